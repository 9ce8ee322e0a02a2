// Fleet: the agent's listeners, their shard sockets and the worker process
// of each shard, and the operations the API asks for. Lives on the EventLoop
// thread: every method must be called there.
//
// Every mutating operation validates and plans first and returns an error
// without changing anything; otherwise it returns OK and calls `done` when
// the change is complete (drains take up to the drain timeout). An
// asynchronous step that fails later (a new worker that never becomes ready)
// is undone before `done` gets the error: a failed call changes nothing.
#ifndef PORTFLEET_AGENT_FLEET_FLEET_H_
#define PORTFLEET_AGENT_FLEET_FLEET_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent/adoption.h"
#include "agent/controller.h"
#include "agent/event_loop.h"
#include "agent/fleet/auto_rebalance.h"
#include "agent/fleet/drain.h"
#include "agent/fleet/handoff.h"
#include "agent/fleet/health_monitor.h"
#include "agent/fleet/load.h"
#include "agent/fleet/model.h"
#include "agent/fleet/supervisor.h"
#include "agent/fleet/update.h"
#include "agent/launcher.h"
#include "agent/sockets.h"
#include "agent/steering/steering.h"
#include "agent/worker_registry.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

class Fleet {
 public:
  Fleet(EventLoop* loop, ProcessLauncher* launcher, FleetOptions options);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  void SetEventSink(std::function<void(const FleetEvent&)> sink) {
    ctx_.sink = std::move(sink);
  }
  // Called by every mutating operation, once it has checked the request and
  // before it changes anything, with the desired state it will produce
  // (see FleetContext::commit). Not called by Start.
  void SetCommitHook(std::function<absl::Status(const v1::FleetSpec&)> hook) {
    ctx_.commit = std::move(hook);
  }
  // BPF steering backend (not owned), or nullptr with the reason it is not
  // available; then listeners use the kernel's plain reuseport hashing.
  void SetSteeringBackend(SteeringBackend* backend, std::string reason);
  bool steering_active() const { return ctx_.steering != nullptr; }
  const std::string& steering_unavailable_reason() const {
    return ctx_.steering_reason;
  }

  // Shard health: the observer (not owned; the kernel's by default), a
  // callback after every observation round, and the start of the periodic
  // observation (the agent starts it; unit tests may Tick by hand).
  void SetShardObserver(ShardObserver* observer) {
    health_.SetObserver(observer);
  }
  void SetAfterHealthTick(std::function<void()> after) {
    health_.SetAfterTick(std::move(after));
  }
  void StartHealthMonitor() {
    health_.Start();
    load_.Start();
    auto_rebalance_.Start();
  }
  // Load measurement seams (not owned; the kernel's by default) and one
  // measurement now (unit tests).
  void SetLoadSeams(ShardObserver* observer, ConnectionCounter* counter) {
    load_.SetObserver(observer);
    load_.SetCounter(counter);
  }
  void MeasureLoadNow() { load_.Tick(); }
  // One-shot rebalance (fleet/rebalance.h); not persisted.
  void RebalanceListener(
      const v1::RebalanceListenerRequest& request,
      std::function<void(absl::StatusOr<v1::RebalanceListenerResponse>)> done);
  // One check of the auto-rebalancer now (unit tests; see
  // fleet/auto_rebalance.h).
  void AutoRebalanceNow() { auto_rebalance_.Tick(); }
  void ObserveHealthNow() { health_.Tick(); }
  // Every listener's health, from its shards as last observed.
  std::vector<ListenerHealthView> Health() const;
  // Maintenance by hand: out of rotation (or back), see HealthMonitor.
  absl::Status SetShardMaintenance(const std::string& name, uint32_t index,
                                   bool maintenance);

  // Workers that reconnected to a restarted agent (or sockets received in a
  // takeover): AddListener gives their shards the handed-back sockets and
  // supervises the running workers instead of starting new ones. Call
  // before Start.
  void SetAdoptees(std::vector<Adoptee> adoptees);
  // Workers a previous agent recorded (agent/worker_registry.h) that still
  // run: a socket on a listener's address that one of them serves is that
  // worker's (drained once the new shards serve), even when its /proc/PID/fd
  // cannot be read (another user's process, no CAP_SYS_PTRACE).
  void SetPreviousWorkers(KnownWorkers known) {
    previous_workers_ = std::move(known);
  }
  // Every worker process the fleet supervises (serving, rollout candidates,
  // retiring), with its listener, shard, shard socket inode and the uid it
  // runs as: what the agent records in <state_dir>/workers. Adopted servers
  // are not included.
  std::vector<v1::WorkerRecord> WorkerRecords() const;

  // Every live shard socket (not owned) with its listener, for a takeover.
  struct SharedSocket {
    v1::Listener listener;
    uint32_t shard;
    int fd;
  };
  std::vector<SharedSocket> SharedSockets() const;
  // The sockets were handed to a new agent (takeover): from now on its
  // workers share them and the orphan scan stops judging their holders.
  void MarkSocketsShared() { ctx_.sockets_shared = true; }

  // Creates every listener of `spec` (at start-up, or after a takeover),
  // without persisting anything. A listener that cannot be started is
  // reported (log, event, status) and retried with backoff while the others
  // serve; a shard whose worker cannot be started is retried like a crashed
  // one. Returns how many listeners failed.
  size_t Start(const v1::FleetSpec& spec);

  // Creates one listener: its shard sockets, steering, then one worker per
  // shard. All or nothing.
  absl::Status AddListener(const v1::Listener& spec);

  absl::Status ScaleListener(const std::string& name, uint32_t shards,
                             Done done);
  absl::Status DrainShard(const std::string& name, uint32_t index, Done done);
  // Takes the listening sockets on the listener's address held by process
  // `pid` (and its process group and descendants) into listener `name`, one
  // new shard per socket, in service at once; returns their indexes. A
  // socket of another uid, on another address or without SO_REUSEPORT is
  // refused with the reason (FailedPrecondition); nothing is taken then.
  absl::StatusOr<std::vector<uint32_t>> AdoptListener(const std::string& name,
                                                      pid_t pid);
  absl::Status DeleteListener(const std::string& name, Done done);
  // Steering tables and CPU pinning of running workers, together: if the
  // tables cannot be written or a worker cannot be re-pinned, both are put
  // back.
  absl::Status SetSteering(const std::string& name,
                           const v1::Steering& steering);
  // Rolling upgrade to `worker` (empty fields keep the current value); see
  // Rollout. If a new worker fails, the shards already rolled are rolled
  // back and `done` gets the error.
  absl::Status RollOut(const std::string& name, const v1::WorkerSpec& worker,
                       uint32_t max_surge, Done done);
  // Rolls out the worker the listener ran before its last successful
  // rollout (an undo); FailedPrecondition when there is none.
  absl::Status RollOutPrevious(const std::string& name, uint32_t max_surge,
                               Done done);
  // The rollout in progress first, then the finished ones, newest first.
  absl::StatusOr<std::vector<v1::RollOut>> RollOuts(
      const std::string& name) const;
  // Pauses or resumes the rollout in progress (FailedPrecondition: none).
  absl::StatusOr<v1::RollOut> PauseRollOut(const std::string& name,
                                           bool paused);
  // Undoes the rollout in progress (see Rollout::Undo); nullopt when none
  // runs.
  absl::StatusOr<std::optional<v1::RollOut>> UndoRollOutInProgress(
      const std::string& name);
  // Applies a changed spec (see PlanUpdate): drain timeout and backlog,
  // steering, shard count and a changed worker (rolled out) in one call.
  absl::Status UpdateListener(const v1::Listener& spec, Done done);
  // What UpdateListener(spec) would do, without doing it.
  absl::StatusOr<ListenerUpdate> PlanListenerUpdate(
      const v1::Listener& spec) const;

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
  // Desired state of every listener (as persisted), failed ones included.
  v1::FleetSpec DesiredSpec() const;
  // Every listener serves and every shard's worker is ready.
  bool AllReady() const;
  size_t listener_count() const { return listeners_.size() + failed_.size(); }
  size_t failed_count() const { return failed_.size(); }

 private:
  friend class ShardAddition;
  friend class UpdateRun;

  absl::StatusOr<Listener*> Find(const std::string& name) const;
  // The commit hook with the desired state where listener `name` becomes
  // `spec` (nullptr: is removed).
  absl::Status Commit(const std::string& name, const v1::Listener* spec);
  // AddListener's steps.
  absl::StatusOr<std::unique_ptr<Listener>> PrepareListener(
      const v1::Listener& spec);
  absl::Status CheckAddressFree(const Listener& listener,
                                std::vector<ForeignListener>* orphans);
  // The reconnected workers of `listener` that fit its desired state, by
  // shard. The others go to `mismatched`: they are told to drain only once
  // the listener's new sockets are in the reuseport group (their queues
  // then migrate there instead of being reset, and no SYN finds the address
  // without a listener).
  std::map<uint32_t, Adoptee> ClaimAdoptees(const Listener& listener,
                                            uint32_t shards,
                                            std::vector<Adoptee>* mismatched);
  absl::StatusOr<std::unique_ptr<Shard>> NewShard(Listener& listener,
                                                  uint32_t index);
  absl::Status CreateShards(Listener& listener, uint32_t n,
                            std::map<uint32_t, Adoptee>& adopt);
  absl::Status AttachSteering(Listener& listener,
                              const std::map<uint32_t, Adoptee>& adopt);
  absl::Status StartWorkers(Listener& listener,
                            std::map<uint32_t, Adoptee>& adopt);
  void LogServing(const Listener& listener) const;

  // Scale to `target` live shards without checking weights (callers do).
  absl::Status Resize(Listener& listener, uint32_t target, Done done);
  // New steering on a validated listener: tables, then re-pinned workers;
  // both put back on failure.
  absl::Status ChangeSteering(Listener& listener, const v1::Steering& steering);
  // Re-pins running workers to their shard's CPU; on failure puts back the
  // ones already moved.
  absl::Status RepinWorkers(Listener& listener,
                            const std::vector<int>& old_cpus);
  absl::Status ApplyUpdate(Listener& listener, ListenerUpdate update,
                           Done done);
  void WorkerGone(Listener& listener, Shard& shard);
  // Listeners that could not be started (retry.cc).
  struct FailedListener {
    v1::Listener spec;
    absl::Status error;
    int attempts = 0;
    absl::Duration backoff;
    std::optional<EventLoop::TimerId> timer;
  };
  void RecordFailure(const v1::Listener& spec, absl::Status error);
  void RetryFailed(const std::string& name);
  void ForgetFailure(const std::string& name);
  absl::Status NotServing(const std::string& name) const;
  absl::Status UpdateFailed(const v1::Listener& spec, Done done);
  absl::Status DeleteFailed(const std::string& name, Done done);

  FleetContext ctx_;
  ListenerMap listeners_;
  Supervisor supervisor_;
  Drainer drainer_;
  std::map<std::string, FailedListener> failed_;
  HealthMonitor health_;
  LoadMonitor load_;
  HandOffRouter handoffs_;
  AutoRebalancer auto_rebalance_;
  std::vector<Adoptee> adoptees_;
  KnownWorkers previous_workers_;
  // In Start (or a retry of it): nothing to commit, and a worker that cannot
  // be started is retried instead of failing its listener.
  bool starting_ = false;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_FLEET_H_
