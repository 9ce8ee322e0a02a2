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
// count.
//
// Under CPU steering a connection stays on the CPU that received its SYN;
// the rebalancer keeps that locality and spills only what a hot CPU's
// shards cannot take (PlanSpill): of every 256 new connections of a CPU
// whose shards are above their share of the load, the share above it goes
// to the indirection table, which is weighted toward the cold shards
// (Listener::rebalance_spill and rebalance_slots). A CPU at or below its
// share spills nothing, and an even listener spills nothing at all.
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
#include <map>
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

// CPU steering: one steered shard and the CPU it is pinned to.
struct SpillInput {
  uint32_t index = 0;
  int cpu = -1;           // -1: not pinned (takes table connections only)
  bool eligible = false;  // ready and in the tables
  double load = 0;        // by the metric
};

struct SpillParams {
  // max/mean at or below this counts as even: no spill anywhere.
  double tolerance = 1.05;
  // A CPU starts to spill when its shards' load passes its target (its
  // shards' share of the total) by this factor; it keeps its spill while
  // above the target, and stops at or below it (hysteresis).
  double hot_factor = 1.05;
  // A step raises a CPU's spill by at most this (of kSpillScale).
  uint32_t max_step = 128;
  // A CPU keeps at least kSpillScale - max_share of its new connections.
  uint32_t max_share = 224;
};

inline constexpr uint32_t kSpillScale = 256;  // PF_SPILL_SCALE

struct CpuSpillPlan {
  int cpu = -1;
  std::vector<uint32_t> shards;  // its eligible shards
  double load = 0;               // theirs, summed
  double target = 0;             // mean load per shard * their number
  uint32_t before = 0;           // spill share now (of kSpillScale)
  uint32_t after = 0;
};

struct SpillPlan {
  // Every CPU with an eligible shard, in CPU order.
  std::vector<CpuSpillPlan> cpus;
  // Indirection-table weights parallel to the inputs (cold shards by how
  // far they are below the mean, 0 for the others); empty: the operator's
  // weights (nothing spills).
  std::vector<uint32_t> table_weights;
  double imbalance = 0;  // max/mean over the eligible shards; 0 when idle
  bool even = false;     // within tolerance (or idle): no spill
  bool spilling() const {
    for (const CpuSpillPlan& c : cpus) {
      if (c.after > 0) return true;
    }
    return false;
  }
};

// Pure: per-shard loads and the spill now (CPU id -> share) in, the spill
// of every CPU and the table out. A CPU whose shards carry load L above
// hot_factor times their target T spills the share of its new connections
// that is above the target, ceil(kSpillScale * (L - T) / L), never less
// than it does now (a spill that worked lowers L: it is held, not undone,
// until the CPU is back at its target), raised by at most max_step per
// step and capped at max_share. A CPU at or below its target spills
// nothing; an even listener resets every spill.
SpillPlan PlanSpill(const std::vector<SpillInput>& shards,
                    const std::map<int, uint32_t>& spill_now,
                    const SpillParams& params);

// A shard's load by `metric` (UNSPECIFIED = connections).
double LoadBy(const v1::ShardLoad& load, v1::RebalanceMetric metric);

// Table slots per shard index that `tables` gives (HASH; empty for CPU).
std::vector<uint32_t> SlotCounts(const SteeringTables& tables);
// Slots per shard index of the indirection table itself, whatever the
// policy (CPU: by table_weights when set; what spilled connections follow).
std::vector<uint32_t> TableSlotCounts(const SteeringTables& tables);

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
  // The auto rebalancer's memory of the refusals it last reported: when set,
  // REBALANCE_REFUSED is emitted only when the refusals differ from it (a
  // listener with a worker that cannot hand off would otherwise say the same
  // every period); it is updated. Refusals are counted either way. Used
  // during the call only.
  std::string* last_refusals = nullptr;
};

// One-shot rebalance of `listener` (see RebalanceListener in agent.proto):
// the tables at once, then the hand-offs through `router`; `done` gets the
// result when they ended (at once when there are none). FailedPrecondition
// without BPF steering or without a ready shard.
void RebalanceListener(FleetContext& ctx, HandOffRouter& router,
                       Listener& listener,
                       const v1::RebalanceListenerRequest& request,
                       RebalanceDone done, const RebalanceLimits& limits = {});

// Puts the operator's tables back (drops the rebalancer's slots and spill)
// and says so in a REBALANCE_DONE event starting with `why`; the slots
// moved.
absl::StatusOr<uint32_t> RestoreBaselineSteering(FleetContext& ctx,
                                                 Listener& listener,
                                                 const std::string& why);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_REBALANCE_H_
