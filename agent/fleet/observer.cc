#include "agent/fleet/observer.h"

#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/sockets.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

std::string ReadSmallFile(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  char buf[1024];
  ssize_t n = ::read(fd.get(), buf, sizeof(buf));
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

// Which of `inodes` the process `pid` holds (its fds are socket:[INODE]).
std::set<uint64_t> HeldSockets(pid_t pid, const std::set<uint64_t>& inodes) {
  std::set<uint64_t> out;
  std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* fds = ::opendir(dir.c_str());
  if (fds == nullptr) return out;
  while (dirent* fe = ::readdir(fds)) {
    if (fe->d_name[0] == '.') continue;
    char buf[64];
    ssize_t n = ::readlinkat(::dirfd(fds), fe->d_name, buf, sizeof(buf));
    absl::string_view link(buf, n > 0 ? static_cast<size_t>(n) : 0);
    if (!absl::ConsumePrefix(&link, "socket:[") ||
        !absl::ConsumeSuffix(&link, "]")) {
      continue;
    }
    uint64_t inode;
    if (absl::SimpleAtoi(link, &inode) && inodes.count(inode) > 0) {
      out.insert(inode);
    }
  }
  ::closedir(fds);
  return out;
}

SocketHolder DescribeHolder(pid_t pid) {
  SocketHolder h;
  h.pid = pid;
  pid_t ppid = 0;
  ParseProcStatIds(ReadSmallFile(absl::StrCat("/proc/", pid, "/stat")), &ppid,
                   &h.pgid);
  // Bounded: a parent chain is short, and a racing exit ends it.
  for (int depth = 0; ppid > 1 && depth < 64; ++depth) {
    h.ancestors.push_back(ppid);
    pid_t pgid_unused = 0;
    pid_t next = 0;
    if (!ParseProcStatIds(ReadSmallFile(absl::StrCat("/proc/", ppid, "/stat")),
                          &next, &pgid_unused)) {
      break;
    }
    ppid = next;
  }
  h.command = ReadSmallFile(absl::StrCat("/proc/", pid, "/comm"));
  if (!h.command.empty() && h.command.back() == '\n') h.command.pop_back();
  h.listener = ProcessEnvValue(pid, "PORTFLEET_LISTENER").value_or("");
  h.shard = ProcessEnvValue(pid, "PORTFLEET_SHARD").value_or("");
  return h;
}

class KernelShardObserver : public ShardObserver {
 public:
  absl::StatusOr<QueueInfo> Queue(int socket_fd) override {
    tcp_info info{};
    socklen_t len = sizeof(info);
    if (::getsockopt(socket_fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) {
      return ErrnoError("getsockopt(TCP_INFO)");
    }
    // On a listening socket: tcpi_unacked = accept queue length,
    // tcpi_sacked = backlog.
    return QueueInfo{.depth = info.tcpi_unacked, .backlog = info.tcpi_sacked};
  }

  ProcessInfo Process(pid_t pid) override {
    std::string path = absl::StrCat("/proc/", pid, "/stat");
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return ProcessInfo{};
    char buf[1024];
    ssize_t n = ::read(fd.get(), buf, sizeof(buf) - 1);
    if (n <= 0) return ProcessInfo{};
    return ParseProcStat(std::string(buf, static_cast<size_t>(n)));
  }

  std::map<uint64_t, std::vector<SocketHolder>> SocketHolders(
      const std::set<uint64_t>& inodes) override {
    std::map<uint64_t, std::vector<SocketHolder>> out;
    if (inodes.empty()) return out;
    DIR* proc = ::opendir("/proc");
    if (proc == nullptr) return out;
    while (dirent* pe = ::readdir(proc)) {
      pid_t pid;
      if (!absl::SimpleAtoi(pe->d_name, &pid)) continue;
      std::set<uint64_t> held = HeldSockets(pid, inodes);
      if (held.empty()) continue;
      SocketHolder holder = DescribeHolder(pid);
      for (uint64_t inode : held) out[inode].push_back(holder);
    }
    ::closedir(proc);
    return out;
  }
};

}  // namespace

ProcessInfo ParseProcStat(const std::string& text) {
  ProcessInfo out;
  // "pid (comm) S ppid ..." where comm may hold anything: fields count from
  // the last ')'.
  size_t close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size()) return out;
  std::vector<std::string> f =
      absl::StrSplit(text.substr(close + 2), ' ', absl::SkipEmpty());
  // f[0] = state (field 3), f[11] = utime (14), f[12] = stime (15).
  if (f.empty() || f[0].empty()) return out;
  switch (f[0][0]) {
    case 'T':
    case 't':
      out.state = ProcessState::kStopped;
      break;
    case 'Z':
    case 'X':
      out.state = ProcessState::kZombie;
      break;
    default:
      out.state = ProcessState::kRunning;
  }
  uint64_t utime = 0, stime = 0;
  if (f.size() > 12 && absl::SimpleAtoi(f[11], &utime) &&
      absl::SimpleAtoi(f[12], &stime)) {
    out.cpu_ticks = utime + stime;
  }
  return out;
}

bool ParseProcStatIds(const std::string& text, pid_t* ppid, pid_t* pgid) {
  // "pid (comm) S ppid pgrp ..."
  size_t close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size()) return false;
  std::vector<absl::string_view> f = absl::StrSplit(
      absl::string_view(text).substr(close + 2), ' ', absl::SkipEmpty());
  return f.size() > 2 && absl::SimpleAtoi(f[1], ppid) &&
         absl::SimpleAtoi(f[2], pgid);
}

std::unique_ptr<ShardObserver> MakeKernelShardObserver() {
  return std::make_unique<KernelShardObserver>();
}

}  // namespace portfleet
