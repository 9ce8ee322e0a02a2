#include "agent/fleet/load.h"

#include <sys/socket.h>

#include <algorithm>
#include <string>
#include <vector>

#include "agent/procfs.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/handoff_pauses.h"

namespace portfleet {
namespace {

class KernelConnectionCounter : public ConnectionCounter {
 public:
  absl::StatusOr<std::map<pid_t, uint64_t>> Count(
      uint16_t port, const std::set<pid_t>& pgids) override {
    std::map<pid_t, uint64_t> out;
    for (pid_t g : pgids) out[g] = 0;
    std::set<uint64_t> inodes;
    for (int family : {AF_INET, AF_INET6}) {
      ASSIGN_OR_RETURN(std::vector<DiagSocket> established,
                       DumpTcpSockets(family, kTcpEstablishedMask, port));
      for (const DiagSocket& d : established) inodes.insert(d.inode);
    }
    if (inodes.empty() || pgids.empty()) return out;
    for (const auto& [pid, ids] : ProcessTable()) {
      if (pgids.count(ids.pgid) == 0) continue;
      for (const ProcessSocket& s : SocketsOfProcess(pid)) {
        out[ids.pgid] += inodes.count(s.inode);
      }
    }
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
      FillHandOffPauses(shard->handoff_pauses, load.mutable_handoff_pauses());
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
    FillHandOffPauses(shard->handoff_pauses, load.mutable_handoff_pauses());
    shard->load = std::move(load);
  }
  if (listener.steering && listener.spec.steering().policy() ==
                               v1::STEERING_POLICY_LEAST_CONNECTIONS) {
    absl::Status s = WriteConnectionCounts(listener);
    if (uint64_t dropped; !s.ok() && complaints_.Allow(now, &dropped)) {
      PF_LOG(WARNING) << "listener " << listener.spec.name()
                      << ": least-connections steering keeps its previous "
                         "counts: "
                      << s.message() << SuppressedNote(dropped);
    }
  }
}

void AddHandOffPauses(const v1::DurationHistogram& reported, Worker& worker,
                      Shard& shard, Listener& listener) {
  DurationHistogram now = HistogramFromProto(reported);
  const DurationHistogram fresh = now.count() >= worker.handoff_pauses.count()
                                      ? now.Since(worker.handoff_pauses)
                                      : now;
  shard.handoff_pauses.Merge(fresh);
  listener.handoff_pauses.Merge(fresh);
  worker.handoff_pauses = std::move(now);
}

void FillHandOffPauses(const DurationHistogram& pauses,
                       v1::HandOffPauses* out) {
  out->set_adopted(pauses.count());
  out->set_p50_us(pauses.QuantileNs(0.5) / 1e3);
  out->set_p99_us(pauses.QuantileNs(0.99) / 1e3);
  HistogramToProto(pauses, out->mutable_histogram(), /*upper_bounds=*/true);
}

}  // namespace portfleet
