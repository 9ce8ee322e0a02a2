#include "agent/fleet/observer.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

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
