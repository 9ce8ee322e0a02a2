// Listeners that could not be started: at start-up (or after a takeover) a
// listener whose worker binary is gone, whose address is taken or whose
// pinned maps are damaged must not take the healthy ones down. It is
// reported (log, event, ListenerState.error, /readyz) and retried with
// backoff; the API can fix it (UpdateListener) or delete it. Its workers
// that reconnected keep serving meanwhile and are adopted by the retry that
// succeeds.
#include "absl/strings/str_cat.h"
#include "agent/fleet/fleet.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/time.h"

namespace portfleet {

void Fleet::RecordFailure(const v1::Listener& spec, absl::Status error) {
  const std::string& name = spec.name();
  FailedListener& f = failed_[name];
  f.spec = spec;
  f.error = std::move(error);
  f.attempts++;
  f.backoff = f.attempts == 1
                  ? ctx_.options.failed_retry_initial
                  : std::min(f.backoff * 2, ctx_.options.failed_retry_max);
  PF_LOG(ERROR) << "listener " << name
                << " is not serving: " << f.error.message() << " (attempt "
                << f.attempts << "; retrying in " << HumanDuration(f.backoff)
                << "; the other listeners serve)";
  ctx_.Emit(v1::EVENT_TYPE_ERROR, name, -1, 0,
            absl::StrCat("not serving: ", f.error.message()));
  if (f.timer) ctx_.loop->CancelTimer(*f.timer);
  f.timer = ctx_.loop->AddTimer(f.backoff, [this, name] {
    auto it = failed_.find(name);
    if (it == failed_.end()) return;
    it->second.timer.reset();
    RetryFailed(name);
  });
}

void Fleet::RetryFailed(const std::string& name) {
  auto it = failed_.find(name);
  if (it == failed_.end() || ctx_.shutting_down) return;
  v1::Listener spec = it->second.spec;
  int attempts = it->second.attempts;
  // Out of the way while it is added (name and address checks).
  FailedListener failed = std::move(it->second);
  failed_.erase(it);
  starting_ = true;
  absl::Status s = AddListener(spec);
  starting_ = false;
  if (s.ok()) {
    PF_LOG(INFO) << "listener " << name << ": serving after " << attempts + 1
                 << " attempts";
    ctx_.Emit(v1::EVENT_TYPE_LISTENER_CREATED, name, -1, 0,
              "serving after a failed start");
    return;
  }
  failed_[name] = std::move(failed);
  RecordFailure(spec, std::move(s));
}

void Fleet::ForgetFailure(const std::string& name) {
  auto it = failed_.find(name);
  if (it == failed_.end()) return;
  if (it->second.timer) ctx_.loop->CancelTimer(*it->second.timer);
  failed_.erase(it);
}

absl::Status Fleet::NotServing(const std::string& name) const {
  const FailedListener& f = failed_.at(name);
  return absl::FailedPreconditionError(
      absl::StrCat("listener ", name, " is not serving (", f.error.message(),
                   "); apply a corrected spec or delete it"));
}

absl::Status Fleet::UpdateFailed(const v1::Listener& spec, Done done) {
  const std::string& name = spec.name();
  RETURN_IF_ERROR(ValidateListener(spec));
  FailedListener& f = failed_.at(name);
  RETURN_IF_ERROR(Commit(name, &spec));
  // Try the corrected spec now: it serves, or the call fails and the old
  // spec stays (and is retried) as it was.
  v1::Listener old = f.spec;
  FailedListener kept = std::move(f);
  failed_.erase(name);
  absl::Status s = AddListener(spec);
  if (s.ok()) {
    if (kept.timer) ctx_.loop->CancelTimer(*kept.timer);
    PF_LOG(INFO) << "listener " << name << ": serving with the updated spec";
    done(absl::OkStatus());
    return absl::OkStatus();
  }
  failed_[name] = std::move(kept);
  return s;
}

absl::Status Fleet::DeleteFailed(const std::string& name, Done done) {
  RETURN_IF_ERROR(Commit(name, nullptr));
  ForgetFailure(name);
  PF_LOG(INFO) << "listener " << name << ": deleted (it was not serving)";
  done(absl::OkStatus());
  return absl::OkStatus();
}

}  // namespace portfleet
