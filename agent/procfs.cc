#include "agent/procfs.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// An open directory, closed on every path.
class Dir {
 public:
  explicit Dir(const std::string& path) : dir_(::opendir(path.c_str())) {}
  ~Dir() {
    if (dir_ != nullptr) ::closedir(dir_);
  }
  Dir(const Dir&) = delete;
  Dir& operator=(const Dir&) = delete;
  DIR* get() const { return dir_; }

 private:
  DIR* dir_;
};

SocketAddress FromDiag(const inet_diag_msg& m) {
  if (m.idiag_family == AF_INET) {
    sockaddr_in in{};
    in.sin_family = AF_INET;
    in.sin_port = m.id.idiag_sport;
    std::memcpy(&in.sin_addr, m.id.idiag_src, 4);
    return SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&in),
                                       sizeof(in));
  }
  sockaddr_in6 in6{};
  in6.sin6_family = AF_INET6;
  in6.sin6_port = m.id.idiag_sport;
  std::memcpy(&in6.sin6_addr, m.id.idiag_src, 16);
  return SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&in6),
                                     sizeof(in6));
}

}  // namespace

std::string ReadProcFile(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  char buf[4096];
  ssize_t n;
  do {
    n = ::read(fd.get(), buf, sizeof(buf));
  } while (n < 0 && errno == EINTR);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

bool ParseProcStatIds(const std::string& text, ProcIds* out) {
  // "pid (comm) S ppid pgrp ...": comm ends at the last ')'.
  size_t close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size()) return false;
  std::vector<absl::string_view> f = absl::StrSplit(
      absl::string_view(text).substr(close + 2), ' ', absl::SkipEmpty());
  if (f.size() < 3 || f[0].size() != 1) return false;
  out->state = f[0][0];
  out->start_time = 0;
  // Fields 3.. of stat(5) are f[0..]: starttime (22) is f[19].
  if (f.size() > 19 && !absl::SimpleAtoi(f[19], &out->start_time)) {
    return false;
  }
  return absl::SimpleAtoi(f[1], &out->ppid) &&
         absl::SimpleAtoi(f[2], &out->pgid);
}

std::optional<ProcIds> ProcessIds(pid_t pid) {
  ProcIds ids;
  if (pid <= 0 ||
      !ParseProcStatIds(ReadProcFile(absl::StrCat("/proc/", pid, "/stat")),
                        &ids)) {
    return std::nullopt;
  }
  return ids;
}

std::optional<uid_t> ProcessEffectiveUid(pid_t pid) {
  if (pid <= 0) return std::nullopt;
  std::string status = ReadProcFile(absl::StrCat("/proc/", pid, "/status"));
  for (absl::string_view line : absl::StrSplit(status, '\n')) {
    if (!absl::ConsumePrefix(&line, "Uid:")) continue;
    // Real, effective, saved, filesystem.
    std::vector<absl::string_view> ids =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    uid_t uid;
    if (ids.size() >= 2 && absl::SimpleAtoi(ids[1], &uid)) return uid;
    return std::nullopt;
  }
  return std::nullopt;
}

std::map<pid_t, ProcIds> ProcessTable() {
  std::map<pid_t, ProcIds> out;
  Dir proc("/proc");
  if (proc.get() == nullptr) return out;
  while (dirent* e = ::readdir(proc.get())) {
    pid_t pid;
    if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
    ProcIds ids;
    if (ParseProcStatIds(ReadProcFile(absl::StrCat("/proc/", pid, "/stat")),
                         &ids)) {
      out[pid] = ids;
    }
  }
  return out;
}

std::vector<ProcessSocket> SocketsOfProcess(pid_t pid) {
  std::vector<ProcessSocket> out;
  Dir fds(absl::StrCat("/proc/", pid, "/fd"));
  if (fds.get() == nullptr) return out;
  while (dirent* e = ::readdir(fds.get())) {
    int fd;
    if (!absl::SimpleAtoi(e->d_name, &fd)) continue;
    char buf[64];
    ssize_t n = ::readlinkat(::dirfd(fds.get()), e->d_name, buf, sizeof(buf));
    absl::string_view link(buf, n > 0 ? static_cast<size_t>(n) : 0);
    uint64_t inode;
    if (absl::ConsumePrefix(&link, "socket:[") &&
        absl::ConsumeSuffix(&link, "]") && absl::SimpleAtoi(link, &inode)) {
      out.push_back(ProcessSocket{.pid = pid, .fd = fd, .inode = inode});
    }
  }
  return out;
}

absl::StatusOr<std::vector<DiagSocket>> DumpTcpSockets(int family,
                                                       uint32_t state_mask,
                                                       uint16_t port) {
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
  msg.request.idiag_states = state_mask;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl.get(), &msg, sizeof(msg), 0,
               reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) < 0) {
    return ErrnoError("sock_diag: request for TCP sockets");
  }
  std::vector<DiagSocket> out;
  alignas(nlmsghdr) char buf[32768];
  for (;;) {
    ssize_t n = ::recv(nl.get(), buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("sock_diag: reply for TCP sockets");
    }
    if (n == 0) return out;
    // NLMSG_OK/NLMSG_NEXT by hand: the macros mix signed and unsigned.
    const size_t total = static_cast<size_t>(n);
    size_t offset = 0;
    while (offset + sizeof(nlmsghdr) <= total) {
      const auto* h = reinterpret_cast<const nlmsghdr*>(buf + offset);
      if (h->nlmsg_len < sizeof(nlmsghdr) || offset + h->nlmsg_len > total) {
        break;
      }
      offset += NLMSG_ALIGN(h->nlmsg_len);
      if (h->nlmsg_type == NLMSG_DONE) return out;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        return ErrnoError(-err->error, "sock_diag: dump of TCP sockets");
      }
      if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
          h->nlmsg_len < NLMSG_LENGTH(sizeof(inet_diag_msg))) {
        continue;
      }
      const auto* m = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
      if (m->idiag_inode == 0) continue;
      if (port != 0 && ntohs(m->id.idiag_sport) != port) continue;
      out.push_back(DiagSocket{
          .inode = m->idiag_inode, .uid = m->idiag_uid, .local = FromDiag(*m)});
    }
  }
}

}  // namespace portfleet
