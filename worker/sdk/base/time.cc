#include "worker/sdk/base/time.h"

#include <cstdint>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace portfleet {
namespace {

class RealClockImpl : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};

}  // namespace

Clock* RealClock() {
  static RealClockImpl* clock = new RealClockImpl();
  return clock;
}

std::string HumanDuration(absl::Duration d) {
  if (d < absl::Seconds(1)) {
    return absl::StrCat(absl::ToInt64Milliseconds(d), "ms");
  }
  return absl::FormatDuration(absl::Trunc(d, absl::Milliseconds(100)));
}

absl::StatusOr<absl::Duration> ParseFlagDuration(absl::string_view text,
                                                 absl::string_view flag) {
  int64_t seconds = 0;
  if (absl::SimpleAtoi(text, &seconds) && seconds >= 0) {
    return absl::Seconds(seconds);
  }
  absl::Duration d;
  if (absl::ParseDuration(text, &d) && d >= absl::ZeroDuration() &&
      d != absl::InfiniteDuration()) {
    return d;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      flag, ": '", text, "' is not a duration (e.g. 30, 30s, 500ms, 2m)"));
}

}  // namespace portfleet
