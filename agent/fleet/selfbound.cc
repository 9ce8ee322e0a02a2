#include "agent/fleet/selfbound.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <map>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

absl::Status GetInt(int fd, int level, int name, const char* what, int* out) {
  socklen_t len = sizeof(*out);
  if (::getsockopt(fd, level, name, out, &len) != 0) {
    return ErrnoError(absl::StrCat("getsockopt(", what, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<ProcessSocket> SocketsOfTree(pid_t root) {
  std::map<pid_t, ProcIds> procs = ProcessTable();
  std::vector<ProcessSocket> out;
  for (const auto& [pid, ids] : procs) {
    bool member = pid == root || ids.pgid == root;
    pid_t up = ids.ppid;
    for (int depth = 0; !member && up > 1 && depth < 64; ++depth) {
      if (up == root) member = true;
      auto it = procs.find(up);
      if (it == procs.end()) break;
      up = it->second.ppid;
    }
    if (!member) continue;
    for (ProcessSocket& s : SocketsOfProcess(pid)) out.push_back(s);
  }
  return out;
}

absl::StatusOr<Fd> CopyProcessFd(pid_t pid, int fd) {
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return ErrnoError(absl::StrCat("pidfd_open of pid ", pid));
  Fd copy(static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), fd, 0)));
  if (!copy) {
    return ErrnoError(absl::StrCat("pidfd_getfd of pid ", pid, " fd ", fd));
  }
  return copy;
}

absl::Status ValidateSelfBoundSocket(int fd, const SocketAddress& address) {
  int domain = 0, type = 0, protocol = 0, listening = 0, reuseport = 0;
  RETURN_IF_ERROR(GetInt(fd, SOL_SOCKET, SO_DOMAIN, "SO_DOMAIN", &domain));
  RETURN_IF_ERROR(GetInt(fd, SOL_SOCKET, SO_TYPE, "SO_TYPE", &type));
  RETURN_IF_ERROR(
      GetInt(fd, SOL_SOCKET, SO_PROTOCOL, "SO_PROTOCOL", &protocol));
  if ((domain != AF_INET && domain != AF_INET6) || type != SOCK_STREAM ||
      protocol != IPPROTO_TCP) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a TCP socket (domain ", domain, ", type ", type,
                     ", protocol ", protocol, ")"));
  }
  RETURN_IF_ERROR(
      GetInt(fd, SOL_SOCKET, SO_ACCEPTCONN, "SO_ACCEPTCONN", &listening));
  if (listening == 0) {
    return absl::InvalidArgumentError("not listening (no listen() call)");
  }
  absl::StatusOr<SocketAddress> local = [&]() -> absl::StatusOr<SocketAddress> {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
      return ErrnoError("getsockname");
    }
    return SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
  }();
  if (!local.ok()) return local.status();
  if (!(*local == address)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bound to ", local->ToString(), ", not the listener's ",
        address.ToString(), " (another address is another reuseport group)"));
  }
  RETURN_IF_ERROR(
      GetInt(fd, SOL_SOCKET, SO_REUSEPORT, "SO_REUSEPORT", &reuseport));
  if (reuseport == 0) {
    return absl::InvalidArgumentError(
        "SO_REUSEPORT is not set (it owns the address alone; no shard can "
        "join it)");
  }
  return absl::OkStatus();
}

absl::StatusOr<SocketSearch> FindSelfBoundSockets(
    pid_t root, bool tree, const SocketAddress& address,
    const std::set<uint64_t>& exclude, std::optional<uid_t> want_uid) {
  ASSIGN_OR_RETURN(std::vector<DiagSocket> listeners,
                   DumpTcpSockets(address.family(), kTcpListenMask, 0));
  std::map<uint64_t, DiagSocket> by_inode;
  for (DiagSocket& l : listeners) by_inode[l.inode] = std::move(l);
  SocketSearch search;
  std::set<uint64_t> seen;
  std::vector<ProcessSocket> fds =
      tree ? SocketsOfTree(root) : SocketsOfProcess(root);
  for (const ProcessSocket& p : fds) {
    auto it = by_inode.find(p.inode);
    if (it == by_inode.end()) continue;  // not a TCP listener
    if (exclude.count(p.inode) > 0 || !seen.insert(p.inode).second) continue;
    const DiagSocket& l = it->second;
    std::string where = absl::StrCat("pid ", p.pid, " fd ", p.fd,
                                     " (socket inode ", p.inode, ")");
    if (!(l.local == address)) {
      search.refused.push_back(
          absl::StrCat(where, ": bound to ", l.local.ToString(),
                       ", not the listener's ", address.ToString()));
      continue;
    }
    if (want_uid.has_value() && l.uid != *want_uid) {
      search.refused.push_back(absl::StrCat(
          where, ": owned by uid ", l.uid, ", not uid ", *want_uid,
          " of the listener's sockets (the kernel groups only sockets of one "
          "effective uid)"));
      continue;
    }
    absl::StatusOr<Fd> copy = CopyProcessFd(p.pid, p.fd);
    if (!copy.ok()) {
      search.refused.push_back(
          absl::StrCat(where, ": ", copy.status().message()));
      continue;
    }
    if (absl::Status valid = ValidateSelfBoundSocket(copy->get(), address);
        !valid.ok()) {
      search.refused.push_back(absl::StrCat(where, ": ", valid.message()));
      continue;
    }
    search.found.push_back(FoundSocket{.socket = std::move(*copy),
                                       .inode = p.inode,
                                       .holder = p.pid,
                                       .uid = l.uid});
  }
  return search;
}

absl::Status CheckRollOutSocketMode(const std::string& name,
                                    const v1::WorkerSpec& from,
                                    const v1::WorkerSpec& to) {
  bool was = from.socket_mode() == v1::SOCKET_MODE_SELF_BOUND;
  bool is = to.socket_mode() == v1::SOCKET_MODE_SELF_BOUND;
  if (was == is) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("listener ", name,
                   ": worker.socket_mode cannot change on a running listener; "
                   "delete the listener and create it again"));
}

}  // namespace portfleet
