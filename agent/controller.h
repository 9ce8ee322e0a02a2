// FleetController: what the API layer may ask of the agent. The real
// implementation runs each call on the agent's event loop and persists the
// desired state before returning success; tests may use a fake.
#ifndef PORTFLEET_AGENT_CONTROLLER_H_
#define PORTFLEET_AGENT_CONTROLLER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "agent/spec/plan.h"
#include "portfleet/v1/agent.pb.h"
#include "portfleet/v1/fleet.pb.h"
#include "worker/sdk/base/duration_histogram.h"

namespace portfleet {

// Steering counters of one shard, summed over CPUs.
struct ShardCountersView {
  uint64_t selected = 0;
  uint64_t migrated = 0;
  uint64_t fallback = 0;
};

struct ShardStatus {
  uint32_t index = 0;
  v1::ShardState state = v1::SHARD_STATE_UNSPECIFIED;
  pid_t pid = 0;
  int cpu = -1;  // pinned CPU, -1 = none
  uint32_t restarts = 0;
  uint64_t socket_inode = 0;
  bool ready = false;               // said ready (or accepted, see Fleet)
  uint32_t queue_depth = 0;         // accept queue, from the kernel
  uint64_t active_connections = 0;  // from the worker's load reports
  uint64_t accepted_total = 0;
  ShardCountersView counters;  // from the steering program
  v1::ShardHealth health = v1::SHARD_HEALTH_UNSPECIFIED;
  std::string health_reason;  // empty when HEALTHY
  uint32_t ejections = 0;
  uint32_t replacements = 0;
  // Holders of the shard socket outside its worker trees (fleet/orphans.h),
  // as last scanned, and those the agent killed since it started.
  struct Orphan {
    pid_t pid = 0;
    std::string command;
    bool leftover = false;
  };
  std::vector<Orphan> orphans;
  uint64_t orphans_killed = 0;
  bool self_bound = false;  // the worker binds its own socket
  bool adopted = false;     // its process was adopted (AdoptListener)
  // The serving worker's load (fleet/load.h), and its indirection-table
  // slots now and the rebalancer's part of them (fleet/rebalance.h).
  v1::ShardLoad load;
  uint32_t steering_slots = 0;
  int32_t rebalance_slot_delta = 0;
};

struct ListenerStatus {
  v1::Listener spec;  // desired state, as last set
  std::vector<ShardStatus> shards;
  // Not serving: it could not be started and is retried (no shards).
  std::string error;
  // max/mean of the ready shards' connections (1.0 = even; 0 when idle),
  // and what the rebalancer did since the agent started.
  double imbalance = 0;
  uint64_t rebalances = 0;
  uint64_t rebalance_slots_moved = 0;
  uint64_t rebalance_refusals = 0;
  // Connections handed off, auto-rebalancer steps, and whether an automatic
  // rebalance is running (above the threshold, not yet at the target).
  uint64_t rebalance_connections_moved = 0;
  uint64_t auto_rebalance_steps = 0;
  bool auto_rebalancing = false;
  // Hand-off pauses of the connections its workers adopted since the agent
  // started (over every shard it had; ShardLoad.handoff_pauses per shard).
  DurationHistogram handoff_pauses;
  // CPU steering: per CPU that a shard is pinned to, the rebalancer's spill
  // share (of 256 new connections of the CPU, how many go to the
  // indirection table; 0 = none).
  std::map<int, uint32_t> spill;
};

// Health of one listener (see v1::ListenerHealth).
struct ListenerHealthStatus {
  std::string name;
  v1::HealthState state = v1::HEALTH_STATE_UNSPECIFIED;
  std::string reason;
  uint32_t healthy_shards = 0;
  uint32_t shards = 0;
};

// The agent's health: one value, published by the agent's event loop, that
// gRPC health, /readyz, GetStatus and /metrics all report.
struct AgentHealth {
  v1::HealthState state = v1::HEALTH_STATE_STARTING;
  std::string reason;  // empty when SERVING
  std::vector<ListenerHealthStatus> listeners;
  // Ready to take traffic: SERVING or DEGRADED.
  bool ready() const {
    return state == v1::HEALTH_STATE_SERVING ||
           state == v1::HEALTH_STATE_DEGRADED;
  }
};

inline bool operator==(const ListenerHealthStatus& a,
                       const ListenerHealthStatus& b) {
  return a.name == b.name && a.state == b.state && a.reason == b.reason &&
         a.healthy_shards == b.healthy_shards && a.shards == b.shards;
}
inline bool operator==(const AgentHealth& a, const AgentHealth& b) {
  return a.state == b.state && a.reason == b.reason &&
         a.listeners == b.listeners;
}

struct AgentStatus {
  std::string version;
  absl::Time started;
  bool bpf_steering_active = false;
  std::string bpf_unavailable_reason;  // empty when active
  uint32_t listeners = 0;
  bool serving = false;  // ready: health.ready()
  AgentHealth health;
  // --config-mode and, in declarative mode, what was last applied.
  v1::ConfigSource config;
};

// Something that happened in the fleet: the one event type, from the fleet's
// units to logs, the API's WatchEvents and metrics. `type` is the API's enum,
// so nothing translates it on the way out.
struct FleetEvent {
  v1::EventType type = v1::EVENT_TYPE_UNSPECIFIED;
  absl::Time time;
  std::string listener;
  int shard = -1;  // -1 = not about one shard
  pid_t pid = 0;
  std::string message;
};

// How an asynchronous mutation reports back. `done` is called exactly once,
// from any thread. `cancelled`, when set, is asked just before the change
// starts (mutations of one listener run one after another): true drops the
// change, and `done` gets CANCELLED with nothing changed.
//
// `plan`, when set, makes the call a dry run (validate_only): the change is
// checked as it would be made, up to the point where the new desired state
// would be saved, and nothing changes (no process, socket, event or state
// file). On success `plan` gets what the change would do to the listener,
// then `done` gets OK; a change that would be refused gets the same error as
// the real call.
//
// `started` (RollOut only), when set, gets the rollout's record as soon as it
// started, before `done` (which comes when it ends).
struct MutationCall {
  std::function<void(absl::Status)> done{};
  std::function<bool()> cancelled{};
  std::function<void(v1::ListenerPlan)> plan{};
  std::function<void(const v1::RollOut&)> started{};
};

// A rolling upgrade asked of the controller.
struct RollOutOptions {
  // The new worker; empty fields keep the current value.
  v1::WorkerSpec worker{};
  // Shards rolled at the same time; 0 = 1.
  uint32_t max_surge = 0;
  // Undo (worker empty): the rollout in progress rolls back (`done` comes at
  // once, with the record in `started`), or else the worker that ran before
  // the last successful rollout is rolled out.
  bool undo = false;
};

class FleetController {
 public:
  virtual ~FleetController() = default;

  // Thread-safe. Errors use absl codes by meaning: NotFound (no such
  // listener/shard), AlreadyExists (name or address taken), InvalidArgument
  // (message names the field), FailedPrecondition (e.g. steering without
  // BPF), ResourceExhausted (limits; the state cannot be persisted),
  // Unavailable (shutting down). A failed call changes nothing.
  //
  // Reads answer at once. Mutations never block the caller: they are queued
  // per listener and report through `call.done` when complete (a drain takes
  // up to the drain timeout).
  virtual absl::StatusOr<std::vector<ListenerStatus>> ListListeners() = 0;
  virtual absl::StatusOr<ListenerStatus> GetListener(
      const std::string& name) = 0;
  virtual AgentStatus GetStatus() = 0;

  virtual void CreateListener(const v1::Listener& spec, MutationCall call) = 0;
  // Replaces a listener's spec (apply of a changed spec): drain timeout,
  // backlog, steering and shard count change in place, a changed worker is
  // rolled out shard by shard; the address cannot change. All or nothing.
  virtual void UpdateListener(const v1::Listener& spec, MutationCall call) = 0;
  // Drains every shard, then removes the listener.
  virtual void DeleteListener(const std::string& name, MutationCall call) = 0;
  virtual void ScaleListener(const std::string& name, uint32_t shards,
                             MutationCall call) = 0;
  // Removes the shard with this index (the last shard's index is reused by
  // no one; indexes of the other shards do not change).
  virtual void DrainShard(const std::string& name, uint32_t index,
                          MutationCall call) = 0;
  virtual void SetSteering(const std::string& name,
                           const v1::Steering& steering, MutationCall call) = 0;
  // Rolling upgrade to `worker` (empty fields keep the current value),
  // `max_surge` shards at a time. Done when every shard runs it, or when it
  // was rolled back.
  virtual void RollOut(const std::string& name, const RollOutOptions& options,
                       MutationCall call) = 0;
  // A listener's rollouts: the one in progress, then the last finished ones,
  // newest first (empty: none since the agent started).
  virtual absl::StatusOr<std::vector<v1::RollOut>> ListRollOuts(
      const std::string& name) = 0;
  // Pauses (or resumes) the rollout in progress; FailedPrecondition when none
  // runs.
  virtual absl::StatusOr<v1::RollOut> PauseRollOut(const std::string& name,
                                                   bool paused) = 0;
  // Takes a shard out of rotation by hand (maintenance) or puts it back.
  // FailedPrecondition for the last shard in rotation.
  virtual void SetShardMaintenance(const std::string& name, uint32_t index,
                                   bool maintenance, MutationCall call) = 0;
  // Takes the listening sockets of running process `pid` on the listener's
  // address into it, one new shard per socket; their indexes go to
  // `indexes` before `call.done`. Pure, like every method here, so that a
  // wrapper (ConfigModeController) cannot silently drop it.
  virtual void AdoptListener(const std::string& name, pid_t pid,
                             std::shared_ptr<std::vector<uint32_t>> indexes,
                             MutationCall call) = 0;

  // One-shot rebalance of a listener (see RebalanceListener in agent.proto).
  // Runs at once on the fleet; not persisted (a rebalance is runtime state).
  virtual absl::StatusOr<v1::RebalanceListenerResponse> RebalanceListener(
      const v1::RebalanceListenerRequest& request) = 0;

  // The agent keeps its last events (a bounded history, oldest dropped
  // first). Subscribe calls `sink` (from any thread) for each kept event at
  // or after `since` (none for absl::InfiniteFuture()), then for every new
  // event until the returned id is passed to Unsubscribe. `sink` must not
  // call the controller.
  virtual uint64_t Subscribe(std::function<void(const FleetEvent&)> sink,
                             absl::Time since) = 0;
  // The kept events at or after `since`, oldest first.
  virtual std::vector<FleetEvent> Events(absl::Time since) = 0;
  virtual void Unsubscribe(uint64_t id) = 0;
};

// A FleetController written synchronously (test fakes): each mutation runs
// in the caller's thread and reports at once.
class SyncFleetController : public FleetController {
 public:
  virtual absl::Status CreateListener(const v1::Listener& spec) = 0;
  virtual absl::Status UpdateListener(const v1::Listener& spec) = 0;
  virtual absl::Status DeleteListener(const std::string& name) = 0;
  virtual absl::Status ScaleListener(const std::string& name,
                                     uint32_t shards) = 0;
  virtual absl::Status DrainShard(const std::string& name, uint32_t index) = 0;
  virtual absl::Status SetSteering(const std::string& name,
                                   const v1::Steering& steering) = 0;
  // The rollout's record when it ended (or, for an undo of one in
  // progress, as it is then).
  virtual absl::StatusOr<v1::RollOut> RollOut(
      const std::string& name, const RollOutOptions& options) = 0;
  virtual absl::Status SetShardMaintenance(const std::string& name,
                                           uint32_t index,
                                           bool maintenance) = 0;

  // Dry runs (MutationCall::plan): the desired spec, and a way to try a
  // change and take it back. The default refuses dry runs.
  virtual v1::FleetSpec DesiredSpec() {
    v1::FleetSpec spec;
    absl::StatusOr<std::vector<ListenerStatus>> all = ListListeners();
    if (all.ok()) {
      for (const ListenerStatus& l : *all) *spec.add_listeners() = l.spec;
    }
    return spec;
  }
  // Until EndDryRun, mutations change a copy that EndDryRun throws away
  // (and publish and persist nothing).
  virtual absl::Status BeginDryRun() {
    return absl::UnimplementedError("this controller has no dry run");
  }
  virtual void EndDryRun() {}

  // Fakes that do not adopt or rebalance say so.
  void AdoptListener(const std::string& name, pid_t pid,
                     std::shared_ptr<std::vector<uint32_t>> indexes,
                     MutationCall call) override {
    (void)pid;
    (void)indexes;
    call.done(absl::UnimplementedError(absl::StrCat(
        "listener ", name, ": this controller cannot adopt a process")));
  }
  absl::StatusOr<v1::RebalanceListenerResponse> RebalanceListener(
      const v1::RebalanceListenerRequest& request) override {
    return absl::UnimplementedError(absl::StrCat(
        "listener ", request.name(), ": this controller cannot rebalance"));
  }

  void CreateListener(const v1::Listener& spec, MutationCall call) override {
    Run(call, spec.name(), [&] { return CreateListener(spec); });
  }
  void UpdateListener(const v1::Listener& spec, MutationCall call) override {
    Run(call, spec.name(), [&] { return UpdateListener(spec); });
  }
  void DeleteListener(const std::string& name, MutationCall call) override {
    Run(call, name, [&] { return DeleteListener(name); });
  }
  void ScaleListener(const std::string& name, uint32_t shards,
                     MutationCall call) override {
    Run(call, name, [&] { return ScaleListener(name, shards); });
  }
  void DrainShard(const std::string& name, uint32_t index,
                  MutationCall call) override {
    Run(call, name, [&] { return DrainShard(name, index); });
  }
  void SetSteering(const std::string& name, const v1::Steering& steering,
                   MutationCall call) override {
    Run(call, name, [&] { return SetSteering(name, steering); });
  }
  void RollOut(const std::string& name, const RollOutOptions& options,
               MutationCall call) override {
    Run(call, name, [&]() -> absl::Status {
      absl::StatusOr<v1::RollOut> r = RollOut(name, options);
      if (r.ok() && call.started) call.started(*r);
      return r.status();
    });
  }
  void SetShardMaintenance(const std::string& name, uint32_t index,
                           bool maintenance, MutationCall call) override {
    Run(call, name,
        [&] { return SetShardMaintenance(name, index, maintenance); });
  }

 private:
  void Run(MutationCall& call, const std::string& name,
           const std::function<absl::Status()>& op) {
    if (call.cancelled && call.cancelled()) {
      call.done(absl::CancelledError("call cancelled"));
      return;
    }
    if (!call.plan) {
      call.done(op());
      return;
    }
    const v1::FleetSpec before = DesiredSpec();
    if (absl::Status s = BeginDryRun(); !s.ok()) {
      call.done(s);
      return;
    }
    absl::Status s = op();
    const v1::FleetSpec after = DesiredSpec();
    EndDryRun();
    if (s.ok()) call.plan(PlanListener(name, before, after));
    call.done(s);
  }
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_CONTROLLER_H_
