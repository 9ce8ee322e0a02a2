// Turns SteeringTables into one table generation of the BPF program
// (bpf/steering_shared.h). Pure; used by the BPF backend and unit tests.
#ifndef PORTFLEET_AGENT_STEERING_GENERATION_H_
#define PORTFLEET_AGENT_STEERING_GENERATION_H_

#include "absl/status/statusor.h"
#include "agent/steering/steering.h"
#include "bpf/steering_shared.h"

namespace portfleet {

// Validates `tables` (precise InvalidArgument) and fills a generation:
// HASH: indirection table by weights. CPU: for each CPU the shards pinned to
// it with a non-zero weight; CPUs without one use the indirection table.
// CPU policy: the indirection table by `table_weights` when given.
absl::StatusOr<pf_generation> BuildGeneration(const SteeringTables& tables);

// The spill shares of the generation (all zero unless the policy is CPU and
// `cpu_spill` says otherwise). InvalidArgument for a CPU id beyond
// PF_MAX_CPUS or a share above PF_SPILL_SCALE, or a spill under HASH.
absl::StatusOr<pf_spill> BuildSpill(const SteeringTables& tables);

// LEAST_CONNECTIONS: the largest weight a shard may have (the program
// multiplies a connection count by a weight in 64 bits).
inline constexpr uint32_t kMaxLeastWeight = 1u << 24;

// The shard weights of the generation for the LEAST_CONNECTIONS policy
// (`weights`, equal when empty; 0 = no new connections); all zero under the
// other policies. InvalidArgument for a weight above kMaxLeastWeight or a
// count that does not match the shards.
absl::StatusOr<pf_least> BuildLeast(const SteeringTables& tables);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_STEERING_GENERATION_H_
