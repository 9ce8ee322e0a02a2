// The supervisor's part for self-bound workers (see fleet/selfbound.h):
// start without a socket, find the worker's socket, make it the shard's,
// and retire it when the worker dies.
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/selfbound.h"
#include "agent/fleet/supervisor.h"
#include "agent/sockets.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

constexpr absl::Duration kSocketSearchPeriod = absl::Milliseconds(50);

// Another live shard of the listener takes connections: a retired socket's
// queue has somewhere to go.
bool OthersServe(const Listener& listener, const Shard& shard) {
  for (const auto& other : listener.shards) {
    if (other.get() != &shard && other->Steered() && other->socket.valid()) {
      return true;
    }
  }
  return false;
}

// Shuts a listening socket down (its queue migrates through the steering
// program) and says how many connections were queued.
uint32_t MigrateAndClose(const Listener& listener, const Shard& shard,
                         Fd socket) {
  uint32_t queued = AcceptQueueDepth(socket.get()).value_or(0);
  if (::shutdown(socket.get(), SHUT_RDWR) != 0) {
    PF_LOG(WARNING) << listener.Name(shard)
                    << ": shutdown of a retired self-bound socket: "
                    << std::strerror(errno);
  }
  return queued;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Worker>> Supervisor::LaunchSelfBound(
    Listener& listener, Shard& shard, const ResolvedWorker& program,
    std::vector<std::string> env) {
  LaunchSpec launch;
  launch.path = program.path;
  launch.argv.push_back(program.spec.command());
  for (const std::string& a : program.spec.args()) launch.argv.push_back(a);
  launch.env = std::move(env);
  launch.cpu = shard.cpu;
  launch.credentials = program.credentials;
  absl::StatusOr<LaunchedProcess> process = ctx_->launcher->Launch(launch);
  if (!process.ok()) {
    return Annotate(process.status(),
                    absl::StrCat(listener.Name(shard), ": starting worker"));
  }
  auto worker = std::make_unique<Worker>();
  worker->process = std::move(*process);
  worker->started = ctx_->Now();
  worker->self_bound = true;
  worker->socket_note = "no listening socket yet";
  if (absl::Status watched = Watch(listener, shard, *worker); !watched.ok()) {
    ctx_->launcher->Signal(worker->process, SIGKILL);
    return watched;
  }
  Listener* l = &listener;
  Shard* s = &shard;
  Worker* w = worker.get();
  w->timers.push_back(ctx_->loop->AddTimer(
      kSocketSearchPeriod, [this, l, s, w] { SearchSocket(*l, *s, w); }));
  w->timers.push_back(
      ctx_->loop->AddTimer(ctx_->options.ready_timeout,
                           [this, l, s, w] { ReadyTimeout(*l, *s, w); }));
  return worker;
}

void Supervisor::SearchSocket(Listener& listener, Shard& shard, Worker* w) {
  if (w->ready) return;
  std::set<uint64_t> taken;
  std::optional<uid_t> uid;
  for (const auto& other : listener.shards) {
    if (other->inode != 0) taken.insert(other->inode);
    if (other.get() != &shard && other->socket_uid && !uid) {
      uid = other->socket_uid;
    }
  }
  absl::StatusOr<SocketSearch> search = FindSelfBoundSockets(
      w->process.pid, /*tree=*/true, listener.address, taken, uid);
  if (!search.ok()) {
    w->socket_note = std::string(search.status().message());
  } else if (!search->found.empty()) {
    FoundSocket& f = search->found.front();
    TakeSocket(listener, shard, *w, std::move(f.socket), f.inode, f.holder,
               f.uid);
    return;
  } else if (!search->refused.empty()) {
    w->socket_note = absl::StrJoin(search->refused, "; ");
  }
  Listener* l = &listener;
  Shard* s = &shard;
  w->timers.push_back(ctx_->loop->AddTimer(
      kSocketSearchPeriod, [this, l, s, w] { SearchSocket(*l, *s, w); }));
}

void Supervisor::TakeSocket(Listener& listener, Shard& shard, Worker& w,
                            Fd socket, uint64_t inode, pid_t holder,
                            uid_t uid) {
  if (shard.candidate.get() == &w) {
    // A rollout's new worker: its socket waits beside the serving one until
    // the candidate takes over.
    w.found_socket = std::move(socket);
    w.found_inode = inode;
    w.found_uid = uid;
    w.socket_note.clear();
    PF_LOG(INFO) << listener.Name(shard) << ": new worker pid " << w.process.pid
                 << " listens on its own socket inode " << inode
                 << " (copied from pid " << holder << ")";
    ctx_->Emit(v1::EVENT_TYPE_SHARD_SOCKET_FOUND, listener, shard.index,
               w.process.pid,
               absl::StrCat("socket inode ", inode, " of pid ", holder, " on ",
                            listener.address.ToString(), " (rollout)"));
    MarkReady(listener, shard, w, "its socket was found");
    return;
  }
  shard.socket = std::move(socket);
  shard.inode = inode;
  shard.socket_uid = uid;
  w.socket_note.clear();
  if (listener.steering) {
    // The group may be new (every earlier socket gone): attach again; the
    // program is the same.
    absl::Status attached = listener.steering->AttachTo(shard.socket.get());
    if (!attached.ok()) {
      PF_LOG(WARNING) << listener.Name(shard) << ": " << attached;
    }
  }
  PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << w.process.pid
               << " listens on its own socket inode " << inode
               << " (copied from pid " << holder << ")";
  ctx_->Emit(v1::EVENT_TYPE_SHARD_SOCKET_FOUND, listener, shard.index,
             w.process.pid,
             absl::StrCat("socket inode ", inode, " of pid ", holder, " on ",
                          listener.address.ToString()));
  // A scale-up waiting for this worker puts it into the tables itself;
  // a started or restarted serving worker goes in now.
  bool serving = shard.worker.get() == &w && !w.on_ready && !shard.draining();
  if (serving) {
    absl::Status s;
    if (listener.steering && !shard.health.ejected &&
        !shard.health.maintenance) {
      s = listener.steering->SetShardSocket(shard.index, shard.socket.get());
    }
    if (s.ok()) {
      shard.in_service = true;
      s = ApplySteering(listener);
    }
    if (!s.ok()) {
      PF_LOG(ERROR) << listener.Name(shard) << ": " << s;
      ctx_->Emit(v1::EVENT_TYPE_ERROR, listener, shard.index, w.process.pid,
                 std::string(s.message()));
    }
  }
  if (shard.retired_socket.valid()) {
    uint32_t queued =
        MigrateAndClose(listener, shard, std::move(shard.retired_socket));
    PF_LOG(INFO) << listener.Name(shard)
                 << ": the dead worker's socket is shut down; " << queued
                 << " queued connection(s) migrated";
  }
  MarkReady(listener, shard, w, "its socket was found");
}

void Supervisor::NoSocketFound(Listener& listener, Shard& shard, Worker* w) {
  std::string why = absl::StrCat(
      listener.Name(shard), ": worker pid ", w->process.pid,
      " bound no usable listening socket on ", listener.address.ToString(),
      " within ", absl::FormatDuration(ctx_->options.ready_timeout),
      " (found: ", w->socket_note, ")");
  ctx_->Emit(v1::EVENT_TYPE_SHARD_SOCKET_REFUSED, listener, shard.index,
             w->process.pid, why);
  if (w->on_ready) {
    std::exchange(w->on_ready, nullptr)(absl::UnavailableError(why));
    return;
  }
  if (shard.worker.get() != w || shard.draining()) return;
  Replace(listener, shard, why);
}

void Supervisor::SwapInCandidateSocket(Listener& listener, Shard& shard,
                                       Worker& fresh) {
  if (!fresh.found_socket.valid()) return;
  Fd old = std::move(shard.socket);
  shard.socket = std::move(fresh.found_socket);
  shard.inode = fresh.found_inode;
  if (fresh.self_bound) shard.socket_uid = fresh.found_uid;
  if (listener.steering) {
    absl::Status s = listener.steering->AttachTo(shard.socket.get());
    if (s.ok() && shard.in_service && !shard.health.ejected &&
        !shard.health.maintenance && !shard.draining()) {
      // The slot now names the new socket (one map update, no gap).
      s = listener.steering->SetShardSocket(shard.index, shard.socket.get());
    }
    if (!s.ok()) PF_LOG(ERROR) << listener.Name(shard) << ": " << s;
  }
  if (old.valid()) {
    uint32_t queued = MigrateAndClose(listener, shard, std::move(old));
    PF_LOG(INFO) << listener.Name(shard)
                 << ": the old worker's socket is shut down; " << queued
                 << " queued connection(s) migrated";
  }
}

void Supervisor::RetireSocket(Listener& listener, Shard& shard, pid_t pid) {
  if (!shard.socket.valid()) return;
  if (listener.steering) {
    listener.steering->ClearShardSocket(shard.index).IgnoreError();
  }
  shard.in_service = false;
  if (absl::Status s = ApplySteering(listener); !s.ok()) PF_LOG(ERROR) << s;
  uint64_t inode = shard.inode;
  shard.inode = 0;
  std::string message;
  if (OthersServe(listener, shard)) {
    uint32_t queued = MigrateAndClose(listener, shard, std::move(shard.socket));
    message = absl::StrCat("socket inode ", inode, " of dead worker pid ", pid,
                           " shut down; ", queued,
                           " queued connection(s) migrated to the other "
                           "shards");
  } else {
    // Nowhere to migrate to yet: kept until the replacement's socket is
    // found.
    shard.retired_socket = std::move(shard.socket);
    message = absl::StrCat(
        "socket inode ", inode, " of dead worker pid ", pid,
        " kept until the replacement's socket is found (no other shard)");
  }
  PF_LOG(WARNING) << listener.Name(shard) << ": " << message;
  ctx_->Emit(v1::EVENT_TYPE_SHARD_SOCKET_RETIRED, listener, shard.index, pid,
             message);
}

absl::Status Supervisor::AdoptProcess(Listener& listener, Shard& shard,
                                      pid_t pid) {
  auto worker = std::make_unique<Worker>();
  worker->process.pid = pid;
  worker->process.pidfd =
      Fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!worker->process.pidfd) {
    return ErrnoError(absl::StrCat(listener.Name(shard),
                                   ": pidfd_open of adopted pid ", pid));
  }
  worker->started = ctx_->Now();
  worker->adopted = true;
  worker->self_bound = true;
  worker->ready = true;  // it has been serving all along
  RETURN_IF_ERROR(Watch(listener, shard, *worker));
  shard.worker = std::move(worker);
  shard.state = v1::SHARD_STATE_RUNNING;
  shard.health.ever_ready = true;
  ctx_->Emit(v1::EVENT_TYPE_SHARD_STARTED, listener, shard.index, pid,
             "adopted");
  return absl::OkStatus();
}

}  // namespace portfleet
