#include "agent/fleet/observer.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/procfs.h"
#include "agent/sockets.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// Which of `inodes` the process `pid` holds.
std::set<uint64_t> HeldSockets(pid_t pid, const std::set<uint64_t>& inodes) {
  std::set<uint64_t> out;
  for (const ProcessSocket& s : SocketsOfProcess(pid)) {
    if (inodes.count(s.inode) > 0) out.insert(s.inode);
  }
  return out;
}

SocketHolder DescribeHolder(pid_t pid) {
  SocketHolder h;
  h.pid = pid;
  ProcIds ids;
  ParseProcStatIds(ReadProcFile(absl::StrCat("/proc/", pid, "/stat")), &ids);
  h.pgid = ids.pgid;
  pid_t ppid = ids.ppid;
  // Bounded: a parent chain is short, and a racing exit ends it.
  for (int depth = 0; ppid > 1 && depth < 64; ++depth) {
    h.ancestors.push_back(ppid);
    ProcIds parent;
    if (!ParseProcStatIds(ReadProcFile(absl::StrCat("/proc/", ppid, "/stat")),
                          &parent)) {
      break;
    }
    ppid = parent.ppid;
  }
  h.command = ReadProcFile(absl::StrCat("/proc/", pid, "/comm"));
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
    std::string stat = ReadProcFile(absl::StrCat("/proc/", pid, "/stat"));
    if (stat.empty()) return ProcessInfo{};
    return ParseProcStat(stat);
  }

  std::map<uint64_t, std::vector<SocketHolder>> SocketHolders(
      const std::set<uint64_t>& inodes) override {
    std::map<uint64_t, std::vector<SocketHolder>> out;
    if (inodes.empty()) return out;
    for (const auto& entry : ProcessTable()) {
      const pid_t pid = entry.first;
      std::set<uint64_t> held = HeldSockets(pid, inodes);
      if (held.empty()) continue;
      SocketHolder holder = DescribeHolder(pid);
      for (uint64_t inode : held) out[inode].push_back(holder);
    }
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

std::unique_ptr<ShardObserver> MakeKernelShardObserver() {
  return std::make_unique<KernelShardObserver>();
}

}  // namespace portfleet
