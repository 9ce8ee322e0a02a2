// The agent's command line: options with their defaults, parsing, --help.
#ifndef PORTFLEET_AGENT_OPTIONS_H_
#define PORTFLEET_AGENT_OPTIONS_H_

#include <string>
#include <vector>

namespace portfleet {

struct AgentOptions {
  std::string config;  // fleet spec file (.textproto or .json)
  std::string api = "unix:///run/portfleet/api.sock";  // gRPC API endpoint
  // /metrics, /healthz, /readyz. 9464 until December 2026; that is the default
  // port of OpenTelemetry's Prometheus exporter, which often runs on the same
  // nodes.
  std::string metrics = "127.0.0.1:9474";
  // --metrics-address IP: the host part of --metrics as a bare IPv4 or IPv6
  // literal (Kubernetes: $(NODE_IP) from status.hostIP). Resolved into
  // `metrics` by ParseAgentArgs.
  std::string metrics_address;
  std::string state_dir = "/var/lib/portfleet";
  std::string bpffs = "/sys/fs/bpf/portfleet";  // pinned steering maps
  // Start-up fails when BPF steering cannot be opened (no bpffs, no
  // CAP_BPF, seccomp) instead of serving with the kernel's hash.
  bool require_steering = false;
  std::string log_level = "info";
  // "text", "json", or "" (text; with journald priorities when stderr is
  // the journal).
  std::string log_format;
  std::string api_group;  // group owning the API socket
  // Where workers reconnect to a restarted agent ("" = derived from --api).
  std::string control_socket;
  bool takeover = false;       // --takeover
  bool takeover_auto = false;  // --takeover=auto: only if an agent runs
  // Identity of this agent across restarts of the same deployment unit (in
  // Kubernetes the pod UID): once it has handed over, an agent of this ID
  // never takes sockets back (see agent/retired.h). "" = no such guard.
  std::string instance_id;
  // After handing over and draining: exit 0, or stay idle (not ready) until
  // terminated (a container with restartPolicy Always).
  bool idle_after_handover = false;
  // Optional remote API: TCP with mutual TLS and an authorization policy.
  std::string api_tls_address;
  std::string api_tls_cert;
  std::string api_tls_key;
  std::string api_tls_client_ca;
  std::string api_authz_policy;
  // --config-mode=declarative: the --config file is the source of truth
  // (watched and reconciled to; API changes of the desired state refused).
  // false = seed: --config only seeds a new state dir (the default).
  bool declarative_config = false;
  // File of worker programs the agent may run (one absolute path per line,
  // '#' comments); empty = any program.
  std::string worker_allowlist;
};

// Parses argv. `--help` and `--version` are returned as a usage result with
// `exit_code` 0; errors with exit code 2.
struct ParsedArgs {
  AgentOptions options;
  bool exit_now = false;  // help/version/usage error printed
  int exit_code = 0;
};
ParsedArgs ParseAgentArgs(const std::vector<std::string>& args);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_OPTIONS_H_
