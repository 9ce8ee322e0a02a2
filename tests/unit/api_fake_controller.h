// An in-memory FleetController for API and CLI tests: keeps listeners and
// fake shards, checks what the real controller checks that the service does
// not (existence, duplicates, BPF), optionally persists every successful
// mutation with SaveFleetState, and lets tests emit events.
#ifndef PORTFLEET_TESTS_UNIT_API_FAKE_CONTROLLER_H_
#define PORTFLEET_TESTS_UNIT_API_FAKE_CONTROLLER_H_

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/api/state_store.h"
#include "agent/controller.h"
#include "agent/event_history.h"

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
  // Listeners created with this worker command never serve: their shards
  // are in restart back-off, as a worker that always exits leaves them.
  std::string crashing_command = "crashes";

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
    if (spec.worker().command() == crashing_command) {
      for (ShardStatus& s : l.shards) {
        s.state = v1::SHARD_STATE_BACKOFF;
        s.ready = false;
        s.pid = 0;
        s.restarts = 4;
        s.health = v1::SHARD_HEALTH_DOWN;
        s.health_reason = "worker exited with status 1";
      }
    }
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
  // Rollouts finish at once unless `hold_rollouts`: then one stays in
  // progress (ROLLING, no shard rolled) until FinishRollOut or an undo.
  bool hold_rollouts = false;
  absl::StatusOr<v1::RollOut> RollOut(const std::string& name,
                                      const RollOutOptions& options) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = listeners_.find(name);
    if (it == listeners_.end()) return NotFound(name);
    std::deque<v1::RollOut>& history = rollouts_[name];
    if (!history.empty() && InProgress(history.front())) {
      if (!options.undo) {
        return absl::FailedPreconditionError(
            "listener " + name + ": a rollout is already in progress");
      }
      v1::RollOut& r = history.front();
      r.set_state(v1::ROLL_OUT_STATE_ROLLED_BACK);
      r.set_message("rollout " + r.id() + " undone by request");
      return r;
    }
    v1::WorkerSpec target = it->second.spec.worker();
    if (options.undo) {
      auto last = std::find_if(history.begin(), history.end(), [](auto& r) {
        return r.state() == v1::ROLL_OUT_STATE_SUCCEEDED;
      });
      if (last == history.end()) {
        return absl::FailedPreconditionError("listener " + name +
                                             ": nothing to undo");
      }
      target = last->previous_worker();
    } else {
      if (options.worker.command() == "fails-to-start") {
        return absl::FailedPreconditionError(
            "listener " + name + " shard 0: new worker exited; rolled back");
      }
      if (!options.worker.command().empty()) {
        target.set_command(options.worker.command());
      }
      if (options.worker.args_size() > 0) {
        *target.mutable_args() = options.worker.args();
      }
    }
    v1::RollOut r;
    r.set_number(static_cast<uint32_t>(++started_[name]));
    r.set_id(absl::StrCat(name, "/", r.number()));
    r.set_listener(name);
    *r.mutable_worker() = target;
    *r.mutable_previous_worker() = it->second.spec.worker();
    r.set_max_surge(options.max_surge == 0 ? 1 : options.max_surge);
    r.set_shards(static_cast<uint32_t>(it->second.shards.size()));
    r.set_undo(options.undo);
    r.set_start_time_unix_micros(1700000000000000);
    if (hold_rollouts && !dry_run_) {
      r.set_state(v1::ROLL_OUT_STATE_ROLLING);
    } else {
      r.set_state(v1::ROLL_OUT_STATE_SUCCEEDED);
      r.set_shards_rolled(r.shards());
      r.set_end_time_unix_micros(1700000060000000);
      *it->second.spec.mutable_worker() = target;
    }
    history.push_front(r);
    return r;
  }
  absl::StatusOr<std::vector<v1::RollOut>> ListRollOuts(
      const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (listeners_.count(name) == 0) return NotFound(name);
    const std::deque<v1::RollOut>& h = rollouts_[name];
    return std::vector<v1::RollOut>(h.begin(), h.end());
  }
  absl::StatusOr<v1::RollOut> PauseRollOut(const std::string& name,
                                           bool paused) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (listeners_.count(name) == 0) return NotFound(name);
    std::deque<v1::RollOut>& h = rollouts_[name];
    if (h.empty() || !InProgress(h.front())) {
      return absl::FailedPreconditionError("listener " + name +
                                           ": no rollout in progress");
    }
    h.front().set_state(paused ? v1::ROLL_OUT_STATE_PAUSED
                               : v1::ROLL_OUT_STATE_ROLLING);
    return h.front();
  }
  // Completes the held rollout of `name`.
  void FinishRollOut(const std::string& name) {
    std::lock_guard<std::mutex> lock(mu_);
    v1::RollOut& r = rollouts_[name].front();
    r.set_state(v1::ROLL_OUT_STATE_SUCCEEDED);
    r.set_shards_rolled(r.shards());
    r.set_end_time_unix_micros(1700000060000000);
    *listeners_[name].spec.mutable_worker() = r.worker();
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
  // Dry runs change a copy that EndDryRun throws away.
  absl::Status BeginDryRun() override {
    std::lock_guard<std::mutex> lock(mu_);
    saved_ = listeners_;
    dry_run_ = true;
    return absl::OkStatus();
  }
  void EndDryRun() override {
    std::lock_guard<std::mutex> lock(mu_);
    listeners_ = std::move(saved_);
    dry_run_ = false;
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
  uint64_t Subscribe(std::function<void(const FleetEvent&)> sink,
                     absl::Time since) override {
    return events_.Subscribe(std::move(sink), since);
  }
  std::vector<FleetEvent> Events(absl::Time since) override {
    return events_.Since(since);
  }
  void Unsubscribe(uint64_t id) override { events_.Unsubscribe(id); }

  int subscribers() { return static_cast<int>(events_.subscribers()); }
  void Emit(v1::EventType type, const std::string& listener,
            const std::string& message, int shard = -1) {
    Emit(FleetEvent{type, absl::Now(), listener, shard, 1234, message});
  }
  void Emit(const FleetEvent& e) { events_.Publish(e); }

 private:
  static bool InProgress(const v1::RollOut& r) {
    return r.state() == v1::ROLL_OUT_STATE_ROLLING ||
           r.state() == v1::ROLL_OUT_STATE_PAUSED;
  }
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
      if (i == 2) {  // adopted 3 connections in a hand-off
        v1::HandOffPauses* p = s.load.mutable_handoff_pauses();
        p->set_adopted(3);
        p->set_p50_us(42);
        p->set_p99_us(184);
        v1::DurationHistogram* h = p->mutable_histogram();
        h->set_count(3);
        h->set_sum_ns(262'000);
        for (auto [index, count, upper] :
             {std::tuple{50u, 2u, 44'000u}, std::tuple{67u, 1u, 192'000u}}) {
          v1::DurationBucket* b = h->add_buckets();
          b->set_index(index);
          b->set_count(count);
          b->set_upper_ns(upper);
        }
      }
      l.shards.push_back(s);
    }
  }
  void EmitLocked(v1::EventType type, const std::string& listener,
                  const std::string& message, int shard = -1) {
    if (dry_run_) return;
    Emit(type, listener, message, shard);
  }
  absl::Status Persist() {
    if (state_dir.empty() || dry_run_) return absl::OkStatus();
    v1::FleetSpec spec;
    for (const auto& [name, l] : listeners_) *spec.add_listeners() = l.spec;
    return SaveFleetState(state_dir, spec);
  }

  std::mutex mu_;
  std::map<std::string, ListenerStatus> listeners_;
  bool dry_run_ = false;
  std::map<std::string, std::deque<v1::RollOut>> rollouts_;
  std::map<std::string, int> started_;
  std::map<std::string, ListenerStatus> saved_;
  EventHistory events_;
};

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_UNIT_API_FAKE_CONTROLLER_H_
