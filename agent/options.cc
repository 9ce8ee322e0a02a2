#include "agent/options.h"

#include <cstdio>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/retired.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/version.h"

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
With --config-mode=declarative the --config file is the source of truth
instead: the agent watches it and reconciles the fleet to it.

Options:
  --config FILE      fleet spec, protobuf text format (.textproto) or JSON
                     (.json) of portfleet.v1.FleetSpec
  --config-mode seed|declarative
                     seed (default): --config seeds a new state dir and the
                     API changes the fleet. declarative: the agent watches
                     --config (a Kubernetes ConfigMap volume's symlink swap,
                     an editor's rename, an in-place write) and creates,
                     updates and deletes listeners to match it; an invalid
                     file is rejected and the fleet kept; API calls that
                     change the desired state fail (FAILED_PRECONDITION);
                     SIGHUP reads the file again (retries a failed apply)
  --api ADDR         gRPC API endpoint (default unix:///run/portfleet/api.sock;
                     the socket is 0660, its directory 0751)
  --api-group GROUP  group owning the API socket (default: the agent's)
  --api-tls-address HOST:PORT   optional remote API with mutual TLS
  --api-tls-cert FILE, --api-tls-key FILE, --api-tls-client-ca FILE
  --api-authz-policy FILE       gRPC authorization policy for the remote API
  --metrics ADDR     metrics/health HTTP endpoint (default 127.0.0.1:9474;
                     until December 2026 it was 127.0.0.1:9464)
  --metrics-address IP   bind the metrics endpoint to this IPv4 or IPv6
                     address (no brackets) on --metrics' port, e.g. the node
                     IP from the Kubernetes downward API: $(NODE_IP)
  --state-dir DIR    persisted desired state (default /var/lib/portfleet)
  --control-socket PATH   where workers reconnect to a restarted agent
                     (default: control.sock beside a unix --api socket, else
                     in --state-dir)
  --bpffs DIR        pinned steering maps (default /sys/fs/bpf/portfleet)
  --require-steering fail the start (exit 1) when BPF steering cannot be
                     opened (no bpffs mounted, no CAP_BPF, a seccomp filter),
                     instead of serving with the kernel's reuseport hash
  --worker-allowlist FILE   worker programs the agent may start, one
                     absolute path per line ('#' comments); without it,
                     anyone who may use the API may run any program as the
                     agent's user (workers get no capabilities)
  --log-level LEVEL  debug, info, warning or error (default info)
  --log-format FORMAT   text or json (one JSON object a line). Without it:
                     text, and under systemd (stderr is $JOURNAL_STREAM)
                     each line carries its journald priority ("<6>INFO ...")
  --takeover[=auto]  take over from the agent running on the same control
                     socket: receive its shard sockets, start our workers on
                     them, then it drains its workers and exits (upgrades
                     without a gap, e.g. a DaemonSet with maxSurge 1). With
                     =auto, start normally when no agent is running.
  --instance-id ID   who this agent is across its own restarts (Kubernetes:
                     the pod UID from the downward API). Once an agent with
                     this ID has handed over, it is retired: restarted with
                     the same ID it never takes the sockets back; it stays
                     idle, not ready, until terminated.
  --after-handover=exit|idle   after a takeover drained our workers: exit 0
                     (default), or stay idle (not ready, no API, no metrics)
                     until SIGTERM, so that a container with restartPolicy
                     Always is not restarted.
  --check            validate the config file and exit (0 = valid)
  --version          print the version and exit
  -h, --help         show this help

Signals:
  SIGTERM, SIGINT    stop: workers get SIGTERM and finish their connections;
                     after the listeners' drain timeout stragglers get SIGKILL;
                     exit 0. A second signal kills the workers at once. Under
                     systemd, a SIGTERM for `systemctl restart` of the agent's
                     unit steps aside instead (as SIGUSR2).
  SIGHUP             declarative mode: read --config again and reconcile;
                     seed mode: ignored (use portfleetctl apply)
  SIGUSR2            step aside: stop the API, leave every worker serving on
                     its socket and exit 0; the next agent (same --state-dir
                     and control socket) re-adopts them

Example:
  portfleet-agent --config deploy/examples/quickstart.textproto
  curl http://127.0.0.1:8080/
  portfleetctl get shards web

Exit codes: 0 stopped cleanly or config valid, 1 start-up failed (the log
says which listener and why), 2 usage error.
)";

// The option a --flag VALUE sets, or nullptr for an unknown flag.
std::string* ValueFlag(const std::string& flag, AgentOptions* o) {
  const std::pair<const char*, std::string*> flags[] = {
      {"--config", &o->config},
      {"--api", &o->api},
      {"--metrics", &o->metrics},
      {"--state-dir", &o->state_dir},
      {"--bpffs", &o->bpffs},
      {"--log-level", &o->log_level},
      {"--log-format", &o->log_format},
      {"--api-group", &o->api_group},
      {"--control-socket", &o->control_socket},
      {"--api-tls-address", &o->api_tls_address},
      {"--api-tls-cert", &o->api_tls_cert},
      {"--api-tls-key", &o->api_tls_key},
      {"--api-tls-client-ca", &o->api_tls_client_ca},
      {"--api-authz-policy", &o->api_authz_policy},
      {"--worker-allowlist", &o->worker_allowlist},
      {"--instance-id", &o->instance_id},
      {"--metrics-address", &o->metrics_address},
  };
  for (const auto& [name, target] : flags) {
    if (flag == name) return target;
  }
  return nullptr;
}

// --check: 0 when the spec file is valid, else 1 with the error printed.
int CheckConfigFile(const std::string& path) {
  absl::StatusOr<v1::FleetSpec> spec = LoadFleetSpecFile(path);
  if (!spec.ok()) {
    std::fprintf(stderr, "portfleet-agent: %s\n",
                 std::string(spec.status().message()).c_str());
    return 1;
  }
  std::printf("%s: valid, %d listener(s)\n", path.c_str(),
              spec->listeners_size());
  return 0;
}

// `address` (host:port) with its host replaced by the bare IP literal `ip`.
absl::StatusOr<std::string> WithHost(const std::string& address,
                                     const std::string& ip) {
  absl::StatusOr<SocketAddress> old =
      SocketAddress::Parse(address, /*allow_port_zero=*/true);
  if (!old.ok()) return old.status();
  std::string joined = ip.find(':') == std::string::npos
                           ? absl::StrCat(ip, ":", old->port())
                           : absl::StrCat("[", ip, "]:", old->port());
  absl::StatusOr<SocketAddress> parsed =
      SocketAddress::Parse(joined, /*allow_port_zero=*/true);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", ip, "' is not an IPv4 or IPv6 address"));
  }
  return parsed->ToString();
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
    if (arg == "--require-steering") {
      out.options.require_steering = true;
      continue;
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
    if (arg == "--config-mode") {
      if (!has_inline) {
        if (i + 1 >= args.size()) return usage_error(arg + " needs a value");
        value = args[++i];
      }
      if (value != "seed" && value != "declarative") {
        return usage_error("--config-mode: '" + value +
                           "' is not 'seed' or 'declarative'");
      }
      out.options.declarative_config = value == "declarative";
      continue;
    }
    if (arg == "--after-handover") {
      if (!has_inline) {
        if (i + 1 >= args.size()) return usage_error(arg + " needs a value");
        value = args[++i];
      }
      if (value != "exit" && value != "idle") {
        return usage_error("--after-handover: '" + value +
                           "' is not 'exit' or 'idle'");
      }
      out.options.idle_after_handover = value == "idle";
      continue;
    }
    std::string* target = ValueFlag(arg, &out.options);
    if (target == nullptr) return usage_error("unknown option '" + arg + "'");
    if (!has_inline) {
      if (i + 1 >= args.size()) return usage_error(arg + " needs a value");
      value = args[++i];
    }
    if (arg == "--metrics-address" && value.empty()) {
      // e.g. an unset $(NODE_IP): never fall back to the default silently.
      return usage_error("--metrics-address needs an IPv4 or IPv6 address");
    }
    *target = value;
  }
  if (!ParseLogLevel(out.options.log_level).ok()) {
    return usage_error("--log-level: unknown level '" + out.options.log_level +
                       "' (want debug, info, warning or error)");
  }
  if (!out.options.log_format.empty() &&
      !ParseLogFormat(out.options.log_format).ok()) {
    return usage_error("--log-format: unknown format '" +
                       out.options.log_format + "' (want text or json)");
  }
  if (!out.options.metrics_address.empty()) {
    absl::StatusOr<std::string> metrics =
        WithHost(out.options.metrics, out.options.metrics_address);
    if (!metrics.ok()) {
      return usage_error("--metrics-address: " +
                         std::string(metrics.status().message()));
    }
    out.options.metrics = *metrics;
  }
  if (!out.options.instance_id.empty()) {
    if (absl::Status s = ValidateInstanceId(out.options.instance_id); !s.ok()) {
      return usage_error("--instance-id: " + std::string(s.message()));
    }
  }
  if (out.options.declarative_config && out.options.config.empty()) {
    return usage_error("--config-mode=declarative needs --config FILE");
  }
  if (check_only && out.options.config.empty()) {
    return usage_error("--check needs --config FILE");
  }
  if (check_only) {
    out.exit_now = true;
    out.exit_code = CheckConfigFile(out.options.config);
  }
  return out;
}

}  // namespace portfleet
