// Orphan scan: which processes hold each shard socket, and which of them are
// not part of the shard's worker trees. Run on the observation period (every
// `orphan_scan_period`), from one walk of /proc (ShardObserver).
//
// A holder belongs to the shard when it is the agent, is in the process group
// of one of the shard's workers (serving, rollout candidate, retiring, or a
// group whose leader is gone, see Supervisor), or descends from one of them
// (a child that left the group). Any other holder is an orphan:
//   - left over from a stopped worker of this shard (its environment names
//     the listener and shard, or it is in the group of one of the shard's
//     past workers): SIGKILLed; it would otherwise serve an old version with
//     no supervisor;
//   - anything else (a process that received the fd, a debugger, a worker of
//     another agent): reported, never touched.
// Both are counted per shard (metrics, ListShards) and emitted once per pid
// as EVENT_TYPE_SHARD_ORPHAN. A socket taken over from a previous agent is
// not judged while that agent's workers still hold it; the scan notices when
// the last of them has gone (Shard.health.shared_socket). An agent that handed
// its sockets to a new one judges nothing any more.
#ifndef PORTFLEET_AGENT_FLEET_ORPHANS_H_
#define PORTFLEET_AGENT_FLEET_ORPHANS_H_

#include <sys/types.h>

#include <set>
#include <string>

#include "agent/fleet/model.h"
#include "agent/fleet/observer.h"
#include "agent/fleet/supervisor.h"

namespace portfleet {

enum class HolderVerdict {
  kOurs,      // the agent or the shard's worker trees
  kLeftover,  // left by a stopped worker of this shard: killed
  kForeign,   // anything else: reported
};

// What the shard knows of its trees, for Classify.
struct ShardTrees {
  pid_t agent_pid = 0;
  std::set<pid_t> groups;       // process groups of its current workers
  std::set<pid_t> pids;         // its current workers' pids
  std::set<pid_t> past_groups;  // process groups of its stopped workers
  std::string listener;
  uint32_t shard = 0;
};

// Pure: the verdict on one holder of the shard's socket.
HolderVerdict ClassifyHolder(const SocketHolder& holder,
                             const ShardTrees& trees);

class OrphanScanner {
 public:
  OrphanScanner(FleetContext* ctx, Supervisor* supervisor,
                ListenerMap* listeners);
  // One scan of every shard socket.
  void Scan(ShardObserver& observer);

 private:
  ShardTrees TreesOf(const Listener& listener, const Shard& shard) const;
  void Judge(Listener& listener, Shard& shard,
             const std::vector<SocketHolder>& holders);

  FleetContext* const ctx_;
  Supervisor* const supervisor_;
  ListenerMap* const listeners_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_ORPHANS_H_
