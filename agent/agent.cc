#include "agent/agent.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <iostream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/adoption.h"
#include "agent/api/server.h"
#include "agent/api/state_store.h"
#include "agent/event_loop.h"
#include "agent/fleet.h"
#include "agent/fleet_controller.h"
#include "agent/launcher.h"
#include "agent/metrics/metrics_server.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "agent/steering/steering.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/version.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {
namespace {

constexpr char kUsage[] = R"(Usage: portfleet-agent [--config FILE] [options]

Runs a fleet of SO_REUSEPORT listening sockets ("shards") with one worker
process per shard, steers new connections to shards with an eBPF program,
restarts workers that die on the same socket, and serves the gRPC API that
portfleetctl uses.

Desired state: the agent persists every change in --state-dir. At start, a
persisted state wins over --config (which only seeds a new state dir); use
'portfleetctl apply -f FILE' to apply an edited spec to a running agent.

Options:
  --config FILE      fleet spec, protobuf text format (.textproto) or JSON
                     (.json) of portfleet.v1.FleetSpec
  --api ADDR         gRPC API endpoint (default unix:///run/portfleet/api.sock;
                     the socket is 0660, its directory 0750)
  --api-group GROUP  group owning the API socket (default: the agent's)
  --api-tls-address HOST:PORT   optional remote API with mutual TLS
  --api-tls-cert FILE, --api-tls-key FILE, --api-tls-client-ca FILE
  --api-authz-policy FILE       gRPC authorization policy for the remote API
  --metrics ADDR     metrics/health HTTP endpoint (default 127.0.0.1:9464)
  --state-dir DIR    persisted desired state (default /var/lib/portfleet)
  --control-socket PATH   where workers reconnect to a restarted agent
                     (default: control.sock beside a unix --api socket, else
                     in --state-dir)
  --bpffs DIR        pinned steering maps (default /sys/fs/bpf/portfleet)
  --log-level LEVEL  debug, info, warning or error (default info)
  --takeover[=auto]  take over from the agent running on the same control
                     socket: receive its shard sockets, start our workers on
                     them, then it drains its workers and exits (upgrades
                     without a gap, e.g. a DaemonSet with maxSurge 1). With
                     =auto, start normally when no agent is running.
  --check            validate the config file and exit (0 = valid)
  --version          print the version and exit
  -h, --help         show this help

Signals:
  SIGTERM, SIGINT    stop: workers get SIGTERM and finish their connections;
                     after the listeners' drain timeout stragglers get SIGKILL;
                     exit 0. A second signal kills the workers at once.

Example:
  portfleet-agent --config deploy/examples/quickstart.textproto
  curl http://127.0.0.1:8080/
  portfleetctl get shards web

Exit codes: 0 stopped cleanly or config valid, 1 start-up failed (the log
says which listener and why), 2 usage error.
)";

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

}  // namespace

ParsedArgs ParseAgentArgs(const std::vector<std::string>& args) {
  ParsedArgs out;
  bool check_only = false;
  auto usage_error = [&](const std::string& message) {
    std::fprintf(
        stderr,
        "portfleet-agent: %s\nRun 'portfleet-agent --help' for usage.\n",
        message.c_str());
    out.exit_now = true;
    out.exit_code = 2;
    return out;
  };
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    std::string value;
    bool has_inline = false;
    if (absl::StartsWith(arg, "--") && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
      has_inline = true;
    }
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      out.exit_now = true;
      return out;
    }
    if (arg == "--version") {
      std::printf("portfleet-agent %s\n", kVersion);
      out.exit_now = true;
      return out;
    }
    if (arg == "--check") {
      check_only = true;
      continue;
    }
    if (arg == "--takeover") {
      if (has_inline && value != "auto" && value != "always") {
        return usage_error("--takeover: '" + value +
                           "' is not 'always' or 'auto'");
      }
      out.options.takeover = true;
      out.options.takeover_auto = has_inline && value == "auto";
      continue;
    }
    std::string* target = nullptr;
    if (arg == "--config") target = &out.options.config;
    if (arg == "--api") target = &out.options.api;
    if (arg == "--metrics") target = &out.options.metrics;
    if (arg == "--state-dir") target = &out.options.state_dir;
    if (arg == "--bpffs") target = &out.options.bpffs;
    if (arg == "--log-level") target = &out.options.log_level;
    if (arg == "--api-group") target = &out.options.api_group;
    if (arg == "--control-socket") target = &out.options.control_socket;
    if (arg == "--api-tls-address") target = &out.options.api_tls_address;
    if (arg == "--api-tls-cert") target = &out.options.api_tls_cert;
    if (arg == "--api-tls-key") target = &out.options.api_tls_key;
    if (arg == "--api-tls-client-ca") target = &out.options.api_tls_client_ca;
    if (arg == "--api-authz-policy") target = &out.options.api_authz_policy;
    if (target == nullptr) return usage_error("unknown option '" + arg + "'");
    if (!has_inline) {
      if (i + 1 >= args.size()) return usage_error(arg + " needs a value");
      value = args[++i];
    }
    *target = value;
  }
  if (!ParseLogLevel(out.options.log_level).ok()) {
    return usage_error("--log-level: unknown level '" + out.options.log_level +
                       "' (want debug, info, warning or error)");
  }
  if (check_only && out.options.config.empty()) {
    return usage_error("--check needs --config FILE");
  }
  if (check_only) {
    absl::StatusOr<v1::FleetSpec> spec = LoadFleetSpecFile(out.options.config);
    out.exit_now = true;
    if (!spec.ok()) {
      std::fprintf(stderr, "portfleet-agent: %s\n",
                   std::string(spec.status().message()).c_str());
      out.exit_code = 1;
    } else {
      std::printf("%s: valid, %d listener(s)\n", out.options.config.c_str(),
                  spec->listeners_size());
    }
  }
  return out;
}

namespace {

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

// Desired state at start: the persisted state wins; --config seeds a new
// state dir.
absl::StatusOr<v1::FleetSpec> InitialSpec(const AgentOptions& options) {
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
                 << (options.config.empty()
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
    return spec;
  }
  PF_LOG(INFO) << "no --config and no persisted state: starting with an "
                  "empty fleet (add listeners with portfleetctl apply -f)";
  return v1::FleetSpec();
}

}  // namespace

int RunAgent(const AgentOptions& options) {
  SetLogTag("agent");
  SetLogLevel(*ParseLogLevel(options.log_level));
  // A worker that dies mid-write must not kill us.
  ::signal(SIGPIPE, SIG_IGN);
  std::vector<int> cpus = OnlineCpus();
  PF_LOG(INFO) << "portfleet-agent " << kVersion << " starting (pid "
               << ::getpid() << ", config " << options.config << ", "
               << cpus.size() << " CPUs"
               << (options.takeover ? ", takeover" : "") << ")";
  const std::string control_path = ControlSocketPath(options);

  // Desired state, and sockets that outlive us: a takeover receives the
  // running agent's sockets; a restart re-adopts running workers.
  v1::FleetSpec spec;
  std::vector<Adoptee> adoptees;
  Fd takeover_connection;
  absl::StatusOr<Fd> control_socket = Fd();
  AgentOptions effective = options;
  if (options.takeover && options.takeover_auto &&
      !ControlSocketAnswers(control_path)) {
    PF_LOG(INFO) << "--takeover=auto: no agent answers on " << control_path
                 << "; starting normally";
    effective.takeover = false;
  }
  const bool takeover = effective.takeover;
  if (takeover) {
    absl::StatusOr<TakeoverGrant> grant =
        RequestTakeover(control_path, absl::Seconds(10));
    if (!grant.ok()) {
      PF_LOG(ERROR) << "start-up failed: " << grant.status().message();
      return 1;
    }
    spec = std::move(grant->spec);
    adoptees = std::move(grant->sockets);
    takeover_connection = std::move(grant->connection);
    PF_LOG(INFO) << "takeover: received " << adoptees.size()
                 << " shard socket(s) of " << spec.listeners_size()
                 << " listener(s) from the running agent";
  } else {
    absl::StatusOr<v1::FleetSpec> initial = InitialSpec(options);
    if (!initial.ok()) {
      PF_LOG(ERROR) << initial.status().message();
      return 1;
    }
    spec = std::move(*initial);
    control_socket = ListenControlSocket(control_path);
    if (!control_socket.ok()) {
      PF_LOG(ERROR) << "start-up failed: control socket: "
                    << control_socket.status().message();
      return 1;
    }
    // Workers left running by a previous agent reconnect within ~250 ms.
    size_t orphans = 0;
    for (const v1::Listener& l : spec.listeners()) {
      absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(l.address());
      if (!addr.ok()) continue;
      for (const ForeignListener& f : FindForeignListeners(*addr, {})) {
        if (f.pid > 0 && IsOrphanedWorkerOf(f.pid, l.name())) orphans++;
      }
    }
    if (orphans > 0) {
      PF_LOG(INFO) << orphans << " worker(s) of a previous agent found; "
                   << "waiting up to 2s for them to reconnect on "
                   << control_path;
      adoptees =
          CollectReconnects(control_socket->get(), orphans, absl::Seconds(2));
      PF_LOG(INFO) << adoptees.size() << " worker(s) reconnected";
    }
  }

  // Signals arrive through a signalfd on the event loop thread. Block them
  // before any thread starts so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  ::sigprocmask(SIG_BLOCK, &signals, nullptr);
  Fd sigfd(::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sigfd) {
    PF_LOG(ERROR) << ErrnoError("signalfd");
    return 1;
  }
  absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Create();
  if (!loop.ok()) {
    PF_LOG(ERROR) << loop.status();
    return 1;
  }
  EventLoop* l = loop->get();

  RealProcessLauncher launcher;
  FleetOptions fleet_options;
  fleet_options.cpus = cpus;
  fleet_options.agent_socket = control_path;
  // BPF steering, or the kernel's plain reuseport hashing with the reason.
  absl::StatusOr<std::unique_ptr<SteeringBackend>> steering =
      OpenBpfSteering(options.bpffs);
  Fleet fleet(l, &launcher, fleet_options);
  fleet.SetAdoptees(std::move(adoptees));
  if (steering.ok()) {
    fleet.SetSteeringBackend(steering->get(), "");
    PF_LOG(INFO) << "BPF steering active (maps pinned under " << options.bpffs
                 << ")";
  } else {
    fleet.SetSteeringBackend(nullptr, std::string(steering.status().message()));
    PF_LOG(WARNING) << "BPF steering unavailable: "
                    << steering.status().message()
                    << "; listeners use the kernel's reuseport hash and "
                       "steering requests will fail";
  }

  LoopFleetController controller(
      l, &fleet,
      [&options](const v1::FleetSpec& desired) {
        return SaveFleetState(options.state_dir, desired);
      },
      kVersion);
  fleet.SetEventSink(
      [&controller](const FleetEvent& event) { controller.Publish(event); });

  // The API, metrics and control socket: at start, or in a takeover once the
  // old agent has released them.
  std::unique_ptr<ApiServer> api;
  std::unique_ptr<MetricsServer> metrics;
  auto open_api = [&]() -> absl::Status {
    ApiServerOptions api_options;
    api_options.address = options.api;
    api_options.socket_group = options.api_group;
    api_options.tls_address = options.api_tls_address;
    api_options.tls_cert = options.api_tls_cert;
    api_options.tls_key = options.api_tls_key;
    api_options.tls_client_ca = options.api_tls_client_ca;
    api_options.authz_policy_file = options.api_authz_policy;
    absl::StatusOr<std::unique_ptr<ApiServer>> started =
        ApiServer::Start(api_options, &controller);
    if (!started.ok()) {
      return Annotate(started.status(), absl::StrCat("API ", options.api));
    }
    api = std::move(*started);
    MetricsServerOptions metrics_options;
    metrics_options.address = options.metrics;
    absl::StatusOr<std::unique_ptr<MetricsServer>> m = MetricsServer::Start(
        metrics_options, [&controller]() -> absl::StatusOr<MetricsSnapshot> {
          MetricsSnapshot snap;
          snap.agent = controller.GetStatus();
          ASSIGN_OR_RETURN(snap.listeners, controller.ListListeners());
          return snap;
        });
    if (!m.ok()) return m.status();
    metrics = std::move(*m);
    PF_LOG(INFO) << "metrics on http://" << options.metrics
                 << "/metrics (also /healthz, /readyz)";
    return absl::OkStatus();
  };
  auto watch_control = [&]() -> absl::Status {
    return l->AddFd(control_socket->get(), [&fleet, &control_socket](uint32_t) {
      fleet.OnControlSocketReadable(control_socket->get());
    });
  };
  auto stop_interfaces = [&]() {
    if (control_socket.ok() && control_socket->valid()) {
      l->RemoveFd(control_socket->get());
      control_socket->Reset();
    }
    metrics.reset();
  };

  if (!takeover) {
    // The API comes up first (NOT_SERVING) so that a failure to bind it
    // stops the start before any worker runs.
    if (absl::Status s = open_api(); !s.ok()) {
      PF_LOG(ERROR) << "start-up failed: " << s.message();
      return 1;
    }
  }
  if (absl::Status s = fleet.Start(spec); !s.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << s.message();
    if (api) api->Shutdown();
    return 1;
  }
  if (!takeover) {
    if (absl::Status s = SaveFleetState(options.state_dir, fleet.DesiredSpec());
        !s.ok()) {
      PF_LOG(ERROR) << "start-up failed: saving the desired state: "
                    << s.message();
      fleet.KillAll();
      api->Shutdown();
      return 1;
    }
    if (absl::Status s = watch_control(); !s.ok()) {
      PF_LOG(ERROR) << "start-up failed: control socket: " << s;
      fleet.KillAll();
      return 1;
    }
    api->SetServing(true);
  }

  // Takeover, new agent: once our workers are ready, tell the old agent;
  // when it closes the connection it has released the API, metrics and
  // control sockets, which we then open.
  bool takeover_ready_sent = false;
  std::function<void()> check_ready;
  check_ready = [&]() {
    if (!fleet.AllReady()) {
      l->AddTimer(absl::Milliseconds(20), check_ready);
      return;
    }
    v1::WorkerMessage ready;
    ready.mutable_takeover_ready();
    std::string bytes = ready.SerializeAsString();
    ::send(takeover_connection.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    takeover_ready_sent = true;
    PF_LOG(INFO) << "takeover: every new worker is ready; the old agent "
                    "drains its workers";
  };
  if (takeover) {
    l->AddTimer(absl::ZeroDuration(), check_ready);
    absl::Status watched = l->AddFd(takeover_connection.get(), [&](uint32_t) {
      char buf[256];
      if (::recv(takeover_connection.get(), buf, sizeof(buf), MSG_DONTWAIT) >
          0) {
        return;
      }
      l->RemoveFd(takeover_connection.get());
      takeover_connection.Reset();
      if (!takeover_ready_sent) {
        PF_LOG(ERROR) << "takeover: the old agent went away before our "
                         "workers were ready; serving on our own";
      }
      control_socket = ListenControlSocket(control_path);
      absl::Status s =
          control_socket.ok() ? watch_control() : control_socket.status();
      if (s.ok()) s = open_api();
      if (s.ok()) {
        s = SaveFleetState(options.state_dir, fleet.DesiredSpec());
      }
      if (!s.ok()) {
        PF_LOG(ERROR) << "takeover: " << s.message()
                      << "; the fleet keeps serving without them";
        return;
      }
      api->SetServing(true);
      PF_LOG(INFO) << "takeover complete: this agent serves the API";
    });
    if (!watched.ok()) {
      PF_LOG(ERROR) << "takeover: " << watched;
      fleet.KillAll();
      return 1;
    }
  }

  // Takeover, old agent: hand every shard socket over, then on the new
  // agent's TakeoverReady release the API, metrics and control socket and
  // drain our workers; the sockets stay open in the new agent.
  Fd handover;
  bool handing_over = false;
  std::thread api_stopper;
  fleet.SetTakeoverHandler([&](ControlConnection c) {
    if (handing_over || handover.valid()) {
      PF_LOG(WARNING) << "takeover request from pid " << c.peer_pid
                      << " refused: a takeover is already in progress";
      return;
    }
    PF_LOG(INFO) << "takeover requested by agent pid " << c.peer_pid
                 << ": handing over the shard sockets";
    if (api) api->SetServing(false);
    controller.Close();
    std::vector<SharedShard> shards;
    for (const Fleet::SharedSocket& s : fleet.SharedSockets()) {
      shards.push_back({s.listener, s.shard, s.fd});
    }
    if (absl::Status s = GrantTakeover(c.control.get(), shards); !s.ok()) {
      PF_LOG(ERROR) << "takeover: " << s << "; resuming service";
      controller.Reopen();
      if (api) api->SetServing(true);
      return;
    }
    handover = std::move(c.control);
    absl::Status watched = l->AddFd(handover.get(), [&](uint32_t) {
      v1::WorkerMessage msg;
      char buf[4096];
      ssize_t n = ::recv(handover.get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n > 0 && msg.ParseFromArray(buf, static_cast<int>(n)) &&
          msg.has_takeover_ready()) {
        PF_LOG(INFO) << "takeover: the new agent's workers are ready; "
                        "releasing the API and draining our workers";
        handing_over = true;
        l->RemoveFd(handover.get());
        stop_interfaces();
        api_stopper = std::thread([&] {
          PF_LOG(DEBUG) << "takeover: stopping the API";
          api->Shutdown();
          PF_LOG(DEBUG) << "takeover: API stopped";
          // Closing the connection tells the new agent we let go.
          handover.Reset();
        });
        fleet.Shutdown([l] { l->Stop(); });
        return;
      }
      if (n > 0) return;
      PF_LOG(ERROR) << "takeover: the new agent went away before it was "
                       "ready; resuming service";
      l->RemoveFd(handover.get());
      handover.Reset();
      controller.Reopen();
      if (api) api->SetServing(true);
    });
    if (!watched.ok()) PF_LOG(ERROR) << "takeover: " << watched;
  });

  // Steering counters in the debug log, every 10 s.
  std::function<void()> log_counters;
  log_counters = [&]() {
    if (GetLogLevel() <= LogLevel::kDebug) fleet.LogSteeringCounters();
    l->AddTimer(absl::Seconds(10), log_counters);
  };
  l->AddTimer(absl::Seconds(10), log_counters);

  int signals_seen = 0;
  absl::Status added = l->AddFd(sigfd.get(), [&](uint32_t) {
    signalfd_siginfo info;
    while (::read(sigfd.get(), &info, sizeof(info)) == sizeof(info)) {
      int sig = static_cast<int>(info.ssi_signo);
      if (sig == SIGHUP) {
        PF_LOG(INFO) << "SIGHUP ignored: use portfleetctl apply to change the "
                        "fleet";
        continue;
      }
      signals_seen++;
      if (signals_seen == 1 && !handing_over) {
        PF_LOG(INFO) << "received SIG" << sigabbrev_np(sig)
                     << ": stopping the API and the workers";
        // Stop the API off the loop thread: in-flight calls still need the
        // loop to finish.
        if (api) api->SetServing(false);
        controller.Close();
        stop_interfaces();
        if (api) api_stopper = std::thread([&api] { api->Shutdown(); });
        fleet.Shutdown([l] { l->Stop(); });
      } else {
        PF_LOG(WARNING) << "received SIG" << sigabbrev_np(sig)
                        << " again: killing workers now";
        fleet.KillAll();
      }
    }
  });
  if (!added.ok()) {
    PF_LOG(ERROR) << added;
    return 1;
  }
  PF_LOG(INFO) << "fleet serving: " << fleet.listener_count() << " listener(s)";
  l->Run();
  l->RemoveFd(sigfd.get());
  if (api_stopper.joinable()) api_stopper.join();
  stop_interfaces();
  if (!handing_over) ::unlink(control_path.c_str());
  PF_LOG(INFO) << (handing_over ? "handed over; stopped" : "stopped");
  return 0;
}

}  // namespace portfleet
