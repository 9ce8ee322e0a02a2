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
#include "agent/event_loop.h"
#include "agent/launcher.h"
#include "portfleet/v1/fleet.pb.h"
#include "worker/sdk/address.h"
#include "worker/sdk/fd.h"

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
  // Environment passed to every worker before the listener's own entries.
  std::vector<std::string> base_env;
};

// Something that happened, for logs and event streams.
struct FleetEvent {
  enum class Type {
    kShardStarted,    // worker started
    kWorkerReady,     // worker said ready on its control channel
    kWorkerExited,    // worker ended unexpectedly
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

// Read-only view of one shard, for status and the API.
struct ShardView {
  uint32_t index = 0;
  std::string state;  // "starting", "running", "backoff", "stopping", "stopped"
  pid_t pid = 0;
  int cpu = -1;
  uint32_t restarts = 0;
  uint64_t socket_inode = 0;
  bool ready = false;
  uint64_t active_connections = 0;  // last load report
  uint64_t accepted_total = 0;
  uint32_t queue_depth = 0;
};

struct ListenerView {
  v1::Listener spec;
  std::vector<ShardView> shards;
};

class Fleet {
 public:
  Fleet(EventLoop* loop, ProcessLauncher* launcher, FleetOptions options);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  void SetEventSink(std::function<void(const FleetEvent&)> sink) {
    sink_ = std::move(sink);
  }

  // Creates every listener of `spec` (sockets, then workers). All or
  // nothing: on error whatever was created is closed and stopped again.
  absl::Status Start(const v1::FleetSpec& spec);

  // Creates one listener: its shard sockets, then one worker per shard.
  absl::Status AddListener(const v1::Listener& spec);

  // SIGTERM to every worker; SIGKILL to those still running after their
  // listener's drain timeout. Calls `done` once every worker is gone and
  // every socket closed.
  void Shutdown(std::function<void()> done);
  // SIGKILL every worker now (second SIGTERM/SIGINT).
  void KillAll();

  std::vector<ListenerView> Snapshot() const;
  bool AllReady() const;
  size_t listener_count() const { return listeners_.size(); }

 private:
  struct Worker;
  struct Shard;
  struct Listener;

  absl::Status StartWorker(Listener& listener, Shard& shard);
  void OnWorkerExit(Listener& listener, Shard& shard);
  void OnControlReadable(Listener& listener, Shard& shard);
  void ScheduleRestart(Listener& listener, Shard& shard);
  void DetachWorker(Shard& shard);
  void CheckShutdownDone();
  void Emit(FleetEvent::Type type, const Listener& listener, int shard,
            pid_t pid, std::string message);

  EventLoop* loop_;
  ProcessLauncher* launcher_;
  FleetOptions options_;
  std::function<void(const FleetEvent&)> sink_;
  std::map<std::string, std::unique_ptr<Listener>> listeners_;
  bool shutting_down_ = false;
  std::function<void()> shutdown_done_;
  std::optional<EventLoop::TimerId> kill_timer_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_H_
