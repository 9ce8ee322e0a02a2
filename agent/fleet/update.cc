#include "agent/fleet/update.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/fleet.h"
#include "agent/fleet/rollout.h"
#include "agent/fleet/selfbound.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "google/protobuf/util/message_differencer.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

using google::protobuf::util::MessageDifferencer;

std::string SteeringText(const v1::Steering& s) {
  std::string out = v1::SteeringPolicy_Name(
      s.policy() == v1::STEERING_POLICY_UNSPECIFIED ? v1::STEERING_POLICY_HASH
                                                    : s.policy());
  if (s.weights_size() > 0) {
    absl::StrAppend(&out, " weights ", absl::StrJoin(s.weights(), ","));
  }
  return out;
}

std::string WorkerText(const v1::WorkerSpec& w) {
  std::string out = w.command();
  for (const std::string& a : w.args()) absl::StrAppend(&out, " ", a);
  return out;
}

// The health settings of `from` into `to`, absent if absent (the persisted
// state stays as it was written).
void CopyHealth(const v1::Listener& from, v1::Listener& to) {
  if (from.has_health()) {
    *to.mutable_health() = from.health();
  } else {
    to.clear_health();
  }
}

// The same for the rebalance block.
void CopyRebalance(const v1::Listener& from, v1::Listener& to) {
  if (from.has_rebalance()) {
    *to.mutable_rebalance() = from.rebalance();
  } else {
    to.clear_rebalance();
  }
}

}  // namespace

std::vector<std::string> ListenerUpdate::Changes() const {
  std::vector<std::string> out;
  if (drain_timeout) {
    out.push_back(absl::StrCat(
        "drain_timeout_seconds: ", EffectiveDrainTimeoutSeconds(from), " -> ",
        EffectiveDrainTimeoutSeconds(to)));
  }
  if (backlog) {
    out.push_back(absl::StrCat("backlog: ", EffectiveBacklog(from), " -> ",
                               EffectiveBacklog(to)));
  }
  if (defer_accept) {
    out.push_back(
        absl::StrCat("defer_accept_seconds: ", from.defer_accept_seconds(),
                     " -> ", to.defer_accept_seconds()));
  }
  if (health) {
    out.push_back(absl::StrCat("health: stall window ",
                               EffectiveStallWindowMs(from), "ms -> ",
                               EffectiveStallWindowMs(to), "ms, stall grace ",
                               EffectiveStallGraceSeconds(from), "s -> ",
                               EffectiveStallGraceSeconds(to), "s"));
  }
  if (rebalance) {
    out.push_back(absl::StrCat("rebalance: ", DescribeRebalance(from), " -> ",
                               DescribeRebalance(to)));
  }
  if (steering) {
    out.push_back(absl::StrCat("steering: ", SteeringText(from.steering()),
                               " -> ", SteeringText(*steering)));
  }
  if (shards) {
    out.push_back(absl::StrCat("shards: ", from.shards(), " -> ", *shards));
  }
  if (worker) {
    out.push_back(absl::StrCat("worker: '", WorkerText(from.worker()), "' -> '",
                               WorkerText(worker->spec),
                               "' (rolled out shard by shard)"));
  }
  return out;
}

absl::StatusOr<ListenerUpdate> PlanUpdate(const Listener& listener,
                                          const v1::Listener& desired,
                                          const FleetContext& ctx) {
  RETURN_IF_ERROR(ValidateListener(desired));
  const std::string& name = listener.spec.name();
  if (*SocketAddress::Parse(desired.address()) != listener.address) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, ": address cannot change (",
                     listener.address.ToString(), " -> ", desired.address(),
                     "); delete the listener and create it again"));
  }
  ListenerUpdate u;
  u.from = listener.spec;
  u.from.set_shards(static_cast<uint32_t>(listener.Live().size()));
  u.to = desired;
  u.to.set_shards(
      EffectiveShards(desired, static_cast<int>(ctx.options.cpus.size())));
  u.drain_timeout = EffectiveDrainTimeoutSeconds(u.to) !=
                    EffectiveDrainTimeoutSeconds(u.from);
  u.backlog = EffectiveBacklog(u.to) != EffectiveBacklog(u.from);
  u.defer_accept = u.to.defer_accept_seconds() != u.from.defer_accept_seconds();
  u.health =
      EffectiveStallWindowMs(u.to) != EffectiveStallWindowMs(u.from) ||
      EffectiveStallGraceSeconds(u.to) != EffectiveStallGraceSeconds(u.from);
  u.rebalance =
      !MessageDifferencer::Equivalent(u.to.rebalance(), u.from.rebalance());
  if (u.to.shards() != u.from.shards()) u.shards = u.to.shards();
  if (!MessageDifferencer::Equivalent(u.to.steering(), u.from.steering())) {
    if (listener.steering == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("listener ", name,
                       ": steering cannot change: BPF steering is "
                       "unavailable on this host (",
                       ctx.steering_reason, ")"));
    }
    u.steering = u.to.steering();
  }
  if (!MessageDifferencer::Equivalent(u.to.worker(), u.from.worker())) {
    RETURN_IF_ERROR(
        CheckRollOutSocketMode(name, u.from.worker(), u.to.worker()));
    if (listener.rollout) {
      return absl::FailedPreconditionError(absl::StrCat(
          "listener ", name, ": a rollout is already in progress"));
    }
    absl::StatusOr<ResolvedWorker> worker =
        ResolveWorker(u.to.worker(), ctx.options.worker_allowlist);
    if (!worker.ok()) {
      if (absl::IsPermissionDenied(worker.status())) return worker.status();
      return absl::InvalidArgumentError(worker.status().message());
    }
    u.worker = std::move(*worker);
  }
  return u;
}

// One UpdateListener in flight, step by step (see update.h for the order).
// Callbacks hold it; every continuation first checks that the fleet is not
// stopping (then the listener may be gone and nothing is undone).
class UpdateRun : public std::enable_shared_from_this<UpdateRun> {
 public:
  UpdateRun(Fleet* fleet, Listener& listener, ListenerUpdate update, Done done)
      : fleet_(fleet),
        listener_(listener),
        u_(std::move(update)),
        done_(std::move(done)),
        live_(static_cast<uint32_t>(listener.Live().size())),
        target_(u_.shards.value_or(live_)) {}

  // Runs the synchronous steps; an error means nothing was changed and
  // `done` will not be called.
  absl::Status Start() {
    PF_LOG(INFO) << "listener " << listener_.spec.name()
                 << ": updating: " << absl::StrJoin(u_.Changes(), "; ");
    RETURN_IF_ERROR(ApplySettings());
    if (u_.steering) {
      if (absl::Status s = fleet_->ChangeSteering(listener_, *u_.steering);
          !s.ok()) {
        UndoSettings();
        return s;
      }
    }
    if (target_ > live_) {
      absl::Status s = fleet_->Resize(
          listener_, target_,
          [self = shared_from_this()](absl::Status s) { self->Roll(s); });
      if (!s.ok()) {
        UndoSteering();
        UndoSettings();
      }
      return s;
    }
    Roll(absl::OkStatus());
    return absl::OkStatus();
  }

 private:
  bool stopping() const { return fleet_->ctx_.shutting_down; }

  // Drain timeout, backlog and TCP_DEFER_ACCEPT.
  absl::Status ApplySettings() {
    RETURN_IF_ERROR(ApplySocketSettings(u_.to, u_.from));
    listener_.spec.set_drain_timeout_seconds(u_.to.drain_timeout_seconds());
    CopyHealth(u_.to, listener_.spec);
    CopyRebalance(u_.to, listener_.spec);
    listener_.spec.set_backlog(u_.to.backlog());
    listener_.spec.set_defer_accept_seconds(u_.to.defer_accept_seconds());
    return absl::OkStatus();
  }
  void UndoSettings() {
    ApplySocketSettings(u_.from, u_.to).IgnoreError();
    listener_.spec.set_drain_timeout_seconds(u_.from.drain_timeout_seconds());
    CopyHealth(u_.from, listener_.spec);
    CopyRebalance(u_.from, listener_.spec);
    listener_.spec.set_backlog(u_.from.backlog());
    listener_.spec.set_defer_accept_seconds(u_.from.defer_accept_seconds());
  }
  // The socket settings of `want` on every shard socket; on a failure the
  // sockets already changed go back to `was`.
  absl::Status ApplySocketSettings(const v1::Listener& want,
                                   const v1::Listener& was) {
    // A self-bound worker's socket is its own: its settings are not ours.
    if (IsSelfBound(listener_.program.spec)) return absl::OkStatus();
    for (size_t i = 0; i < listener_.shards.size(); ++i) {
      absl::Status s =
          SetSocketSettings(listener_.shards[i]->socket.get(), want);
      if (s.ok()) continue;
      for (size_t j = 0; j <= i; ++j) {
        SetSocketSettings(listener_.shards[j]->socket.get(), was).IgnoreError();
      }
      return Annotate(s, listener_.Name(*listener_.shards[i]));
    }
    return absl::OkStatus();
  }
  absl::Status SetSocketSettings(int fd, const v1::Listener& l) {
    if (u_.backlog) {
      RETURN_IF_ERROR(
          SetListenBacklog(fd, static_cast<int>(EffectiveBacklog(l))));
    }
    if (u_.defer_accept) {
      RETURN_IF_ERROR(
          SetDeferAccept(fd, static_cast<int>(l.defer_accept_seconds())));
    }
    return absl::OkStatus();
  }
  void UndoSteering() {
    if (!u_.steering) return;
    absl::Status s = fleet_->ChangeSteering(listener_, u_.from.steering());
    if (!s.ok()) {
      PF_LOG(ERROR) << "listener " << listener_.spec.name()
                    << ": putting the steering back: " << s;
    }
  }

  // After the shards were added (if any): the rollout.
  void Roll(absl::Status grown) {
    if (!grown.ok() || stopping()) return Finish(std::move(grown));
    grew_ = target_ > live_;
    if (!u_.worker) return Shrink();
    auto rollout = std::make_shared<Rollout>(
        &fleet_->ctx_, &fleet_->supervisor_, listener_, *u_.worker, 1,
        [self = shared_from_this()](absl::Status s) {
          if (!s.ok() || self->stopping()) return self->Finish(std::move(s));
          self->Shrink();
        });
    listener_.rollout = rollout;
    rollout->Start();
  }

  void Shrink() {
    if (target_ >= live_) return Finish(absl::OkStatus());
    absl::Status s = fleet_->Resize(
        listener_, target_,
        [self = shared_from_this()](absl::Status s) { self->Finish(s); });
    if (!s.ok()) Finish(s);
  }

  void Finish(absl::Status s) {
    if (!s.ok() && !stopping()) {
      // Added shards drain away again; then steering and settings go back.
      if (grew_)
        fleet_->Resize(listener_, live_, [](absl::Status) {}).IgnoreError();
      UndoSteering();
      UndoSettings();
    }
    done_(std::move(s));
  }

  Fleet* const fleet_;
  Listener& listener_;
  const ListenerUpdate u_;
  Done done_;
  const uint32_t live_;    // live shards before
  const uint32_t target_;  // live shards after
  bool grew_ = false;
};

absl::Status Fleet::ApplyUpdate(Listener& listener, ListenerUpdate update,
                                Done done) {
  auto run = std::make_shared<UpdateRun>(this, listener, std::move(update),
                                         std::move(done));
  return run->Start();
}

}  // namespace portfleet
