#include "agent/api/service.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl::StatusCode is documented to match google.rpc.Code, which gRPC's
  // StatusCode also follows, value for value.
  static_assert(static_cast<int>(absl::StatusCode::kUnauthenticated) ==
                grpc::StatusCode::UNAUTHENTICATED);
  static_assert(static_cast<int>(absl::StatusCode::kDataLoss) ==
                grpc::StatusCode::DATA_LOSS);
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

v1::Shard ToProto(const ShardStatus& s) {
  v1::Shard out;
  out.set_index(s.index);
  out.set_state(s.state);
  out.set_pid(s.pid);
  out.set_cpu(s.cpu);
  out.set_restarts(s.restarts);
  out.set_ready(s.ready);
  out.set_queue_depth(s.queue_depth);
  out.set_active_connections(s.active_connections);
  out.set_accepted_total(s.accepted_total);
  out.mutable_counters()->set_selected(s.counters.selected);
  out.mutable_counters()->set_migrated(s.counters.migrated);
  out.mutable_counters()->set_fallback(s.counters.fallback);
  out.set_socket_inode(s.socket_inode);
  out.set_health(s.health);
  out.set_health_reason(s.health_reason);
  out.set_ejections(s.ejections);
  out.set_replacements(s.replacements);
  for (const ShardStatus::Orphan& o : s.orphans) {
    v1::ShardOrphan* po = out.add_orphans();
    po->set_pid(o.pid);
    po->set_command(o.command);
    po->set_leftover(o.leftover);
  }
  out.set_orphans_killed(s.orphans_killed);
  out.set_self_bound(s.self_bound);
  out.set_adopted(s.adopted);
  *out.mutable_load() = s.load;
  out.set_steering_slots(s.steering_slots);
  out.set_rebalance_slot_delta(s.rebalance_slot_delta);
  return out;
}

v1::ListenerState ToProto(const ListenerStatus& l) {
  v1::ListenerState out;
  *out.mutable_spec() = l.spec;
  for (const ShardStatus& s : l.shards) *out.add_shards() = ToProto(s);
  out.set_error(l.error);
  v1::ListenerRebalanceStatus* r = out.mutable_rebalance();
  r->set_imbalance(l.imbalance);
  r->set_auto_active(l.auto_rebalancing);
  r->set_auto_steps(l.auto_rebalance_steps);
  r->set_rebalances(l.rebalances);
  r->set_slots_moved(l.rebalance_slots_moved);
  r->set_connections_moved(l.rebalance_connections_moved);
  r->set_refusals(l.rebalance_refusals);
  return out;
}

v1::Event ToProto(const FleetEvent& e) {
  v1::Event out;
  out.set_type(e.type);
  out.set_time_unix_micros(absl::ToUnixMicros(e.time));
  out.set_listener(e.listener);
  out.set_shard(e.shard);
  out.set_pid(e.pid);
  out.set_message(e.message);
  return out;
}

absl::Status ValidateName(const std::string& name, const std::string& field) {
  if (name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  }
  if (!IsDnsLabel(name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": \"", name,
        "\" is not a DNS label (1-63 of [a-z0-9-], not starting or ending "
        "with '-')"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSteering(const v1::Steering& steering,
                              const std::string& field) {
  // The shard count is the fleet's to check against.
  absl::Status s = portfleet::ValidateSteering(steering, std::nullopt);
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(field, ".", s.message()));
}

namespace {

absl::Status ValidateListenerField(const v1::Listener& listener, bool present) {
  if (!present) return absl::InvalidArgumentError("listener: required");
  absl::Status s = ValidateListener(listener);
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("listener.", s.message()));
}

}  // namespace

// A fixed pool of threads with a bounded queue for controller calls.
class CallRunner {
 public:
  CallRunner(int threads, int max_queued) : max_queued_(max_queued) {
    for (int i = 0; i < threads; ++i) {
      threads_.emplace_back([this] { Loop(); });
    }
  }
  ~CallRunner() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  // False when the queue is full or the runner is stopping.
  bool Post(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_ || static_cast<int>(queue_.size()) >= max_queued_) {
        return false;
      }
      queue_.push_back(std::move(fn));
    }
    cv_.notify_one();
    return true;
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        // Queued calls still run (and finish) when stopping.
        if (queue_.empty()) return;
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }

  const int max_queued_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

FleetServiceImpl::FleetServiceImpl(FleetController* controller,
                                   FleetServiceOptions options)
    : controller_(controller),
      options_(options),
      runner_(std::make_unique<CallRunner>(options.worker_threads,
                                           options.max_queued_calls)) {}

FleetServiceImpl::~FleetServiceImpl() = default;

grpc::ServerUnaryReactor* FleetServiceImpl::Run(
    grpc::CallbackServerContext* ctx, const char* method, absl::Status check,
    std::function<absl::Status()> work) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status denied = Authorize(ctx, method); !denied.ok()) {
    reactor->Finish(denied);
    return reactor;
  }
  if (!check.ok()) {
    reactor->Finish(ToGrpcStatus(check));
    return reactor;
  }
  bool posted = runner_->Post([ctx, reactor, work = std::move(work)] {
    // Not started when nobody waits for the answer any more: a failed call
    // changes nothing.
    if (ctx->IsCancelled()) {
      reactor->Finish(grpc::Status(grpc::CANCELLED, "call cancelled"));
      return;
    }
    if (ctx->deadline() <= std::chrono::system_clock::now()) {
      reactor->Finish(grpc::Status(grpc::DEADLINE_EXCEEDED,
                                   "deadline exceeded before the call ran"));
      return;
    }
    reactor->Finish(ToGrpcStatus(work()));
  });
  if (!posted) {
    reactor->Finish(grpc::Status(grpc::RESOURCE_EXHAUSTED,
                                 "too many API calls in progress"));
  }
  return reactor;
}

namespace {

// The reactor of a mutating call. The controller answers through `Finish`
// from any thread, possibly after the client gave up: the shared state makes
// a late answer harmless. A cancelled call finishes at once (the change
// itself, if it already started, completes as it must).
class MutationReactor final : public grpc::ServerUnaryReactor {
 public:
  struct State {
    std::mutex mu;
    MutationReactor* reactor = nullptr;  // null once done
    bool finished = false;
    std::atomic<bool> cancelled{false};
  };

  MutationReactor() : state_(std::make_shared<State>()) {
    state_->reactor = this;
  }
  std::shared_ptr<State> state() const { return state_; }

  static void FinishOnce(const std::shared_ptr<State>& state,
                         grpc::Status status) {
    std::lock_guard<std::mutex> lock(state->mu);
    if (state->finished || state->reactor == nullptr) return;
    state->finished = true;
    state->reactor->Finish(std::move(status));
  }

  void OnCancel() override {
    state_->cancelled = true;
    FinishOnce(state_, grpc::Status(grpc::CANCELLED, "call cancelled"));
  }
  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->reactor = nullptr;
    }
    delete this;
  }

 private:
  std::shared_ptr<State> state_;
};

}  // namespace

grpc::ServerUnaryReactor* FleetServiceImpl::Mutate(
    grpc::CallbackServerContext* ctx, const char* method, absl::Status check,
    std::function<void(MutationCall)> start, std::function<void()> fill,
    v1::ListenerPlan* plan, v1::RollOut* started) {
  auto* reactor = new MutationReactor();
  std::shared_ptr<MutationReactor::State> state = reactor->state();
  if (grpc::Status denied = Authorize(ctx, method); !denied.ok()) {
    MutationReactor::FinishOnce(state, denied);
    return reactor;
  }
  if (!check.ok()) {
    MutationReactor::FinishOnce(state, ToGrpcStatus(check));
    return reactor;
  }
  auto deadline = ctx->deadline();
  MutationCall call;
  // Not started when nobody waits for the answer any more: a failed call
  // changes nothing.
  call.cancelled = [state, deadline] {
    return state->cancelled.load() ||
           deadline <= std::chrono::system_clock::now();
  };
  if (plan != nullptr) {
    // A dry run: the reply is the plan alone. It is written under the
    // reactor's lock, and only while the call is not finished (the response
    // message goes with the call).
    call.plan = [state, plan](v1::ListenerPlan p) {
      std::lock_guard<std::mutex> lock(state->mu);
      if (!state->finished && state->reactor != nullptr) *plan = std::move(p);
    };
    fill = nullptr;
  }
  if (started != nullptr) {
    // Answered as soon as the rollout started; its end is not waited for.
    call.started = [state, started](const v1::RollOut& r) {
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->finished || state->reactor == nullptr) return;
      *started = r;
      state->finished = true;
      state->reactor->Finish(grpc::Status::OK);
    };
    fill = nullptr;
  }
  call.done = [this, state, fill = std::move(fill)](absl::Status s) {
    if (!s.ok() || !fill) {
      MutationReactor::FinishOnce(state, ToGrpcStatus(s));
      return;
    }
    // The reply carries the listener's state: a read, which must not run on
    // the agent's loop thread (where `done` may be called).
    bool posted = runner_->Post([state, fill] {
      fill();
      MutationReactor::FinishOnce(state, grpc::Status::OK);
    });
    if (!posted) MutationReactor::FinishOnce(state, grpc::Status::OK);
  };
  start(std::move(call));
  return reactor;
}

grpc::Status FleetServiceImpl::Authorize(grpc::CallbackServerContext* ctx,
                                         const char* method) {
  if (!options_.authorize) return grpc::Status::OK;
  return options_.authorize(
      ctx,
      absl::StrCat("/", v1::FleetService::service_full_name(), "/", method));
}

void FleetServiceImpl::FillListener(const std::string& name,
                                    v1::ListenerState* out) {
  absl::StatusOr<ListenerStatus> l = controller_->GetListener(name);
  if (l.ok()) *out = ToProto(*l);
}

grpc::ServerUnaryReactor* FleetServiceImpl::ListListeners(
    grpc::CallbackServerContext* ctx, const v1::ListListenersRequest* req,
    v1::ListListenersResponse* resp) {
  return Run(ctx, "ListListeners", absl::OkStatus(),
             [this, resp]() -> absl::Status {
               absl::StatusOr<std::vector<ListenerStatus>> all =
                   controller_->ListListeners();
               if (!all.ok()) return all.status();
               for (const ListenerStatus& l : *all)
                 *resp->add_listeners() = ToProto(l);
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::GetListener(
    grpc::CallbackServerContext* ctx, const v1::GetListenerRequest* req,
    v1::GetListenerResponse* resp) {
  return Run(ctx, "GetListener", ValidateName(req->name(), "name"),
             [this, req, resp]() -> absl::Status {
               absl::StatusOr<ListenerStatus> l =
                   controller_->GetListener(req->name());
               if (!l.ok()) return l.status();
               *resp->mutable_listener() = ToProto(*l);
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::ListShards(
    grpc::CallbackServerContext* ctx, const v1::ListShardsRequest* req,
    v1::ListShardsResponse* resp) {
  return Run(ctx, "ListShards", ValidateName(req->name(), "name"),
             [this, req, resp]() -> absl::Status {
               absl::StatusOr<ListenerStatus> l =
                   controller_->GetListener(req->name());
               if (!l.ok()) return l.status();
               for (const ShardStatus& s : l->shards) {
                 *resp->add_shards() = ToProto(s);
               }
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::GetStatus(
    grpc::CallbackServerContext* ctx, const v1::GetStatusRequest* req,
    v1::GetStatusResponse* resp) {
  return Run(
      ctx, "GetStatus", absl::OkStatus(), [this, resp]() -> absl::Status {
        AgentStatus s = controller_->GetStatus();
        resp->set_version(s.version);
        resp->set_uptime_seconds(absl::ToInt64Seconds(absl::Now() - s.started));
        resp->set_start_time_unix(absl::ToUnixSeconds(s.started));
        resp->set_bpf_steering_active(s.bpf_steering_active);
        resp->set_bpf_unavailable_reason(s.bpf_unavailable_reason);
        resp->set_listeners(s.listeners);
        resp->set_serving(s.serving);
        resp->set_health(s.health.state);
        resp->set_health_reason(s.health.reason);
        for (const ListenerHealthStatus& l : s.health.listeners) {
          v1::ListenerHealth* out = resp->add_listener_health();
          out->set_name(l.name);
          out->set_state(l.state);
          out->set_reason(l.reason);
          out->set_healthy_shards(l.healthy_shards);
          out->set_shards(l.shards);
        }
        if (s.config.mode() != v1::CONFIG_MODE_UNSPECIFIED) {
          *resp->mutable_config() = s.config;
        }
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* FleetServiceImpl::CreateListener(
    grpc::CallbackServerContext* ctx, const v1::CreateListenerRequest* req,
    v1::CreateListenerResponse* resp) {
  return Mutate(
      ctx, "CreateListener",
      ValidateListenerField(req->listener(), req->has_listener()),
      [this, req](MutationCall call) {
        controller_->CreateListener(req->listener(), std::move(call));
      },
      [this, req, resp] {
        FillListener(req->listener().name(), resp->mutable_listener());
      },
      req->validate_only() ? resp->mutable_plan() : nullptr);
}

grpc::ServerUnaryReactor* FleetServiceImpl::UpdateListener(
    grpc::CallbackServerContext* ctx, const v1::UpdateListenerRequest* req,
    v1::UpdateListenerResponse* resp) {
  return Mutate(
      ctx, "UpdateListener",
      ValidateListenerField(req->listener(), req->has_listener()),
      [this, req](MutationCall call) {
        controller_->UpdateListener(req->listener(), std::move(call));
      },
      [this, req, resp] {
        FillListener(req->listener().name(), resp->mutable_listener());
      },
      req->validate_only() ? resp->mutable_plan() : nullptr);
}

grpc::ServerUnaryReactor* FleetServiceImpl::DeleteListener(
    grpc::CallbackServerContext* ctx, const v1::DeleteListenerRequest* req,
    v1::DeleteListenerResponse* resp) {
  return Mutate(
      ctx, "DeleteListener", ValidateName(req->name(), "name"),
      [this, req](MutationCall call) {
        controller_->DeleteListener(req->name(), std::move(call));
      },
      nullptr, req->validate_only() ? resp->mutable_plan() : nullptr);
}

grpc::ServerUnaryReactor* FleetServiceImpl::ScaleListener(
    grpc::CallbackServerContext* ctx, const v1::ScaleListenerRequest* req,
    v1::ScaleListenerResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && (req->shards() < 1 || req->shards() > kMaxShards)) {
    check = absl::InvalidArgumentError(absl::StrCat(
        "shards: ", req->shards(), " is out of range (1-", kMaxShards, ")"));
  }
  return Mutate(
      ctx, "ScaleListener", check,
      [this, req](MutationCall call) {
        controller_->ScaleListener(req->name(), req->shards(), std::move(call));
      },
      [this, req, resp] {
        FillListener(req->name(), resp->mutable_listener());
      },
      req->validate_only() ? resp->mutable_plan() : nullptr);
}

grpc::ServerUnaryReactor* FleetServiceImpl::RollOutListener(
    grpc::CallbackServerContext* ctx, const v1::RollOutListenerRequest* req,
    v1::RollOutListenerResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && req->max_surge() > kMaxShards) {
    check = absl::InvalidArgumentError(
        absl::StrCat("max_surge: ", req->max_surge(), " is out of range (0-",
                     kMaxShards, ")"));
  }
  if (check.ok() && req->undo() && req->has_worker() &&
      req->worker().ByteSizeLong() > 0) {
    check = absl::InvalidArgumentError(
        "worker: must be empty with undo (an undo rolls out the previous "
        "worker)");
  }
  return Mutate(
      ctx, "RollOutListener", check,
      [this, req](MutationCall call) {
        RollOutOptions options;
        options.worker = req->worker();
        options.max_surge = req->max_surge();
        options.undo = req->undo();
        controller_->RollOut(req->name(), options, std::move(call));
      },
      [this, req, resp] {
        FillListener(req->name(), resp->mutable_listener());
        absl::StatusOr<std::vector<v1::RollOut>> all =
            controller_->ListRollOuts(req->name());
        if (all.ok() && !all->empty()) *resp->mutable_rollout() = all->front();
      },
      nullptr, req->async() ? resp->mutable_rollout() : nullptr);
}

grpc::ServerUnaryReactor* FleetServiceImpl::GetRollOut(
    grpc::CallbackServerContext* ctx, const v1::GetRollOutRequest* req,
    v1::GetRollOutResponse* resp) {
  return Run(ctx, "GetRollOut", ValidateName(req->name(), "name"),
             [this, req, resp]() -> absl::Status {
               absl::StatusOr<std::vector<v1::RollOut>> all =
                   controller_->ListRollOuts(req->name());
               if (!all.ok()) return all.status();
               if (all->empty()) {
                 return absl::NotFoundError(
                     absl::StrCat("listener ", req->name(),
                                  ": no rollout since the agent started"));
               }
               *resp->mutable_rollout() = all->front();
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::ListRollOuts(
    grpc::CallbackServerContext* ctx, const v1::ListRollOutsRequest* req,
    v1::ListRollOutsResponse* resp) {
  return Run(ctx, "ListRollOuts", ValidateName(req->name(), "name"),
             [this, req, resp]() -> absl::Status {
               absl::StatusOr<std::vector<v1::RollOut>> all =
                   controller_->ListRollOuts(req->name());
               if (!all.ok()) return all.status();
               for (v1::RollOut& r : *all) {
                 *resp->add_rollouts() = std::move(r);
               }
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::PauseRollOut(
    grpc::CallbackServerContext* ctx, const v1::PauseRollOutRequest* req,
    v1::PauseRollOutResponse* resp) {
  return Run(ctx, "PauseRollOut", ValidateName(req->name(), "name"),
             [this, req, resp]() -> absl::Status {
               absl::StatusOr<v1::RollOut> r =
                   controller_->PauseRollOut(req->name(), req->paused());
               if (!r.ok()) return r.status();
               *resp->mutable_rollout() = std::move(*r);
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::RebalanceListener(
    grpc::CallbackServerContext* ctx, const v1::RebalanceListenerRequest* req,
    v1::RebalanceListenerResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && !v1::RebalanceMetric_IsValid(req->metric())) {
    check = absl::InvalidArgumentError(
        absl::StrCat("metric: unknown value ", req->metric()));
  }
  return Run(ctx, "RebalanceListener", check,
             [this, req, resp]() -> absl::Status {
               absl::StatusOr<v1::RebalanceListenerResponse> r =
                   controller_->RebalanceListener(*req);
               if (!r.ok()) return r.status();
               *resp = std::move(*r);
               return absl::OkStatus();
             });
}

grpc::ServerUnaryReactor* FleetServiceImpl::DrainShard(
    grpc::CallbackServerContext* ctx, const v1::DrainShardRequest* req,
    v1::DrainShardResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && req->index() >= kMaxShards) {
    check = absl::InvalidArgumentError(absl::StrCat(
        "index: ", req->index(), " is out of range (0-", kMaxShards - 1, ")"));
  }
  return Mutate(
      ctx, "DrainShard", check,
      [this, req](MutationCall call) {
        controller_->DrainShard(req->name(), req->index(), std::move(call));
      },
      [this, req, resp] {
        FillListener(req->name(), resp->mutable_listener());
      });
}

grpc::ServerUnaryReactor* FleetServiceImpl::AdoptListener(
    grpc::CallbackServerContext* ctx, const v1::AdoptListenerRequest* req,
    v1::AdoptListenerResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && req->pid() <= 0) {
    check = absl::InvalidArgumentError(
        absl::StrCat("pid: ", req->pid(), " is not a process id"));
  }
  auto indexes = std::make_shared<std::vector<uint32_t>>();
  return Mutate(
      ctx, "AdoptListener", check,
      [this, req, indexes](MutationCall call) {
        controller_->AdoptListener(req->name(), req->pid(), indexes,
                                   std::move(call));
      },
      [this, req, resp, indexes] {
        for (uint32_t i : *indexes) resp->add_indexes(i);
        FillListener(req->name(), resp->mutable_listener());
      });
}

grpc::ServerUnaryReactor* FleetServiceImpl::SetShardMaintenance(
    grpc::CallbackServerContext* ctx, const v1::SetShardMaintenanceRequest* req,
    v1::SetShardMaintenanceResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && req->index() >= kMaxShards) {
    check = absl::InvalidArgumentError(absl::StrCat(
        "index: ", req->index(), " is out of range (0-", kMaxShards - 1, ")"));
  }
  return Mutate(
      ctx, "SetShardMaintenance", check,
      [this, req](MutationCall call) {
        controller_->SetShardMaintenance(req->name(), req->index(),
                                         req->maintenance(), std::move(call));
      },
      [this, req, resp] {
        FillListener(req->name(), resp->mutable_listener());
      });
}

grpc::ServerUnaryReactor* FleetServiceImpl::SetSteering(
    grpc::CallbackServerContext* ctx, const v1::SetSteeringRequest* req,
    v1::SetSteeringResponse* resp) {
  absl::Status check = ValidateName(req->name(), "name");
  if (check.ok() && !req->has_steering()) {
    check = absl::InvalidArgumentError("steering: required");
  }
  if (check.ok()) check = ValidateSteering(req->steering(), "steering");
  return Mutate(
      ctx, "SetSteering", check,
      [this, req](MutationCall call) {
        controller_->SetSteering(req->name(), req->steering(), std::move(call));
      },
      [this, req, resp] {
        FillListener(req->name(), resp->mutable_listener());
      },
      req->validate_only() ? resp->mutable_plan() : nullptr);
}

namespace {

// One WatchEvents stream. The controller's sink pushes into a bounded queue;
// one write is in flight at a time. State shared with the sink lives in
// `Shared` so that a late sink call after the stream ended is harmless.
class EventWriter final
    : public grpc::ServerWriteReactor<v1::WatchEventsResponse> {
 public:
  // The stream's shared state, for FleetServiceImpl::StopWatchers.
  std::shared_ptr<void> shared() const { return shared_; }
  static void Stop(const std::shared_ptr<void>& shared) {
    auto* s = static_cast<Shared*>(shared.get());
    std::lock_guard<std::mutex> lock(s->mu);
    s->FinishLocked(grpc::Status(grpc::UNAVAILABLE, "agent shutting down"));
  }

  // Sends the kept events at or after `since` (InfiniteFuture: none), then
  // follows; or, with `history_only`, ends after them.
  EventWriter(FleetController* controller, std::string filter,
              size_t max_queued, std::atomic<int>* watchers, absl::Time since,
              bool history_only)
      : controller_(controller),
        shared_(std::make_shared<Shared>()),
        watchers_(watchers) {
    shared_->writer = this;
    shared_->filter = std::move(filter);
    shared_->max_queued = max_queued;
    StartSendInitialMetadata();
    // The history is sent whole: the queue limit is for new events.
    shared_->replaying = true;
    if (history_only) {
      for (const FleetEvent& e : controller_->Events(since)) shared_->Push(e);
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->FinishLocked(grpc::Status::OK, /*drop_queued=*/false);
      return;
    }
    std::weak_ptr<Shared> weak = shared_;
    subscription_ = controller_->Subscribe(
        [weak](const FleetEvent& e) {
          if (std::shared_ptr<Shared> s = weak.lock()) s->Push(e);
        },
        since);
    subscribed_ = true;
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->replaying = false;
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->writing = false;
    if (!ok) {
      // The client went away; OnCancel follows or the call is done.
      shared_->FinishLocked(grpc::Status(grpc::CANCELLED, "write failed"));
      return;
    }
    shared_->NextLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->FinishLocked(grpc::Status(grpc::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    if (subscribed_) controller_->Unsubscribe(subscription_);
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->writer = nullptr;
    }
    watchers_->fetch_sub(1);
    delete this;
  }

 private:
  struct Shared {
    std::mutex mu;
    EventWriter* writer = nullptr;  // null once the stream is done
    std::string filter;
    size_t max_queued = 0;
    std::deque<v1::WatchEventsResponse> queue;
    v1::WatchEventsResponse in_flight;
    bool writing = false;
    bool finished = false;
    bool replaying = false;  // sending the history: no queue limit
    std::optional<grpc::Status> pending_finish;

    void Push(const FleetEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (writer == nullptr || finished || pending_finish) return;
      if (!filter.empty() && e.listener != filter) return;
      if (!replaying && queue.size() >= max_queued) {
        queue.clear();
        FinishLocked(grpc::Status(
            grpc::RESOURCE_EXHAUSTED,
            absl::StrCat("event watcher too slow: more than ", max_queued,
                         " events queued; events were dropped, watch again")));
        return;
      }
      v1::WatchEventsResponse r;
      *r.mutable_event() = ToProto(e);
      queue.push_back(std::move(r));
      NextLocked();
    }

    void NextLocked() {
      if (writer == nullptr || writing || finished) return;
      if (queue.empty()) {
        if (pending_finish) {
          finished = true;
          writer->Finish(*pending_finish);
        }
        return;
      }
      in_flight = std::move(queue.front());
      queue.pop_front();
      writing = true;
      writer->StartWrite(&in_flight);
    }

    // Finishes after the write in flight (if any); queued events are dropped
    // unless `drop_queued` is false (then they are sent first).
    void FinishLocked(grpc::Status status, bool drop_queued = true) {
      if (finished || pending_finish) return;
      if (drop_queued) queue.clear();
      pending_finish = std::move(status);
      NextLocked();
    }
  };

  FleetController* const controller_;
  std::shared_ptr<Shared> shared_;
  std::atomic<int>* watchers_;
  uint64_t subscription_ = 0;
  bool subscribed_ = false;
};

class RejectedWriter final
    : public grpc::ServerWriteReactor<v1::WatchEventsResponse> {
 public:
  explicit RejectedWriter(grpc::Status status) { Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerWriteReactor<v1::WatchEventsResponse>*
FleetServiceImpl::WatchEvents(grpc::CallbackServerContext* ctx,
                              const v1::WatchEventsRequest* req) {
  if (grpc::Status denied = Authorize(ctx, "WatchEvents"); !denied.ok()) {
    return new RejectedWriter(std::move(denied));
  }
  if (!req->listener().empty()) {
    absl::Status s = ValidateName(req->listener(), "listener");
    if (!s.ok()) return new RejectedWriter(ToGrpcStatus(s));
  }
  if (watchers_.fetch_add(1) >= options_.max_watchers) {
    watchers_.fetch_sub(1);
    return new RejectedWriter(grpc::Status(
        grpc::RESOURCE_EXHAUSTED, absl::StrCat("too many event watchers (max ",
                                               options_.max_watchers, ")")));
  }
  absl::Time since = absl::InfiniteFuture();
  if (req->since_unix_micros() > 0) {
    since = absl::FromUnixMicros(req->since_unix_micros());
  } else if (req->history_only()) {
    since = absl::InfinitePast();
  }
  auto* writer =
      new EventWriter(controller_, req->listener(), options_.max_queued_events,
                      &watchers_, since, req->history_only());
  std::lock_guard<std::mutex> lock(streams_mu_);
  std::erase_if(streams_,
                [](const std::weak_ptr<void>& w) { return w.expired(); });
  streams_.push_back(writer->shared());
  return writer;
}

void FleetServiceImpl::StopWatchers() {
  std::vector<std::shared_ptr<void>> open;
  {
    std::lock_guard<std::mutex> lock(streams_mu_);
    for (const std::weak_ptr<void>& w : streams_) {
      if (std::shared_ptr<void> s = w.lock()) open.push_back(std::move(s));
    }
    streams_.clear();
  }
  for (const std::shared_ptr<void>& s : open) EventWriter::Stop(s);
}

}  // namespace portfleet
