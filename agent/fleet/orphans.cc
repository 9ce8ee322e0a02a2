#include "agent/fleet/orphans.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

HolderVerdict ClassifyHolder(const SocketHolder& holder,
                             const ShardTrees& trees) {
  if (holder.pid == trees.agent_pid) return HolderVerdict::kOurs;
  if (trees.groups.count(holder.pgid) > 0) return HolderVerdict::kOurs;
  if (trees.pids.count(holder.pid) > 0) return HolderVerdict::kOurs;
  for (pid_t a : holder.ancestors) {
    // A worker's child that left its group, or the agent's own child between
    // fork and exec.
    if (a == trees.agent_pid || trees.pids.count(a) > 0) {
      return HolderVerdict::kOurs;
    }
  }
  if (trees.past_groups.count(holder.pgid) > 0) return HolderVerdict::kLeftover;
  if (holder.listener == trees.listener &&
      holder.shard == absl::StrCat(trees.shard)) {
    return HolderVerdict::kLeftover;
  }
  return HolderVerdict::kForeign;
}

OrphanScanner::OrphanScanner(FleetContext* ctx, Supervisor* supervisor,
                             ListenerMap* listeners)
    : ctx_(ctx), supervisor_(supervisor), listeners_(listeners) {}

ShardTrees OrphanScanner::TreesOf(const Listener& listener,
                                  const Shard& shard) const {
  ShardTrees t;
  t.agent_pid = ::getpid();
  t.listener = listener.spec.name();
  t.shard = shard.index;
  auto add = [&t](const Worker* w) {
    if (w == nullptr || w->process.pid <= 0) return;
    t.pids.insert(w->process.pid);
    t.groups.insert(w->process.pid);  // each worker leads its own group
  };
  add(shard.worker.get());
  add(shard.candidate.get());
  for (const auto& w : shard.retiring) add(w.get());
  for (pid_t g : supervisor_->RemnantGroups(shard)) t.groups.insert(g);
  for (pid_t g : shard.past_groups) {
    if (t.groups.count(g) == 0) t.past_groups.insert(g);
  }
  return t;
}

void OrphanScanner::Scan(ShardObserver& observer) {
  if (ctx_->sockets_shared) return;
  std::set<uint64_t> inodes;
  for (auto& [name, listener] : *listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->inode != 0) inodes.insert(shard->inode);
    }
  }
  std::map<uint64_t, std::vector<SocketHolder>> holders =
      observer.SocketHolders(inodes);
  for (auto& [name, listener] : *listeners_) {
    for (auto& shard : listener->shards) {
      if (inodes.count(shard->inode) == 0) continue;
      auto it = holders.find(shard->inode);
      Judge(*listener, *shard,
            it == holders.end() ? std::vector<SocketHolder>{} : it->second);
    }
  }
}

void OrphanScanner::Judge(Listener& listener, Shard& shard,
                          const std::vector<SocketHolder>& holders) {
  ShardTrees trees = TreesOf(listener, shard);
  if (shard.health.shared_socket) {
    // A takeover's socket: the previous agent's workers serve it until they
    // drain. Nothing is judged until none of them holds it any more.
    bool others =
        std::any_of(holders.begin(), holders.end(), [&](const SocketHolder& h) {
          return ClassifyHolder(h, trees) != HolderVerdict::kOurs;
        });
    if (!others) {
      shard.health.shared_socket = false;
      PF_LOG(INFO) << listener.Name(shard)
                   << ": no worker of the previous agent holds the socket any "
                      "more";
    }
    return;
  }
  std::vector<OrphanHolder> found;
  for (const SocketHolder& h : holders) {
    HolderVerdict v = ClassifyHolder(h, trees);
    if (v == HolderVerdict::kOurs) continue;
    OrphanHolder o{.pid = h.pid,
                   .command = h.command,
                   .leftover = v == HolderVerdict::kLeftover};
    bool first = shard.orphans_seen.insert(h.pid).second;
    if (o.leftover) {
      bool killed = ctx_->launcher->KillProcess(h.pid);
      if (killed) shard.orphans_killed++;
      std::string what = absl::StrCat(
          "pid ", h.pid, " (", h.command, ", process group ", h.pgid,
          ") holds the shard socket, left over from a stopped worker; ",
          killed ? "SIGKILL" : "it is gone");
      PF_LOG(WARNING) << listener.Name(shard) << ": " << what;
      if (first) {
        ctx_->Emit(v1::EVENT_TYPE_SHARD_ORPHAN, listener, shard.index, h.pid,
                   what);
      }
    } else if (first) {
      std::string what = absl::StrCat(
          "pid ", h.pid, " (", h.command, ", process group ", h.pgid,
          ") holds the shard socket and is not a process of its worker; "
          "left running");
      PF_LOG(WARNING) << listener.Name(shard) << ": " << what;
      ctx_->Emit(v1::EVENT_TYPE_SHARD_ORPHAN, listener, shard.index, h.pid,
                 what);
    }
    found.push_back(std::move(o));
  }
  // Forget pids no longer seen (a reused pid is news again).
  for (auto it = shard.orphans_seen.begin(); it != shard.orphans_seen.end();) {
    bool still =
        std::any_of(found.begin(), found.end(),
                    [&](const OrphanHolder& o) { return o.pid == *it; });
    it = still ? std::next(it) : shard.orphans_seen.erase(it);
  }
  shard.orphans = std::move(found);
}

}  // namespace portfleet
