#include "agent/fleet/load.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// Inodes of the established TCP sockets of one family whose local port is
// `port`, added to `out`.
absl::Status DumpEstablished(int family, uint16_t port,
                             std::set<uint64_t>* out) {
  Fd nl(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!nl) return ErrnoError("socket(NETLINK_SOCK_DIAG)");
  struct {
    nlmsghdr nlh;
    inet_diag_req_v2 req;
  } msg{};
  msg.nlh.nlmsg_len = sizeof(msg);
  msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  msg.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  msg.req.sdiag_family = static_cast<uint8_t>(family);
  msg.req.sdiag_protocol = IPPROTO_TCP;
  msg.req.idiag_states = 1U << TCP_ESTABLISHED;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl.get(), &msg, sizeof(msg), 0,
               reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) < 0) {
    return ErrnoError("sock_diag: sendto");
  }
  alignas(nlmsghdr) char buf[32768];
  for (;;) {
    ssize_t n = ::recv(nl.get(), buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("sock_diag: recv");
    }
    if (n == 0) return absl::OkStatus();
    // NLMSG_OK/NLMSG_NEXT by hand: the macros mix signed and unsigned.
    size_t offset = 0;
    const size_t len = static_cast<size_t>(n);
    while (offset + sizeof(nlmsghdr) <= len) {
      auto* h = reinterpret_cast<nlmsghdr*>(buf + offset);
      if (h->nlmsg_len < sizeof(nlmsghdr) || offset + h->nlmsg_len > len) {
        break;
      }
      offset += NLMSG_ALIGN(h->nlmsg_len);
      if (h->nlmsg_type == NLMSG_DONE) return absl::OkStatus();
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        return ErrnoError(-err->error, "sock_diag: dump");
      }
      if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
          h->nlmsg_len < NLMSG_LENGTH(sizeof(inet_diag_msg))) {
        continue;
      }
      const auto* d = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
      if (ntohs(d->id.idiag_sport) == port && d->idiag_inode != 0) {
        out->insert(d->idiag_inode);
      }
    }
  }
}

std::string ReadSmall(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  char buf[1024];
  ssize_t n = ::read(fd.get(), buf, sizeof(buf));
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

// How many of `inodes` the process `pid` holds an fd on.
uint64_t CountHeld(pid_t pid, const std::set<uint64_t>& inodes) {
  uint64_t count = 0;
  std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* fds = ::opendir(dir.c_str());
  if (fds == nullptr) return 0;
  while (dirent* fe = ::readdir(fds)) {
    if (fe->d_name[0] == '.') continue;
    char buf[64];
    ssize_t n = ::readlinkat(::dirfd(fds), fe->d_name, buf, sizeof(buf));
    absl::string_view link(buf, n > 0 ? static_cast<size_t>(n) : 0);
    uint64_t inode;
    if (absl::ConsumePrefix(&link, "socket:[") &&
        absl::ConsumeSuffix(&link, "]") && absl::SimpleAtoi(link, &inode) &&
        inodes.count(inode) > 0) {
      ++count;
    }
  }
  ::closedir(fds);
  return count;
}

class KernelConnectionCounter : public ConnectionCounter {
 public:
  absl::StatusOr<std::map<pid_t, uint64_t>> Count(
      uint16_t port, const std::set<pid_t>& pgids) override {
    std::map<pid_t, uint64_t> out;
    for (pid_t g : pgids) out[g] = 0;
    std::set<uint64_t> inodes;
    RETURN_IF_ERROR(DumpEstablished(AF_INET, port, &inodes));
    RETURN_IF_ERROR(DumpEstablished(AF_INET6, port, &inodes));
    if (inodes.empty() || pgids.empty()) return out;
    DIR* proc = ::opendir("/proc");
    if (proc == nullptr) return ErrnoError("opendir(/proc)");
    while (dirent* pe = ::readdir(proc)) {
      pid_t pid;
      if (!absl::SimpleAtoi(pe->d_name, &pid)) continue;
      pid_t ppid = 0;
      pid_t pgid = 0;
      if (!ParseProcStatIds(ReadSmall(absl::StrCat("/proc/", pid, "/stat")),
                            &ppid, &pgid) ||
          pgids.count(pgid) == 0) {
        continue;
      }
      out[pgid] += CountHeld(pid, inodes);
    }
    ::closedir(proc);
    return out;
  }
};

// Per second between two readings of a total; 0 across a reset.
double Rate(uint64_t before, uint64_t now, absl::Duration elapsed) {
  double secs = absl::ToDoubleSeconds(elapsed);
  if (now < before || secs <= 0) return 0;
  return static_cast<double>(now - before) / secs;
}

}  // namespace

std::unique_ptr<ConnectionCounter> MakeKernelConnectionCounter() {
  return std::make_unique<KernelConnectionCounter>();
}

double Imbalance(const std::vector<double>& loads) {
  if (loads.empty()) return 0;
  double sum = 0;
  double max = 0;
  for (double l : loads) {
    sum += l;
    max = std::max(max, l);
  }
  if (sum <= 0) return 0;
  return max / (sum / static_cast<double>(loads.size()));
}

LoadMonitor::LoadMonitor(FleetContext* ctx, ListenerMap* listeners)
    : ctx_(ctx),
      listeners_(listeners),
      kernel_observer_(MakeKernelShardObserver()),
      kernel_counter_(MakeKernelConnectionCounter()),
      observer_(kernel_observer_.get()),
      counter_(kernel_counter_.get()) {}

LoadMonitor::~LoadMonitor() {
  if (timer_) ctx_->loop->CancelTimer(*timer_);
}

void LoadMonitor::Start() {
  if (timer_) return;
  timer_ = ctx_->loop->AddTimer(ctx_->options.load_period, [this] {
    timer_.reset();
    Tick();
    Start();
  });
}

void LoadMonitor::Tick() {
  if (ctx_->shutting_down) return;
  for (auto& [name, listener] : *listeners_) {
    if (!listener->deleting) MeasureListener(*listener);
  }
}

void LoadMonitor::MeasureListener(Listener& listener) {
  static const long kTicksPerSecond = ::sysconf(_SC_CLK_TCK);
  const absl::Time now = ctx_->Now();
  // Workers without reports are counted by the kernel, in one pass.
  std::set<pid_t> unreported;
  for (const auto& shard : listener.shards) {
    const Worker* w = shard->worker.get();
    if (w != nullptr && !(w->reports && w->control)) {
      unreported.insert(w->process.pid);
    }
  }
  std::map<pid_t, uint64_t> kernel;
  if (!unreported.empty()) {
    absl::StatusOr<std::map<pid_t, uint64_t>> counted =
        counter_->Count(listener.address.port(), unreported);
    if (counted.ok()) {
      kernel = *std::move(counted);
    } else if (uint64_t dropped; complaints_.Allow(now, &dropped)) {
      PF_LOG(WARNING) << "listener " << listener.spec.name()
                      << ": counting established connections: "
                      << counted.status().message() << SuppressedNote(dropped);
    }
  }
  for (auto& shard : listener.shards) {
    const Worker* w = shard->worker.get();
    v1::ShardLoad load;
    if (w == nullptr) {
      shard->load = load;
      shard->load_track = LoadTrack{};
      continue;
    }
    // Workers are started as their own process group (pgid = pid).
    const pid_t pid = w->process.pid;
    if (w->reports && w->control) {
      load.set_reports(true);
      load.set_connections(w->active_connections);
      load.set_connections_source(v1::ShardLoad::SOURCE_WORKER);
      load.set_bytes_in_total(w->bytes_in_total);
      load.set_bytes_out_total(w->bytes_out_total);
      load.set_requests_total(w->requests_total);
    } else if (auto k = kernel.find(pid); k != kernel.end()) {
      load.set_connections(k->second);
      load.set_connections_source(v1::ShardLoad::SOURCE_KERNEL);
    }
    ProcessInfo p = observer_->Process(pid);
    LoadTrack& t = shard->load_track;
    const uint64_t bytes = load.bytes_in_total() + load.bytes_out_total();
    if (t.pid == pid && t.time < now) {
      const absl::Duration elapsed = now - t.time;
      if (kTicksPerSecond > 0 && p.cpu_ticks >= t.cpu_ticks) {
        load.set_cpu(static_cast<double>(p.cpu_ticks - t.cpu_ticks) /
                     static_cast<double>(kTicksPerSecond) /
                     absl::ToDoubleSeconds(elapsed));
      }
      load.set_bytes_per_second(Rate(t.bytes, bytes, elapsed));
      load.set_requests_per_second(
          Rate(t.requests, load.requests_total(), elapsed));
    }
    t = LoadTrack{.pid = pid,
                  .time = now,
                  .cpu_ticks = p.cpu_ticks,
                  .bytes = bytes,
                  .requests = load.requests_total()};
    shard->load = std::move(load);
  }
}

}  // namespace portfleet
