// Fleet: the agent's model of its listeners, their shard sockets and the
// worker process of each shard. Lives on the EventLoop thread: every method
// must be called there.
#ifndef PORTFLEET_AGENT_FLEET_H_
#define PORTFLEET_AGENT_FLEET_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "agent/adoption.h"
#include "agent/controller.h"
#include "agent/event_loop.h"
#include "agent/launcher.h"
#include "agent/steering/steering.h"
#include "portfleet/v1/fleet.pb.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

struct FleetOptions {
  // CPUs workers may be pinned to (online CPUs, in order).
  std::vector<int> cpus = {0};
  // First restart delay after a worker exits; doubles per exit up to the cap.
  absl::Duration restart_backoff_initial = absl::Milliseconds(100);
  absl::Duration restart_backoff_max = absl::Seconds(10);
  // A worker that ran this long resets its backoff to the initial delay.
  absl::Duration restart_stable_after = absl::Seconds(10);
  // A worker that exits sooner than this is reported as exiting at once.
  absl::Duration exit_at_once = absl::Seconds(1);
  // Rollout: how long a new worker may take to say ready, and how long one
  // without a control channel (no hello) must stay up to count as ready.
  absl::Duration ready_timeout = absl::Seconds(10);
  absl::Duration ready_grace = absl::Seconds(2);
  // The agent's control socket, passed to workers as PORTFLEET_AGENT_SOCKET
  // so that they can reconnect to a restarted agent. Empty = none.
  std::string agent_socket;
  // Environment passed to every worker before the listener's own entries.
  std::vector<std::string> base_env;
};

// Something that happened, for logs and event streams.
struct FleetEvent {
  enum class Type {
    kShardStarted,  // worker started
    kWorkerReady,   // worker said ready on its control channel
    kWorkerExited,  // worker ended unexpectedly
    kWorkerRestarted,
    kDrainBegun,
    kDrainDone,
    kError,
  };
  Type type;
  std::string listener;
  int shard = -1;
  pid_t pid = 0;
  std::string message;
};

class Fleet {
 public:
  using Done = std::function<void(absl::Status)>;

  Fleet(EventLoop* loop, ProcessLauncher* launcher, FleetOptions options);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  void SetEventSink(std::function<void(const FleetEvent&)> sink) {
    sink_ = std::move(sink);
  }
  // BPF steering backend (not owned), or nullptr with the reason it is not
  // available; then listeners use the kernel's plain reuseport hashing.
  void SetSteeringBackend(SteeringBackend* backend, std::string reason);
  bool steering_active() const { return steering_ != nullptr; }
  const std::string& steering_unavailable_reason() const {
    return steering_reason_;
  }

  // Workers that reconnected to a restarted agent: AddListener gives their
  // shards the handed-back sockets and supervises the running workers
  // instead of starting new ones. Call before Start.
  void SetAdoptees(std::vector<Adoptee> adoptees);
  // A connection on the agent's control socket after start-up: a late
  // reconnect is told to drain (its shard has a worker).
  void OnControlSocketReadable(int listen_fd);
  // Called with a takeover request that arrived on the control socket.
  void SetTakeoverHandler(std::function<void(ControlConnection)> handler) {
    takeover_handler_ = std::move(handler);
  }
  // Every live shard socket (not owned) with its listener, for a takeover.
  struct SharedSocket {
    v1::Listener listener;
    uint32_t shard;
    int fd;
  };
  std::vector<SharedSocket> SharedSockets() const;

  // Creates every listener of `spec` (sockets, then workers). All or
  // nothing: on error whatever was created is closed and stopped again.
  absl::Status Start(const v1::FleetSpec& spec);

  // Creates one listener: its shard sockets, steering, then one worker per
  // shard. All or nothing.
  absl::Status AddListener(const v1::Listener& spec);

  // Lifecycle changes. Each validates first and returns an error without
  // changing anything; otherwise returns OK and calls `done` when the change
  // is complete (drains can take up to the drain timeout).
  absl::Status ScaleListener(const std::string& name, uint32_t shards,
                             Done done);
  absl::Status DrainShard(const std::string& name, uint32_t index, Done done);
  absl::Status DeleteListener(const std::string& name, Done done);
  absl::Status SetSteering(const std::string& name,
                           const v1::Steering& steering);
  // Rolling upgrade: per shard (max_surge at a time), the new worker starts
  // on the same socket, becomes ready, then the old one drains. If a new
  // worker fails, the shards already rolled are rolled back and `done` gets
  // the error; nothing refuses a connection either way.
  absl::Status RollOut(const std::string& name, const v1::WorkerSpec& worker,
                       uint32_t max_surge, Done done);
  // Applies a changed spec: shard count, steering, drain timeout and backlog
  // in place. Address or worker changes: FailedPrecondition.
  absl::Status UpdateListener(const v1::Listener& spec, Done done);

  // SIGTERM to every worker; SIGKILL to those still running after their
  // listener's drain timeout. Calls `done` once every worker is gone and
  // every socket closed.
  void Shutdown(std::function<void()> done);
  // SIGKILL every worker now (second SIGTERM/SIGINT).
  void KillAll();

  std::vector<ListenerStatus> Status() const;
  absl::StatusOr<ListenerStatus> ListenerStatusOf(
      const std::string& name) const;
  // Logs each listener's steering counters (summed over CPUs) at debug level.
  void LogSteeringCounters() const;
  // Desired state of every listener (as persisted).
  v1::FleetSpec DesiredSpec() const;
  bool AllReady() const;
  size_t listener_count() const { return listeners_.size(); }

 private:
  struct Worker;
  struct Shard;
  struct Listener;

  absl::StatusOr<std::unique_ptr<Shard>> NewShard(Listener& listener,
                                                  uint32_t index);
  absl::StatusOr<std::unique_ptr<Worker>> LaunchWorker(
      Listener& listener, Shard& shard, const v1::WorkerSpec& worker_spec,
      const std::string& command_path);
  absl::Status WatchWorker(Listener& listener, Shard& shard, Worker& worker);
  absl::Status StartWorker(Listener& listener, Shard& shard);
  absl::Status AdoptWorker(Listener& listener, Shard& shard, Adoptee adoptee);
  void ForgetWorker(Worker& worker);
  void OnWorkerExit(Listener& listener, Shard& shard);
  void OnOtherWorkerExit(Listener& listener, Shard& shard, Worker* worker);
  void OnControlReadable(Listener& listener, Shard& shard, Worker* worker);
  // Rolling upgrade of one shard: start `spec` on the shard's socket, wait
  // for it to be ready, then make it the shard's worker and drain the old
  // one. `done` gets an error (and the old worker keeps serving) if the new
  // one does not become ready.
  void RollShard(Listener& listener, Shard& shard, const v1::WorkerSpec& spec,
                 const std::string& path, Done done);
  void RetireWorker(Listener& listener, Shard& shard,
                    std::unique_ptr<Worker> worker);
  void ScheduleRestart(Listener& listener, Shard& shard);
  void DetachWorker(Shard& shard);
  void KillAndReap(Shard& shard);
  void CheckShutdownDone();
  // Rewrites the listener's steering tables from its live shards.
  absl::Status ApplySteering(Listener& listener);
  // Starts draining a shard: no new connections, queue migrated, worker told
  // to finish. `done` runs when the worker is gone and the shard removed.
  void BeginDrain(Listener& listener, Shard& shard, Done done);
  void FinishDrain(Listener& listener, Shard& shard);
  absl::Status GrowListener(Listener& listener, uint32_t target, Done done);
  // Drains a worker left behind by a previous agent on this listener's
  // address: SIGTERM, watch its pidfd, SIGKILL after the drain timeout.
  void DrainOrphan(const std::string& listener, pid_t pid, uint64_t inode,
                   uint32_t timeout_seconds);
  void Emit(FleetEvent::Type type, const Listener& listener, int shard,
            pid_t pid, std::string message);

  EventLoop* loop_;
  ProcessLauncher* launcher_;
  FleetOptions options_;
  SteeringBackend* steering_ = nullptr;
  std::string steering_reason_ = "not configured";
  std::function<void(const FleetEvent&)> sink_;
  std::map<std::string, std::unique_ptr<Listener>> listeners_;
  bool shutting_down_ = false;
  std::function<void()> shutdown_done_;
  std::optional<EventLoop::TimerId> kill_timer_;
  struct Orphan {
    pid_t pid;
    Fd pidfd;
    EventLoop::TimerId kill_timer;
  };
  std::map<pid_t, Orphan> orphans_;
  std::vector<Adoptee> adoptees_;
  std::function<void(ControlConnection)> takeover_handler_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_H_
