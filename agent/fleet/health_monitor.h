// HealthMonitor: the closed loop's health half. Every `health_period` it
// observes every shard (ShardObserver: accept queue, process state; the
// steering program's counters; the worker's load reports), feeds each
// shard's StallDetector, and acts on what changed:
//
//   stalled    SHARD_STALLED; the grace timer starts; the shard is ejected
//              unless it is its listener's last healthy shard (or steering
//              is unavailable), which is logged as an error instead.
//   ejected    its table slots (HASH slots and CPU-table entries) go to the
//              healthy shards and its sockarray slot is emptied: no new
//              connection reaches it. Its queue is saved by shutdown() of
//              the listening socket, which makes the kernel migrate every
//              queued and half-open connection through the steering program
//              to a live shard, and listen() at once on the same socket,
//              which puts it back in the reuseport group (empty, still out
//              of the tables) for its worker to return to. SHARD_EJECTED.
//   recovered  not suspect for `restore_after`: back in the tables.
//              SHARD_RESTORED.
//   grace end  still stalled (or stalled again since it recovered): the
//              worker is SIGKILLed and replaced on the same socket at once.
//              SHARD_REPLACED; the new worker rejoins the tables once ready.
//
// It also makes a worker without a control channel ready as soon as it is
// seen to drain its queue, and keeps each shard's health and reason for the
// views (ShardHealth). Maintenance (by hand) takes a shard out of the tables
// like an ejection, without touching its queue: its worker keeps accepting
// what was queued.
#ifndef PORTFLEET_AGENT_FLEET_HEALTH_MONITOR_H_
#define PORTFLEET_AGENT_FLEET_HEALTH_MONITOR_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "agent/fleet/model.h"
#include "agent/fleet/observer.h"
#include "agent/fleet/orphans.h"
#include "agent/fleet/supervisor.h"

namespace portfleet {

// Health of one listener, derived from its shards.
struct ListenerHealthView {
  std::string name;
  v1::HealthState state = v1::HEALTH_STATE_UNSPECIFIED;
  std::string reason;  // empty when SERVING
  uint32_t healthy_shards = 0;
  uint32_t shards = 0;  // live, in-service shards
};

class HealthMonitor {
 public:
  HealthMonitor(FleetContext* ctx, Supervisor* supervisor,
                ListenerMap* listeners);
  ~HealthMonitor();
  HealthMonitor(const HealthMonitor&) = delete;
  HealthMonitor& operator=(const HealthMonitor&) = delete;

  // The observer to use (not owned); the kernel's by default.
  void SetObserver(ShardObserver* observer) { observer_ = observer; }
  // Runs after every observation round (on the loop).
  void SetAfterTick(std::function<void()> after) {
    after_tick_ = std::move(after);
  }
  // Observes every `health_period` from now on.
  void Start();
  // One observation round of every shard, and what follows from it; every
  // `orphan_scan_period` also the holders of every shard socket.
  void Tick();

  // One orphan scan now (the agent's stop runs one after its last worker
  // exited, so that a leftover holding a shard socket does not outlive it).
  void ScanOrphansNow() { orphans_.Scan(*observer_); }

  // Takes `shard` out of rotation by hand, or puts it back. Refused
  // (FailedPrecondition) for its listener's last shard in rotation, a
  // draining shard, or without BPF steering.
  absl::Status SetMaintenance(Listener& listener, Shard& shard, bool on);
  // Cancels what the monitor holds for a shard that goes away.
  void Forget(Shard& shard);

  // The listener's health (pure, from its shards as last observed).
  ListenerHealthView ListenerHealth(const Listener& listener) const;

 private:
  HealthParams Params(const Listener& listener) const;
  ShardSample Sample(const Listener& listener, const Shard& shard,
                     const Worker& worker) const;
  void ObserveListener(Listener& listener);
  void Judge(Listener& listener, Shard& shard, const ShardSample& sample);
  void ReadyByQueue(Listener& listener, Shard& shard, Worker& worker,
                    const ShardSample& sample);
  void OnStalled(Listener& listener, Shard& shard, const std::string& why);
  void OnRecovered(Listener& listener, Shard& shard);
  void TryEject(Listener& listener, Shard& shard, bool first);
  // True if another shard would still take connections with `shard` out.
  bool OthersServe(const Listener& listener, const Shard& shard) const;
  absl::Status Eject(Listener& listener, Shard& shard, const std::string& why);
  void Restore(Listener& listener, Shard& shard, const std::string& why);
  void OnGraceEnd(Listener& listener, Shard& shard);
  // Migrates the shard's queue (shutdown) and listens again at once.
  void MigrateQueue(const Listener& listener, Shard& shard);
  static void UpdateHealth(const Listener& listener, Shard& shard);

  FleetContext* const ctx_;
  Supervisor* const supervisor_;
  ListenerMap* const listeners_;
  std::unique_ptr<ShardObserver> kernel_observer_;
  ShardObserver* observer_;
  std::function<void()> after_tick_;
  std::optional<EventLoop::TimerId> timer_;
  OrphanScanner orphans_;
  absl::Time last_orphan_scan_ = absl::InfinitePast();
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_HEALTH_MONITOR_H_
