#include "agent/stop_decider.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

StopDecider::StopDecider(EventLoop* loop, std::unique_ptr<RestartProbe> probe,
                         absl::Duration timeout, Actions actions)
    : loop_(loop),
      probe_(std::move(probe)),
      timeout_(timeout),
      actions_(std::move(actions)) {}

StopDecider::~StopDecider() {
  if (timer_) loop_->CancelTimer(*timer_);
  if (thread_.joinable()) thread_.join();
}

void StopDecider::OnStop(const std::string& why, int count) {
  switch (state_) {
    case State::kRunning:
      break;
    case State::kProbing:
      // No time to wait for the answer: a stop, and at once.
      PF_LOG(WARNING) << why << " again before systemd answered: stopping";
      Drain(why);
      actions_.kill_now(why);
      return;
    case State::kDraining:
    case State::kSteppingAside:
      actions_.kill_now(why);
      return;
  }
  if (count > 1) {  // the first request was not ours to decide
    Drain(why);
    actions_.kill_now(why);
    return;
  }
  if (!probe_) {
    Drain(why);
    return;
  }
  state_ = State::kProbing;
  timer_ = loop_->AddTimer(timeout_, [this, why] {
    timer_.reset();
    OnTimeout(why);
  });
  std::weak_ptr<int> alive = alive_;
  RestartProbe* probe = probe_.get();
  EventLoop* loop = loop_;
  absl::Duration timeout = timeout_;
  thread_ = std::thread([this, alive, probe, loop, timeout, why] {
    absl::StatusOr<RestartVerdict> verdict = probe->Probe(timeout);
    loop->Post([this, alive, why, verdict = std::move(verdict)] {
      if (alive.lock()) OnVerdict(why, verdict);
    });
  });
}

void StopDecider::OnStepAside(const std::string& why) {
  if (state_ != State::kRunning) {
    PF_LOG(INFO) << why << ": ignored, already stopping";
    return;
  }
  state_ = State::kSteppingAside;
  actions_.step_aside(why);
}

void StopDecider::OnVerdict(const std::string& why,
                            const absl::StatusOr<RestartVerdict>& verdict) {
  if (state_ != State::kProbing) return;  // timed out or overtaken
  if (timer_) loop_->CancelTimer(*timer_);
  timer_.reset();
  if (!verdict.ok()) {
    PF_LOG(WARNING) << "cannot tell whether systemd is restarting the agent ("
                    << verdict.status().message() << "): taking " << why
                    << " as a stop";
    Drain(why);
    return;
  }
  if (verdict->restarting) {
    state_ = State::kSteppingAside;
    actions_.step_aside(absl::StrCat(why, ": systemd is restarting ",
                                     verdict->unit, " (job ", verdict->job_type,
                                     ")"));
    return;
  }
  if (verdict->unit.empty()) {
    Drain(why);
    return;
  }
  Drain(absl::StrCat(
      why, " (", verdict->unit, ": ",
      verdict->job_type.empty() ? "no job" : verdict->job_type + " job", ")"));
}

void StopDecider::OnTimeout(const std::string& why) {
  if (state_ != State::kProbing) return;
  PF_LOG(WARNING) << "no answer within " << absl::FormatDuration(timeout_)
                  << " to whether systemd is restarting the agent: taking "
                  << why << " as a stop";
  Drain(why);
}

void StopDecider::Drain(const std::string& why) {
  state_ = State::kDraining;
  actions_.drain(why);
}

}  // namespace portfleet
