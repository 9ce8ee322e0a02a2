#include "agent/fleet/rollout.h"

#include <signal.h>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

Rollout::Rollout(FleetContext* ctx, Supervisor* supervisor, Listener& listener,
                 ResolvedWorker target, uint32_t max_surge, Done done)
    : ctx_(ctx),
      supervisor_(supervisor),
      listener_(listener),
      target_(std::move(target)),
      previous_(listener.program),
      max_surge_(max_surge == 0 ? 1 : max_surge),
      done_(std::move(done)) {
  for (Shard* s : listener.Live()) order_.push_back(s->index);
}

void Rollout::Start() {
  PF_LOG(INFO) << "listener " << listener_.spec.name() << ": rolling out '"
               << target_.spec.command() << "' to " << order_.size()
               << " shard(s), " << max_surge_ << " at a time";
  Pump();
}

void Rollout::Pump() {
  while (phase_ == Phase::kRolling && in_flight_ < max_surge_ &&
         next_ < order_.size()) {
    uint32_t index = order_[next_++];
    Shard* shard = listener_.Find(index);
    if (shard == nullptr || shard->draining()) continue;  // drained meanwhile
    in_flight_++;
    RollShard(ctx_, supervisor_, listener_, *shard, target_,
              [self = shared_from_this(), index](absl::Status s) {
                self->OnShardDone(index, std::move(s));
              });
  }
  if (phase_ == Phase::kRolling && in_flight_ == 0 && next_ >= order_.size()) {
    listener_.program = target_;
    *listener_.spec.mutable_worker() = target_.spec;
    PF_LOG(INFO) << "listener " << listener_.spec.name()
                 << ": rollout complete";
    Finish(absl::OkStatus());
  }
}

void Rollout::OnShardDone(uint32_t index, absl::Status status) {
  in_flight_--;
  if (phase_ == Phase::kDone) return;  // aborted
  if (status.ok()) {
    rolled_.push_back(index);
  } else if (error_.ok()) {
    error_ = status;
    phase_ = Phase::kRollingBack;
  }
  if (phase_ == Phase::kRolling) {
    Pump();
  } else if (in_flight_ == 0) {
    RollBackNext();
  }
}

void Rollout::RollBackNext() {
  if (phase_ != Phase::kRollingBack) return;
  if (rolled_.empty()) {
    PF_LOG(ERROR) << "listener " << listener_.spec.name()
                  << ": rollout failed: " << error_.message();
    Finish(error_);
    return;
  }
  uint32_t index = rolled_.back();
  rolled_.pop_back();
  Shard* shard = listener_.Find(index);
  if (shard == nullptr || shard->draining()) {
    RollBackNext();
    return;
  }
  PF_LOG(WARNING) << listener_.Name(*shard) << ": rolling back to '"
                  << previous_.spec.command() << "'";
  RollShard(ctx_, supervisor_, listener_, *shard, previous_,
            [self = shared_from_this(), index](absl::Status s) {
              if (!s.ok()) {
                PF_LOG(ERROR)
                    << "listener " << self->listener_.spec.name() << " shard "
                    << index << ": rollback failed: " << s.message();
              }
              self->RollBackNext();
            });
}

void Rollout::Abort(absl::Status why) {
  if (phase_ == Phase::kDone) return;
  PF_LOG(WARNING) << "listener " << listener_.spec.name()
                  << ": rollout stopped: " << why.message();
  Finish(std::move(why));
}

void Rollout::Finish(absl::Status status) {
  phase_ = Phase::kDone;
  // The callbacks in flight hold their own reference.
  std::shared_ptr<Rollout> self = shared_from_this();
  if (listener_.rollout.get() == this) listener_.rollout.reset();
  if (done_) std::exchange(done_, nullptr)(std::move(status));
}

void Rollout::RollShard(FleetContext* ctx, Supervisor* supervisor,
                        Listener& listener, Shard& shard,
                        const ResolvedWorker& program, Done done) {
  if (shard.candidate) {
    done(absl::FailedPreconditionError(absl::StrCat(
        listener.Name(shard), ": a rollout is already in progress")));
    return;
  }
  absl::StatusOr<std::unique_ptr<Worker>> candidate =
      supervisor->Launch(listener, shard, program);
  if (!candidate.ok()) {
    done(candidate.status());
    return;
  }
  shard.candidate = std::move(*candidate);
  Worker* c = shard.candidate.get();
  PF_LOG(INFO) << listener.Name(shard) << ": new worker pid " << c->process.pid
               << " started beside pid "
               << (shard.worker ? shard.worker->process.pid : 0)
               << " on socket inode " << shard.inode
               << "; waiting for it to be ready";
  Listener* l = &listener;
  Shard* s = &shard;
  supervisor->AwaitReady(*c, [ctx, supervisor, l, s, c, program,
                              done = std::move(done)](absl::Status ready) {
    if (!ready.ok()) {
      // The old worker never stopped serving; stop the candidate (its exit
      // is reaped by the supervisor) unless it is gone already.
      if (s->candidate.get() == c) supervisor->Signal(*c, SIGKILL);
      done(absl::FailedPreconditionError(
          absl::StrCat(l->Name(*s), ": ", ready.message(),
                       "; rolled back, the old worker keeps serving")));
      return;
    }
    std::unique_ptr<Worker> fresh = std::move(s->candidate);
    for (EventLoop::TimerId t : fresh->timers) ctx->loop->CancelTimer(t);
    fresh->timers.clear();
    std::unique_ptr<Worker> old = std::move(s->worker);
    supervisor->CancelRestart(*s);
    pid_t pid = fresh->process.pid;
    s->worker = std::move(fresh);
    s->program = program;
    s->state = v1::SHARD_STATE_RUNNING;
    s->backoff = ctx->options.restart_backoff_initial;
    PF_LOG(INFO) << l->Name(*s) << ": new worker pid " << pid
                 << " ready and serving"
                 << (old ? absl::StrCat("; draining old worker pid ",
                                        old->process.pid)
                         : std::string());
    ctx->Emit(v1::EVENT_TYPE_SHARD_STARTED, *l, s->index, pid, "rolled out");
    supervisor->Retire(*l, *s, std::move(old));
    done(absl::OkStatus());
  });
}

}  // namespace portfleet
