// The rebalancer: evens a listener's load over its ready shards by a metric
// (connections, CPU, bytes/s; see fleet/load.h for how each is measured).
//
// New connections: under HASH steering the indirection table's slots are
// redistributed, from the operator's weights as the baseline, in inverse
// proportion to each shard's load relative to the mean (a shard at twice
// the mean gets half its baseline share, an idle one up to 4 times it), so
// that new connections go to the cold shards until the next rebalance. When
// the load is even (max/mean at most `tolerance`) the table goes back to the
// baseline. The adjustment is kept apart from the spec (Listener::
// rebalance_slots, visible per shard as steering_slots and
// rebalance_slot_delta) and is dropped by any change of steering or shard
// count. Under CPU steering nothing moves: locality is kept.
//
// Existing connections (move_connections): by connections, idle
// connections are handed from workers above the mean to workers below it;
// by bytes, traffic is (the hot worker releases its busiest idle
// connections up to the bytes/s planned; PlanByteHandOffs); by CPU, none
// are. Only workers whose hello said they can hand off take part
// (fleet/handoff.h); a connection with data in flight is never released.
// Others are rebalanced by steering only, and the response says so per
// shard.
#ifndef PORTFLEET_AGENT_FLEET_REBALANCE_H_
#define PORTFLEET_AGENT_FLEET_REBALANCE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "agent/fleet/handoff.h"
#include "agent/fleet/model.h"
#include "portfleet/v1/agent.pb.h"

namespace portfleet {

// One steered shard, as the planner sees it.
struct RebalanceInput {
  uint32_t index = 0;
  // Ready and in the tables: takes part. Others keep their baseline slots.
  bool eligible = false;
  double load = 0;              // by the metric
  uint32_t baseline_slots = 0;  // from the operator's weights
  uint32_t slots = 0;           // now
};

struct RebalanceParams {
  // max/mean at or below this counts as even: back to the baseline.
  double tolerance = 1.05;
  // A shard's share stays within [baseline / max_factor, baseline *
  // max_factor] (before rounding).
  double max_factor = 4.0;
  uint32_t table_size = 256;
};

struct RebalancePlan {
  // Slots after, parallel to the inputs; they add up to the sum of the
  // inputs' baseline slots.
  std::vector<uint32_t> slots;
  // Slots taken from one shard and given to another (sum of the gains).
  uint32_t slots_moved = 0;
  // max/mean of the eligible shards' loads; 0 when idle.
  double imbalance = 0;
  bool even = false;  // imbalance within tolerance (or idle)
};

// Pure: loads in, slots out.
RebalancePlan PlanRebalance(const std::vector<RebalanceInput>& shards,
                            const RebalanceParams& params);

// A shard's load by `metric` (UNSPECIFIED = connections).
double LoadBy(const v1::ShardLoad& load, v1::RebalanceMetric metric);

// Table slots per shard index that `tables` gives (HASH; empty for CPU).
std::vector<uint32_t> SlotCounts(const SteeringTables& tables);

// How long the hot workers have to release their connections.
inline constexpr absl::Duration kHandOffTimeout = absl::Seconds(10);

using RebalanceDone =
    std::function<void(absl::StatusOr<v1::RebalanceListenerResponse>)>;

// What a rebalance may do beyond the request (the auto-rebalancer's step).
struct RebalanceLimits {
  // At most this many connections are handed off.
  uint32_t max_moves = UINT32_MAX;
  // Who asked, at the start of the events' messages ("auto: ...");
  // empty = the operator (RebalanceListener).
  std::string origin;
};

// One-shot rebalance of `listener` (see RebalanceListener in agent.proto):
// the tables at once, then the hand-offs through `router`; `done` gets the
// result when they ended (at once when there are none). FailedPrecondition
// without BPF steering or without a ready shard.
void RebalanceListener(FleetContext& ctx, HandOffRouter& router,
                       Listener& listener,
                       const v1::RebalanceListenerRequest& request,
                       RebalanceDone done, const RebalanceLimits& limits = {});

// Puts the operator's tables back (drops the rebalancer's slots) and says
// so in a REBALANCE_DONE event starting with `why`; the slots moved.
absl::StatusOr<uint32_t> RestoreBaselineSteering(FleetContext& ctx,
                                                 Listener& listener,
                                                 const std::string& why);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_REBALANCE_H_
