// Shard health policy: from a stream of observations of one shard to "is it
// stalled", with hysteresis. Pure: no syscalls, no clock of its own, so that
// it is unit tested with plain samples.
//
// A sample is *suspect* when
//   - the worker process is stopped (SIGSTOP, a debugger), or
//   - the worker sends load reports but none came for `report_timeout`, or
//   - connections wait in the shard's accept queue and none was accepted
//     since the previous sample: the queue did not shrink, the worker's
//     accepted counter did not advance, and (with the steering program's
//     counters) no more connections arrived than the queue grew by.
// The shard becomes *stalled* once every sample over `stall_window` was
// suspect, and healthy again once none was for `restore_after`.
//
// What it cannot see: a worker that accepts connections and never answers
// them keeps its queue empty and its counters moving; only a client (or an
// application-level probe) notices that. See README, "Shard health".
#ifndef PORTFLEET_AGENT_FLEET_HEALTH_H_
#define PORTFLEET_AGENT_FLEET_HEALTH_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "absl/time/time.h"

namespace portfleet {

enum class ProcessState {
  kUnknown,  // not read (no /proc entry yet, or not our business)
  kRunning,  // running or sleeping
  kStopped,  // stopped by a signal or traced
  kZombie,   // exited, not reaped yet
};

// One observation of a shard, from every source the agent has.
struct ShardSample {
  absl::Time time;
  pid_t pid = 0;  // the serving worker
  // /proc/PID/stat.
  ProcessState process = ProcessState::kUnknown;
  uint64_t cpu_ticks = 0;  // utime + stime
  // TCP_INFO of the agent's copy of the shard socket.
  bool has_queue = false;
  uint32_t queue_depth = 0;
  uint32_t backlog = 0;
  // The steering program's counters: connections steered or migrated to
  // the shard so far (selected + migrated).
  bool has_arrivals = false;
  uint64_t arrivals = 0;
  // The worker's load reports (portfleet-aware workers only).
  bool reports = false;  // it has sent at least one
  uint64_t accepted_total = 0;
  absl::Time last_report;
};

struct HealthParams {
  // Suspect this long -> stalled.
  absl::Duration stall_window = absl::Milliseconds(600);
  // No load report this long from a worker that sends them -> suspect.
  absl::Duration report_timeout = absl::Seconds(3);
  // Not suspect this long -> healthy again.
  absl::Duration restore_after = absl::Seconds(1);
};

struct Judgement {
  bool stalled = false;
  // Why the shard is (or was last) suspect: "worker pid 12 is stopped".
  std::string reason;
};

// Per shard, per worker: Reset() when the serving worker changes.
class StallDetector {
 public:
  Judgement Observe(const ShardSample& sample, const HealthParams& params);
  void Reset();
  bool stalled() const { return stalled_; }
  // The previous sample, if any.
  const std::optional<ShardSample>& last() const { return last_; }

  // Why `sample` is suspect after `previous` (nullopt: it is not). Public
  // for tests.
  static std::optional<std::string> Suspect(
      const ShardSample& sample, const std::optional<ShardSample>& previous,
      const HealthParams& params);
  // The worker accepted something between `previous` and `sample`.
  static bool Accepted(const ShardSample& sample, const ShardSample& previous);

 private:
  std::optional<ShardSample> last_;
  std::optional<absl::Time> suspect_since_;
  std::optional<absl::Time> clear_since_;
  bool stalled_ = false;
  std::string reason_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_HEALTH_H_
