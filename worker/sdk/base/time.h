// Clocks and durations: the clock seam that timers and uptimes read (a test
// injects a manual clock), and the duration text every program accepts and
// prints.
#ifndef PORTFLEET_WORKER_SDK_BASE_TIME_H_
#define PORTFLEET_WORKER_SDK_BASE_TIME_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace portfleet {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// absl::Now(). The returned clock lives forever.
Clock* RealClock();

// A clock that only moves when told to (tests).
class ManualClock : public Clock {
 public:
  explicit ManualClock(absl::Time start = absl::UnixEpoch() + absl::Hours(1))
      : now_(start) {}
  absl::Time Now() const override { return now_; }
  void Advance(absl::Duration d) { now_ += d; }

 private:
  absl::Time now_;
};

// "250ms" below a second, else absl's format truncated to 100 ms ("1.5s",
// "2m30s").
std::string HumanDuration(absl::Duration d);

// A duration as operators write it: a bare number of seconds ("30") or an
// absl duration ("30s", "500ms", "2m"). Negative and infinite durations are
// refused; `flag` names the option in the InvalidArgument message.
absl::StatusOr<absl::Duration> ParseFlagDuration(absl::string_view text,
                                                 absl::string_view flag);

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_BASE_TIME_H_
