// Re-adoption of running workers by a restarted agent, over the agent's
// control socket (a Unix SOCK_SEQPACKET listener whose path workers get as
// PORTFLEET_AGENT_SOCKET). See WorkerHello in control.proto.
#ifndef PORTFLEET_AGENT_ADOPTION_H_
#define PORTFLEET_AGENT_ADOPTION_H_

#include <sys/types.h>

#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "agent/worker_registry.h"
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

// Binds the control socket at `path`. It is mode 0666 in a directory other
// users may pass through but not list (created 0751; an existing one of the
// agent's own gets o+x): workers that run as another user must reach it to
// reconnect. Who may use it is decided per connection from SO_PEERCRED
// (AdmitControlPeer, CheckReconnect; takeovers: the agent's uid only). A
// stale socket file is replaced; a live one (another agent answers) is
// FailedPrecondition.
absl::StatusOr<Fd> ListenControlSocket(const std::string& path);

// Whether a peer of the control socket is worth reading: a process of the
// agent's own uid, or one of `known`'s workers (same pid, uid and start
// time). Anyone else is closed at once, before it can hold a slot.
bool AdmitControlPeer(pid_t pid, uid_t uid, const KnownWorkers& known);

// Accepts one pending connection and reads its first packet (waiting up to
// `wait` for it). nullopt when no connection is pending. With `admit`, a
// peer it refuses is closed unread: PermissionDenied naming pid and uid.
absl::StatusOr<std::optional<ControlConnection>> AcceptControlConnection(
    int listen_fd, absl::Duration wait,
    const std::function<bool(pid_t, uid_t)>& admit = nullptr);

// Turns a reconnect hello into an Adoptee after checking it: the hello has
// reconnect set, a socket is attached, it is a listening TCP socket whose
// inode matches the hello, and the sender is the pid the hello names. A
// sender of another uid than the agent's must also be a worker `known`
// records with that listener, shard and socket (a process of another user
// could otherwise hand in a socket of its own as a shard).
// On success the connection's descriptors move into the Adoptee; on error
// they stay in `connection`.
absl::StatusOr<Adoptee> CheckReconnect(ControlConnection& connection,
                                       const KnownWorkers& known);

// Accepts reconnecting workers of `listeners` until `want` have arrived or
// `timeout` has passed. Peers AdmitControlPeer refuses are closed unread;
// connections that are not valid reconnects, and workers of listeners that
// are not in the desired state (they would serve an address nobody
// supervises), are answered with AgentDrain (workers) or closed, logged,
// and not counted.
std::vector<Adoptee> CollectReconnects(int listen_fd, size_t want,
                                       absl::Duration timeout,
                                       const std::set<std::string>& listeners,
                                       const KnownWorkers& known);

// True if something accepts connections on the control socket at `path`.
bool ControlSocketAnswers(const std::string& path);

// Tells a worker on `control` to drain (best effort).
void SendDrain(int control, uint32_t deadline_ms);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_ADOPTION_H_
