// Connection hand-off pauses (WorkerLoad.handoff_pauses in control.proto):
// the sender stamps a released connection with its CLOCK_MONOTONIC
// (HandOffConnection.released_mono_ns), the receiver counts the time until
// the connection is in its own event loop. AgentLink does both for a worker
// that uses its hand-off calls; these are the pieces, also for the agent.
#ifndef PORTFLEET_WORKER_SDK_HANDOFF_PAUSES_H_
#define PORTFLEET_WORKER_SDK_HANDOFF_PAUSES_H_

#include <cstdint>
#include <optional>

#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/duration_histogram.h"

namespace portfleet {

// CLOCK_MONOTONIC in nanoseconds (never 0 on a running system).
uint64_t MonotonicNowNs();

// The pause of a connection released at `released_mono_ns` and adopted at
// `adopted_mono_ns`; nullopt when the sender did not stamp it (0) or the
// stamp is later than the adoption (no such clock exists on one host; a
// stamp that is not one).
std::optional<uint64_t> HandOffPauseNs(uint64_t released_mono_ns,
                                       uint64_t adopted_mono_ns);

// The histogram as its message: non-empty buckets ascending, count and sum.
// With `upper_bounds`, each bucket also says its upper bound (the agent's
// API does).
void HistogramToProto(const DurationHistogram& histogram,
                      v1::DurationHistogram* out, bool upper_bounds = false);
// The message as a histogram: buckets with an index beyond the scheme are
// ignored, the count is the sum of the buckets' (whatever `count` says).
DurationHistogram HistogramFromProto(const v1::DurationHistogram& message);

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_HANDOFF_PAUSES_H_
