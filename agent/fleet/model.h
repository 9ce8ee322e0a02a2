// The fleet's state and what its units share. A Listener owns its shard
// sockets; a Shard owns the worker processes on its socket (the serving one,
// a rollout's candidate, old ones finishing their connections). Plain data:
// the behaviour lives in the units that take a FleetContext
//   fleet.cc       listener map and the public operations
//   scale.cc       adding shards (start, await ready, then steer to them)
//   update.cc      planning and applying a changed listener spec
//   supervisor.cc  worker processes: launch, watch, adopt, exit, restart,
//                  control channel, readiness
//   drain.cc       draining shards, orphans of a previous agent, shutdown
//   rollout.cc     rolling upgrades and their rollback
//   health_monitor.cc  observing every shard, ejecting stalled ones,
//                  restoring and replacing them, maintenance
// Everything here lives on the EventLoop thread.
#ifndef PORTFLEET_AGENT_FLEET_MODEL_H_
#define PORTFLEET_AGENT_FLEET_MODEL_H_

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "agent/controller.h"
#include "agent/event_loop.h"
#include "agent/fleet/health.h"
#include "agent/launcher.h"
#include "agent/steering/steering.h"
#include "portfleet/v1/agent.pb.h"
#include "portfleet/v1/fleet.pb.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/duration_histogram.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {

// Called once when an asynchronous change is complete.
using Done = std::function<void(absl::Status)>;

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
  // How long a new worker (scale-up, rollout) may take to say ready, and how
  // long one without a control channel (no hello) must stay up to count as
  // ready.
  absl::Duration ready_timeout = absl::Seconds(10);
  absl::Duration ready_grace = absl::Seconds(2);
  // Shard health: how often every shard is observed, and the policy's
  // report timeout and restore hysteresis (the stall window and grace are
  // per listener, see HealthSpec).
  absl::Duration health_period = absl::Milliseconds(200);
  absl::Duration report_timeout = absl::Seconds(3);
  absl::Duration restore_after = absl::Seconds(1);
  // How often the holders of every shard socket are looked up (one walk of
  // /proc/*/fd, on the observation period; see fleet/orphans.h).
  absl::Duration orphan_scan_period = absl::Seconds(1);
  // How often the load of every shard is measured (fleet/load.h).
  absl::Duration load_period = absl::Seconds(1);
  // The agent's control socket, passed to workers as PORTFLEET_AGENT_SOCKET
  // so that they can reconnect to a restarted agent. Empty = none.
  std::string agent_socket;
  // A listener that cannot be started at start-up (or after a restart) is
  // retried after this delay, doubling up to the cap.
  absl::Duration failed_retry_initial = absl::Seconds(1);
  absl::Duration failed_retry_max = absl::Seconds(60);
  // Worker programs the agent may run (canonical absolute paths, see
  // --worker-allowlist); empty = any. API access otherwise equals running
  // any program as the agent's user.
  std::set<std::string> worker_allowlist;
  // Environment passed to every worker before the listener's own entries.
  // Empty = the agent's environment without LISTEN_*, NOTIFY_SOCKET and
  // PORTFLEET_* entries.
  std::vector<std::string> base_env;
};

// A worker program resolved once, when its spec enters the fleet: the
// executable and the credentials to run it with.
struct ResolvedWorker {
  v1::WorkerSpec spec;
  std::string path;
  std::optional<Credentials> credentials;  // unset = the agent's
};
// A stable digest of a worker program (command, args, env, user, group),
// given to each worker as PORTFLEET_WORKER_SPEC so that a restarted agent
// can tell which program a running worker is (argv may be rewritten by the
// worker, e.g. setproctitle).
std::string WorkerSpecDigest(const v1::WorkerSpec& spec);
inline constexpr char kWorkerSpecEnvVar[] = "PORTFLEET_WORKER_SPEC";
// A self-bound worker's address ("127.0.0.1:8080", "[::1]:8080"); PORT has
// the port alone.
inline constexpr char kSelfBoundAddressEnvVar[] = "PORTFLEET_ADDRESS";

// The worker binds its own SO_REUSEPORT socket (SOCKET_MODE_SELF_BOUND).
inline bool IsSelfBound(const v1::WorkerSpec& spec) {
  return spec.socket_mode() == v1::SOCKET_MODE_SELF_BOUND;
}

// Resolves the command (ResolveCommand) and user/group (ResolveCredentials).
// Errors say which ("worker command 'x' not found ...", "worker.user: ...").
// With a non-empty `allowlist` (canonical paths), the resolved command must be
// one of them: PermissionDenied otherwise.
absl::StatusOr<ResolvedWorker> ResolveWorker(
    const v1::WorkerSpec& spec, const std::set<std::string>& allowlist = {});

struct Worker {
  LaunchedProcess process;
  // Agent end of the control channel; unset once closed (or never had one).
  std::optional<ControlChannel> control;
  absl::Time started;
  bool hello = false;    // said hello on its control channel
  bool handoff = false;  // its hello said it hands off connections
  // Its hello said it also hands off and adopts proxied pairs (two sockets
  // per HandOffConnection, upstream_attached).
  bool handoff_pairs = false;
  bool adopted = false;  // started by a previous agent; not our child
  bool killed = false;   // SIGKILLed by the agent (its group too)
  // Told to stop (drain, retirement, the agent's stop): its processes are
  // SIGKILLed at this time, also those that outlive it.
  std::optional<absl::Time> stop_by;
  bool ready = false;
  // Someone waits for this worker to be ready (a scale-up, a rollout): called
  // once, with OK or with why it cannot become ready.
  std::function<void(absl::Status)> on_ready;
  std::vector<EventLoop::TimerId> timers;  // cancelled when it goes away
  uint64_t active_connections = 0;
  uint64_t accepted_total = 0;
  uint64_t bytes_in_total = 0;
  uint64_t bytes_out_total = 0;
  uint64_t requests_total = 0;
  bool reports = false;  // has sent a load report
  absl::Time last_report;
  // The hand-off pauses of its last load report (cumulative over its life).
  DurationHistogram handoff_pauses;
  // Lines about this worker's bad control messages.
  LogRateLimiter complaints;
  // Self-bound (see fleet/selfbound.h): binds its own socket, which the
  // agent looks for until it is found; why none was taken yet.
  bool self_bound = false;
  std::string socket_note;
  // A rollout candidate's own socket while the old worker still serves the
  // shard's: a self-bound candidate's, once found; or one the agent opened
  // for it (the old worker has no control channel, see Rollout::RollShard).
  // It becomes the shard's when the candidate takes over.
  Fd found_socket;
  uint64_t found_inode = 0;
  uid_t found_uid = 0;
};

// What the health monitor keeps about a shard (see health_monitor.h).
struct ShardHealthTrack {
  v1::ShardHealth health = v1::SHARD_HEALTH_STARTING;
  std::string reason;
  StallDetector detector;
  bool stalled = false;      // the detector's verdict, acted upon
  bool ejected = false;      // out of the tables for a stall
  bool maintenance = false;  // out of the tables by hand
  bool ever_ready = false;   // a worker of this shard was ready once
  // Queue depth at the previous observation (readiness by draining).
  std::optional<uint32_t> last_depth;
  // Set when a stall episode starts; the worker is replaced when its grace
  // period ends and it is still (or again) stalled.
  std::optional<EventLoop::TimerId> grace_timer;
  uint32_t episodes = 0;  // stalls since the grace timer started
  pid_t stalled_pid = 0;  // the worker that stalled last
  uint32_t ejections = 0;
  uint32_t replacements = 0;
  // The serving worker is being replaced: restart at once, no back-off.
  bool replacing = false;
  // The socket is also served by processes this agent does not supervise (a
  // takeover's old workers): a draining queue says nothing about ours.
  bool shared_socket = false;
};

// A process holding a shard socket outside the shard's worker trees (see
// fleet/orphans.h).
struct OrphanHolder {
  pid_t pid = 0;
  std::string command;
  bool leftover = false;  // of a stopped worker of this shard: killed
};

// The previous load measurement of a shard's worker, for rates.
struct LoadTrack {
  pid_t pid = 0;  // the worker measured; another pid restarts the rates
  absl::Time time = absl::InfinitePast();
  uint64_t cpu_ticks = 0;
  uint64_t bytes = 0;
  uint64_t requests = 0;
};

struct Shard {
  uint32_t index = 0;
  // The agent's copy of the shard socket. A self-bound shard (see
  // fleet/selfbound.h) has none until its worker's socket is found.
  Fd socket;
  uint64_t inode = 0;
  // Self-bound: the owner uid of `socket`, and the socket of a worker that
  // died while no other shard could take its queue: shut down (its queue
  // migrates) once the replacement's socket is found.
  std::optional<uid_t> socket_uid;
  Fd retired_socket;
  // Its process was taken in by AdoptListener: it binds its own socket, is
  // not restarted, and the shard is removed when it exits.
  bool adopted = false;
  int cpu = -1;  // pinned CPU, -1 = any
  v1::ShardState state = v1::SHARD_STATE_STARTING;
  std::unique_ptr<Worker> worker;     // the serving worker
  std::unique_ptr<Worker> candidate;  // a rollout's new worker, not serving
  std::vector<std::unique_ptr<Worker>> retiring;  // finishing connections
  // Process groups of this shard's workers whose leader is gone but not every
  // descendant (a pre-fork server's children); see Supervisor.
  uint32_t remnant_groups = 0;
  // Process groups of this shard's last stopped workers (newest last), and
  // the orphan scan's findings.
  std::vector<pid_t> past_groups;
  std::vector<OrphanHolder> orphans;  // as last scanned
  std::set<pid_t> orphans_seen;       // reported already
  uint64_t orphans_killed = 0;
  ResolvedWorker program;  // what the shard runs (listener's or rollout's)
  // Hand-off pauses of the connections adopted by this shard's workers since
  // the agent started: each load report adds what is new in it, so a
  // worker that goes (replaced, restarted) leaves its counts here.
  DurationHistogram handoff_pauses;
  uint32_t restarts = 0;
  absl::Duration backoff;
  std::optional<EventLoop::TimerId> restart_timer;
  std::optional<EventLoop::TimerId> drain_timer;
  std::vector<Done> drain_done;  // called when the drain completes
  // In the steering tables. A shard added by a scale-up joins them once its
  // worker is ready.
  bool in_service = true;
  ShardHealthTrack health;
  // Its serving worker's load as last measured (fleet/load.h).
  v1::ShardLoad load;
  LoadTrack load_track;
  // Expires with the shard: a callback that may remove the shard checks it
  // before touching the shard again.
  std::shared_ptr<int> lifetime = std::make_shared<int>();

  bool draining() const { return state == v1::SHARD_STATE_DRAINING; }
  // Gets table slots: live, in service, not ejected, not in maintenance.
  bool Steered() const {
    return !draining() && in_service && !health.ejected && !health.maintenance;
  }
  bool HasProcesses() const {
    return worker != nullptr || candidate != nullptr || !retiring.empty() ||
           remnant_groups > 0;
  }
};

// The shard's worker binds its own socket (self-bound or adopted).
inline bool OwnsItsSocket(const Shard& shard) {
  return shard.adopted || IsSelfBound(shard.program.spec);
}

class Rollout;

struct Listener {
  v1::Listener spec;  // desired state, as last set
  SocketAddress address;
  ResolvedWorker program;
  std::vector<std::unique_ptr<Shard>> shards;  // in index order
  std::unique_ptr<ListenerSteering> steering;  // null without BPF
  bool deleting = false;
  std::vector<Done> delete_done;
  // The rollout in progress, if any (shared: its callbacks keep it alive
  // while they run).
  std::shared_ptr<Rollout> rollout;
  // Rollouts started since the agent started (numbers them), and the last
  // finished ones, newest first (at most kRollOutHistory).
  uint32_t rollouts_started = 0;
  std::deque<v1::RollOut> rollout_history;
  // The rebalancer's table slots per shard index (fleet/rebalance.h),
  // replacing the spec's weights while every steered shard has an entry.
  // Cleared when the steering or the shard count changes. Not persisted.
  // Under CPU steering they are the indirection table's weights instead
  // (SteeringTables::table_weights: where spilled connections go) and leave
  // every shard on its CPU.
  std::map<uint32_t, uint32_t> rebalance_slots;
  // CPU steering: the rebalancer's spill share per CPU id (of
  // PF_SPILL_SCALE new connections of that CPU, how many go to the
  // indirection table). Cleared with rebalance_slots. Not persisted.
  std::map<int, uint32_t> rebalance_spill;
  // Rebalances applied since the agent started, the table slots they moved
  // and what they refused (RebalanceRefusal entries).
  uint64_t rebalances = 0;
  uint64_t rebalance_slots_moved = 0;
  uint64_t rebalance_refusals = 0;
  // Connections handed from one worker to another (fleet/handoff.h), and
  // the steps the auto-rebalancer took (fleet/auto_rebalance.h).
  uint64_t rebalance_connections_moved = 0;
  uint64_t auto_rebalance_steps = 0;
  // Hand-off pauses of the connections its workers adopted (see
  // Shard::handoff_pauses), over every shard it had.
  DurationHistogram handoff_pauses;

  // Shards that take new connections (not draining), in index order.
  std::vector<Shard*> Live() const;
  Shard* Find(uint32_t index) const;
  // "listener web shard 2", the prefix of every log line about a shard.
  std::string Name(const Shard& shard) const;
};

using ListenerMap = std::map<std::string, std::unique_ptr<Listener>>;

// What every unit of the fleet shares.
struct FleetContext {
  EventLoop* loop = nullptr;
  ProcessLauncher* launcher = nullptr;
  FleetOptions options;
  SteeringBackend* steering = nullptr;  // null: kernel reuseport hashing
  std::string steering_reason = "not configured";
  std::function<void(const FleetEvent&)> sink;
  // Persists the desired state a change is about to produce, before the
  // change touches anything; an error refuses the change. Unset (start-up,
  // tests): nothing to persist.
  std::function<absl::Status(const v1::FleetSpec&)> commit;
  bool shutting_down = false;
  // The shard sockets were handed to a new agent (takeover): its workers
  // hold them too, so no holder is judged an orphan any more.
  bool sockets_shared = false;
  // Connection hand-off messages from workers (handoff_connection with its
  // sockets, handoff_done), for the rebalancer's router (fleet/handoff.h).
  std::function<void(Listener&, Shard&, const v1::WorkerMessage&,
                     std::vector<Fd>)>
      on_handoff;

  absl::Time Now() const { return loop->Now(); }
  void Emit(v1::EventType type, const Listener& listener, int shard, pid_t pid,
            std::string message) const;
  void Emit(v1::EventType type, const std::string& listener, int shard,
            pid_t pid, std::string message) const;
};

// The CPU shard `index` is pinned to under `steering`: cpus[index % n] for
// STEERING_POLICY_CPU, -1 (any CPU) otherwise.
int PinnedCpu(const v1::Steering& steering, uint32_t index,
              const std::vector<int>& cpus);

// The steering tables for the listener's shards as they are: live,
// in-service shards get the spec's weights in index order (1 each without
// weights); draining and not-yet-ready shards get none; ejected shards and
// shards in maintenance keep their place in the weights with none. While
// the rebalancer's slots (Listener::rebalance_slots) cover every steered
// shard, they replace the weights. Under CPU steering the rebalancer's slots
// weight the indirection table only (table_weights) and its spill shares
// become cpu_spill. Pure.
SteeringTables PlanTables(const Listener& listener);
// PlanTables without the rebalancer's slots: the operator's weights alone.
SteeringTables PlanBaselineTables(const Listener& listener);

// Writes PlanTables(listener) (no-op without BPF or without a live shard).
absl::Status ApplySteering(Listener& listener);
// LEAST_CONNECTIONS: writes each shard's measured connections (Shard::load)
// plus its accept queue at the last health observation to the listener's
// steering, where the program counts on from them.
absl::Status WriteConnectionCounts(const Listener& listener);

// A new listening socket on the listener's address with its options
// (backlog, TCP_DEFER_ACCEPT), in the listener's reuseport group.
absl::StatusOr<Fd> CreateListenerSocket(const Listener& listener);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_MODEL_H_
