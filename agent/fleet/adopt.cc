// Adopting a running server (AdoptListener): its listening sockets on the
// listener's address become new shards, steered at once, without restarting
// it (see fleet/selfbound.h for how sockets are found and checked).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/fleet.h"
#include "agent/fleet/selfbound.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// The uid the listener's reuseport group belongs to: its sockets' owner
// (the agent's for sockets it created), else the uid its workers run as.
uid_t GroupUid(const Listener& listener) {
  for (const auto& shard : listener.shards) {
    if (shard->socket_uid) return *shard->socket_uid;
  }
  for (const auto& shard : listener.shards) {
    if (shard->socket.valid()) return ::geteuid();
  }
  if (listener.program.credentials) return listener.program.credentials->uid;
  return ::geteuid();
}

uint32_t LowestFreeIndex(const Listener& listener) {
  uint32_t index = 0;
  for (const auto& s : listener.shards) {
    if (s->index == index) index++;
  }
  return index;
}

}  // namespace

absl::StatusOr<std::vector<uint32_t>> Fleet::AdoptListener(
    const std::string& name, pid_t pid) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  const std::string who = absl::StrCat("listener ", name, ": pid ", pid);
  if (pid <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pid: ", pid, " is not a process id"));
  }
  if (pid == ::getpid()) {
    return absl::InvalidArgumentError(who + " is the agent itself");
  }
  if (::kill(pid, 0) != 0 && errno == ESRCH) {
    return absl::NotFoundError(who + ": no such process");
  }
  std::set<uint64_t> taken;
  for (const auto& shard : listener->shards) {
    if (shard->worker && shard->worker->process.pid == pid) {
      return absl::AlreadyExistsError(
          absl::StrCat(who, " is already the worker of shard ", shard->index));
    }
    if (shard->inode != 0) taken.insert(shard->inode);
  }
  uid_t uid = GroupUid(*listener);
  absl::StatusOr<SocketSearch> search =
      FindSelfBoundSockets(pid, /*tree=*/true, listener->address, taken, uid);
  if (!search.ok()) return Annotate(search.status(), who);
  if (search->found.empty()) {
    if (search->refused.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          who,
          " (and its process group and children) holds no listening "
          "socket on ",
          listener->address.ToString(), " that is not already a shard"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat(who, ": refused: ", absl::StrJoin(search->refused, "; ")));
  }
  std::vector<Shard*> live = listener->Live();
  if (live.size() + search->found.size() > kMaxShards) {
    return absl::ResourceExhaustedError(absl::StrCat(
        who, ": ", search->found.size(), " socket(s) would make ",
        live.size() + search->found.size(), " shards; at most ", kMaxShards));
  }
  if (listener->spec.steering().weights_size() > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", name,
        " has steering weights; clear them (or adopt before setting them)"));
  }
  v1::Listener intended = listener->spec;
  intended.set_shards(
      static_cast<uint32_t>(live.size() + search->found.size()));
  RETURN_IF_ERROR(Commit(name, &intended));

  std::vector<Shard*> added;
  for (FoundSocket& f : search->found) {
    auto shard = std::make_unique<Shard>();
    shard->index = LowestFreeIndex(*listener);
    shard->backoff = ctx_.options.restart_backoff_initial;
    shard->program = listener->program;
    shard->cpu = -1;  // a running process is not re-pinned
    shard->socket = std::move(f.socket);
    shard->inode = f.inode;
    shard->socket_uid = f.uid;
    shard->adopted = true;
    shard->in_service = false;
    Shard* raw = shard.get();
    auto pos = std::find_if(
        listener->shards.begin(), listener->shards.end(),
        [&](const std::unique_ptr<Shard>& p) { return p->index > raw->index; });
    listener->shards.insert(pos, std::move(shard));
    absl::Status s = supervisor_.AdoptProcess(*listener, *raw, f.holder);
    if (!s.ok()) {
      // Gone meanwhile: take back what was added; nothing served yet.
      for (Shard* a : added) supervisor_.Detach(*a);
      added.push_back(raw);
      listener->shards.erase(
          std::remove_if(listener->shards.begin(), listener->shards.end(),
                         [&](const std::unique_ptr<Shard>& p) {
                           return std::find(added.begin(), added.end(),
                                            p.get()) != added.end();
                         }),
          listener->shards.end());
      Commit(name, &listener->spec).IgnoreError();
      return Annotate(s, who);
    }
    added.push_back(raw);
  }
  std::vector<uint32_t> indexes;
  for (Shard* shard : added) {
    if (listener->steering) {
      absl::Status s = listener->steering->AttachTo(shard->socket.get());
      if (s.ok()) {
        s = listener->steering->SetShardSocket(shard->index,
                                               shard->socket.get());
      }
      if (!s.ok()) {
        PF_LOG(ERROR) << listener->Name(*shard) << ": " << s;
        continue;  // stays out of the tables; the kernel's hash may pick it
      }
    }
    shard->in_service = true;
    indexes.push_back(shard->index);
    PF_LOG(INFO) << listener->Name(*shard) << ": adopted socket inode "
                 << shard->inode << " of pid " << shard->worker->process.pid;
    ctx_.Emit(v1::EVENT_TYPE_SHARD_SOCKET_FOUND, *listener, shard->index,
              shard->worker->process.pid,
              absl::StrCat("adopted socket inode ", shard->inode, " of pid ",
                           shard->worker->process.pid));
  }
  if (absl::Status s = ApplySteering(*listener); !s.ok()) PF_LOG(ERROR) << s;
  for (const std::string& r : search->refused) {
    PF_LOG(WARNING) << who << ": not adopted: " << r;
  }
  listener->spec.set_shards(static_cast<uint32_t>(listener->Live().size()));
  return indexes;
}

}  // namespace portfleet
