// Shard sockets: SO_REUSEPORT listening sockets created by the agent, all of a
// listener's with identical options so that they form one reuseport group.
#ifndef PORTFLEET_AGENT_SOCKETS_H_
#define PORTFLEET_AGENT_SOCKETS_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

struct ShardSocketOptions {
  int backlog = 1024;  // listen() backlog
  // TCP_NODELAY on the listening socket: accepted connections inherit it, so
  // workers need no setsockopt per connection (portfleet-worker checks the
  // listener once and skips its own).
  bool tcp_nodelay = true;
  // TCP_DEFER_ACCEPT in seconds (Listener.defer_accept_seconds); 0 = off.
  int defer_accept_seconds = 0;
};

// socket + SO_REUSEADDR + SO_REUSEPORT (+ IPV6_V6ONLY for IPv6) + the
// options above + bind + listen. Blocking, close-on-exec. EADDRINUSE ->
// AlreadyExists.
absl::StatusOr<Fd> CreateShardSocket(const SocketAddress& address,
                                     const ShardSocketOptions& options);

// Sets TCP_DEFER_ACCEPT on a shard socket that already listens (a changed
// Listener.defer_accept_seconds; it applies to connections from then on).
// 0 turns it off.
absl::Status SetDeferAccept(int fd, int seconds);

// Inode number of a socket fd (stable identity, as in /proc/PID/fd links).
absl::StatusOr<uint64_t> SocketInodeOf(int fd);

// A TCP listener that is not one of `ours` and whose address overlaps
// `address` (same port; same IP or either one a wildcard), read from
// /proc/net/tcp{,6} of the current network namespace.
struct ForeignListener {
  uint64_t inode = 0;
  std::string local_address;  // as the kernel lists it
  pid_t pid = 0;              // a process holding it, 0 if not found
  std::string process_name;   // its comm
};
std::optional<ForeignListener> FindForeignListener(
    const SocketAddress& address, const std::set<uint64_t>& ours);
// All of them.
std::vector<ForeignListener> FindForeignListeners(
    const SocketAddress& address, const std::set<uint64_t>& ours);

// True if `pid` is a worker of `listener` (PORTFLEET_LISTENER in its
// environment) that no live portfleet-agent supervises: left behind by an
// agent that died.
bool IsOrphanedWorkerOf(pid_t pid, const std::string& listener);

// The value of `name` in the environment `pid` was started with, or nullopt
// (not set, or not readable).
std::optional<std::string> ProcessEnvValue(pid_t pid, const std::string& name);

// Queued connections of a listening socket (accept queue depth).
absl::StatusOr<uint32_t> AcceptQueueDepth(int fd);
// The backlog a listening socket was last listen()ed with (TCP_INFO).
absl::StatusOr<uint32_t> ListenBacklog(int fd);
// listen() again on a listening socket: only resizes its backlog.
absl::Status SetListenBacklog(int fd, int backlog);
// The local address of a bound socket (getsockname).
absl::StatusOr<SocketAddress> LocalAddressOf(int fd);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_SOCKETS_H_
