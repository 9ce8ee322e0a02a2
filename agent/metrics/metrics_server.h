// The agent's Prometheus endpoint (`--metrics`, default 127.0.0.1:9474):
//
//   GET /metrics  Prometheus text exposition format 0.0.4 of a snapshot
//   GET /healthz  200 "ok" while `liveness` says the agent is alive (its
//                 event loop beats, its API answers), else 503 with why
//   GET /readyz   200 when the agent is ready (health SERVING or DEGRADED),
//                 else 503 with the health and its reason
//
// A small HTTP/1.1 server on its own thread (poll(2), non-blocking sockets,
// "Connection: close", bounded request size and time; idle connections
// cannot starve probes). It never touches the
// agent's state: everything it reports comes through the `snapshot`
// callback, so this library does not depend on the agent library.
#ifndef PORTFLEET_AGENT_METRICS_METRICS_SERVER_H_
#define PORTFLEET_AGENT_METRICS_METRICS_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "agent/controller.h"

namespace portfleet {

// What /metrics and /readyz report: the agent's status and every listener
// with its shards.
struct MetricsSnapshot {
  AgentStatus agent;
  std::vector<ListenerStatus> listeners;
};

struct MetricsServerOptions {
  // Numeric "host:port" or "[v6]:port"; port 0 = an ephemeral port (tests),
  // read it back with MetricsServer::port().
  std::string address = "127.0.0.1:9474";
  // /healthz: OK, or why the agent is not alive (e.g. its API stopped
  // answering). Called on the server thread; must be quick. Unset = alive.
  std::function<absl::Status()> liveness;
  // /readyz: the agent's health, read without waiting for its event loop.
  // Unset = from the snapshot's AgentStatus.
  std::function<AgentHealth()> health;
};

class MetricsServer {
 public:
  using SnapshotFn = std::function<absl::StatusOr<MetricsSnapshot>()>;

  // Binds and listens before returning, then serves on its own thread.
  // Errors name the address: "metrics 127.0.0.1:9474: address already in
  // use" (code as absl::ErrnoToStatus maps the errno), "metrics foo:
  // invalid address ..." (InvalidArgument).
  //
  // `snapshot` is called from the server thread for /metrics and /readyz,
  // one request at a time; it may block briefly. It returns an error when no
  // snapshot can be taken (e.g. the agent is shutting down); both endpoints
  // then answer 503 with the message. It must not destroy the server.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const MetricsServerOptions& options, SnapshotFn snapshot);

  // Stops serving, closes every connection and joins the thread.
  ~MetricsServer();

  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // The bound port (the ephemeral one when the options asked for port 0).
  uint16_t port() const;

  // Limits, public for tests.
  static constexpr size_t kMaxRequestBytes = 8192;  // request line + headers
  // Connections at once; when all are taken, the oldest idle one (nothing
  // received yet) is closed for a new one. Idle ones are closed after 1 s.
  static constexpr int kMaxConnections = 256;

 private:
  struct Impl;
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Pure: the Prometheus text exposition format (0.0.4) of a snapshot. Every
// family has HELP and TYPE lines, even without samples; label values are
// escaped per the format (\\, \", \n).
std::string RenderPrometheus(const MetricsSnapshot& snapshot);

// The /readyz answer for a health: 200 "ready" (with the state when
// DEGRADED) or 503 with the state and reason. Pure.
std::pair<int, std::string> ReadinessAnswer(const AgentHealth& health);

// The content type of RenderPrometheus's output.
inline constexpr char kPrometheusContentType[] =
    "text/plain; version=0.0.4; charset=utf-8";

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_METRICS_METRICS_SERVER_H_
