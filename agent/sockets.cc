#include "agent/sockets.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "agent/procfs.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

absl::StatusOr<Fd> CreateShardSocket(const SocketAddress& address,
                                     const ShardSocketOptions& options) {
  Fd fd(::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP));
  if (!fd) return ErrnoError("socket");
  int one = 1;
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) !=
      0) {
    return ErrnoError("setsockopt(SO_REUSEADDR)");
  }
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) !=
      0) {
    return ErrnoError("setsockopt(SO_REUSEPORT)");
  }
  if (address.family() == AF_INET6 &&
      ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) !=
          0) {
    return ErrnoError("setsockopt(IPV6_V6ONLY)");
  }
  if (options.tcp_nodelay && ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY,
                                          &one, sizeof(one)) != 0) {
    return ErrnoError("setsockopt(TCP_NODELAY)");
  }
  if (options.defer_accept_seconds > 0 &&
      ::setsockopt(fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT,
                   &options.defer_accept_seconds,
                   sizeof(options.defer_accept_seconds)) != 0) {
    return ErrnoError("setsockopt(TCP_DEFER_ACCEPT)");
  }
  if (::bind(fd.get(), address.get(), address.length) != 0) {
    int err = errno;
    if (err == EADDRINUSE) {
      return absl::AlreadyExistsError(absl::StrCat(
          "bind ", address.ToString(),
          ": address already in use by another socket that is not part of "
          "this listener"));
    }
    if (err == EACCES) {
      return absl::PermissionDeniedError(absl::StrCat(
          "bind ", address.ToString(),
          ": permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"));
    }
    if (err == EADDRNOTAVAIL) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bind ", address.ToString(),
          ": address not available (no local interface has this IP)"));
    }
    return ErrnoError(err, absl::StrCat("bind ", address.ToString()));
  }
  if (::listen(fd.get(), options.backlog) != 0) {
    return ErrnoError(absl::StrCat("listen ", address.ToString()));
  }
  return fd;
}

absl::Status SetDeferAccept(int fd, int seconds) {
  if (::setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &seconds,
                   sizeof(seconds)) != 0) {
    return ErrnoError(
        absl::StrCat("setsockopt(TCP_DEFER_ACCEPT, ", seconds, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> SocketInodeOf(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError("fstat socket");
  return static_cast<uint64_t>(st.st_ino);
}

namespace {

// Decodes /proc/net/tcp's "0100007F:1F90" or tcp6's 32-hex-digit form.
bool DecodeProcAddress(absl::string_view text, int family, in6_addr* ip,
                       uint16_t* port) {
  std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  if (parts.size() != 2) return false;
  uint32_t p;
  if (!absl::SimpleHexAtoi(parts[1], &p)) return false;
  *port = static_cast<uint16_t>(p);
  std::memset(ip, 0, sizeof(*ip));
  size_t words = family == AF_INET ? 1 : 4;
  if (parts[0].size() != words * 8) return false;
  for (size_t i = 0; i < words; ++i) {
    uint32_t w;
    if (!absl::SimpleHexAtoi(parts[0].substr(i * 8, 8), &w)) return false;
    // The kernel prints each 32-bit word in host (little-endian) order.
    std::memcpy(reinterpret_cast<char*>(ip) + i * 4, &w, 4);
  }
  return true;
}

bool IsAny(const in6_addr& ip, int family) {
  size_t len = family == AF_INET ? 4 : 16;
  for (size_t i = 0; i < len; ++i) {
    if (ip.s6_addr[i] != 0) return false;
  }
  return true;
}

void FindOwner(uint64_t inode, ForeignListener* out) {
  for (const auto& entry : ProcessTable()) {
    for (const ProcessSocket& s : SocketsOfProcess(entry.first)) {
      if (s.inode != inode) continue;
      out->pid = entry.first;
      out->process_name = std::string(absl::StripTrailingAsciiWhitespace(
          ReadProcFile(absl::StrCat("/proc/", entry.first, "/comm"))));
      return;
    }
  }
}

}  // namespace

std::optional<ForeignListener> FindForeignListener(
    const SocketAddress& address, const std::set<uint64_t>& ours) {
  std::vector<ForeignListener> all = FindForeignListeners(address, ours);
  if (all.empty()) return std::nullopt;
  return all.front();
}

std::optional<std::string> ProcessEnvValue(pid_t pid, const std::string& name) {
  std::ifstream env_file(absl::StrCat("/proc/", pid, "/environ"));
  std::stringstream env;
  env << env_file.rdbuf();
  std::string prefix = name + "=";
  for (absl::string_view e : absl::StrSplit(env.str(), '\0')) {
    if (absl::StartsWith(e, prefix)) {
      return std::string(e.substr(prefix.size()));
    }
  }
  return std::nullopt;
}

bool IsOrphanedWorkerOf(pid_t pid, const std::string& listener) {
  if (ProcessEnvValue(pid, "PORTFLEET_LISTENER") != listener) return false;
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  pid_t ppid = 0;
  while (std::getline(status, line)) {
    if (absl::StartsWith(line, "PPid:")) {
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(5)),
                            &ppid)) {
        return false;
      }
    }
  }
  if (ppid <= 0) return false;
  std::ifstream comm(absl::StrCat("/proc/", ppid, "/comm"));
  std::string parent;
  std::getline(comm, parent);
  return parent != "portfleet-agent";
}

std::vector<ForeignListener> FindForeignListeners(
    const SocketAddress& address, const std::set<uint64_t>& ours) {
  std::vector<ForeignListener> found;
  in6_addr want{};
  if (address.family() == AF_INET) {
    std::memcpy(
        &want,
        &reinterpret_cast<const sockaddr_in*>(&address.storage)->sin_addr, 4);
  } else {
    want = reinterpret_cast<const sockaddr_in6*>(&address.storage)->sin6_addr;
  }
  const char* table =
      address.family() == AF_INET ? "/proc/net/tcp" : "/proc/net/tcp6";
  std::ifstream in(table);
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::vector<absl::string_view> f =
        absl::StrSplit(line, ' ', absl::SkipWhitespace());
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
    if (f.size() < 10 || f[3] != "0A") continue;  // 0A = LISTEN
    in6_addr ip;
    uint16_t port;
    if (!DecodeProcAddress(f[1], address.family(), &ip, &port)) continue;
    if (port != address.port()) continue;
    size_t len = address.family() == AF_INET ? 4 : 16;
    bool overlap = IsAny(ip, address.family()) ||
                   IsAny(want, address.family()) ||
                   std::memcmp(&ip, &want, len) == 0;
    if (!overlap) continue;
    uint64_t inode;
    if (!absl::SimpleAtoi(f[9], &inode) || ours.count(inode) > 0) continue;
    ForeignListener out;
    out.inode = inode;
    out.local_address = std::string(f[1]);
    FindOwner(inode, &out);
    found.push_back(std::move(out));
  }
  return found;
}

absl::StatusOr<uint32_t> AcceptQueueDepth(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) {
    return ErrnoError("getsockopt(TCP_INFO)");
  }
  // For a listening socket tcpi_unacked is the current accept queue length.
  return info.tcpi_unacked;
}

absl::StatusOr<uint32_t> ListenBacklog(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) {
    return ErrnoError("getsockopt(TCP_INFO)");
  }
  // For a listening socket tcpi_sacked is the backlog.
  return info.tcpi_sacked;
}

absl::Status SetListenBacklog(int fd, int backlog) {
  if (::listen(fd, backlog) != 0) {
    return ErrnoError(absl::StrCat("listen(backlog ", backlog, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<SocketAddress> LocalAddressOf(int fd) {
  sockaddr_storage local{};
  socklen_t len = sizeof(local);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0) {
    return ErrnoError("getsockname");
  }
  return SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&local), len);
}

}  // namespace portfleet
