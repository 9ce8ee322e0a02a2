// Which connections a worker releases for a HandOffRequest (control.proto):
// the choice every hand-off capable worker makes, kept here so that a C++
// worker that opts in (WorkerIdentity.handoff) makes it the same way. The
// worker decides what is releasable (nothing in flight); this picks among
// those.
#ifndef PORTFLEET_WORKER_SDK_HANDOFF_CHOICE_H_
#define PORTFLEET_WORKER_SDK_HANDOFF_CHOICE_H_

#include <cstdint>
#include <vector>

namespace portfleet {

// A releasable connection, by the worker's key for it (e.g. its fd), with
// its recent traffic in bytes (in + out) per second.
struct HandOffCandidate {
  int key = -1;
  double bytes_per_second = 0;
};

struct HandOffChoice {
  std::vector<int> keys;        // to release, in order
  double bytes_per_second = 0;  // their traffic, summed
};

// By count (`bytes_per_second` == 0): the first `count` candidates. By bytes
// (`bytes_per_second` > 0, the traffic the agent wants moved): the busiest
// first, each taken only if its rate is at most twice what remains of the
// budget (so each move narrows the gap between the hot and the cold worker,
// never overshoots it), until the budget is spent or `count` are taken;
// candidates with less than kMinShareOfBudget of the budget (idle ones
// included) are not taken: a crowd of small connections is left alone.
inline constexpr double kMinShareOfBudget = 0.05;

HandOffChoice ChooseForHandOff(std::vector<HandOffCandidate> candidates,
                               uint32_t count, uint64_t bytes_per_second);

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_HANDOFF_CHOICE_H_
