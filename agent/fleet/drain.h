// Drainer: taking shards out of service without losing a connection, workers
// left behind by a previous agent, and the fleet's shutdown.
//
// Draining a shard: its table slots go first (the caller rewrites the
// tables), then its sockarray slot, the worker is told to finish its
// connections, the listening socket is shut down so that the kernel migrates
// its queue through the steering program, and the worker is reaped within
// the listener's drain timeout (else SIGKILL). The shard is removed when its
// last process is gone; a deleting listener is removed with its last shard.
#ifndef PORTFLEET_AGENT_FLEET_DRAIN_H_
#define PORTFLEET_AGENT_FLEET_DRAIN_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "agent/fleet/model.h"
#include "agent/fleet/supervisor.h"

namespace portfleet {

class Drainer {
 public:
  Drainer(FleetContext* ctx, Supervisor* supervisor, ListenerMap* listeners);
  ~Drainer();
  Drainer(const Drainer&) = delete;
  Drainer& operator=(const Drainer&) = delete;

  // Starts draining `shard` (already out of the tables); `done` runs when it
  // is removed.
  void Begin(Listener& listener, Shard& shard, Done done);
  // Takes a shard that never served (a failed scale-up) away: out of the
  // sockarray, its socket shut down (a queue migrates), its worker SIGKILLed;
  // removed once the process is reaped.
  void Abandon(Listener& listener, Shard& shard);
  // A worker process of `shard` has gone: removes the shard when its drain
  // is complete, and completes the shutdown when nothing is left.
  void OnWorkerGone(Listener& listener, Shard& shard);

  // Drains a worker left behind by a previous agent on this listener's
  // address: SIGTERM, watch its pidfd, SIGKILL after the drain timeout.
  void DrainOrphan(const std::string& listener, pid_t pid, uint64_t inode,
                   uint32_t timeout_seconds);

  // SIGTERM to every worker; SIGKILL to those still running after the
  // longest drain timeout. `done` runs once every worker is gone and every
  // socket closed. Restarts stop; rollouts stop without rolling back.
  void Shutdown(std::function<void()> done);
  // Runs once the stop has no process left, before the sockets close.
  void SetBeforeClose(std::function<void()> hook) {
    before_close_ = std::move(hook);
  }
  // SIGKILL to every worker now (a second SIGTERM).
  void KillAll();
  bool shutting_down() const { return ctx_->shutting_down; }

 private:
  void Finish(Listener& listener, Shard& shard);
  void CheckShutdownDone();
  // After its socket was shut down: SIGTERM to a self-bound worker after a
  // grace (it may stop by itself first), SIGKILL at the drain timeout.
  void TellSelfBoundDrain(Listener& listener, Shard& shard);

  FleetContext* const ctx_;
  Supervisor* const supervisor_;
  ListenerMap* const listeners_;
  std::function<void()> shutdown_done_;
  std::optional<EventLoop::TimerId> kill_timer_;
  struct Orphan {
    pid_t pid;
    pid_t pgid;  // its process group (0: it leads none)
    Fd pidfd;
    EventLoop::TimerId kill_timer;
    bool leader_gone = false;  // exited; processes of its group remain
  };
  std::map<pid_t, Orphan> orphans_;
  std::function<void()> before_close_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_DRAIN_H_
