// An in-memory FleetController for API and CLI tests: keeps listeners and
// fake shards, checks what the real controller checks that the service does
// not (existence, duplicates, BPF), optionally persists every successful
// mutation with SaveFleetState, and lets tests emit events.
#ifndef PORTFLEET_TESTS_UNIT_API_FAKE_CONTROLLER_H_
#define PORTFLEET_TESTS_UNIT_API_FAKE_CONTROLLER_H_

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/api/state_store.h"
#include "agent/controller.h"

namespace portfleet::testing {

class FakeController : public SyncFleetController {
 public:
  using SyncFleetController::CreateListener;
  using SyncFleetController::DeleteListener;
  using SyncFleetController::DrainShard;
  using SyncFleetController::RollOut;
  using SyncFleetController::ScaleListener;
  using SyncFleetController::SetShardMaintenance;
  using SyncFleetController::SetSteering;
  using SyncFleetController::UpdateListener;

  // Persisted to `state_dir` after each successful mutation when not empty.
  std::string state_dir;
  bool bpf_active = true;

  absl::StatusOr<std::vector<ListenerStatus>> ListListeners() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<ListenerStatus> out;
    for (const auto& [name, l] : listeners_) out.push_back(l);
    return out;
  }
  absl::StatusOr<ListenerStatus> GetListener(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    return it->second;
  }
  absl::Status CreateListener(const v1::Listener& spec) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (listeners_.count(spec.name())) {
      return absl::AlreadyExistsError(
          absl::StrCat("listener \"", spec.name(), "\" already exists"));
    }
    for (const auto& [name, l] : listeners_) {
      if (l.spec.address() == spec.address()) {
        return absl::AlreadyExistsError(absl::StrCat("address ", spec.address(),
                                                     " is taken by listener \"",
                                                     name, "\""));
      }
    }
    ListenerStatus l;
    l.spec = spec;
    Reshard(l, spec.shards() == 0 ? 2 : spec.shards());
    listeners_[spec.name()] = l;
    EmitLocked(v1::EVENT_TYPE_LISTENER_CREATED, spec.name(), "created");
    return Persist();
  }
  absl::Status UpdateListener(const v1::Listener& spec) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(spec.name());
    if (it == listeners_.end()) return NotFound(spec.name());
    it->second.spec = spec;
    Reshard(it->second, spec.shards() == 0 ? 2 : spec.shards());
    return Persist();
  }
  absl::Status DeleteListener(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (listeners_.erase(name) == 0) return NotFound(name);
    EmitLocked(v1::EVENT_TYPE_LISTENER_DELETED, name, "deleted");
    return Persist();
  }
  absl::Status ScaleListener(const std::string& name,
                             uint32_t shards) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    it->second.spec.set_shards(shards);
    Reshard(it->second, shards);
    return Persist();
  }
  absl::Status RollOut(const std::string& name, const v1::WorkerSpec& worker,
                       uint32_t max_surge) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    if (worker.command() == "fails-to-start") {
      return absl::FailedPreconditionError(
          "listener " + name + " shard 0: new worker exited; rolled back");
    }
    if (!worker.command().empty()) {
      it->second.spec.mutable_worker()->set_command(worker.command());
    }
    if (worker.args_size() > 0) {
      *it->second.spec.mutable_worker()->mutable_args() = worker.args();
    }
    return Persist();
  }
  absl::Status DrainShard(const std::string& name, uint32_t index) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    auto& shards = it->second.shards;
    for (auto s = shards.begin(); s != shards.end(); ++s) {
      if (s->index == index) {
        if (shards.size() == 1) {
          return absl::FailedPreconditionError(
              "cannot drain the last shard; delete the listener instead");
        }
        shards.erase(s);
        it->second.spec.set_shards(shards.size());
        EmitLocked(v1::EVENT_TYPE_DRAIN_DONE, name, "drained", index);
        return Persist();
      }
    }
    return absl::NotFoundError(
        absl::StrCat("listener \"", name, "\" has no shard ", index));
  }
  absl::Status SetSteering(const std::string& name,
                           const v1::Steering& steering) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    if (!bpf_active) {
      return absl::FailedPreconditionError(
          "BPF steering is not active: no CAP_BPF");
    }
    if (steering.weights_size() > 0 &&
        steering.weights_size() != static_cast<int>(it->second.shards.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("steering.weights: ", steering.weights_size(),
                       " weights for ", it->second.shards.size(), " shards"));
    }
    *it->second.spec.mutable_steering() = steering;
    EmitLocked(v1::EVENT_TYPE_STEERING_CHANGED, name, "steering changed");
    return Persist();
  }
  absl::Status SetShardMaintenance(const std::string& name, uint32_t index,
                                   bool maintenance) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    for (ShardStatus& s : it->second.shards) {
      if (s.index != index) continue;
      s.health =
          maintenance ? v1::SHARD_HEALTH_MAINTENANCE : v1::SHARD_HEALTH_HEALTHY;
      EmitLocked(maintenance ? v1::EVENT_TYPE_SHARD_EJECTED
                             : v1::EVENT_TYPE_SHARD_RESTORED,
                 name, "maintenance", index);
      return absl::OkStatus();
    }
    return absl::NotFoundError(
        absl::StrCat("listener \"", name, "\" has no shard ", index));
  }
  AgentStatus GetStatus() override {
    std::lock_guard<std::mutex> lock(mu_);
    AgentStatus s;
    s.version = "9.8.7";
    s.started = absl::Now() - absl::Seconds(3725);
    s.bpf_steering_active = bpf_active;
    if (!bpf_active) s.bpf_unavailable_reason = "no CAP_BPF";
    s.listeners = listeners_.size();
    s.serving = true;
    s.health.state = v1::HEALTH_STATE_SERVING;
    return s;
  }
  uint64_t Subscribe(std::function<void(const FleetEvent&)> sink) override {
    std::lock_guard<std::mutex> lock(sub_mu_);
    sinks_[++next_id_] = std::move(sink);
    return next_id_;
  }
  void Unsubscribe(uint64_t id) override {
    std::lock_guard<std::mutex> lock(sub_mu_);
    sinks_.erase(id);
  }

  int subscribers() {
    std::lock_guard<std::mutex> lock(sub_mu_);
    return sinks_.size();
  }
  void Emit(v1::EventType type, const std::string& listener,
            const std::string& message, int shard = -1) {
    FleetEvent e{type, absl::Now(), listener, shard, 1234, message};
    std::lock_guard<std::mutex> lock(sub_mu_);
    for (auto& [id, sink] : sinks_) sink(e);
  }

 private:
  static absl::Status NotFound(const std::string& name) {
    return absl::NotFoundError(
        absl::StrCat("listener \"", name, "\" not found"));
  }
  static void Reshard(ListenerStatus& l, uint32_t n) {
    l.shards.clear();
    for (uint32_t i = 0; i < n; ++i) {
      ShardStatus s;
      s.index = i;
      s.state = v1::SHARD_STATE_RUNNING;
      s.health = v1::SHARD_HEALTH_HEALTHY;
      s.pid = 1000 + i;
      s.cpu = i;
      s.ready = true;
      s.queue_depth = i;
      s.active_connections = 10 * i;
      s.accepted_total = 100 * i;
      s.counters.selected = 5 * (i + 1);
      if (i == 1) {  // a stranger holds this shard's socket; one was killed
        s.orphans.push_back({.pid = 4242, .command = "nc", .leftover = false});
        s.orphans_killed = 1;
      }
      l.shards.push_back(s);
    }
  }
  void EmitLocked(v1::EventType type, const std::string& listener,
                  const std::string& message, int shard = -1) {
    Emit(type, listener, message, shard);
  }
  absl::Status Persist() {
    if (state_dir.empty()) return absl::OkStatus();
    v1::FleetSpec spec;
    for (const auto& [name, l] : listeners_) *spec.add_listeners() = l.spec;
    return SaveFleetState(state_dir, spec);
  }

  std::mutex mu_;
  std::map<std::string, ListenerStatus> listeners_;
  std::mutex sub_mu_;
  std::map<uint64_t, std::function<void(const FleetEvent&)>> sinks_;
  uint64_t next_id_ = 0;
};

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_UNIT_API_FAKE_CONTROLLER_H_
