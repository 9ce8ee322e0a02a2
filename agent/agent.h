// Agent: one portfleet agent process's parts wired together — the event
// loop, the fleet, BPF steering, the API and metrics servers, the control
// socket, and the two ends of a takeover. Start() brings it up to serving,
// Run() serves until the shutdown completes. Signals are not its business
// (SignalHandler in main does them), so a test can run two agents in one
// process.
#ifndef PORTFLEET_AGENT_AGENT_H_
#define PORTFLEET_AGENT_AGENT_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "agent/api/prober.h"
#include "agent/api/server.h"
#include "agent/control_socket.h"
#include "agent/declarative.h"
#include "agent/event_loop.h"
#include "agent/fleet/fleet.h"
#include "agent/fleet_controller.h"
#include "agent/health_board.h"
#include "agent/launcher.h"
#include "agent/metrics/metrics_server.h"
#include "agent/options.h"
#include "agent/sd_notify.h"
#include "agent/steering/steering.h"
#include "agent/stop_decider.h"
#include "agent/takeover.h"
#include "agent/worker_registry.h"

namespace portfleet {

class Agent {
 public:
  // Everything up to serving: the desired state (persisted state, else
  // --config), re-adoption of running workers or a takeover, the fleet, the
  // API and metrics. An error is a start-up failure (exit code 1) and
  // leaves nothing running that this call started.
  static absl::StatusOr<std::unique_ptr<Agent>> Start(
      const AgentOptions& options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Serves until the shutdown (Stop or a handed-over takeover) completes.
  // Returns the process exit code.
  int Run();
  // On the loop thread: a stop request. The first stops the API and drains
  // the workers, unless systemd is restarting the agent's unit: then the
  // agent steps aside (see OnStepAside). Later ones kill the workers at once.
  void OnStop(const std::string& why, int count);
  // On the loop thread (SIGUSR2): step aside, as for a restart by systemd:
  // stop the API, keep the desired state, leave every worker serving on its
  // socket and exit 0; the next agent re-adopts them.
  void OnStepAside(const std::string& why);
  // Thread-safe: OnStop("stop requested", 1) on the loop.
  void Stop();
  // On the loop thread (SIGHUP): declarative mode reads --config again;
  // seed mode logs that it ignores it.
  void OnReload();

  EventLoop* loop() { return loop_.get(); }

 private:
  explicit Agent(const AgentOptions& options);
  absl::Status StartFleet();
  // BPF steering, or the kernel's reuseport hashing with the reason (an
  // error instead with --require-steering).
  absl::Status OpenSteering();
  // The donating end of a takeover, wired to this agent.
  std::unique_ptr<TakeoverDonor> MakeDonor();
  absl::Status OpenApi();
  absl::Status OpenMetrics();
  absl::Status OpenControlSocket(Fd listen_fd);
  void CloseInterfaces();
  // StopDecider's actions.
  void Drain(const std::string& why);
  void StepAside(const std::string& why);
  void OnTakeoverReleased(bool ready_sent);
  void HandOver(std::function<void()> release_done);
  // Our workers drained after a hand-over: exit, or idle until a stop.
  void OnHandedOverDrained();
  void StopApiInBackground(std::function<void()> then);
  void ScheduleCounterLog();
  // Health: recomputes it from the fleet and the phase, publishes it on the
  // board (-> gRPC health, sd_notify STATUS=) and beats the heartbeat.
  void PublishHealth();
  void OnHealthChange(const AgentHealth& health);
  // The agent serves: phase, health, READY=1.
  // Rewrites <state_dir>/workers if the fleet's workers changed.
  void UpdateWorkerRecords();
  void BeginServing();
  void Notify(const std::string& assignments);
  // Declarative mode: starts following --config (once serving).
  void StartReconciler();
  void StopReconciler();

  const AgentOptions options_;
  const std::string control_path_;
  bool takeover_ = false;
  v1::FleetSpec initial_spec_;
  // The initial spec came from --config (a new state dir): save it once.
  // A loaded state is never rewritten at start.
  bool seeded_ = false;
  std::vector<Adoptee> adoptees_;
  Fd control_listen_;  // bound at start, served once the fleet runs
  // Workers a previous agent recorded that still run (agent/
  // worker_registry.h), and this agent's own record of its workers, kept
  // in <state_dir>/workers while it owns the fleet (not after a hand-over).
  KnownWorkers previous_workers_;
  std::unique_ptr<WorkerRegistryWriter> worker_records_;
  bool handed_over_ = false;

  std::unique_ptr<EventLoop> loop_;
  RealProcessLauncher launcher_;
  std::unique_ptr<SteeringBackend> steering_;
  std::unique_ptr<Fleet> fleet_;
  std::unique_ptr<LoopFleetController> controller_;
  // Declarative mode only: follows --config.
  std::unique_ptr<ConfigReconciler> reconciler_;
  // What the API calls: controller_ behind the config mode's rules.
  std::unique_ptr<ConfigModeController> api_controller_;
  std::unique_ptr<ApiServer> api_;
  std::unique_ptr<ApiProber> prober_;  // unix API only
  std::unique_ptr<MetricsServer> metrics_;
  std::unique_ptr<ControlSocketServer> control_server_;
  std::unique_ptr<TakeoverDonor> donor_;
  std::unique_ptr<TakeoverReceiver> receiver_;
  // What a stop request means (drain, or step aside for a restart).
  std::unique_ptr<StopDecider> stop_decider_;
  std::thread api_stopper_;
  bool stopping_ = false;
  // After a hand-over: our workers are drained / a stop was asked for.
  bool drained_ = false;
  bool stop_requested_ = false;
  AgentPhase phase_ = AgentPhase::kStarting;
  HealthBoard board_;
  std::unique_ptr<SdNotifier> notifier_;
  std::unique_ptr<WatchdogPinger> watchdog_;
  // Inode of the control socket this agent bound (0: none): only that one
  // is unlinked at exit, never a running agent's after a failed takeover.
  uint64_t control_inode_ = 0;
};

// main(): blocks the signals, starts the agent and runs it. Returns the exit
// code (0 stopped cleanly, 1 start-up failed).
int RunAgent(const AgentOptions& options);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_AGENT_H_
