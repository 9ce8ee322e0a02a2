// Re-adoption of running workers by a restarted agent, over the agent's
// control socket (a Unix SOCK_SEQPACKET listener whose path workers get as
// PORTFLEET_AGENT_SOCKET). See WorkerHello in control.proto.
#ifndef PORTFLEET_AGENT_ADOPTION_H_
#define PORTFLEET_AGENT_ADOPTION_H_

#include <sys/types.h>

#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

// A worker that reconnected and handed its listening socket back.
struct Adoptee {
  v1::WorkerHello hello;
  Fd socket;           // our own descriptor of the worker's listening socket
  Fd control;          // the connection, which becomes its control channel
  pid_t peer_pid = 0;  // from SO_PEERCRED
};

// The first packet of a connection to the control socket.
struct ControlConnection {
  v1::WorkerMessage message;
  Fd fd;       // attached descriptor, if any
  Fd control;  // the connection
  pid_t peer_pid = 0;
  uid_t peer_uid = 0;
};

// Binds the control socket at `path` (mode 0600; parent directory created
// 0750). A stale socket file is replaced; a live one (another agent answers)
// is FailedPrecondition.
absl::StatusOr<Fd> ListenControlSocket(const std::string& path);

// Accepts one pending connection and reads its first packet (waiting up to
// `wait` for it). nullopt when no connection is pending.
absl::StatusOr<std::optional<ControlConnection>> AcceptControlConnection(
    int listen_fd, absl::Duration wait);

// Turns a reconnect hello into an Adoptee after checking it: the hello has
// reconnect set, a socket is attached, it is a listening TCP socket whose
// inode matches the hello, and the sender is the pid the hello names.
// On success the connection's descriptors move into the Adoptee; on error
// they stay in `connection`.
absl::StatusOr<Adoptee> CheckReconnect(ControlConnection& connection);

// Accepts reconnecting workers of `listeners` until `want` have arrived or
// `timeout` has passed. Connections that are not valid reconnects, and
// workers of listeners that are not in the desired state (they would serve
// an address nobody supervises), are answered with AgentDrain (workers) or
// closed, logged, and not counted.
std::vector<Adoptee> CollectReconnects(int listen_fd, size_t want,
                                       absl::Duration timeout,
                                       const std::set<std::string>& listeners);

// True if something accepts connections on the control socket at `path`.
bool ControlSocketAnswers(const std::string& path);

// Tells a worker on `control` to drain (best effort).
void SendDrain(int control, uint32_t deadline_ms);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_ADOPTION_H_
