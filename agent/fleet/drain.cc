#include "agent/fleet/drain.h"

#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "agent/fleet/rollout.h"
#include "agent/fleet/selfbound.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"

namespace portfleet {
namespace {

// The shard's worker process is also the worker of another shard that is not
// draining (one process with several sockets).
bool ServesOtherShards(const Listener& listener, const Shard& shard) {
  for (const auto& other : listener.shards) {
    if (other.get() != &shard && !other->draining() && other->worker &&
        other->worker->process.pid == shard.worker->process.pid) {
      return true;
    }
  }
  return false;
}

}  // namespace

Drainer::Drainer(FleetContext* ctx, Supervisor* supervisor,
                 ListenerMap* listeners)
    : ctx_(ctx), supervisor_(supervisor), listeners_(listeners) {}

Drainer::~Drainer() {
  if (kill_timer_) ctx_->loop->CancelTimer(*kill_timer_);
  for (auto& [pid, orphan] : orphans_) {
    if (!orphan.leader_gone) ctx_->loop->RemoveFd(orphan.pidfd.get());
    ctx_->loop->CancelTimer(orphan.kill_timer);
  }
}

void Drainer::Begin(Listener& listener, Shard& shard, Done done) {
  shard.state = v1::SHARD_STATE_DRAINING;
  shard.drain_done.push_back(std::move(done));
  supervisor_->CancelRestart(shard);
  uint32_t timeout = EffectiveDrainTimeoutSeconds(listener.spec);
  pid_t pid = shard.worker ? shard.worker->process.pid : 0;
  PF_LOG(INFO) << listener.Name(shard) << ": draining (worker pid " << pid
               << ", timeout " << timeout << "s)";
  ctx_->Emit(v1::EVENT_TYPE_DRAIN_BEGUN, listener, shard.index, pid, "");
  // 1. No new SYNs: the steering tables no longer name this shard (done by
  //    the caller) and its sockarray slot is emptied.
  if (listener.steering) {
    absl::Status s = listener.steering->ClearShardSocket(shard.index);
    if (!s.ok()) PF_LOG(WARNING) << listener.Name(shard) << ": " << s;
  }
  // 2. Tell the worker to stop accepting and finish its connections. A
  //    self-bound worker is told after step 3, see TellSelfBoundDrain.
  bool self_bound = OwnsItsSocket(shard);
  if (shard.worker && !self_bound) {
    supervisor_->TellDrain(listener, *shard.worker);
  }
  // 3. Shut the listening socket down: the kernel hands its queued and
  //    half-open connections to the steering program's migrate path (or,
  //    without BPF, to net.ipv4.tcp_migrate_req if enabled). A deleting
  //    listener has nowhere to migrate to: its worker may still accept.
  if (!listener.Live().empty() && shard.socket.valid() &&
      ::shutdown(shard.socket.get(), SHUT_RDWR) != 0) {
    PF_LOG(WARNING) << listener.Name(shard)
                    << ": shutdown of the listening socket: "
                    << strerror(errno);
  }
  if (shard.worker && self_bound) {
    if (ServesOtherShards(listener, shard)) {
      // One process, several sockets (threads): the others keep serving.
      // Its socket is shut down; nothing else of it is this shard's.
      PF_LOG(INFO) << listener.Name(shard) << ": process pid "
                   << shard.worker->process.pid
                   << " serves other shards too: not signalled";
      supervisor_->Detach(shard);
    } else {
      TellSelfBoundDrain(listener, shard);
    }
  }
  // 4. Reap the worker within the drain timeout, else SIGKILL.
  Listener* l = &listener;
  Shard* s = &shard;
  shard.drain_timer =
      ctx_->loop->AddTimer(absl::Seconds(timeout), [this, l, s] {
        s->drain_timer.reset();
        if (!s->worker) return;
        PF_LOG(WARNING) << l->Name(*s) << ": worker pid "
                        << s->worker->process.pid
                        << " still running after the drain timeout; SIGKILL";
        supervisor_->Signal(*s->worker, SIGKILL);
      });
  if (shard.candidate) supervisor_->Signal(*shard.candidate, SIGKILL);
  for (auto& old : shard.retiring) supervisor_->Signal(*old, SIGTERM);
  if (!shard.HasProcesses()) Finish(listener, shard);
}

void Drainer::TellSelfBoundDrain(Listener& listener, Shard& shard) {
  // Its socket is shut down: its accept() fails from now on, and a server
  // written as the SO_REUSEPORT examples are (accept in a loop) finishes the
  // connection in hand and stops by itself. SIGTERM (which kills such a
  // server at once, connection in hand or not) follows after a grace, and
  // SIGKILL at the drain timeout.
  uint32_t timeout = EffectiveDrainTimeoutSeconds(listener.spec);
  absl::Duration grace =
      std::min(kSelfBoundTermGrace, absl::Seconds(timeout) / 2);
  Worker* w = shard.worker.get();
  w->stop_by = ctx_->Now() + absl::Seconds(timeout);
  w->timers.push_back(ctx_->loop->AddTimer(
      grace, [this, w] { supervisor_->Signal(*w, SIGTERM); }));
}

void Drainer::Abandon(Listener& listener, Shard& shard) {
  shard.state = v1::SHARD_STATE_DRAINING;
  shard.in_service = false;
  supervisor_->CancelRestart(shard);
  if (listener.steering) {
    listener.steering->ClearShardSocket(shard.index).IgnoreError();
  }
  if (!listener.Live().empty() && shard.socket.valid()) {
    ::shutdown(shard.socket.get(), SHUT_RDWR);
  }
  if (shard.worker) supervisor_->Signal(*shard.worker, SIGKILL);
  if (!shard.HasProcesses()) Finish(listener, shard);
}

void Drainer::OnWorkerGone(Listener& listener, Shard& shard) {
  if (shard.draining() && !shard.HasProcesses()) {
    Finish(listener, shard);  // may destroy `shard` and `listener`
  }
  CheckShutdownDone();
}

void Drainer::Finish(Listener& listener, Shard& shard) {
  if (shard.drain_timer) {
    ctx_->loop->CancelTimer(*shard.drain_timer);
    shard.drain_timer.reset();
  }
  std::vector<Done> callbacks = std::move(shard.drain_done);
  uint32_t index = shard.index;
  PF_LOG(INFO) << listener.Name(shard) << ": drained and removed";
  ctx_->Emit(v1::EVENT_TYPE_DRAIN_DONE, listener, index, 0, "");
  auto it = std::find_if(
      listener.shards.begin(), listener.shards.end(),
      [&](const std::unique_ptr<Shard>& p) { return p.get() == &shard; });
  if (it != listener.shards.end()) listener.shards.erase(it);  // closes fd
  for (Done& cb : callbacks) cb(absl::OkStatus());
  if (!listener.deleting || !listener.shards.empty()) return;
  std::string name = listener.spec.name();
  std::vector<Done> deleted = std::move(listener.delete_done);
  if (listener.steering) {
    absl::Status s = listener.steering->RemovePins();
    if (!s.ok()) PF_LOG(WARNING) << "listener " << name << ": " << s;
  }
  listeners_->erase(name);
  PF_LOG(INFO) << "listener " << name << ": deleted";
  for (Done& cb : deleted) cb(absl::OkStatus());
}

void Drainer::DrainOrphan(const std::string& listener, pid_t pid,
                          uint64_t inode, uint32_t timeout_seconds) {
  if (orphans_.count(pid) > 0) return;
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) {
    PF_LOG(WARNING) << "listener " << listener << ": worker pid " << pid
                    << " left by a previous agent: pidfd_open: "
                    << strerror(errno);
    return;
  }
  // A worker the agent started leads its own process group: its children
  // (a pre-fork server's) go with it.
  pid_t pgid = ::getpgid(pid) == pid ? pid : 0;
  PF_LOG(INFO) << "listener " << listener << ": draining worker pid " << pid
               << (pgid > 0 ? " and its process group" : "")
               << " left by a previous agent (socket inode " << inode
               << "); its queue migrates to the new shards when it closes";
  ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGTERM, nullptr, 0);
  if (pgid > 0) ctx_->launcher->SignalGroup(pgid, SIGTERM);
  int fd = pidfd.get();
  EventLoop::TimerId timer = ctx_->loop->AddTimer(
      absl::Seconds(timeout_seconds), [this, pid, listener] {
        auto it = orphans_.find(pid);
        if (it == orphans_.end()) return;
        PF_LOG(WARNING) << "listener " << listener << ": old worker pid " << pid
                        << (it->second.leader_gone ? " is gone, its group" : "")
                        << " still running after the drain timeout; SIGKILL";
        if (!it->second.leader_gone) {
          ::syscall(SYS_pidfd_send_signal, it->second.pidfd.get(), SIGKILL,
                    nullptr, 0);
        }
        if (it->second.pgid > 0 &&
            ctx_->launcher->GroupAlive(it->second.pgid)) {
          ctx_->launcher->SignalGroup(it->second.pgid, SIGKILL);
        }
        if (it->second.leader_gone) orphans_.erase(it);
      });
  absl::Status watched = ctx_->loop->AddFd(fd, [this, pid, listener](uint32_t) {
    auto it = orphans_.find(pid);
    if (it == orphans_.end()) return;
    ctx_->loop->RemoveFd(it->second.pidfd.get());
    if (it->second.pgid > 0 && ctx_->launcher->GroupAlive(it->second.pgid)) {
      // Its children stay until they finish or the drain timeout kills them.
      PF_LOG(INFO) << "listener " << listener << ": old worker pid " << pid
                   << " exited; processes of its group remain";
      it->second.leader_gone = true;
      return;
    }
    PF_LOG(INFO) << "listener " << listener << ": old worker pid " << pid
                 << " exited";
    ctx_->loop->CancelTimer(it->second.kill_timer);
    orphans_.erase(it);
  });
  if (!watched.ok()) {
    ctx_->loop->CancelTimer(timer);
    return;
  }
  orphans_.emplace(pid, Orphan{pid, pgid, std::move(pidfd), timer});
}

void Drainer::Shutdown(std::function<void()> done) {
  shutdown_done_ = std::move(done);
  if (ctx_->shutting_down) return;
  ctx_->shutting_down = true;
  uint32_t drain_seconds = 0;
  int signalled = 0;
  for (auto& [name, listener] : *listeners_) {
    drain_seconds =
        std::max(drain_seconds, EffectiveDrainTimeoutSeconds(listener->spec));
    if (listener->rollout) {
      listener->rollout->Abort(
          absl::UnavailableError("the agent is shutting down"));
    }
    for (auto& shard : listener->shards) {
      supervisor_->CancelRestart(*shard);
      absl::Time stop_by =
          ctx_->Now() +
          absl::Seconds(EffectiveDrainTimeoutSeconds(listener->spec));
      if (shard->candidate) {
        shard->candidate->stop_by = stop_by;
        supervisor_->Signal(*shard->candidate, SIGTERM);
      }
      if (shard->draining()) continue;
      if (shard->worker) {
        shard->state = v1::SHARD_STATE_STOPPING;
        shard->worker->stop_by = stop_by;
        supervisor_->Signal(*shard->worker, SIGTERM);
        signalled++;
      } else {
        shard->state = v1::SHARD_STATE_STOPPED;
      }
    }
  }
  PF_LOG(INFO) << "shutting down: SIGTERM sent to " << signalled
               << " worker(s); waiting up to " << drain_seconds
               << "s for them to finish their connections";
  kill_timer_ = ctx_->loop->AddTimer(absl::Seconds(drain_seconds), [this] {
    kill_timer_.reset();
    PF_LOG(WARNING) << "drain timeout reached: killing remaining workers";
    KillAll();
  });
  CheckShutdownDone();
}

void Drainer::KillAll() {
  for (auto& [name, listener] : *listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->worker) {
        PF_LOG(WARNING) << listener->Name(*shard) << ": SIGKILL to worker pid "
                        << shard->worker->process.pid;
        if (!shard->draining()) shard->state = v1::SHARD_STATE_STOPPING;
        supervisor_->Signal(*shard->worker, SIGKILL);
      }
      if (shard->candidate) supervisor_->Signal(*shard->candidate, SIGKILL);
      for (auto& old : shard->retiring) supervisor_->Signal(*old, SIGKILL);
    }
  }
  // Children of workers that are already gone.
  supervisor_->KillRemnants();
}

void Drainer::CheckShutdownDone() {
  if (!ctx_->shutting_down) return;
  for (auto& [name, listener] : *listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->HasProcesses()) return;
    }
  }
  if (kill_timer_) {
    ctx_->loop->CancelTimer(*kill_timer_);
    kill_timer_.reset();
  }
  // A descendant that left its worker's process group still holds a shard
  // socket: killed now, or it would serve on with no supervisor.
  if (before_close_) before_close_();
  listeners_->clear();  // closes every shard socket
  if (shutdown_done_) std::exchange(shutdown_done_, nullptr)();
}

}  // namespace portfleet
