// Supervisor: the worker processes of every shard. Starts them by the
// socket-activation convention on the shard's socket, watches their pidfds
// and control channels, re-adopts workers of a previous agent, restarts a
// serving worker that dies (same socket, exponential backoff), and decides
// when a new worker is ready.
#ifndef PORTFLEET_AGENT_FLEET_SUPERVISOR_H_
#define PORTFLEET_AGENT_FLEET_SUPERVISOR_H_

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "agent/adoption.h"
#include "agent/fleet/model.h"

namespace portfleet {

class Supervisor {
 public:
  // Called after any worker process of `shard` has gone (reaped) and the
  // shard's own bookkeeping is done: the fleet finishes drains and the
  // shutdown there. `shard` may be destroyed by the callee.
  using WorkerGone = std::function<void(Listener&, Shard&)>;

  Supervisor(FleetContext* ctx, WorkerGone gone);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts the shard's program as its serving worker (state RUNNING).
  absl::Status Start(Listener& listener, Shard& shard);
  // Start(), or, if the worker cannot be started, the same restart with
  // backoff as after a crash (at start-up: one bad shard must not fail its
  // listener, whose other workers may have been re-adopted).
  void StartOrRetry(Listener& listener, Shard& shard);
  // Starts `program` on the shard's socket (or on `own_socket`, which it
  // keeps as its found_socket) and watches it; the caller decides what it
  // becomes (a rollout's candidate).
  absl::StatusOr<std::unique_ptr<Worker>> Launch(Listener& listener,
                                                 Shard& shard,
                                                 const ResolvedWorker& program,
                                                 Fd own_socket = Fd());
  // Supervises a worker of a previous agent that reconnected and handed its
  // socket back (the shard already holds that socket).
  absl::Status Adopt(Listener& listener, Shard& shard, Adoptee adoptee);

  // Calls `done` once: OK when `worker` is ready (see MarkReady), an error
  // when it is not ready within the ready timeout or exits first. The
  // worker must be watched (Start/Launch).
  void AwaitReady(Worker& worker, std::function<void(absl::Status)> done);

  // Readiness, the same rule for every worker the agent starts (start,
  // restart, scale-up, rollout, takeover): ready when it says so on its
  // control channel; without a control channel (no hello) when it is seen
  // to accept (its queue drains, see HealthMonitor) or once it has stayed up
  // for the ready grace period. A serving worker that is not ready within
  // the ready timeout is replaced; a awaited one fails its waiter.
  void MarkReady(Listener& listener, Shard& shard, Worker& worker,
                 absl::string_view how);
  // SIGKILLs the shard's serving worker and starts a new one on the same
  // socket as soon as it is reaped (no back-off); emits SHARD_REPLACED.
  void Replace(Listener& listener, Shard& shard, const std::string& why);

  // Asks `worker` to finish its connections and exit: AgentDrain on its
  // control channel, or SIGTERM without one.
  void TellDrain(const Listener& listener, Worker& worker);
  // Drains an old worker of `shard` without touching the shard's socket (a
  // new worker serves it); SIGKILL after the listener's drain timeout.
  void Retire(Listener& listener, Shard& shard, std::unique_ptr<Worker> worker);

  // Signals the worker and its process group (a pre-fork server's children).
  bool Signal(Worker& worker, int sig);
  // SIGKILLs every process group whose leader is gone (see Remnant).
  void KillRemnants();
  // Process groups of `shard` that outlived their leader.
  std::vector<pid_t> RemnantGroups(const Shard& shard) const;
  // SIGKILLs the shard's serving worker and waits (up to 5 s) to reap it.
  // Only for start-up failures, before the loop serves anything.
  void KillAndReap(Shard& shard);
  // Stops watching the serving worker and forgets it (it keeps running).
  void Detach(Shard& shard);
  // Stops watching `worker` (pidfd, control channel, timers).
  void Forget(Worker& worker);
  void CancelRestart(Shard& shard);

 private:
  absl::Status Watch(Listener& listener, Shard& shard, Worker& worker);
  // Self-bound workers (supervisor_selfbound.cc): started without a socket;
  // their socket is searched for every kSocketSearchPeriod until found
  // (then it is the shard's and the worker is ready) or the ready timeout.
  absl::StatusOr<std::unique_ptr<Worker>> LaunchSelfBound(
      Listener& listener, Shard& shard, const ResolvedWorker& program,
      std::vector<std::string> env);
  void SearchSocket(Listener& listener, Shard& shard, Worker* worker);
  void TakeSocket(Listener& listener, Shard& shard, Worker& worker, Fd socket,
                  uint64_t inode, pid_t holder, uid_t uid);
  void NoSocketFound(Listener& listener, Shard& shard, Worker* worker);
  // The serving self-bound worker `pid` died: its socket leaves the tables
  // and is shut down (the queue migrates to the live shards; with none, once
  // the replacement's socket is found).
  void RetireSocket(Listener& listener, Shard& shard, pid_t pid);

 public:
  // A self-bound rollout candidate takes over: its socket becomes the
  // shard's (sockarray slot), the old one is shut down (its queue migrates).
  void SwapInCandidateSocket(Listener& listener, Shard& shard, Worker& fresh);
  // Supervises running process `pid` (not our child) as the serving worker
  // of an adopted shard that already holds its socket (AdoptListener).
  absl::Status AdoptProcess(Listener& listener, Shard& shard, pid_t pid);

 private:
  void OnExit(Listener& listener, Shard& shard, Worker* worker);
  // The serving worker ended: restart it unless the shard is draining or the
  // fleet is stopping.
  void OnServingExit(Listener& listener, Shard& shard, int pid,
                     const std::string& how, absl::Duration uptime);
  void OnControlReadable(Listener& listener, Shard& shard, Worker* worker);
  void OnControlMessage(Listener& listener, Shard& shard, Worker* worker,
                        const v1::WorkerMessage& message);
  void ScheduleRestart(Listener& listener, Shard& shard);
  void ArmReadiness(Listener& listener, Shard& shard, Worker& worker);
  void ReadyTimeout(Listener& listener, Shard& shard, Worker* worker);
  void SendDrainOrTerm(Worker& worker, uint32_t timeout_seconds);

  // A worker's process group after its leader was reaped while descendants
  // stayed in it. They got SIGTERM (the server's own graceful stop) and get
  // SIGKILL at `kill_at`; the shard counts as having processes until the
  // group is empty, so a drain, a rollout's retirement and the agent's stop
  // wait for the whole tree.
  struct Remnant {
    pid_t pgid = 0;
    absl::Time kill_at;
    bool killed = false;
    bool abandoned = false;  // survived SIGKILL: no longer waited for
    Listener* listener = nullptr;
    Shard* shard = nullptr;
    std::weak_ptr<int> shard_alive;
  };
  // After `worker` (of `shard`) was reaped: track what is left of its group.
  void KeepRemnant(Listener& listener, Shard& shard, const Worker& worker);
  void PollRemnants();

  FleetContext* const ctx_;
  WorkerGone gone_;
  std::vector<Remnant> remnants_;
  std::optional<EventLoop::TimerId> remnant_timer_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_SUPERVISOR_H_
