#include "agent/agent.h"

#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "agent/adoption.h"
#include "agent/api/state_store.h"
#include "agent/restart_probe.h"
#include "agent/retired.h"
#include "agent/signals.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "google/protobuf/stubs/logging.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/version.h"

namespace portfleet {
namespace {

// How often every shard is observed (FleetOptions::health_period).
constexpr absl::Duration kHealthPeriod = absl::Milliseconds(200);
// How long a stop request waits for systemd to say whether it restarts the
// agent (then the workers stay) before it drains them as for a stop.
constexpr absl::Duration kRestartProbeTimeout = absl::Seconds(1);

std::vector<int> OnlineCpus() {
  cpu_set_t set;
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
    }
  }
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

// Every API connection, control connection and worker channel is a
// descriptor: the soft limit goes up to the hard one (workers inherit it).
void RaiseFdLimit() {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur >= lim.rlim_max) {
    return;
  }
  rlim_t was = lim.rlim_cur;
  lim.rlim_cur = lim.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &lim) == 0) {
    PF_LOG(DEBUG) << "open file limit raised from " << was << " to "
                  << lim.rlim_max;
  }
}

std::string ControlSocketPath(const AgentOptions& options) {
  if (!options.control_socket.empty()) return options.control_socket;
  for (const char* prefix : {"unix://", "unix:"}) {
    if (absl::StartsWith(options.api, prefix)) {
      std::string path = options.api.substr(strlen(prefix));
      return path.substr(0, path.rfind('/') + 1) + "control.sock";
    }
  }
  return options.state_dir + "/control.sock";
}

// A directory the agent keeps sockets or state in must be its own and not
// writable by anyone else: another user could otherwise put a socket there
// that workers or a new agent trust, or replace the state. A directory that
// does not exist yet is created safely later.
absl::Status CheckPrivateDirectory(const std::string& dir,
                                   const std::string& what) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return ErrnoError(absl::StrCat(what, " directory ", dir));
  }
  if (st.st_uid != ::geteuid()) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " directory ", dir, " is owned by uid ", st.st_uid,
        ", not by this agent's uid ", ::geteuid(),
        ": another user could replace what the agent keeps there; use a "
        "directory the agent owns (chown ",
        ::geteuid(), " ", dir, ")"));
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " directory ", dir, " is writable by ",
        (st.st_mode & S_IWOTH) ? "every user" : "its group", " (mode ",
        absl::StrFormat("%04o", st.st_mode & 07777),
        "): another user could put a socket or file of their own there; use "
        "a private directory (chmod go-w ",
        dir, ") such as /run/portfleet"));
  }
  return absl::OkStatus();
}

std::string ParentDir(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Every directory the agent writes sockets or state into.
absl::Status CheckDirectories(const AgentOptions& options,
                              const std::string& control_path) {
  RETURN_IF_ERROR(CheckPrivateDirectory(options.state_dir, "state"));
  RETURN_IF_ERROR(
      CheckPrivateDirectory(ParentDir(control_path), "control socket"));
  for (const char* prefix : {"unix://", "unix:"}) {
    if (absl::StartsWith(options.api, prefix)) {
      return CheckPrivateDirectory(
          ParentDir(options.api.substr(strlen(prefix))), "API socket");
    }
  }
  return absl::OkStatus();
}

// Desired state at start: the persisted state wins; --config seeds a new
// state dir.
absl::StatusOr<v1::FleetSpec> InitialSpec(const AgentOptions& options,
                                          bool* seeded) {
  *seeded = false;
  absl::StatusOr<std::optional<v1::FleetSpec>> persisted =
      LoadFleetState(options.state_dir);
  if (!persisted.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "persisted state is unusable: ", persisted.status().message(),
        " (start refused so that no state is lost: repair or remove the "
        "file)"));
  }
  if (persisted->has_value()) {
    PF_LOG(INFO) << "restoring " << (*persisted)->listeners_size()
                 << " listener(s) from the persisted state in "
                 << options.state_dir
                 << (options.declarative_config
                         ? absl::StrCat(" (--config-mode=declarative: then "
                                        "reconciled to ",
                                        options.config, ")")
                     : options.config.empty()
                         ? std::string()
                         : absl::StrCat(" (--config ", options.config,
                                        " is not applied over it; use "
                                        "portfleetctl apply -f to change the "
                                        "fleet)"));
    return **persisted;
  }
  if (!options.config.empty()) {
    absl::StatusOr<v1::FleetSpec> spec = LoadFleetSpecFile(options.config);
    if (!spec.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("invalid config: ", spec.status().message()));
    }
    // Stored as absolute paths: a relative command must not depend on the
    // directory a later agent starts in.
    for (v1::Listener& l : *spec->mutable_listeners()) {
      MakeCommandAbsolute(l.mutable_worker());
    }
    *seeded = true;
    return spec;
  }
  PF_LOG(INFO) << "no --config and no persisted state: starting with an "
                  "empty fleet (add listeners with portfleetctl apply -f)";
  return v1::FleetSpec();
}

// Workers left running by a previous agent of `spec`'s listeners: those its
// records name (agent/worker_registry.h; any user), and any other process
// holding a listener's address whose environment says it is a worker of
// that listener (same user, or CAP_SYS_PTRACE).
size_t CountOrphanedWorkers(const v1::FleetSpec& spec,
                            const KnownWorkers& known) {
  std::set<pid_t> orphans;
  for (const v1::Listener& l : spec.listeners()) {
    for (const v1::WorkerRecord& r : known.records()) {
      if (r.listener() == l.name()) orphans.insert(static_cast<pid_t>(r.pid()));
    }
    absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(l.address());
    if (!addr.ok()) continue;
    for (const ForeignListener& f : FindForeignListeners(*addr, {})) {
      if (f.pid > 0 && IsOrphanedWorkerOf(f.pid, l.name())) {
        orphans.insert(f.pid);
      }
    }
  }
  return orphans.size();
}

}  // namespace

Agent::Agent(const AgentOptions& options)
    : options_(options), control_path_(ControlSocketPath(options)) {}

Agent::~Agent() {
  if (api_stopper_.joinable()) api_stopper_.join();
  stop_decider_.reset();
  // Calls still arriving fail at once instead of waiting for the loop.
  if (controller_) controller_->Close();
  // Workers are deliberately left running (the data path outlives us); the
  // fleet only releases its registrations on the loop.
  control_server_.reset();
  donor_.reset();
  receiver_.reset();
  metrics_.reset();
  if (api_) api_->Shutdown();
  api_.reset();
  // After the API: GetStatus reads the reconciler through api_controller_.
  api_controller_.reset();
  reconciler_.reset();
  controller_.reset();
  fleet_.reset();
}

absl::StatusOr<std::unique_ptr<Agent>> Agent::Start(
    const AgentOptions& options) {
  std::unique_ptr<Agent> agent(new Agent(options));
  PF_LOG(INFO) << "portfleet-agent " << kVersion << " starting (pid "
               << ::getpid() << ", config " << options.config << ", "
               << OnlineCpus().size() << " CPUs"
               << (options.takeover ? ", takeover" : "") << ")";
  RETURN_IF_ERROR(CheckDirectories(options, agent->control_path_));
  agent->takeover_ = options.takeover;
  if (options.takeover && options.takeover_auto &&
      !ControlSocketAnswers(agent->control_path_)) {
    PF_LOG(INFO) << "--takeover=auto: no agent answers on "
                 << agent->control_path_ << "; starting normally";
    agent->takeover_ = false;
  }
  // Desired state, and sockets that outlive us: a takeover receives the
  // running agent's sockets; a restart re-adopts running workers.
  if (agent->takeover_) {
    ASSIGN_OR_RETURN(
        agent->receiver_,
        TakeoverReceiver::Request(agent->control_path_, absl::Seconds(10)));
    TakeoverGrant grant = agent->receiver_->TakeGrant();
    agent->initial_spec_ = std::move(grant.spec);
    agent->adoptees_ = std::move(grant.sockets);
    PF_LOG(INFO) << "takeover: received " << agent->adoptees_.size()
                 << " shard socket(s) of "
                 << agent->initial_spec_.listeners_size()
                 << " listener(s) from the running agent";
  } else {
    ASSIGN_OR_RETURN(agent->initial_spec_,
                     InitialSpec(options, &agent->seeded_));
    absl::StatusOr<Fd> control = ListenControlSocket(agent->control_path_);
    if (!control.ok()) return Annotate(control.status(), "control socket");
    agent->control_listen_ = std::move(*control);
    // Workers left running by a previous agent reconnect within ~250 ms.
    agent->previous_workers_ =
        KnownWorkers(LoadLiveWorkers(agent->options_.state_dir));
    if (size_t orphans = CountOrphanedWorkers(agent->initial_spec_,
                                              agent->previous_workers_)) {
      PF_LOG(INFO) << orphans << " worker(s) of a previous agent found; "
                   << "waiting up to 2s for them to reconnect on "
                   << agent->control_path_;
      std::set<std::string> names;
      for (const v1::Listener& l : agent->initial_spec_.listeners()) {
        names.insert(l.name());
      }
      agent->adoptees_ =
          CollectReconnects(agent->control_listen_.get(), orphans,
                            absl::Seconds(2), names, agent->previous_workers_);
      PF_LOG(INFO) << agent->adoptees_.size() << " worker(s) reconnected";
    }
  }
  RETURN_IF_ERROR(agent->StartFleet());
  return agent;
}

static absl::StatusOr<std::set<std::string>> LoadWorkerAllowlist(
    const std::string& path) {
  std::set<std::string> out;
  if (path.empty()) return out;
  std::ifstream in(path);
  if (!in) return ErrnoError(absl::StrCat("--worker-allowlist ", path));
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    absl::string_view entry = absl::StripAsciiWhitespace(line);
    if (entry.empty() || entry[0] == '#') continue;
    std::error_code ec;
    std::filesystem::path canonical =
        std::filesystem::canonical(std::string(entry), ec);
    if (entry[0] != '/' || ec) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n, ": '", entry,
                       "' is not an absolute path to an "
                       "existing file",
                       ec ? absl::StrCat(" (", ec.message(), ")") : ""));
    }
    out.insert(canonical.string());
  }
  if (out.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        ": no worker program listed (an empty allowlist would refuse "
        "every listener)"));
  }
  return out;
}

absl::Status Agent::StartFleet() {
  ASSIGN_OR_RETURN(loop_, EventLoop::Create());
  FleetOptions fleet_options;
  ASSIGN_OR_RETURN(fleet_options.worker_allowlist,
                   LoadWorkerAllowlist(options_.worker_allowlist));
  fleet_options.cpus = OnlineCpus();
  fleet_options.agent_socket = control_path_;
  fleet_options.health_period = kHealthPeriod;
  fleet_ = std::make_unique<Fleet>(loop_.get(), &launcher_, fleet_options);
  fleet_->SetAdoptees(std::move(adoptees_));
  fleet_->SetPreviousWorkers(previous_workers_);
  worker_records_ = std::make_unique<WorkerRegistryWriter>(options_.state_dir);
  RETURN_IF_ERROR(OpenSteering());
  std::string state_dir = options_.state_dir;
  controller_ = std::make_unique<LoopFleetController>(
      loop_.get(), fleet_.get(),
      [state_dir](const v1::FleetSpec& desired) {
        return SaveFleetState(state_dir, desired);
      },
      kVersion, &board_);
  notifier_ = SdNotifier::FromEnvironment();
  board_.OnChange([this](const AgentHealth& h) { OnHealthChange(h); });
  fleet_->SetAfterHealthTick([this] {
    PublishHealth();
    UpdateWorkerRecords();
  });
  fleet_->StartHealthMonitor();
  if (std::optional<absl::Duration> interval = SdNotifier::WatchdogInterval();
      interval && notifier_) {
    watchdog_ = std::make_unique<WatchdogPinger>(loop_.get(), notifier_.get(),
                                                 *interval);
  }
  fleet_->SetEventSink([this](const FleetEvent& e) {
    controller_->Publish(e);
    // A worker started or went: on record before anything else can happen
    // to this agent.
    UpdateWorkerRecords();
  });
  if (options_.declarative_config) {
    LoopFleetController* c = controller_.get();
    Fleet* fleet = fleet_.get();
    reconciler_ = std::make_unique<ConfigReconciler>(
        loop_.get(), options_.config,
        ConfigReconcilerHooks{
            .controller = c,
            .desired = [fleet] { return fleet->DesiredSpec(); },
            .publish = [c](const FleetEvent& e) { c->Publish(e); }});
  }
  api_controller_ = std::make_unique<ConfigModeController>(
      controller_.get(),
      options_.declarative_config ? ConfigMode::kDeclarative
                                  : ConfigMode::kSeed,
      options_.config, reconciler_.get());
  donor_ = MakeDonor();
  stop_decider_ = std::make_unique<StopDecider>(
      loop_.get(), MakeSystemdRestartProbe(), kRestartProbeTimeout,
      StopDecider::Actions{
          .drain = [this](const std::string& why) { Drain(why); },
          .step_aside = [this](const std::string& why) { StepAside(why); },
          .kill_now =
              [this](const std::string& why) {
                PF_LOG(WARNING) << why << " again: killing workers now";
                fleet_->KillAll();
              }});

  if (takeover_) {
    // The old agent keeps the API, metrics and control socket until our
    // workers are ready; we open them once it lets go.
    fleet_->Start(initial_spec_);
    return receiver_->Watch(
        loop_.get(), [this] { return fleet_->AllReady(); },
        [this](bool ready_sent) { OnTakeoverReleased(ready_sent); });
  }
  // The API comes up first (NOT_SERVING) so that a failure to bind it stops
  // the start before any worker runs.
  RETURN_IF_ERROR(OpenApi());
  size_t failed = fleet_->Start(initial_spec_);
  if (seeded_) {
    // A state that cannot be saved is not a reason to stop serving: the API
    // refuses changes until it can be.
    absl::Status s = SaveFleetState(options_.state_dir, fleet_->DesiredSpec());
    if (!s.ok()) {
      PF_LOG(ERROR) << "saving the desired state from --config: " << s.message()
                    << " (serving; changes through the API are refused until "
                       "the state can be saved)";
    }
  }
  if (absl::Status s = OpenControlSocket(std::move(control_listen_)); !s.ok()) {
    fleet_->KillAll();
    return s;
  }
  BeginServing();
  ScheduleCounterLog();
  PF_LOG(INFO) << "fleet serving: " << fleet_->listener_count() - failed
               << " listener(s)"
               << (failed > 0 ? absl::StrCat(", ", failed,
                                             " not serving (retried; see "
                                             "above)")
                              : std::string());
  return absl::OkStatus();
}

void Agent::UpdateWorkerRecords() {
  // A new agent that takes over records its workers once it serves; one
  // that handed over leaves the record to it.
  if (!worker_records_ || handed_over_ || phase_ == AgentPhase::kStarting) {
    return;
  }
  worker_records_->Update(fleet_->WorkerRecords());
}

void Agent::BeginServing() {
  phase_ = AgentPhase::kServing;
  UpdateWorkerRecords();
  fleet_->ObserveHealthNow();  // publishes
  if (api_) api_->SetHealth(board_.Current());
  Notify(absl::StrCat("READY=1\nSTATUS=", DescribeHealth(board_.Current())));
  StartReconciler();
}

void Agent::StartReconciler() {
  if (!reconciler_) return;
  if (absl::Status s = reconciler_->Start(); !s.ok()) {
    // Serving goes on with the fleet as it is; SIGHUP still reconciles.
    PF_LOG(ERROR) << "declarative config: " << s.message() << " (changes of "
                  << options_.config << " are applied only on SIGHUP)";
  }
}

void Agent::StopReconciler() {
  if (reconciler_) reconciler_->Stop();
}

void Agent::OnReload() {
  if (stopping_) return;
  if (!reconciler_) {
    PF_LOG(INFO) << "SIGHUP ignored (--config-mode=seed): use portfleetctl "
                    "apply to change the fleet";
    return;
  }
  reconciler_->Reload();
}

void Agent::PublishHealth() {
  board_.Beat(absl::Now());
  board_.Publish(ComputeAgentHealth(phase_, fleet_->Health()));
}

void Agent::OnHealthChange(const AgentHealth& health) {
  // On the loop thread (Publish runs there).
  std::string text = DescribeHealth(health);
  if (health.state == v1::HEALTH_STATE_SERVING ||
      health.state == v1::HEALTH_STATE_STARTING ||
      health.state == v1::HEALTH_STATE_STOPPING) {
    PF_LOG(INFO) << "health: " << text;
  } else {
    PF_LOG(WARNING) << "health: " << text;
  }
  if (api_ && !(donor_ && donor_->in_progress())) api_->SetHealth(health);
  Notify("STATUS=" + text);
}

void Agent::Notify(const std::string& assignments) {
  if (!notifier_) return;
  if (absl::Status s = notifier_->Send(assignments); !s.ok()) {
    PF_LOG(DEBUG) << s;
  }
}

absl::Status Agent::OpenSteering() {
  // BPF steering, or the kernel's plain reuseport hashing with the reason.
  absl::StatusOr<std::unique_ptr<SteeringBackend>> steering =
      OpenBpfSteering(options_.bpffs);
  if (steering.ok()) {
    steering_ = std::move(*steering);
    fleet_->SetSteeringBackend(steering_.get(), "");
    PF_LOG(INFO) << "BPF steering active (maps pinned under " << options_.bpffs
                 << ")";
  } else if (options_.require_steering) {
    return absl::FailedPreconditionError(
        absl::StrCat("BPF steering unavailable (--require-steering): ",
                     steering.status().message()));
  } else {
    fleet_->SetSteeringBackend(nullptr,
                               std::string(steering.status().message()));
    PF_LOG(WARNING) << "BPF steering unavailable: "
                    << steering.status().message()
                    << "; listeners use the kernel's reuseport hash and "
                       "steering requests will fail";
  }
  return absl::OkStatus();
}

std::unique_ptr<TakeoverDonor> Agent::MakeDonor() {
  return std::make_unique<TakeoverDonor>(
      loop_.get(),
      TakeoverDonor::Hooks{.sockets =
                               [this] {
                                 std::vector<SharedShard> out;
                                 fleet_->MarkSocketsShared();
                                 for (const Fleet::SharedSocket& s :
                                      fleet_->SharedSockets()) {
                                   out.push_back({s.listener, s.shard, s.fd});
                                 }
                                 return out;
                               },
                           .pause =
                               [this] {
                                 if (api_) api_->SetServing(false);
                                 StopReconciler();
                                 controller_->Close();
                                 // Not ready (/readyz 503, STATUS=).
                                 phase_ = AgentPhase::kHandingOver;
                                 PublishHealth();
                               },
                           .resume =
                               [this] {
                                 phase_ = AgentPhase::kServing;
                                 PublishHealth();
                                 controller_->Reopen();
                                 StartReconciler();
                                 if (api_) api_->SetHealth(board_.Current());
                               },
                           .hand_over =
                               [this](std::function<void()> release_done) {
                                 HandOver(std::move(release_done));
                               }});
}

absl::Status Agent::OpenApi() {
  ApiServerOptions api_options;
  api_options.address = options_.api;
  api_options.socket_group = options_.api_group;
  api_options.tls_address = options_.api_tls_address;
  api_options.tls_cert = options_.api_tls_cert;
  api_options.tls_key = options_.api_tls_key;
  api_options.tls_client_ca = options_.api_tls_client_ca;
  api_options.authz_policy_file = options_.api_authz_policy;
  absl::StatusOr<std::unique_ptr<ApiServer>> started =
      ApiServer::Start(api_options, api_controller_.get());
  if (!started.ok()) {
    return Annotate(started.status(), absl::StrCat("API ", options_.api));
  }
  api_ = std::move(*started);
  if (absl::StartsWith(options_.api, "unix:")) {
    prober_ =
        std::make_unique<ApiProber>(ApiProberOptions{.target = options_.api});
  }
  return OpenMetrics();
}

absl::Status Agent::OpenMetrics() {
  MetricsServerOptions metrics_options;
  metrics_options.address = options_.metrics;
  // Alive: the event loop beats after every health round (a loop that has
  // not for this long is wedged) and the API answers.
  ApiProber* prober = prober_.get();
  const HealthBoard* board = &board_;
  absl::Duration max_beat_age = std::max(absl::Seconds(3), 15 * kHealthPeriod);
  metrics_options.liveness = [prober, board, max_beat_age] {
    RETURN_IF_ERROR(board->Live(absl::Now(), max_beat_age));
    return prober ? prober->Liveness() : absl::OkStatus();
  };
  metrics_options.health = [board] { return board->Current(); };
  LoopFleetController* controller = controller_.get();
  absl::StatusOr<std::unique_ptr<MetricsServer>> m = MetricsServer::Start(
      metrics_options, [controller]() -> absl::StatusOr<MetricsSnapshot> {
        MetricsSnapshot snap;
        snap.agent = controller->GetStatus();
        ASSIGN_OR_RETURN(snap.listeners, controller->ListListeners());
        return snap;
      });
  if (!m.ok()) return m.status();
  metrics_ = std::move(*m);
  absl::StatusOr<SocketAddress> bound =
      SocketAddress::Parse(options_.metrics, /*allow_port_zero=*/true);
  std::string where = options_.metrics;
  if (bound.ok()) {
    where =
        absl::StrCat(bound->ToString().substr(0, bound->ToString().rfind(':')),
                     ":", metrics_->port());
  }
  PF_LOG(INFO) << "metrics on http://" << where
               << "/metrics (also /healthz, /readyz)";
  return absl::OkStatus();
}

absl::Status Agent::OpenControlSocket(Fd listen_fd) {
  control_server_ = std::make_unique<ControlSocketServer>(
      loop_.get(), std::move(listen_fd),
      [this](ControlConnection c) {
        if (stopping_) {
          PF_LOG(WARNING) << "takeover request from pid " << c.peer_pid
                          << " refused: this agent is stopping";
          return;
        }
        donor_->OnRequest(std::move(c));
      },
      ControlSocketOptions{.admit = [this](pid_t pid, uid_t uid) {
        // The agent's uid, a previous agent's worker (a late reconnect: told
        // to drain), or one of ours.
        if (AdmitControlPeer(pid, uid, previous_workers_)) return true;
        if (!worker_records_) return false;
        for (const v1::WorkerRecord& r : worker_records_->current()) {
          if (static_cast<pid_t>(r.pid()) == pid && r.uid() == uid) {
            return true;
          }
        }
        return false;
      }});
  RETURN_IF_ERROR(Annotate(control_server_->Start(), "control socket"));
  struct stat st;
  if (::stat(control_path_.c_str(), &st) == 0) control_inode_ = st.st_ino;
  return absl::OkStatus();
}

void Agent::OnTakeoverReleased(bool ready_sent) {
  receiver_.reset();
  absl::StatusOr<Fd> control = ListenControlSocket(control_path_);
  absl::Status s = control.ok() ? OpenControlSocket(std::move(*control))
                                : Annotate(control.status(), "control socket");
  if (s.ok()) s = OpenApi();
  if (s.ok()) s = SaveFleetState(options_.state_dir, fleet_->DesiredSpec());
  if (!s.ok()) {
    PF_LOG(ERROR) << "takeover: " << s.message()
                  << "; the fleet keeps serving without them";
    return;
  }
  BeginServing();
  ScheduleCounterLog();
  PF_LOG(INFO) << "takeover complete: this agent serves the API"
               << (ready_sent ? "" : " (the old agent went away first)");
}

void Agent::CloseInterfaces() {
  control_server_.reset();
  metrics_.reset();
  prober_.reset();
}

void Agent::StopApiInBackground(std::function<void()> then) {
  if (!api_) {
    if (then) then();
    return;
  }
  // Off the loop thread: in-flight calls still need the loop to finish.
  api_stopper_ = std::thread([this, then = std::move(then)] {
    api_->Shutdown();
    if (then) then();
  });
}

void Agent::HandOver(std::function<void()> release_done) {
  handed_over_ = true;
  stopping_ = true;
  phase_ = AgentPhase::kStopping;
  if (!options_.instance_id.empty()) {
    // Before anything else: from now on a restart of this instance must
    // never take the sockets back.
    absl::Status s = RetireInstance(options_.state_dir, options_.instance_id);
    if (s.ok()) {
      PF_LOG(INFO) << "instance " << options_.instance_id
                   << " retired: restarted with this --instance-id, an agent "
                      "stays idle and never takes the sockets back";
    } else {
      PF_LOG(ERROR) << "recording instance " << options_.instance_id
                    << " as retired: " << s.message()
                    << " (a restart of this instance could take the sockets "
                       "back)";
    }
  }
  PublishHealth();
  Notify("STOPPING=1\nSTATUS=handed over to a new agent; draining workers");
  CloseInterfaces();
  // Closing the connection (release_done) tells the new agent we let go.
  StopApiInBackground(std::move(release_done));
  fleet_->Shutdown([this] { OnHandedOverDrained(); });
}

void Agent::OnHandedOverDrained() {
  drained_ = true;
  if (!options_.idle_after_handover || stop_requested_) {
    loop_->Stop();
    return;
  }
  PF_LOG(INFO) << "handed over and our workers drained; idle (no API, no "
                  "metrics, not ready) until terminated "
                  "(--after-handover=idle)";
}

void Agent::OnStop(const std::string& why, int count) {
  if (donor_ && donor_->handed_over() && count == 1) {
    if (drained_) {
      PF_LOG(INFO) << why << ": handed over and idle; stopping";
      loop_->Stop();
      return;
    }
    PF_LOG(INFO) << why
                 << ": already handed over; stopping once our workers "
                    "are drained";
    stop_requested_ = true;
    return;
  }
  if (stopping_ && stop_decider_->state() == StopDecider::State::kRunning) {
    // A hand-over in progress.
    PF_LOG(WARNING) << why << " again: killing workers now";
    fleet_->KillAll();
    return;
  }
  stop_decider_->OnStop(why, count);
}

void Agent::OnStepAside(const std::string& why) {
  if (stopping_) {
    PF_LOG(INFO) << why << ": ignored, already stopping";
    return;
  }
  stop_decider_->OnStepAside(why);
}

void Agent::Drain(const std::string& why) {
  stopping_ = true;
  phase_ = AgentPhase::kStopping;
  PublishHealth();
  Notify("STOPPING=1\nSTATUS=stopping: draining workers");
  PF_LOG(INFO) << why << ": stopping the API and the workers";
  if (api_) api_->SetServing(false);
  StopReconciler();
  controller_->Close();
  CloseInterfaces();
  StopApiInBackground(nullptr);
  fleet_->Shutdown([this] { loop_->Stop(); });
}

void Agent::StepAside(const std::string& why) {
  stopping_ = true;
  phase_ = AgentPhase::kStopping;
  PublishHealth();
  size_t workers = 0;
  for (const ListenerStatus& l : fleet_->Status()) {
    for (const ShardStatus& s : l.shards) workers += s.pid > 0 ? 1 : 0;
  }
  std::string leaving =
      absl::StrCat("leaving ", workers, workers == 1 ? " worker" : " workers",
                   " of ", fleet_->listener_count(),
                   fleet_->listener_count() == 1 ? " listener" : " listeners",
                   " to the next agent");
  Notify(absl::StrCat("STOPPING=1\nSTATUS=stepping aside: ", leaving));
  PF_LOG(INFO) << why << ": " << leaving;
  if (api_) api_->SetServing(false);
  StopReconciler();
  controller_->Close();
  // Every change was saved when it was made; once more, so that the next
  // agent restores exactly this fleet.
  if (absl::Status s =
          SaveFleetState(options_.state_dir, fleet_->DesiredSpec());
      !s.ok()) {
    PF_LOG(ERROR) << "saving the desired state before stepping aside: "
                  << s.message()
                  << " (the next agent restores the last "
                     "state saved)";
  }
  // The control socket goes (the next agent binds its own at that path);
  // the workers' channels close when this process exits and they reconnect
  // to it. Workers, shard sockets, steering program and pinned maps stay.
  CloseInterfaces();
  EventLoop* loop = loop_.get();
  StopApiInBackground([loop] { loop->Stop(); });
}

void Agent::Stop() {
  loop_->Post([this] { OnStop("stop requested", 1); });
}

void Agent::ScheduleCounterLog() {
  // Steering counters in the debug log, every 10 s.
  loop_->AddTimer(absl::Seconds(10), [this] {
    if (GetLogLevel() <= LogLevel::kDebug) fleet_->LogSteeringCounters();
    ScheduleCounterLog();
  });
}

int Agent::Run() {
  loop_->Run();
  if (api_stopper_.joinable()) api_stopper_.join();
  CloseInterfaces();
  bool handed_over = donor_ && donor_->handed_over();
  // Only our own socket: after a takeover the new agent's is at that path,
  // and an agent whose takeover failed never had one there.
  struct stat st;
  if (!handed_over && control_inode_ != 0 &&
      ::stat(control_path_.c_str(), &st) == 0 && st.st_ino == control_inode_) {
    ::unlink(control_path_.c_str());
  }
  bool stepped_aside = stop_decider_ && stop_decider_->state() ==
                                            StopDecider::State::kSteppingAside;
  PF_LOG(INFO) << (handed_over     ? "handed over; stopped"
                   : stepped_aside ? "stepped aside; workers left serving"
                                   : "stopped");
  return 0;
}

// protobuf logs an ERROR for every malformed string it parses (e.g. invalid
// UTF-8 from a worker): through our log, rate-limited, as input from outside.
void RouteProtobufLogs() {
  google::protobuf::SetLogHandler([](google::protobuf::LogLevel level,
                                     const char* filename, int line,
                                     const std::string& message) {
    static std::mutex mu;
    static LogRateLimiter limiter(5, absl::Seconds(10));
    std::lock_guard<std::mutex> lock(mu);
    uint64_t dropped = 0;
    if (!limiter.Allow(absl::Now(), &dropped)) return;
    if (level >= google::protobuf::LOGLEVEL_ERROR) {
      PF_LOG(WARNING) << "protobuf: " << message << SuppressedNote(dropped);
    } else {
      PF_LOG(DEBUG) << "protobuf: " << message << SuppressedNote(dropped);
    }
  });
}

namespace {

// Whether this agent's --instance-id has handed over before (see
// agent/retired.h).
bool IsRetired(const AgentOptions& options) {
  if (options.instance_id.empty()) return false;
  absl::StatusOr<std::vector<std::string>> retired =
      LoadRetiredInstances(options.state_dir);
  if (!retired.ok()) {
    PF_LOG(WARNING) << "cannot read the retired instances: "
                    << retired.status().message()
                    << " (starting as if instance " << options.instance_id
                    << " had never handed over)";
    return false;
  }
  return std::find(retired->begin(), retired->end(), options.instance_id) !=
         retired->end();
}

// A retired instance opens nothing (no API, metrics, control socket, state
// or sockets) and waits for SIGTERM or SIGINT: restarted by its container
// engine, it must not take the sockets back from the agent it handed them
// to, nor be restarted again and again.
int RunRetired(const AgentOptions& options,
               std::unique_ptr<SignalHandler>* signals) {
  PF_LOG(WARNING) << "instance " << options.instance_id
                  << " already handed its sockets over to a newer agent ("
                  << options.state_dir << "/" << kRetiredInstancesFileName
                  << "): retired; staying idle (no API, no metrics, not "
                     "ready, no takeover) until terminated";
  absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Create();
  if (!loop.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << loop.status();
    return 1;
  }
  EventLoop* l = loop->get();
  absl::Status watched = (*signals)->Watch(l, [l](int sig, int) {
    PF_LOG(INFO) << "received SIG" << sigabbrev_np(sig)
                 << ": retired agent stops";
    l->Stop();
  });
  if (!watched.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << watched;
    signals->reset();  // before the loop it watches
    return 1;
  }
  l->Run();
  signals->reset();  // before the loop it watches
  return 0;
}

}  // namespace

int RunAgent(const AgentOptions& options) {
  SetLogTag("agent");
  SetLogLevel(*ParseLogLevel(options.log_level));
  if (!options.log_format.empty()) {
    SetLogFormat(*ParseLogFormat(options.log_format));
  }
  RouteProtobufLogs();
  // A worker that dies mid-write must not kill us.
  ::signal(SIGPIPE, SIG_IGN);
  RaiseFdLimit();
  // Before any thread starts.
  absl::StatusOr<std::unique_ptr<SignalHandler>> signals =
      SignalHandler::Block();
  if (!signals.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << signals.status();
    return 1;
  }
  if (IsRetired(options)) return RunRetired(options, &*signals);
  absl::StatusOr<std::unique_ptr<Agent>> agent = Agent::Start(options);
  if (!agent.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << agent.status().message();
    return 1;
  }
  Agent* a = agent->get();
  absl::Status watched = (*signals)->Watch(
      a->loop(),
      [a](int sig, int count) {
        a->OnStop(absl::StrCat("received SIG", sigabbrev_np(sig)), count);
      },
      [a] { a->OnReload(); }, [a] { a->OnStepAside("received SIGUSR2"); });
  if (!watched.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << watched;
    return 1;
  }
  int code = a->Run();
  signals->reset();
  return code;
}

}  // namespace portfleet
