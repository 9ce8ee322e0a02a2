// FleetController: what the API layer may ask of the agent. The real
// implementation runs each call on the agent's event loop and persists the
// desired state before returning success; tests may use a fake.
#ifndef PORTFLEET_AGENT_CONTROLLER_H_
#define PORTFLEET_AGENT_CONTROLLER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "portfleet/v1/agent.pb.h"
#include "portfleet/v1/fleet.pb.h"

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
};

struct ListenerStatus {
  v1::Listener spec;  // desired state, as last set
  std::vector<ShardStatus> shards;
  // Not serving: it could not be started and is retried (no shards).
  std::string error;
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
struct MutationCall {
  std::function<void(absl::Status)> done;
  std::function<bool()> cancelled;
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
  virtual void RollOut(const std::string& name, const v1::WorkerSpec& worker,
                       uint32_t max_surge, MutationCall call) = 0;
  // Takes a shard out of rotation by hand (maintenance) or puts it back.
  // FailedPrecondition for the last shard in rotation.
  virtual void SetShardMaintenance(const std::string& name, uint32_t index,
                                   bool maintenance, MutationCall call) = 0;

  // Calls `sink` (from any thread) for every event until the returned id is
  // passed to Unsubscribe.
  virtual uint64_t Subscribe(std::function<void(const FleetEvent&)> sink) = 0;
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
  virtual absl::Status RollOut(const std::string& name,
                               const v1::WorkerSpec& worker,
                               uint32_t max_surge) = 0;
  virtual absl::Status SetShardMaintenance(const std::string& name,
                                           uint32_t index,
                                           bool maintenance) = 0;

  void CreateListener(const v1::Listener& spec, MutationCall call) override {
    Run(call, [&] { return CreateListener(spec); });
  }
  void UpdateListener(const v1::Listener& spec, MutationCall call) override {
    Run(call, [&] { return UpdateListener(spec); });
  }
  void DeleteListener(const std::string& name, MutationCall call) override {
    Run(call, [&] { return DeleteListener(name); });
  }
  void ScaleListener(const std::string& name, uint32_t shards,
                     MutationCall call) override {
    Run(call, [&] { return ScaleListener(name, shards); });
  }
  void DrainShard(const std::string& name, uint32_t index,
                  MutationCall call) override {
    Run(call, [&] { return DrainShard(name, index); });
  }
  void SetSteering(const std::string& name, const v1::Steering& steering,
                   MutationCall call) override {
    Run(call, [&] { return SetSteering(name, steering); });
  }
  void RollOut(const std::string& name, const v1::WorkerSpec& worker,
               uint32_t max_surge, MutationCall call) override {
    Run(call, [&] { return RollOut(name, worker, max_surge); });
  }
  void SetShardMaintenance(const std::string& name, uint32_t index,
                           bool maintenance, MutationCall call) override {
    Run(call, [&] { return SetShardMaintenance(name, index, maintenance); });
  }

 private:
  static void Run(MutationCall& call, const std::function<absl::Status()>& op) {
    if (call.cancelled && call.cancelled()) {
      call.done(absl::CancelledError("call cancelled"));
      return;
    }
    call.done(op());
  }
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_CONTROLLER_H_
