#include "agent/fleet/health_monitor.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/fleet.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

HealthMonitor::HealthMonitor(FleetContext* ctx, Supervisor* supervisor,
                             ListenerMap* listeners)
    : ctx_(ctx),
      supervisor_(supervisor),
      listeners_(listeners),
      kernel_observer_(MakeKernelShardObserver()),
      observer_(kernel_observer_.get()),
      orphans_(ctx, supervisor, listeners) {}

HealthMonitor::~HealthMonitor() {
  if (timer_) ctx_->loop->CancelTimer(*timer_);
}

void HealthMonitor::Start() {
  if (timer_) return;
  timer_ = ctx_->loop->AddTimer(ctx_->options.health_period, [this] {
    timer_.reset();
    Tick();
    Start();
  });
}

HealthParams HealthMonitor::Params(const Listener& listener) const {
  return HealthParams{
      .stall_window = absl::Milliseconds(EffectiveStallWindowMs(listener.spec)),
      .report_timeout = ctx_->options.report_timeout,
      .restore_after = ctx_->options.restore_after};
}

void HealthMonitor::Tick() {
  if (!ctx_->shutting_down) {
    for (auto& [name, listener] : *listeners_) {
      if (!listener->deleting) ObserveListener(*listener);
    }
    if (ctx_->Now() - last_orphan_scan_ >= ctx_->options.orphan_scan_period) {
      last_orphan_scan_ = ctx_->Now();
      orphans_.Scan(*observer_);
    }
  }
  if (after_tick_) after_tick_();
}

ShardSample HealthMonitor::Sample(const Listener& listener, const Shard& shard,
                                  const Worker& worker) const {
  ShardSample s;
  s.time = ctx_->Now();
  s.pid = worker.process.pid;
  ProcessInfo p = observer_->Process(s.pid);
  s.process = p.state;
  s.cpu_ticks = p.cpu_ticks;
  if (absl::StatusOr<QueueInfo> q = observer_->Queue(shard.socket.get());
      q.ok()) {
    s.has_queue = true;
    s.queue_depth = q->depth;
    s.backlog = q->backlog;
  }
  // A worker whose channel closed (reconnecting) is judged without reports.
  if (worker.reports && worker.control) {
    s.reports = true;
    s.accepted_total = worker.accepted_total;
    s.last_report = worker.last_report;
  }
  return s;
}

void HealthMonitor::ObserveListener(Listener& listener) {
  std::vector<std::pair<Shard*, ShardSample>> samples;
  bool queued = false;
  for (auto& shard : listener.shards) {
    ShardHealthTrack& h = shard->health;
    if (shard->draining() || !shard->worker) {
      // No worker (back-off, stopping) or leaving: nothing to judge.
      h.detector.Reset();
      h.last_depth.reset();
      UpdateHealth(listener, *shard);
      continue;
    }
    samples.emplace_back(shard.get(), Sample(listener, *shard, *shard->worker));
    queued = queued || samples.back().second.queue_depth > 0;
  }
  // The program's counters tell arrivals from accepts; they are only needed
  // when something waits in a queue (an idle agent reads nothing).
  if (queued && listener.steering) {
    absl::StatusOr<std::vector<ShardCounters>> counters =
        listener.steering->ReadCounters();
    for (auto& [shard, sample] : samples) {
      if (!counters.ok() || shard->index >= counters->size()) continue;
      const ShardCounters& c = (*counters)[shard->index];
      sample.has_arrivals = true;
      sample.arrivals = c.selected + c.migrated;
    }
  }
  for (auto& [shard, sample] : samples) {
    std::weak_ptr<int> alive = shard->lifetime;
    Judge(listener, *shard, sample);
    if (alive.expired() || listener.deleting) return;
  }
}

void HealthMonitor::Judge(Listener& listener, Shard& shard,
                          const ShardSample& sample) {
  ShardHealthTrack& h = shard.health;
  Worker& worker = *shard.worker;
  if (!worker.ready) ReadyByQueue(listener, shard, worker, sample);
  if (sample.has_queue) h.last_depth = sample.queue_depth;
  if (!worker.ready) {
    h.detector.Reset();
    UpdateHealth(listener, shard);
    return;
  }
  h.ever_ready = true;
  Judgement j = h.detector.Observe(sample, Params(listener));
  if (j.stalled && !h.stalled) {
    OnStalled(listener, shard, j.reason);
  } else if (j.stalled && !h.ejected) {
    TryEject(listener, shard, /*first=*/false);
  } else if (!j.stalled && h.stalled) {
    OnRecovered(listener, shard);
  } else if (!j.stalled && h.ejected) {
    Restore(listener, shard, "not stalled");
  }
  if (j.stalled) h.reason = j.reason;
  UpdateHealth(listener, shard);
}

void HealthMonitor::ReadyByQueue(Listener& listener, Shard& shard,
                                 Worker& worker, const ShardSample& sample) {
  ShardHealthTrack& h = shard.health;
  // Only a queue that nobody else serves says something about this worker.
  if (worker.hello || h.shared_socket || shard.candidate ||
      !shard.retiring.empty() || shard.remnant_groups > 0 ||
      shard.worker.get() != &worker) {
    return;
  }
  if (sample.has_queue && h.last_depth && *h.last_depth > 0 &&
      sample.queue_depth < *h.last_depth) {
    supervisor_->MarkReady(listener, shard, worker,
                           "no control channel; it accepts: its queue drains");
  }
}

void HealthMonitor::OnStalled(Listener& listener, Shard& shard,
                              const std::string& why) {
  ShardHealthTrack& h = shard.health;
  h.stalled = true;
  h.reason = why;
  h.episodes++;
  h.stalled_pid = shard.worker ? shard.worker->process.pid : 0;
  uint32_t grace = EffectiveStallGraceSeconds(listener.spec);
  PF_LOG(WARNING) << listener.Name(shard) << ": stalled: " << why
                  << "; replaced unless it recovers within " << grace << "s";
  ctx_->Emit(v1::EVENT_TYPE_SHARD_STALLED, listener, shard.index,
             shard.worker ? shard.worker->process.pid : 0, why);
  if (!h.grace_timer) {
    std::weak_ptr<int> alive = shard.lifetime;
    Listener* l = &listener;
    Shard* s = &shard;
    h.grace_timer =
        ctx_->loop->AddTimer(absl::Seconds(grace), [this, alive, l, s] {
          if (alive.expired()) return;
          s->health.grace_timer.reset();
          OnGraceEnd(*l, *s);
        });
  }
  TryEject(listener, shard, /*first=*/true);
}

bool HealthMonitor::OthersServe(const Listener& listener,
                                const Shard& shard) const {
  for (const auto& other : listener.shards) {
    if (other.get() == &shard || !other->Steered()) continue;
    if (other->health.stalled || !other->worker || !other->worker->ready) {
      continue;
    }
    return true;
  }
  return false;
}

void HealthMonitor::TryEject(Listener& listener, Shard& shard, bool first) {
  ShardHealthTrack& h = shard.health;
  if (h.ejected || !h.stalled) return;
  if (!listener.steering) {
    if (first) {
      PF_LOG(ERROR) << listener.Name(shard) << ": stalled but not ejected: "
                    << "BPF steering is unavailable (" << ctx_->steering_reason
                    << "), so the kernel's hash keeps sending it connections";
    }
    return;
  }
  if (!OthersServe(listener, shard)) {
    if (first) {
      std::string why = absl::StrCat(
          "stalled but NOT ejected: it is the last healthy shard of listener ",
          listener.spec.name(),
          "; its worker is replaced if it does not "
          "recover within ",
          EffectiveStallGraceSeconds(listener.spec), "s");
      PF_LOG(ERROR) << listener.Name(shard) << ": " << why;
      ctx_->Emit(v1::EVENT_TYPE_ERROR, listener, shard.index,
                 shard.worker ? shard.worker->process.pid : 0, why);
    }
    return;
  }
  absl::Status s = Eject(listener, shard, h.reason);
  if (!s.ok()) PF_LOG(ERROR) << listener.Name(shard) << ": ejecting: " << s;
}

absl::Status HealthMonitor::Eject(Listener& listener, Shard& shard,
                                  const std::string& why) {
  ShardHealthTrack& h = shard.health;
  h.ejected = true;
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    h.ejected = false;
    return s;
  }
  h.ejections++;
  if (absl::Status s = listener.steering->ClearShardSocket(shard.index);
      !s.ok()) {
    PF_LOG(WARNING) << listener.Name(shard) << ": " << s;
  }
  uint32_t queued = h.last_depth.value_or(0);
  MigrateQueue(listener, shard);
  PF_LOG(WARNING) << listener.Name(shard)
                  << ": ejected from the steering tables (" << why << "); "
                  << queued
                  << " queued connection(s) migrated to the other shards";
  ctx_->Emit(v1::EVENT_TYPE_SHARD_EJECTED, listener, shard.index,
             shard.worker ? shard.worker->process.pid : 0,
             absl::StrCat(why, "; ", queued, " queued connection(s) migrated"));
  return absl::OkStatus();
}

void HealthMonitor::MigrateQueue(const Listener& listener, Shard& shard) {
  int fd = shard.socket.get();
  if (::shutdown(fd, SHUT_RDWR) != 0) {
    PF_LOG(WARNING) << listener.Name(shard)
                    << ": shutdown of the listening socket: "
                    << std::strerror(errno);
    return;
  }
  // The same socket rejoins the reuseport group with an empty queue (the
  // kernel keeps a shut-down listener of a migrating group for this).
  if (::listen(fd, static_cast<int>(EffectiveBacklog(listener.spec))) != 0) {
    PF_LOG(ERROR) << listener.Name(shard)
                  << ": listen() again after migrating the queue: "
                  << std::strerror(errno)
                  << "; the shard's worker cannot accept until it is replaced";
  }
  shard.health.last_depth = 0;
}

void HealthMonitor::Restore(Listener& listener, Shard& shard,
                            const std::string& why) {
  ShardHealthTrack& h = shard.health;
  if (!h.ejected) return;
  h.ejected = false;
  if (listener.steering && !h.maintenance) {
    absl::Status s =
        listener.steering->SetShardSocket(shard.index, shard.socket.get());
    if (s.ok()) s = ApplySteering(listener);
    if (!s.ok()) {
      PF_LOG(ERROR) << listener.Name(shard) << ": back into the tables: " << s;
      h.ejected = true;
      listener.steering->ClearShardSocket(shard.index).IgnoreError();
      return;
    }
  }
  PF_LOG(INFO) << listener.Name(shard) << ": back in the steering tables ("
               << why << ")";
  ctx_->Emit(v1::EVENT_TYPE_SHARD_RESTORED, listener, shard.index,
             shard.worker ? shard.worker->process.pid : 0, why);
}

void HealthMonitor::OnRecovered(Listener& listener, Shard& shard) {
  ShardHealthTrack& h = shard.health;
  h.stalled = false;
  bool replaced = shard.worker->process.pid != h.stalled_pid;
  std::string why =
      replaced
          ? absl::StrCat("new worker pid ", shard.worker->process.pid, " ready")
          : absl::StrCat("recovered: not stalled for ",
                         HumanDuration(ctx_->options.restore_after));
  h.reason.clear();
  if (h.ejected) {
    Restore(listener, shard, why);
  } else {
    PF_LOG(INFO) << listener.Name(shard) << ": " << why;
  }
}

void HealthMonitor::OnGraceEnd(Listener& listener, Shard& shard) {
  ShardHealthTrack& h = shard.health;
  uint32_t episodes = std::exchange(h.episodes, 0);
  if (!shard.worker || shard.draining() || h.replacing) return;
  if (!h.stalled && episodes <= 1) return;  // recovered in time
  uint32_t grace = EffectiveStallGraceSeconds(listener.spec);
  std::string why =
      h.stalled ? absl::StrCat("still stalled after the ", grace,
                               "s grace period (", h.reason, ")")
                : absl::StrCat("stalled ", episodes, " times within the ",
                               grace, "s grace period");
  supervisor_->Replace(listener, shard, why);
}

absl::Status HealthMonitor::SetMaintenance(Listener& listener, Shard& shard,
                                           bool on) {
  ShardHealthTrack& h = shard.health;
  std::string name = listener.Name(shard);
  if (shard.draining()) {
    return absl::FailedPreconditionError(name + " is draining");
  }
  if (h.maintenance == on) return absl::OkStatus();
  if (on && !listener.steering) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, ": cannot take it out of rotation: BPF steering is unavailable (",
        ctx_->steering_reason, ")"));
  }
  if (on && shard.Steered() && !OthersServe(listener, shard)) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, " is the last healthy shard in rotation of listener ",
        listener.spec.name(), "; it stays in rotation"));
  }
  h.maintenance = on;
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    h.maintenance = !on;
    return s;
  }
  if (listener.steering && !h.ejected && shard.in_service) {
    absl::Status s =
        on ? listener.steering->ClearShardSocket(shard.index)
           : listener.steering->SetShardSocket(shard.index, shard.socket.get());
    if (!s.ok()) PF_LOG(WARNING) << name << ": " << s;
  }
  pid_t pid = shard.worker ? shard.worker->process.pid : 0;
  PF_LOG(INFO) << name
               << (on ? ": out of rotation (maintenance)"
                      : ": back in rotation (maintenance ended)");
  ctx_->Emit(on ? v1::EVENT_TYPE_SHARD_EJECTED : v1::EVENT_TYPE_SHARD_RESTORED,
             listener, shard.index, pid,
             on ? "maintenance (by hand)" : "maintenance ended (by hand)");
  UpdateHealth(listener, shard);
  return absl::OkStatus();
}

void HealthMonitor::Forget(Shard& shard) {
  if (shard.health.grace_timer) {
    ctx_->loop->CancelTimer(*shard.health.grace_timer);
    shard.health.grace_timer.reset();
  }
}

void HealthMonitor::UpdateHealth(const Listener& /*listener*/, Shard& shard) {
  ShardHealthTrack& h = shard.health;
  const Worker* w = shard.worker.get();
  if (shard.draining()) {
    h.health = v1::SHARD_HEALTH_DRAINING;
    h.reason = "draining";
  } else if (h.maintenance) {
    h.health = v1::SHARD_HEALTH_MAINTENANCE;
    h.reason = "maintenance (by hand)";
  } else if (h.ejected) {
    h.health = v1::SHARD_HEALTH_EJECTED;
    if (!h.stalled) h.reason = "replaced; waiting for the new worker";
  } else if (h.stalled) {
    h.health = v1::SHARD_HEALTH_STALLED;
  } else if (w == nullptr) {
    h.health = v1::SHARD_HEALTH_DOWN;
    h.reason = shard.state == v1::SHARD_STATE_BACKOFF
                   ? "worker exited; restarting (back-off)"
                   : "no worker";
  } else if (!w->ready) {
    h.health = v1::SHARD_HEALTH_STARTING;
    h.reason = absl::StrCat("worker pid ", w->process.pid, " not ready yet");
  } else {
    h.health = v1::SHARD_HEALTH_HEALTHY;
    h.reason.clear();
  }
}

ListenerHealthView HealthMonitor::ListenerHealth(
    const Listener& listener) const {
  ListenerHealthView v;
  v.name = listener.spec.name();
  std::vector<std::string> why;
  bool starting = false;
  absl::Time now = ctx_->Now();
  for (const auto& shard : listener.shards) {
    if (shard->draining() || !shard->in_service) continue;
    v.shards++;
    const ShardHealthTrack& h = shard->health;
    bool healthy = h.health == v1::SHARD_HEALTH_HEALTHY && shard->Steered();
    if (healthy) {
      v.healthy_shards++;
      continue;
    }
    const Worker* w = shard->worker.get();
    if (!h.ever_ready && w != nullptr && !w->ready &&
        now - w->started < ctx_->options.ready_timeout) {
      starting = true;
    }
    why.push_back(absl::StrCat("shard ", shard->index, " ",
                               ShardHealth_Name(h.health).substr(13), ": ",
                               h.reason));
  }
  if (starting) {
    v.state = v1::HEALTH_STATE_STARTING;
  } else if (v.healthy_shards == 0) {
    v.state = v1::HEALTH_STATE_NOT_SERVING;
    if (why.empty()) why.push_back("no shard");
  } else if (v.healthy_shards < v.shards) {
    v.state = v1::HEALTH_STATE_DEGRADED;
  } else {
    v.state = v1::HEALTH_STATE_SERVING;
  }
  v.reason = absl::StrJoin(why, "; ");
  return v;
}

// --- The fleet's health operations -------------------------------------------

std::vector<ListenerHealthView> Fleet::Health() const {
  std::vector<ListenerHealthView> out;
  for (const auto& [name, listener] : listeners_) {
    if (!listener->deleting) out.push_back(health_.ListenerHealth(*listener));
  }
  // A listener that could not start serves nothing (it is retried).
  for (const auto& [name, failed] : failed_) {
    out.push_back(ListenerHealthView{
        .name = name,
        .state = v1::HEALTH_STATE_NOT_SERVING,
        .reason = absl::StrCat("could not start: ", failed.error.message(),
                               " (retrying)"),
        .healthy_shards = 0,
        .shards = failed.spec.shards()});
  }
  std::sort(out.begin(), out.end(),
            [](const ListenerHealthView& a, const ListenerHealthView& b) {
              return a.name < b.name;
            });
  return out;
}

absl::Status Fleet::SetShardMaintenance(const std::string& name, uint32_t index,
                                        bool maintenance) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  Shard* shard = listener->Find(index);
  if (shard == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("listener ", name, " has no shard ", index));
  }
  return health_.SetMaintenance(*listener, *shard, maintenance);
}

}  // namespace portfleet
