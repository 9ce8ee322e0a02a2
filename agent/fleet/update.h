// Planning a changed listener spec (apply of an edited spec, UpdateListener):
// everything that can be checked is checked before anything is touched, and
// the plan says what will change. Fleet::UpdateListener applies it in an
// order that lets every step be undone:
//   drain timeout, health and rebalance settings and backlog -> steering
//   (tables and pinning)
//   -> more shards -> worker rollout -> fewer shards
// A failing step undoes the ones before it (added shards are drained again),
// so a failed update changes nothing.
#ifndef PORTFLEET_AGENT_FLEET_UPDATE_H_
#define PORTFLEET_AGENT_FLEET_UPDATE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "agent/fleet/model.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

struct ListenerUpdate {
  v1::Listener from;  // the listener's spec now
  v1::Listener to;    // the spec asked for, with the shard count resolved
  bool drain_timeout = false;  // drain_timeout_seconds changes
  bool backlog = false;        // backlog changes
  bool defer_accept = false;   // defer_accept_seconds changes
  bool health = false;         // health settings change
  // The rebalance block changes: a setting, no worker restarts (the
  // auto-rebalancer reads it from the spec each period).
  bool rebalance = false;
  std::optional<v1::Steering> steering;  // new steering
  std::optional<uint32_t> shards;        // new number of live shards
  std::optional<ResolvedWorker> worker;  // new worker, rolled out

  bool empty() const {
    return !drain_timeout && !backlog && !defer_accept && !health &&
           !rebalance && !steering && !shards && !worker;
  }
  // One line per change: "shards: 2 -> 4", "worker: rolled out (args)".
  std::vector<std::string> Changes() const;
};

// Checks `desired` against `listener` and plans the change. Errors:
// InvalidArgument (the spec; a worker command that cannot be resolved),
// FailedPrecondition (address change; steering without BPF; a worker change
// while a rollout is in progress).
absl::StatusOr<ListenerUpdate> PlanUpdate(const Listener& listener,
                                          const v1::Listener& desired,
                                          const FleetContext& ctx);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_UPDATE_H_
