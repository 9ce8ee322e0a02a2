#include "agent/agent.h"

#include <sched.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/event_loop.h"
#include "agent/fleet.h"
#include "agent/fleet_controller.h"
#include "agent/steering/steering.h"
#include "agent/launcher.h"
#include "agent/spec.h"
#include "worker/sdk/log.h"
#include "worker/sdk/status.h"

namespace portfleet {
namespace {

constexpr char kUsage[] = R"(Usage: portfleet-agent --config FILE [options]

Runs a fleet of SO_REUSEPORT listening sockets ("shards") with one worker
process per shard, restarting workers that die on the same socket.

Options:
  --config FILE      fleet spec, protobuf text format (.textproto) or JSON
                     (.json) of portfleet.v1.FleetSpec (required)
  --api ADDR         gRPC API endpoint (default unix:///run/portfleet/api.sock)
  --metrics ADDR     metrics/health HTTP endpoint (default 127.0.0.1:9464)
  --state-dir DIR    persisted desired state (default /var/lib/portfleet)
  --bpffs DIR        pinned steering maps (default /sys/fs/bpf/portfleet)
  --log-level LEVEL  debug, info, warning or error (default info)
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
    std::fprintf(stderr, "portfleet-agent: %s\nRun 'portfleet-agent --help' for usage.\n",
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
    std::string* target = nullptr;
    if (arg == "--config") target = &out.options.config;
    if (arg == "--api") target = &out.options.api;
    if (arg == "--metrics") target = &out.options.metrics;
    if (arg == "--state-dir") target = &out.options.state_dir;
    if (arg == "--bpffs") target = &out.options.bpffs;
    if (arg == "--log-level") target = &out.options.log_level;
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
  if (out.options.config.empty()) {
    return usage_error("--config FILE is required");
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

int RunAgent(const AgentOptions& options) {
  SetLogTag("agent");
  SetLogLevel(*ParseLogLevel(options.log_level));
  // A worker that dies mid-write must not kill us.
  ::signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<v1::FleetSpec> spec = LoadFleetSpecFile(options.config);
  if (!spec.ok()) {
    PF_LOG(ERROR) << "invalid config: " << spec.status().message();
    return 1;
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
  RealProcessLauncher launcher;
  FleetOptions fleet_options;
  fleet_options.cpus = OnlineCpus();
  // BPF steering, or the kernel's plain reuseport hashing with the reason.
  absl::StatusOr<std::unique_ptr<SteeringBackend>> steering =
      OpenBpfSteering(options.bpffs);
  Fleet fleet(loop->get(), &launcher, fleet_options);
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


  LoopFleetController controller(loop->get(), &fleet, nullptr, kVersion);
  fleet.SetEventSink(
      [&controller](const FleetEvent& event) { controller.Publish(event); });

  PF_LOG(INFO) << "portfleet-agent " << kVersion << " starting (pid "
               << ::getpid() << ", config " << options.config << ", "
               << fleet_options.cpus.size() << " CPUs)";
  if (absl::Status s = fleet.Start(*spec); !s.ok()) {
    PF_LOG(ERROR) << "start-up failed: " << s.message();
    return 1;
  }

  int signals_seen = 0;
  EventLoop* l = loop->get();
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
      if (signals_seen == 1) {
        PF_LOG(INFO) << "received SIG" << sigabbrev_np(sig)
                     << ": stopping workers";
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
  PF_LOG(INFO) << "fleet serving: " << fleet.listener_count()
               << " listener(s)";
  l->Run();
  l->RemoveFd(sigfd.get());
  PF_LOG(INFO) << "stopped";
  return 0;
}

}  // namespace portfleet
