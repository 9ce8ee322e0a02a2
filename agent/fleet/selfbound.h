// Self-bound sockets (WorkerSpec.socket_mode = SOCKET_MODE_SELF_BOUND): the
// worker binds its own SO_REUSEPORT socket on the listener's address, and the
// agent finds it and takes a copy:
//   1. the kernel lists the TCP listeners on the port (sock_diag,
//      NETLINK_INET_DIAG): inode, owner uid, local address;
//   2. /proc/PID/fd of the worker's process tree (the worker, its process
//      group, its descendants) names the fds that hold those inodes;
//   3. pidfd_getfd copies one into the agent;
//   4. the copy is checked: TCP, listening, SO_REUSEPORT, bound to exactly
//      the listener's address, owned by the uid of the listener's other
//      sockets (the kernel groups only sockets of one effective uid).
// Plain functions of the kernel's state; the supervisor polls them.
#ifndef PORTFLEET_AGENT_FLEET_SELFBOUND_H_
#define PORTFLEET_AGENT_FLEET_SELFBOUND_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "agent/procfs.h"
#include "portfleet/v1/fleet.pb.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

// The socket fds of `root` and of every process in its process group or
// below it (one walk of /proc).
std::vector<ProcessSocket> SocketsOfTree(pid_t root);

// Copies fd `fd` of process `pid` into the agent (pidfd_open +
// pidfd_getfd; close-on-exec).
absl::StatusOr<Fd> CopyProcessFd(pid_t pid, int fd);

// Checks a copied socket: TCP, listening, SO_REUSEPORT, bound to `address`.
// The error says which check failed and what the socket is instead.
absl::Status ValidateSelfBoundSocket(int fd, const SocketAddress& address);

// A socket found for a shard.
struct FoundSocket {
  Fd socket;
  uint64_t inode = 0;
  pid_t holder = 0;  // the process it was copied from
  uid_t uid = 0;
};

// What the search of a process tree gave.
struct SocketSearch {
  // Valid sockets on the address (copied), not among `exclude`.
  std::vector<FoundSocket> found;
  // Why the others were refused, or what the tree listens on instead
  // ("pid 12 fd 3: bound to 0.0.0.0:8080, not 127.0.0.1:8080"); empty when
  // nothing else was seen.
  std::vector<std::string> refused;
};

// The listening sockets on `address` held by `root`'s process tree (or by
// `root` alone when `tree` is false) whose inode is not in `exclude`. With
// `want_uid`, a socket owned by another uid is refused. Errors only when the
// kernel cannot be asked (sock_diag).
absl::StatusOr<SocketSearch> FindSelfBoundSockets(
    pid_t root, bool tree, const SocketAddress& address,
    const std::set<uint64_t>& exclude, std::optional<uid_t> want_uid);

// A rollout from `from` to `to` on listener `name`: FailedPrecondition when
// the socket mode changes (the shards' sockets cannot change owner).
absl::Status CheckRollOutSocketMode(const std::string& name,
                                    const v1::WorkerSpec& from,
                                    const v1::WorkerSpec& to);

// How long a self-bound worker whose socket was shut down (drain, rollout)
// may take to stop by itself before it gets SIGTERM (at most half the drain
// timeout).
inline constexpr absl::Duration kSelfBoundTermGrace = absl::Seconds(1);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_SELFBOUND_H_
