#include "agent/fleet/health.h"

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/time.h"

namespace portfleet {

bool StallDetector::Accepted(const ShardSample& sample,
                             const ShardSample& previous) {
  if (sample.reports && previous.reports &&
      sample.accepted_total > previous.accepted_total) {
    return true;
  }
  if (!sample.has_queue || !previous.has_queue) return false;
  if (sample.queue_depth < previous.queue_depth) return true;
  if (sample.has_arrivals && previous.has_arrivals &&
      sample.arrivals >= previous.arrivals) {
    uint64_t arrived = sample.arrivals - previous.arrivals;
    uint64_t grew = sample.queue_depth - previous.queue_depth;
    return arrived > grew;
  }
  return false;
}

std::optional<std::string> StallDetector::Suspect(
    const ShardSample& sample, const std::optional<ShardSample>& previous,
    const HealthParams& params) {
  if (sample.process == ProcessState::kStopped) {
    return absl::StrCat("worker pid ", sample.pid, " is stopped");
  }
  if (sample.reports &&
      sample.time - sample.last_report > params.report_timeout) {
    return absl::StrCat("no load report from worker pid ", sample.pid, " for ",
                        HumanDuration(sample.time - sample.last_report));
  }
  if (sample.has_queue && sample.queue_depth > 0 && previous.has_value() &&
      previous->pid == sample.pid && !Accepted(sample, *previous)) {
    return absl::StrCat(sample.queue_depth,
                        " connection(s) queued and not accepted by worker pid ",
                        sample.pid);
  }
  return std::nullopt;
}

Judgement StallDetector::Observe(const ShardSample& sample,
                                 const HealthParams& params) {
  if (last_ && last_->pid != sample.pid) Reset();
  std::optional<std::string> suspect = Suspect(sample, last_, params);
  last_ = sample;
  if (suspect) {
    clear_since_.reset();
    if (!suspect_since_) suspect_since_ = sample.time;
    if (!stalled_) reason_ = *suspect;
    if (!stalled_ && sample.time - *suspect_since_ >= params.stall_window) {
      stalled_ = true;
      reason_ = absl::StrCat(*suspect, " (for ",
                             HumanDuration(sample.time - *suspect_since_), ")");
    }
  } else {
    suspect_since_.reset();
    if (!clear_since_) clear_since_ = sample.time;
    if (stalled_ && sample.time - *clear_since_ >= params.restore_after) {
      stalled_ = false;
    }
  }
  return Judgement{.stalled = stalled_, .reason = stalled_ ? reason_ : ""};
}

void StallDetector::Reset() {
  last_.reset();
  suspect_since_.reset();
  clear_since_.reset();
  stalled_ = false;
  reason_.clear();
}

}  // namespace portfleet
