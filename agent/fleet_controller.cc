#include "agent/fleet_controller.h"

#include <future>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

absl::Status ShuttingDown() {
  return absl::UnavailableError("the agent is shutting down");
}

}  // namespace

LoopFleetController::LoopFleetController(EventLoop* loop, Fleet* fleet,
                                         Persist persist, std::string version)
    : loop_(loop),
      fleet_(fleet),
      persist_(std::move(persist)),
      version_(std::move(version)),
      started_(absl::Now()) {}

void LoopFleetController::Publish(const FleetEvent& event) {
  std::lock_guard<std::mutex> lock(subscribers_mu_);
  for (auto& [id, sink] : subscribers_) sink(event);
}

uint64_t LoopFleetController::Subscribe(
    std::function<void(const FleetEvent&)> sink) {
  std::lock_guard<std::mutex> lock(subscribers_mu_);
  uint64_t id = next_subscriber_++;
  subscribers_[id] = std::move(sink);
  return id;
}

void LoopFleetController::Unsubscribe(uint64_t id) {
  std::lock_guard<std::mutex> lock(subscribers_mu_);
  subscribers_.erase(id);
}

absl::Status LoopFleetController::Mutate(
    const std::function<absl::Status(Done)>& op) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return ShuttingDown();
  auto done = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = done->get_future();
  loop_->Post([this, &op, done] {
    absl::Status immediate = op([this, done](absl::Status s) {
      // Runs on the loop thread when the change is complete.
      if (s.ok() && persist_) s = persist_(fleet_->DesiredSpec());
      done->set_value(s);
    });
    if (!immediate.ok()) done->set_value(immediate);
  });
  return result.get();
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

absl::Status LoopFleetController::CreateListener(const v1::Listener& spec) {
  absl::Status s = Mutate([&](Done done) {
    RETURN_IF_ERROR(fleet_->AddListener(spec));
    done(absl::OkStatus());
    return absl::OkStatus();
  });
  if (s.ok()) {
    Publish({.type = v1::EVENT_TYPE_LISTENER_CREATED,
             .time = absl::Now(),
             .listener = spec.name(),
             .message = "created"});
  }
  return s;
}

absl::Status LoopFleetController::UpdateListener(const v1::Listener& spec) {
  return Mutate(
      [&](Done done) { return fleet_->UpdateListener(spec, std::move(done)); });
}

absl::Status LoopFleetController::DeleteListener(const std::string& name) {
  absl::Status s = Mutate(
      [&](Done done) { return fleet_->DeleteListener(name, std::move(done)); });
  if (s.ok()) {
    Publish({.type = v1::EVENT_TYPE_LISTENER_DELETED,
             .time = absl::Now(),
             .listener = name,
             .message = "deleted"});
  }
  return s;
}

absl::Status LoopFleetController::ScaleListener(const std::string& name,
                                                uint32_t shards) {
  return Mutate([&](Done done) {
    return fleet_->ScaleListener(name, shards, std::move(done));
  });
}

absl::Status LoopFleetController::DrainShard(const std::string& name,
                                             uint32_t index) {
  return Mutate([&](Done done) {
    return fleet_->DrainShard(name, index, std::move(done));
  });
}

absl::Status LoopFleetController::SetSteering(const std::string& name,
                                              const v1::Steering& steering) {
  absl::Status s = Mutate([&](Done done) {
    RETURN_IF_ERROR(fleet_->SetSteering(name, steering));
    done(absl::OkStatus());
    return absl::OkStatus();
  });
  if (s.ok()) {
    Publish({.type = v1::EVENT_TYPE_STEERING_CHANGED,
             .time = absl::Now(),
             .listener = name,
             .message = v1::SteeringPolicy_Name(steering.policy())});
  }
  return s;
}

absl::Status LoopFleetController::RollOut(const std::string& name,
                                          const v1::WorkerSpec& worker,
                                          uint32_t max_surge) {
  return Mutate([&](Done done) {
    return fleet_->RollOut(name, worker, max_surge, std::move(done));
  });
}

AgentStatus LoopFleetController::GetStatus() {
  AgentStatus out;
  out.version = version_;
  out.started = started_;
  if (closed_) return out;
  loop_->RunSync([&] {
    out.bpf_steering_active = fleet_->steering_active();
    out.bpf_unavailable_reason = fleet_->steering_unavailable_reason();
    out.listeners = static_cast<uint32_t>(fleet_->listener_count());
    out.serving = fleet_->AllReady();
  });
  return out;
}

}  // namespace portfleet
