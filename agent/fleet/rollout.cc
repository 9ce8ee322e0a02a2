#include "agent/fleet/rollout.h"

#include <signal.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

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
  const uint32_t number = ++listener.rollouts_started;
  record_.set_id(absl::StrCat(listener.spec.name(), "/", number));
  record_.set_listener(listener.spec.name());
  record_.set_number(number);
  *record_.mutable_worker() = target_.spec;
  *record_.mutable_previous_worker() = previous_.spec;
  record_.set_max_surge(max_surge_);
  record_.set_shards(static_cast<uint32_t>(order_.size()));
  record_.set_start_time_unix_micros(absl::ToUnixMicros(absl::Now()));
}

v1::RollOut Rollout::Record() const {
  v1::RollOut out = record_;
  if (out.state() == v1::ROLL_OUT_STATE_UNSPECIFIED) {
    out.set_state(phase_ == Phase::kRollingBack
                      ? v1::ROLL_OUT_STATE_ROLLING_BACK
                  : paused_ ? v1::ROLL_OUT_STATE_PAUSED
                            : v1::ROLL_OUT_STATE_ROLLING);
    out.set_shards_rolled(static_cast<uint32_t>(rolled_.size()));
    if (!error_.ok()) out.set_message(std::string(error_.message()));
  }
  return out;
}

void Rollout::Start() {
  PF_LOG(INFO) << "listener " << listener_.spec.name() << ": rolling out '"
               << target_.spec.command() << "' to " << order_.size()
               << " shard(s), " << max_surge_ << " at a time";
  ctx_->Emit(v1::EVENT_TYPE_ROLLOUT_STARTED, listener_, -1, 0,
             absl::StrCat(record_.id(), record_.undo() ? " (undo)" : "",
                          ": rolling out '", target_.spec.command(), "' to ",
                          order_.size(), " shard(s)"));
  Pump();
}

void Rollout::Pause() {
  if (phase_ != Phase::kRolling || paused_) return;
  paused_ = true;
  PF_LOG(INFO) << "listener " << listener_.spec.name() << ": rollout "
               << record_.id() << " paused";
  ctx_->Emit(v1::EVENT_TYPE_ROLLOUT_PAUSED, listener_, -1, 0,
             absl::StrCat(record_.id(), ": paused after ", rolled_.size(),
                          " of ", order_.size(), " shard(s)"));
}

void Rollout::Resume() {
  if (phase_ != Phase::kRolling || !paused_) return;
  paused_ = false;
  PF_LOG(INFO) << "listener " << listener_.spec.name() << ": rollout "
               << record_.id() << " resumed";
  ctx_->Emit(v1::EVENT_TYPE_ROLLOUT_RESUMED, listener_, -1, 0,
             absl::StrCat(record_.id(), ": resumed"));
  // The loop, not the caller's stack, goes on with it.
  ctx_->loop->Post([self = shared_from_this()] { self->Pump(); });
}

void Rollout::Undo() {
  if (phase_ != Phase::kRolling) return;
  PF_LOG(WARNING) << "listener " << listener_.spec.name() << ": rollout "
                  << record_.id() << " undone; rolling back " << rolled_.size()
                  << " shard(s)";
  paused_ = false;
  error_ = absl::AbortedError(
      absl::StrCat("rollout ", record_.id(), " undone by request"));
  phase_ = Phase::kRollingBack;
  // New workers not ready yet are not waited for: stopped, their shards end
  // as not rolled (the old workers never stopped serving).
  for (const auto& shard : listener_.shards) {
    if (shard->candidate) supervisor_->Signal(*shard->candidate, SIGKILL);
  }
  if (in_flight_ == 0) {
    ctx_->loop->Post([self = shared_from_this()] { self->RollBackNext(); });
  }
}

void Rollout::Pump() {
  while (phase_ == Phase::kRolling && !paused_ && in_flight_ < max_surge_ &&
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
    Finish(absl::OkStatus(), v1::ROLL_OUT_STATE_SUCCEEDED);
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
    Finish(error_, v1::ROLL_OUT_STATE_ROLLED_BACK);
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
  Finish(std::move(why), v1::ROLL_OUT_STATE_ABORTED);
}

void Rollout::Finish(absl::Status status, v1::RollOutState state) {
  phase_ = Phase::kDone;
  // The callbacks in flight hold their own reference.
  std::shared_ptr<Rollout> self = shared_from_this();
  if (listener_.rollout.get() == this) listener_.rollout.reset();
  record_.set_state(state);
  record_.set_shards_rolled(
      state == v1::ROLL_OUT_STATE_SUCCEEDED ? record_.shards() : 0);
  if (state == v1::ROLL_OUT_STATE_ABORTED) {
    record_.set_shards_rolled(static_cast<uint32_t>(rolled_.size()));
  }
  record_.set_message(std::string(status.message()));
  record_.set_end_time_unix_micros(absl::ToUnixMicros(absl::Now()));
  listener_.rollout_history.push_front(record_);
  while (listener_.rollout_history.size() > kRollOutHistory) {
    listener_.rollout_history.pop_back();
  }
  ctx_->Emit(state == v1::ROLL_OUT_STATE_SUCCEEDED
                 ? v1::EVENT_TYPE_ROLLOUT_SUCCEEDED
             : state == v1::ROLL_OUT_STATE_ROLLED_BACK
                 ? v1::EVENT_TYPE_ROLLOUT_ROLLED_BACK
                 : v1::EVENT_TYPE_ROLLOUT_ABORTED,
             listener_, -1, 0,
             status.ok() ? record_.id()
                         : absl::StrCat(record_.id(), ": ", status.message()));
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
  // An old worker without a control channel is asked to stop with SIGTERM
  // only; a server that ignores it (a pre-fork child that does not check)
  // would go on taking new connections from a shared socket until the drain
  // timeout SIGKILLs it, connections in hand included. With BPF steering its
  // successor gets a socket of its own instead: when the successor is ready,
  // the shard's slot names the new socket and the old one is shut down (its
  // queue migrates), so the old version gets no new connection after that.
  Fd own_socket;
  const Worker* serving = shard.worker.get();
  if (!IsSelfBound(program.spec) && listener.steering != nullptr &&
      serving != nullptr && !serving->hello && !serving->self_bound &&
      shard.socket.valid()) {
    absl::StatusOr<Fd> socket = CreateListenerSocket(listener);
    if (!socket.ok()) {
      done(Annotate(
          socket.status(),
          absl::StrCat(listener.Name(shard), ": socket for the new worker")));
      return;
    }
    own_socket = std::move(*socket);
  }
  absl::StatusOr<std::unique_ptr<Worker>> candidate =
      supervisor->Launch(listener, shard, program, std::move(own_socket));
  if (!candidate.ok()) {
    done(candidate.status());
    return;
  }
  shard.candidate = std::move(*candidate);
  Worker* c = shard.candidate.get();
  std::string where;
  if (c->self_bound) {
    where = " (it binds its own socket)";
  } else if (c->found_socket.valid()) {
    where = absl::StrCat(
        " on its own socket inode ", c->found_inode,
        " (the old worker has no control channel: its socket inode ",
        shard.inode, " is shut down once the new one is ready)");
  } else {
    where = absl::StrCat(" on socket inode ", shard.inode);
  }
  PF_LOG(INFO) << listener.Name(shard) << ": new worker pid " << c->process.pid
               << " started beside pid " << (serving ? serving->process.pid : 0)
               << where << "; waiting for it to be ready";
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
    // A self-bound worker's socket, or the one opened for it above,
    // replaces the old one.
    supervisor->SwapInCandidateSocket(*l, *s, *fresh);
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
