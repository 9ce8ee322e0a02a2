// LoadMonitor: the closed loop's load half. Every `load_period` (1 s) it
// measures the serving worker of every shard and keeps the result on the
// shard (Shard::load), for the views and the rebalancer:
//   connections  the worker's load reports when it sends them; otherwise
//                the kernel's count (ConnectionCounter): established TCP
//                connections on the listener's port whose socket is held
//                by a process of the worker's process group, so that the
//                count works for any worker;
//   cpu          CPU time of the worker process per second (/proc, through
//                the ShardObserver);
//   bytes, requests  totals and per-second rates from the load reports.
// The kernel count costs one sock_diag dump and one /proc walk per listener
// with a worker that does not report, and nothing otherwise. Under the
// LEAST_CONNECTIONS policy the connection counts are then written to the
// listener's steering (ListenerSteering::SetConnectionCounts).
#ifndef PORTFLEET_AGENT_FLEET_LOAD_H_
#define PORTFLEET_AGENT_FLEET_LOAD_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "absl/status/statusor.h"
#include "agent/fleet/model.h"
#include "agent/fleet/observer.h"

namespace portfleet {

// Established connections per process group. A seam: unit tests use a fake.
class ConnectionCounter {
 public:
  virtual ~ConnectionCounter() = default;
  // Established TCP connections (IPv4 and IPv6) whose local port is `port`,
  // counted per process group in `pgids` that holds their socket.
  virtual absl::StatusOr<std::map<pid_t, uint64_t>> Count(
      uint16_t port, const std::set<pid_t>& pgids) = 0;
};

// The real one: NETLINK_SOCK_DIAG (inet_diag) and /proc/*/fd.
std::unique_ptr<ConnectionCounter> MakeKernelConnectionCounter();

class LoadMonitor {
 public:
  LoadMonitor(FleetContext* ctx, ListenerMap* listeners);
  ~LoadMonitor();
  LoadMonitor(const LoadMonitor&) = delete;
  LoadMonitor& operator=(const LoadMonitor&) = delete;

  // Seams (not owned); the kernel's by default.
  void SetObserver(ShardObserver* observer) { observer_ = observer; }
  void SetCounter(ConnectionCounter* counter) { counter_ = counter; }
  // Measures every `load_period` from now on.
  void Start();
  // One measurement of every shard.
  void Tick();

 private:
  void MeasureListener(Listener& listener);

  FleetContext* const ctx_;
  ListenerMap* const listeners_;
  std::unique_ptr<ShardObserver> kernel_observer_;
  std::unique_ptr<ConnectionCounter> kernel_counter_;
  ShardObserver* observer_;
  ConnectionCounter* counter_;
  std::optional<EventLoop::TimerId> timer_;
  // Lines about a kernel count that failed.
  LogRateLimiter complaints_;
};

// Max/mean of `loads` (1.0 = even); 0 when they are empty or all 0. Pure.
double Imbalance(const std::vector<double>& loads);

// A load report's hand-off pauses (WorkerLoad.handoff_pauses, cumulative
// over the worker's life) from `worker` of `shard`: what is new since its
// previous report is added to the shard's and the listener's counts, and
// the report is kept on the worker. A report with fewer pauses than the
// previous one (the worker started counting again) counts whole.
void AddHandOffPauses(const v1::DurationHistogram& reported, Worker& worker,
                      Shard& shard, Listener& listener);

// The shard's hand-off pauses as the API shows them (ShardLoad).
void FillHandOffPauses(const DurationHistogram& pauses, v1::HandOffPauses* out);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_LOAD_H_
