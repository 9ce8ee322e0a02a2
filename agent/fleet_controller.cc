#include "agent/fleet_controller.h"

#include <chrono>
#include <future>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/spec/plan.h"
#include "agent/spec/spec.h"
#include "google/protobuf/util/message_differencer.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

absl::Status ShuttingDown() {
  return absl::UnavailableError("the agent is shutting down");
}

// Wraps `done` so that a success also publishes `event` (loop thread).
MutationCall Announce(MutationCall call, LoopFleetController* controller,
                      FleetEvent event) {
  if (call.plan) return call;  // a dry run announces nothing
  call.done = [done = std::move(call.done), controller,
               event = std::move(event)](absl::Status s) mutable {
    if (s.ok()) {
      event.time = absl::Now();
      controller->Publish(event);
    }
    done(std::move(s));
  };
  return call;
}

}  // namespace

LoopFleetController::LoopFleetController(EventLoop* loop, Fleet* fleet,
                                         Persist persist, std::string version,
                                         const HealthBoard* board)
    : loop_(loop),
      fleet_(fleet),
      persist_(std::move(persist)),
      version_(std::move(version)),
      board_(board),
      started_(absl::Now()) {
  fleet_->SetCommitHook(
      [this](const v1::FleetSpec& intended) { return Commit(intended); });
}

LoopFleetController::~LoopFleetController() {
  // The loop has stopped by now: nothing calls the hook concurrently.
  fleet_->SetCommitHook(nullptr);
}

absl::Status LoopFleetController::Commit(const v1::FleetSpec& intended) {
  if (dry_run_) {
    // The change has been checked; this is what it would produce. Refusing
    // it here stops the fleet before it touches anything.
    dry_run_intended_ = intended;
    return absl::AbortedError("dry run: nothing was changed");
  }
  if (!persist_) return absl::OkStatus();
  if (persisted_.has_value() &&
      google::protobuf::util::MessageDifferencer::Equals(*persisted_,
                                                         intended)) {
    return absl::OkStatus();
  }
  absl::Status s = persist_(intended);
  if (!s.ok()) {
    return Annotate(s, "saving the desired state (nothing was changed)");
  }
  persisted_ = intended;
  return absl::OkStatus();
}

void LoopFleetController::Publish(const FleetEvent& event) {
  events_.Publish(event);
}

uint64_t LoopFleetController::Subscribe(
    std::function<void(const FleetEvent&)> sink, absl::Time since) {
  return events_.Subscribe(std::move(sink), since);
}

std::vector<FleetEvent> LoopFleetController::Events(absl::Time since) {
  return events_.Since(since);
}

void LoopFleetController::Unsubscribe(uint64_t id) { events_.Unsubscribe(id); }

void LoopFleetController::Close() {
  closed_ = true;
  // Queued mutations that have not started are dropped; the running ones
  // finish with the shutdown.
  std::vector<MutationCall> dropped;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    for (auto& [key, queue] : queues_) {
      while (queue.size() > 1) {
        dropped.push_back(std::move(queue.back().call));
        queue.pop_back();
      }
    }
  }
  for (MutationCall& call : dropped) call.done(ShuttingDown());
}

LoopFleetController::Op LoopFleetController::DryRun(
    const std::string& key, std::function<void(v1::ListenerPlan)> plan, Op op) {
  return [this, key, plan = std::move(plan),
          op = std::move(op)](Done done) -> absl::Status {
    const v1::FleetSpec before = fleet_->DesiredSpec();
    struct Sync {
      bool called = false;
      absl::Status status;
    };
    auto sync = std::make_shared<Sync>();
    dry_run_ = true;
    dry_run_intended_.reset();
    absl::Status s = op([sync](absl::Status st) {
      sync->called = true;
      sync->status = std::move(st);
    });
    dry_run_ = false;
    std::optional<v1::FleetSpec> intended = std::move(dry_run_intended_);
    dry_run_intended_.reset();
    if (intended.has_value()) {
      // Stopped at the commit: the change would have been made.
      plan(PlanListener(key, before, *intended));
      done(absl::OkStatus());
      return absl::OkStatus();
    }
    if (!s.ok()) return s;
    if (sync->called) {
      // Finished without a commit: nothing to change (e.g. the same spec).
      if (sync->status.ok()) plan(PlanListener(key, before, before));
      done(sync->status);
      return absl::OkStatus();
    }
    // Every fleet change commits before it starts; one that did not is a bug
    // that a dry run must not hide.
    PF_LOG(ERROR) << "listener " << key
                  << ": a dry run started a change without saving it first";
    return absl::InternalError(absl::StrCat(
        "listener ", key, ": the dry run could not stop the change"));
  };
}

void LoopFleetController::Mutate(const std::string& key, MutationCall call,
                                 Op op) {
  if (closed_) {
    call.done(ShuttingDown());
    return;
  }
  if (call.plan) op = DryRun(key, std::move(call.plan), std::move(op));
  bool first;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    std::deque<Pending>& queue = queues_[key];
    queue.push_back({std::move(call), std::move(op)});
    first = queue.size() == 1;
  }
  if (first) loop_->Post([this, key] { StartNext(key); });
}

void LoopFleetController::StartNext(const std::string& key) {
  Pending* next = nullptr;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    auto it = queues_.find(key);
    if (it == queues_.end() || it->second.empty()) return;
    // Stays valid: only Finished() removes the front element.
    next = &it->second.front();
  }
  if (closed_) return Finished(key, ShuttingDown());
  if (next->call.cancelled && next->call.cancelled()) {
    return Finished(key, absl::CancelledError("call cancelled"));
  }
  absl::Status immediate =
      next->op([this, key](absl::Status s) { Finished(key, std::move(s)); });
  if (!immediate.ok()) Finished(key, std::move(immediate));
}

void LoopFleetController::Finished(const std::string& key,
                                   absl::Status status) {
  // The state as it is now: what the change left, or what its undo did
  // (nothing to do when nothing was ever saved, or it is what was saved).
  if (persisted_.has_value()) {
    absl::Status saved = Commit(fleet_->DesiredSpec());
    if (!saved.ok()) PF_LOG(ERROR) << saved;
  }
  MutationCall call;
  bool more;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    std::deque<Pending>& queue = queues_[key];
    call = std::move(queue.front().call);
    queue.pop_front();
    more = !queue.empty();
    if (!more) queues_.erase(key);
  }
  if (more) loop_->Post([this, key] { StartNext(key); });
  call.done(std::move(status));
}

absl::StatusOr<std::vector<ListenerStatus>>
LoopFleetController::ListListeners() {
  if (closed_) return ShuttingDown();
  std::vector<ListenerStatus> out;
  loop_->RunSync([&] { out = fleet_->Status(); });
  return out;
}

absl::StatusOr<ListenerStatus> LoopFleetController::GetListener(
    const std::string& name) {
  if (closed_) return ShuttingDown();
  absl::StatusOr<ListenerStatus> out = absl::UnknownError("not run");
  loop_->RunSync([&] { out = fleet_->ListenerStatusOf(name); });
  return out;
}

AgentStatus LoopFleetController::GetStatus() {
  AgentStatus out;
  out.version = version_;
  out.started = started_;
  // The health is the board's (what gRPC health and /readyz say), read
  // without the loop.
  if (board_ != nullptr) {
    out.health = board_->Current();
    out.serving = out.health.ready();
  }
  if (closed_) return out;
  loop_->RunSync([&] {
    out.bpf_steering_active = fleet_->steering_active();
    out.bpf_unavailable_reason = fleet_->steering_unavailable_reason();
    out.listeners = static_cast<uint32_t>(fleet_->listener_count());
    if (board_ == nullptr) {
      out.health = ComputeAgentHealth(AgentPhase::kServing, fleet_->Health());
      out.serving = out.health.ready();
    }
  });
  return out;
}

void LoopFleetController::CreateListener(const v1::Listener& request,
                                         MutationCall call) {
  v1::Listener spec = request;
  MakeCommandAbsolute(spec.mutable_worker());
  call = Announce(std::move(call), this,
                  {.type = v1::EVENT_TYPE_LISTENER_CREATED,
                   .time = absl::Time(),
                   .listener = spec.name(),
                   .message = "created"});
  Mutate(spec.name(), std::move(call), [this, spec](Done done) {
    RETURN_IF_ERROR(fleet_->AddListener(spec));
    done(absl::OkStatus());
    return absl::OkStatus();
  });
}

void LoopFleetController::UpdateListener(const v1::Listener& request,
                                         MutationCall call) {
  v1::Listener spec = request;
  MakeCommandAbsolute(spec.mutable_worker());
  Mutate(spec.name(), std::move(call), [this, spec](Done done) {
    return fleet_->UpdateListener(spec, std::move(done));
  });
}

void LoopFleetController::DeleteListener(const std::string& name,
                                         MutationCall call) {
  call = Announce(std::move(call), this,
                  {.type = v1::EVENT_TYPE_LISTENER_DELETED,
                   .time = absl::Time(),
                   .listener = name,
                   .message = "deleted"});
  Mutate(name, std::move(call), [this, name](Done done) {
    return fleet_->DeleteListener(name, std::move(done));
  });
}

void LoopFleetController::ScaleListener(const std::string& name,
                                        uint32_t shards, MutationCall call) {
  Mutate(name, std::move(call), [this, name, shards](Done done) {
    return fleet_->ScaleListener(name, shards, std::move(done));
  });
}

void LoopFleetController::AdoptListener(
    const std::string& name, pid_t pid,
    std::shared_ptr<std::vector<uint32_t>> indexes, MutationCall call) {
  Mutate(name, std::move(call), [this, name, pid, indexes](Done done) {
    absl::StatusOr<std::vector<uint32_t>> added =
        fleet_->AdoptListener(name, pid);
    if (!added.ok()) return added.status();
    *indexes = std::move(*added);
    done(absl::OkStatus());
    return absl::OkStatus();
  });
}

void LoopFleetController::DrainShard(const std::string& name, uint32_t index,
                                     MutationCall call) {
  Mutate(name, std::move(call), [this, name, index](Done done) {
    return fleet_->DrainShard(name, index, std::move(done));
  });
}

void LoopFleetController::SetSteering(const std::string& name,
                                      const v1::Steering& steering,
                                      MutationCall call) {
  call = Announce(std::move(call), this,
                  {.type = v1::EVENT_TYPE_STEERING_CHANGED,
                   .time = absl::Time(),
                   .listener = name,
                   .message = v1::SteeringPolicy_Name(steering.policy())});
  Mutate(name, std::move(call), [this, name, steering](Done done) {
    RETURN_IF_ERROR(fleet_->SetSteering(name, steering));
    done(absl::OkStatus());
    return absl::OkStatus();
  });
}

void LoopFleetController::RollOut(const std::string& name,
                                  const RollOutOptions& options,
                                  MutationCall call) {
  if (!options.undo || closed_) {
    StartRollOut(name, options, std::move(call));
    return;
  }
  // An undo of the rollout in progress does not queue behind it (the
  // rollout holds its listener's queue until it ends).
  auto pending = std::make_shared<MutationCall>(std::move(call));
  loop_->Post([this, name, options, pending] {
    absl::StatusOr<std::optional<v1::RollOut>> undone =
        fleet_->UndoRollOutInProgress(name);
    if (!undone.ok()) {
      pending->done(undone.status());
      return;
    }
    if (undone->has_value()) {
      if (pending->started) pending->started(**undone);
      pending->done(absl::OkStatus());
      return;
    }
    StartRollOut(name, options, std::move(*pending));
  });
}

void LoopFleetController::StartRollOut(const std::string& name,
                                       const RollOutOptions& options,
                                       MutationCall call) {
  v1::WorkerSpec worker = options.worker;
  MakeCommandAbsolute(&worker);
  std::function<void(const v1::RollOut&)> started = std::move(call.started);
  Mutate(name, std::move(call),
         [this, name, worker, options, started](Done done) -> absl::Status {
           if (options.undo) {
             RETURN_IF_ERROR(fleet_->RollOutPrevious(name, options.max_surge,
                                                     std::move(done)));
           } else {
             RETURN_IF_ERROR(fleet_->RollOut(name, worker, options.max_surge,
                                             std::move(done)));
           }
           if (started) {
             absl::StatusOr<std::vector<v1::RollOut>> all =
                 fleet_->RollOuts(name);
             if (all.ok() && !all->empty()) started(all->front());
           }
           return absl::OkStatus();
         });
}

absl::StatusOr<std::vector<v1::RollOut>> LoopFleetController::ListRollOuts(
    const std::string& name) {
  if (closed_) return ShuttingDown();
  absl::StatusOr<std::vector<v1::RollOut>> out = absl::UnknownError("not run");
  loop_->RunSync([&] { out = fleet_->RollOuts(name); });
  return out;
}

absl::StatusOr<v1::RebalanceListenerResponse>
LoopFleetController::RebalanceListener(
    const v1::RebalanceListenerRequest& request) {
  if (closed_) return ShuttingDown();
  // The tables change at once; hand-offs take up to kHandOffTimeout.
  auto result = std::make_shared<
      std::promise<absl::StatusOr<v1::RebalanceListenerResponse>>>();
  std::future<absl::StatusOr<v1::RebalanceListenerResponse>> future =
      result->get_future();
  loop_->Post([this, request, result] {
    fleet_->RebalanceListener(
        request, [result](absl::StatusOr<v1::RebalanceListenerResponse> r) {
          result->set_value(std::move(r));
        });
  });
  if (future.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
    return absl::DeadlineExceededError(absl::StrCat(
        "listener ", request.name(), ": rebalance did not end within 30s"));
  }
  return future.get();
}

absl::StatusOr<v1::RollOut> LoopFleetController::PauseRollOut(
    const std::string& name, bool paused) {
  if (closed_) return ShuttingDown();
  absl::StatusOr<v1::RollOut> out = absl::UnknownError("not run");
  loop_->RunSync([&] { out = fleet_->PauseRollOut(name, paused); });
  return out;
}

void LoopFleetController::SetShardMaintenance(const std::string& name,
                                              uint32_t index, bool maintenance,
                                              MutationCall call) {
  // Runtime state, not desired state: nothing new to persist.
  Mutate(name, std::move(call), [this, name, index, maintenance](Done done) {
    RETURN_IF_ERROR(fleet_->SetShardMaintenance(name, index, maintenance));
    done(absl::OkStatus());
    return absl::OkStatus();
  });
}

}  // namespace portfleet
