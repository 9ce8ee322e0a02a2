#include "agent/health_board.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/sdk/base/time.h"

namespace portfleet {
namespace {

std::string StateName(v1::HealthState state) {
  return v1::HealthState_Name(state).substr(sizeof("HEALTH_STATE_") - 1);
}

}  // namespace

AgentHealth ComputeAgentHealth(AgentPhase phase,
                               const std::vector<ListenerHealthView>& views) {
  AgentHealth out;
  for (const ListenerHealthView& v : views) {
    out.listeners.push_back(
        ListenerHealthStatus{.name = v.name,
                             .state = v.state,
                             .reason = v.reason,
                             .healthy_shards = v.healthy_shards,
                             .shards = v.shards});
  }
  if (phase == AgentPhase::kStarting) {
    out.state = v1::HEALTH_STATE_STARTING;
    out.reason = "the agent is starting";
    return out;
  }
  if (phase == AgentPhase::kStopping) {
    out.state = v1::HEALTH_STATE_STOPPING;
    out.reason = "the agent is stopping";
    return out;
  }
  if (phase == AgentPhase::kHandingOver) {
    out.state = v1::HEALTH_STATE_STOPPING;
    out.reason = "the agent is handing its sockets over to a new agent";
    return out;
  }
  // The worst listener decides.
  auto rank = [](v1::HealthState s) {
    switch (s) {
      case v1::HEALTH_STATE_NOT_SERVING:
        return 3;
      case v1::HEALTH_STATE_STARTING:
        return 2;
      case v1::HEALTH_STATE_DEGRADED:
        return 1;
      default:
        return 0;
    }
  };
  out.state = v1::HEALTH_STATE_SERVING;
  std::vector<std::string> why;
  for (const ListenerHealthView& v : views) {
    if (rank(v.state) > rank(out.state)) out.state = v.state;
    if (v.state != v1::HEALTH_STATE_SERVING) {
      why.push_back(absl::StrCat("listener ", v.name, " ", StateName(v.state),
                                 " (", v.healthy_shards, "/", v.shards,
                                 " shards healthy",
                                 v.reason.empty() ? "" : ": ", v.reason, ")"));
    }
  }
  out.reason = absl::StrJoin(why, "; ");
  return out;
}

std::string DescribeHealth(const AgentHealth& health) {
  std::string out = StateName(health.state);
  if (!health.reason.empty()) absl::StrAppend(&out, ": ", health.reason);
  return out;
}

bool HealthBoard::Publish(const AgentHealth& health) {
  std::function<void(const AgentHealth&)> callback;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (published_ && health == health_) return false;
    health_ = health;
    published_ = true;
    callback = on_change_;
  }
  if (callback) callback(health);
  return true;
}

AgentHealth HealthBoard::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return health_;
}

void HealthBoard::OnChange(std::function<void(const AgentHealth&)> callback) {
  std::lock_guard<std::mutex> lock(mu_);
  on_change_ = std::move(callback);
}

void HealthBoard::Beat(absl::Time now) {
  last_beat_ns_.store(absl::ToUnixNanos(now));
}

absl::Status HealthBoard::Live(absl::Time now, absl::Duration max_age) const {
  int64_t last = last_beat_ns_.load();
  if (last == 0)
    return absl::UnavailableError("the event loop has not run yet");
  absl::Duration age = now - absl::FromUnixNanos(last);
  if (age > max_age) {
    return absl::UnavailableError(
        absl::StrCat("the agent's event loop has not run for ",
                     HumanDuration(age), " (wedged)"));
  }
  return absl::OkStatus();
}

}  // namespace portfleet
