#include "agent/fleet/selfbound.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/observer.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

constexpr int kTcpListen = 10;  // TCP_LISTEN in the kernel's tcp_states.h

std::string ReadSmall(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

SocketAddress FromDiag(const inet_diag_msg& m) {
  SocketAddress a;
  if (m.idiag_family == AF_INET) {
    sockaddr_in in{};
    in.sin_family = AF_INET;
    in.sin_port = m.id.idiag_sport;
    std::memcpy(&in.sin_addr, m.id.idiag_src, 4);
    a = SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&in),
                                    sizeof(in));
  } else {
    sockaddr_in6 in6{};
    in6.sin6_family = AF_INET6;
    in6.sin6_port = m.id.idiag_sport;
    std::memcpy(&in6.sin6_addr, m.id.idiag_src, 16);
    a = SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&in6),
                                    sizeof(in6));
  }
  return a;
}

absl::Status GetInt(int fd, int level, int name, const char* what, int* out) {
  socklen_t len = sizeof(*out);
  if (::getsockopt(fd, level, name, out, &len) != 0) {
    return ErrnoError(absl::StrCat("getsockopt(", what, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ListeningSocket>> ListListeningSockets(
    int family, uint16_t port) {
  Fd nl(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!nl) return ErrnoError("socket(NETLINK_SOCK_DIAG)");
  struct {
    nlmsghdr header;
    inet_diag_req_v2 request;
  } msg{};
  msg.header.nlmsg_len = sizeof(msg);
  msg.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  msg.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  msg.request.sdiag_family = static_cast<uint8_t>(family);
  msg.request.sdiag_protocol = IPPROTO_TCP;
  msg.request.idiag_states = 1u << kTcpListen;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl.get(), &msg, sizeof(msg), 0,
               reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) < 0) {
    return ErrnoError("sock_diag request for TCP listeners");
  }
  std::vector<ListeningSocket> out;
  alignas(nlmsghdr) char buf[32768];
  for (;;) {
    ssize_t n = ::recv(nl.get(), buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("sock_diag reply for TCP listeners");
    }
    if (n == 0) return out;
    const size_t total = static_cast<size_t>(n);
    // NLMSG_OK/NLMSG_NEXT by hand: the macros mix signed and unsigned.
    for (size_t off = 0; off + sizeof(nlmsghdr) <= total;
         off +=
         NLMSG_ALIGN(reinterpret_cast<const nlmsghdr*>(buf + off)->nlmsg_len)) {
      auto* h = reinterpret_cast<nlmsghdr*>(buf + off);
      if (h->nlmsg_len < sizeof(nlmsghdr) || off + h->nlmsg_len > total) {
        break;
      }
      if (h->nlmsg_type == NLMSG_DONE) return out;
      if (h->nlmsg_type == NLMSG_ERROR) {
        auto* err = static_cast<nlmsgerr*>(NLMSG_DATA(h));
        return ErrnoError(-err->error, "sock_diag dump of TCP listeners");
      }
      if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
          h->nlmsg_len < NLMSG_LENGTH(sizeof(inet_diag_msg))) {
        continue;
      }
      auto* m = static_cast<inet_diag_msg*>(NLMSG_DATA(h));
      if (port != 0 && ntohs(m->id.idiag_sport) != port) continue;
      out.push_back(ListeningSocket{
          .inode = m->idiag_inode, .uid = m->idiag_uid, .local = FromDiag(*m)});
    }
  }
}

std::vector<ProcessSocket> SocketsOfProcess(pid_t pid) {
  std::vector<ProcessSocket> out;
  std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    int fd;
    if (!absl::SimpleAtoi(e->d_name, &fd)) continue;
    char link[64];
    ssize_t n = ::readlinkat(::dirfd(d), e->d_name, link, sizeof(link) - 1);
    if (n <= 0) continue;
    link[n] = '\0';
    uint64_t inode;
    if (std::strncmp(link, "socket:[", 8) != 0) continue;
    std::string digits(link + 8);
    if (digits.empty() || digits.back() != ']') continue;
    digits.pop_back();
    if (!absl::SimpleAtoi(digits, &inode)) continue;
    out.push_back(ProcessSocket{.pid = pid, .fd = fd, .inode = inode});
  }
  ::closedir(d);
  return out;
}

std::vector<ProcessSocket> SocketsOfTree(pid_t root) {
  // Parent and group of every process, then the members of the tree.
  std::map<pid_t, std::pair<pid_t, pid_t>> procs;  // pid -> (ppid, pgid)
  if (DIR* d = ::opendir("/proc")) {
    while (dirent* e = ::readdir(d)) {
      pid_t pid;
      if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
      pid_t ppid = 0, pgid = 0;
      if (ParseProcStatIds(ReadSmall(absl::StrCat("/proc/", pid, "/stat")),
                           &ppid, &pgid)) {
        procs[pid] = {ppid, pgid};
      }
    }
    ::closedir(d);
  }
  std::vector<ProcessSocket> out;
  for (const auto& [pid, ids] : procs) {
    bool member = pid == root || ids.second == root;
    pid_t up = ids.first;
    for (int depth = 0; !member && up > 1 && depth < 64; ++depth) {
      if (up == root) member = true;
      auto it = procs.find(up);
      if (it == procs.end()) break;
      up = it->second.first;
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
  ASSIGN_OR_RETURN(std::vector<ListeningSocket> listeners,
                   ListListeningSockets(address.family(), 0));
  std::map<uint64_t, ListeningSocket> by_inode;
  for (ListeningSocket& l : listeners) by_inode[l.inode] = std::move(l);
  SocketSearch search;
  std::set<uint64_t> seen;
  std::vector<ProcessSocket> fds =
      tree ? SocketsOfTree(root) : SocketsOfProcess(root);
  for (const ProcessSocket& p : fds) {
    auto it = by_inode.find(p.inode);
    if (it == by_inode.end()) continue;  // not a TCP listener
    if (exclude.count(p.inode) > 0 || !seen.insert(p.inode).second) continue;
    const ListeningSocket& l = it->second;
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
