// Changing a listener's number of shards. Adding a shard: socket, worker,
// await its readiness, then sockarray and table slots (until then no
// connection is steered to it). Removing shards: the highest indexes leave
// the tables, then drain.
#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "agent/fleet/fleet.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

// One scale-up in flight: the new shards, and how many still have to say
// ready. Callbacks hold it; it ends when every new worker answered.
class ShardAddition : public std::enable_shared_from_this<ShardAddition> {
 public:
  ShardAddition(Fleet* fleet, Listener& listener, Done done)
      : fleet_(fleet), listener_(listener), done_(std::move(done)) {}

  // Creates shards up to `target` live ones and starts their workers.
  absl::Status Begin(uint32_t target) {
    while (listener_.Live().size() < target) {
      uint32_t index = 0;  // lowest free index
      for (const auto& s : listener_.shards) {
        if (s->index == index) index++;
      }
      if (index >= kMaxShards) {
        return Fail(absl::ResourceExhaustedError(
            absl::StrCat("listener ", listener_.spec.name(),
                         ": no free shard index below ", kMaxShards)));
      }
      absl::StatusOr<std::unique_ptr<Shard>> shard =
          fleet_->NewShard(listener_, index);
      if (!shard.ok()) {
        return Fail(
            Annotate(shard.status(), "listener " + listener_.spec.name()));
      }
      Shard* raw = shard->get();
      raw->in_service = false;
      auto pos = std::find_if(
          listener_.shards.begin(), listener_.shards.end(),
          [&](const std::unique_ptr<Shard>& p) { return p->index > index; });
      listener_.shards.insert(pos, std::move(*shard));
      added_.push_back(raw);
      if (absl::Status s = fleet_->supervisor_.Start(listener_, *raw);
          !s.ok()) {
        return Fail(s);
      }
    }
    waiting_ = added_.size();
    std::vector<Shard*> added = added_;  // AwaitReady may call back at once
    for (Shard* shard : added) {
      fleet_->supervisor_.AwaitReady(
          *shard->worker, [self = shared_from_this(), shard](absl::Status s) {
            self->OnReady(shard, std::move(s));
          });
    }
    return absl::OkStatus();
  }

 private:
  void OnReady(Shard* shard, absl::Status status) {
    if (fleet_->ctx_.shutting_down) {
      // The shutdown stops these workers with the rest (and may have removed
      // the listener already).
      if (done_) {
        std::exchange(done_, nullptr)(
            absl::UnavailableError("the agent is shutting down"));
      }
      return;
    }
    if (!status.ok() && error_.ok()) {
      error_ = Annotate(status, listener_.Name(*shard));
    }
    if (--waiting_ > 0) return;
    absl::Status s = error_;
    for (Shard* added : added_) {
      if (!s.ok()) break;
      if (listener_.steering) {
        s = listener_.steering->SetShardSocket(added->index,
                                               added->socket.get());
      }
      added->in_service = true;
    }
    if (s.ok()) s = ApplySteering(listener_);
    if (!s.ok()) {
      done_(Fail(s));
      return;
    }
    listener_.spec.set_shards(static_cast<uint32_t>(listener_.Live().size()));
    PF_LOG(INFO) << "listener " << listener_.spec.name() << ": scaled up to "
                 << listener_.Live().size() << " shards";
    // The new shards hold nothing yet: an auto-rebalancer acts at once.
    fleet_->auto_rebalance_.Kick(listener_.spec.name());
    done_(absl::OkStatus());
  }

  // Takes every new shard away again. None served: the tables were never
  // written with them (a failed write changed nothing).
  absl::Status Fail(const absl::Status& status) {
    std::vector<Shard*> added = std::move(added_);
    for (Shard* shard : added) fleet_->drainer_.Abandon(listener_, *shard);
    return status;
  }

  Fleet* const fleet_;
  Listener& listener_;
  Done done_;
  std::vector<Shard*> added_;
  size_t waiting_ = 0;
  absl::Status error_;
};

absl::Status Fleet::Resize(Listener& listener, uint32_t target, Done done) {
  std::vector<Shard*> live = listener.Live();
  // Another shard count starts from the operator's weights
  // (fleet/rebalance.h).
  if (target != live.size()) {
    listener.rebalance_slots.clear();
    listener.rebalance_spill.clear();
  }
  if (target > live.size()) {
    auto addition =
        std::make_shared<ShardAddition>(this, listener, std::move(done));
    return addition->Begin(target);
  }
  if (target == live.size()) {
    done(absl::OkStatus());
    return absl::OkStatus();
  }
  // Scale down: drain the highest indexes, all at once.
  listener.spec.set_shards(target);
  auto remaining = std::make_shared<size_t>(live.size() - target);
  auto first_error = std::make_shared<absl::Status>();
  std::vector<Shard*> victims(live.begin() + target, live.end());
  for (Shard* shard : victims) shard->state = v1::SHARD_STATE_DRAINING;
  if (absl::Status s = ApplySteering(listener); !s.ok()) PF_LOG(ERROR) << s;
  for (Shard* shard : victims) {
    drainer_.Begin(listener, *shard,
                   [remaining, first_error, done](absl::Status s) {
                     if (!s.ok() && first_error->ok()) *first_error = s;
                     if (--*remaining == 0) done(*first_error);
                   });
  }
  return absl::OkStatus();
}

absl::Status Fleet::ScaleListener(const std::string& name, uint32_t shards,
                                  Done done) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  if (shards == 0 || shards > kMaxShards) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shards: ", shards, " is out of range (1-", kMaxShards, ")"));
  }
  const v1::Steering& steering = listener->spec.steering();
  if (steering.weights_size() > 0 &&
      static_cast<uint32_t>(steering.weights_size()) != shards) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, " has ", steering.weights_size(),
                     " steering weights; set weights for ", shards,
                     " shards with SetSteering first, or clear them"));
  }
  v1::Listener intended = listener->spec;
  intended.set_shards(shards);
  RETURN_IF_ERROR(Commit(name, &intended));
  return Resize(*listener, shards, std::move(done));
}

}  // namespace portfleet
