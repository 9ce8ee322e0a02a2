// ApiServer: serves FleetService, grpc.health.v1 and server reflection on the
// agent's unix socket and, optionally, on TCP with mutual TLS.
//
// The unix socket is safe from the first connection on: it is bound in a
// private 0700 directory, given mode 0660 (and the group), then renamed into
// place; its directory is created 0751 (others may pass through to the
// control socket beside it, not list it). A stale socket left by a dead agent
// is removed; a socket on which another agent answers is left alone and
// Start fails with FailedPrecondition.
#ifndef PORTFLEET_AGENT_API_SERVER_H_
#define PORTFLEET_AGENT_API_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "agent/api/authz.h"
#include "agent/api/service.h"
#include "agent/controller.h"

namespace portfleet {

inline constexpr char kDefaultApiAddress[] = "unix:///run/portfleet/api.sock";
inline constexpr char kFleetServiceName[] = "portfleet.v1.FleetService";
// grpc.health.v1 service name of a listener: "listener/NAME".
inline constexpr char kListenerServicePrefix[] = "listener/";

struct ApiServerOptions {
  // "unix:///abs/path" or "unix:path". Empty = no unix socket.
  std::string address = kDefaultApiAddress;
  // Group owning the socket and its directory (name or numeric gid); empty =
  // the agent's group. Members may use the API.
  std::string socket_group;
  // Optional remote listener, off when empty: "host:port" served with TLS,
  // client certificate required and verified against tls_client_ca.
  std::string tls_address;
  std::string tls_cert;       // PEM file: server certificate chain
  std::string tls_key;        // PEM file: server private key
  std::string tls_client_ca;  // PEM file: CA(s) that sign client certificates
  // gRPC authorization policy (JSON, see authz.h) for the TLS listener,
  // re-read when the file changes (looked at no more than once per second,
  // on a call). Required with tls_address: the remote listener is never open
  // to every certificate holder by accident. FleetService calls on the TLS
  // listener are authorized by the client certificate's URI/DNS SANs (else
  // its CN); health and reflection stay open. The unix socket is guarded by
  // its file permissions only.
  std::string authz_policy_file;
  // Largest request or response message.
  int max_message_bytes = 4 << 20;
  // Concurrent calls per connection.
  int max_concurrent_streams = 64;
  // Controller calls, watchers and queues of the service.
  FleetServiceOptions service;
};

class ApiServer {
 public:
  // Starts serving. Health is NOT_SERVING until SetServing(true).
  static absl::StatusOr<std::unique_ptr<ApiServer>> Start(
      const ApiServerOptions& options, FleetController* controller);
  ~ApiServer();  // Shutdown()

  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // grpc.health.v1 status of "" and "portfleet.v1.FleetService".
  void SetServing(bool serving);
  // All of grpc.health.v1 from the agent's health: "" and
  // "portfleet.v1.FleetService" SERVING when it is ready, and
  // "listener/NAME" SERVING while that listener serves (SERVING or
  // DEGRADED); listeners that went away become NOT_SERVING.
  void SetHealth(const AgentHealth& health);
  // Stops accepting, cancels streams, waits up to 5 s for calls in progress,
  // removes the socket. Idempotent.
  void Shutdown();

  // Path of the unix socket ("" when none).
  const std::string& socket_path() const { return socket_path_; }
  // Port the TLS listener got (useful with "host:0"); 0 when none.
  int tls_port() const { return tls_port_; }

 private:
  ApiServer() = default;

  // Declared first: the TLS service's authorizer uses it until the end.
  std::unique_ptr<AuthzPolicyFile> authz_;
  std::unique_ptr<FleetServiceImpl> service_;
  std::unique_ptr<FleetServiceImpl> tls_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> tls_server_;
  std::string socket_path_;
  std::vector<std::string> listener_services_;  // published by SetHealth
  int tls_port_ = 0;
  bool shut_down_ = false;
};

// Path of a "unix:///path" or "unix:path" address; error otherwise.
absl::StatusOr<std::string> UnixSocketPath(const std::string& address);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_API_SERVER_H_
