// Connection steering for one host: the sk_reuseport program of bpf/ and its
// per-listener maps, behind small interfaces so that agent logic can be unit
// tested with a fake.
//
// Pinned state of a listener, under <bpffs_root>/<listener>/ (see
// bpf/steering_shared.h for the value layouts):
//   shards       REUSEPORT_SOCKARRAY: shard index -> shard socket
//   generations  ARRAY[2]: two table generations (policy, indirection table,
//                CPU table); only the inactive one is ever written
//   config       ARRAY[1]: the active generation (one word, flipped last)
//   counters     PERCPU_ARRAY: per shard {selected, migrated, fallback}; the
//                extra last slot counts decisions with no shard at all
//   spill        ARRAY[2]: per generation, the CPU policy's spill shares;
//                written with its generation. Directories of older agents
//                lack it: it is added when they are reused.
//   least        ARRAY[2]: per generation, the LEAST_CONNECTIONS policy's
//                shard weights; written with its generation
//   conns        ARRAY[1]: connections per shard (LEAST_CONNECTIONS): the
//                agent's measured count, plus one per connection steered
//                since. Like spill, both are added to older directories.
// The directory is created whole in <bpffs_root>/_tmp-* and renamed into
// place, so a listener's directory is either complete or absent.
#ifndef PORTFLEET_AGENT_STEERING_STEERING_H_
#define PORTFLEET_AGENT_STEERING_STEERING_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

struct ShardCounters {
  uint64_t selected = 0;  // new connections steered to the shard
  uint64_t migrated = 0;  // queued connections moved to the shard
  uint64_t fallback = 0;  // meant for the shard, slot empty: kernel chose
};

struct SteeringTables {
  // STEERING_POLICY_UNSPECIFIED means HASH.
  v1::SteeringPolicy policy = v1::STEERING_POLICY_HASH;
  // One per shard index 0..n-1 (empty = equal); 0 = no new connections.
  std::vector<uint32_t> weights;
  // CPU each shard is pinned to (CPU policy), -1 = none. Required for CPU.
  std::vector<int> shard_cpus;
  // Number of shards; 0 = the size of `weights` or else of `shard_cpus`.
  uint32_t num_shards = 0;
  // CPU policy: weights of the indirection table (used by CPUs without a
  // shard and by spilled connections), one per shard; empty = `weights`.
  // Unlike `weights`, a 0 here keeps the shard on its CPU.
  std::vector<uint32_t> table_weights;
  // CPU policy: per CPU id, how many of every PF_SPILL_SCALE (256) new
  // connections of that CPU go to the indirection table instead of the
  // CPU's own shards. Empty or 0 = none (locality kept).
  std::vector<uint32_t> cpu_spill;
};

// Largest-remainder apportionment of `table_size` slots by weights ->
// slot->shard array (contiguous runs, shard 0 first; ties go to the lower
// shard index). Empty weights = equal weights. Pure.
absl::StatusOr<std::vector<uint32_t>> BuildIndirectionTable(
    const std::vector<uint32_t>& weights, uint32_t num_shards,
    uint32_t table_size);

class ListenerSteering {
 public:
  // Detaches nothing: the reuseport group keeps the program, the pinned maps
  // keep the tables.
  virtual ~ListenerSteering() = default;
  // SO_ATTACH_REUSEPORT_EBPF on a bound socket of the reuseport group.
  virtual absl::Status AttachTo(int listening_socket_fd) = 0;
  // Validates SO_DOMAIN (inet/inet6), SO_TYPE (stream), SO_PROTOCOL (TCP),
  // SO_ACCEPTCONN first.
  virtual absl::Status SetShardSocket(uint32_t shard, int socket_fd) = 0;
  virtual absl::Status ClearShardSocket(uint32_t shard) = 0;
  // Writes the inactive generation, then switches to it.
  virtual absl::Status Apply(const SteeringTables& tables) = 0;
  // LEAST_CONNECTIONS: the measured open connections of shards 0..n-1
  // (at most PF_MAX_SHARDS; the others are set to 0). The program counts
  // the connections it steers on top until the next call.
  virtual absl::Status SetConnectionCounts(
      const std::vector<uint64_t>& counts) = 0;
  // Summed over CPUs; PF_MAX_SHARDS entries (shard index order).
  virtual absl::StatusOr<std::vector<ShardCounters>> ReadCounters() = 0;
  // Decisions that had no shard (no tables applied yet).
  virtual absl::StatusOr<ShardCounters> ReadUnattributedCounters() = 0;
  // Listener deleted: unlinks its pin directory.
  virtual absl::Status RemovePins() = 0;
};

class SteeringBackend {
 public:
  virtual ~SteeringBackend() = default;
  // Opens the listener's pinned maps (checked: map type, key and value size,
  // max_entries; a mismatch or a missing map -> FailedPrecondition naming the
  // map, the mismatch and the pin path) or creates them atomically.
  virtual absl::StatusOr<std::unique_ptr<ListenerSteering>> OpenListener(
      absl::string_view listener) = 0;
};

// Probes whether BPF steering is possible here (the program loads; the bpffs
// of `bpffs_root` is mounted, mounting bpffs at /sys/fs/bpf if needed) and
// returns the backend, or a status that says precisely why not.
absl::StatusOr<std::unique_ptr<SteeringBackend>> OpenBpfSteering(
    std::string bpffs_root = "/sys/fs/bpf/portfleet");

// Validates a listener name for use as a pin directory: 1-63 characters of
// [a-z0-9-_] starting with [a-z0-9] (bpffs rejects '.'; '_' starts the
// agent's temporary directories).
absl::Status ValidatePinName(absl::string_view listener);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_STEERING_STEERING_H_
