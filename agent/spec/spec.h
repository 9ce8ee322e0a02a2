// Fleet spec files: parsing (.textproto / .txtpb / .json) and validation.
#ifndef PORTFLEET_AGENT_SPEC_SPEC_H_
#define PORTFLEET_AGENT_SPEC_SPEC_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

inline constexpr uint32_t kMaxShards = 64;
inline constexpr uint32_t kDefaultDrainTimeoutSeconds = 30;
inline constexpr uint32_t kMaxDrainTimeoutSeconds = 3600;
inline constexpr uint32_t kDefaultBacklog = 1024;
inline constexpr uint32_t kMaxBacklog = 65535;
inline constexpr uint32_t kMaxWeight = 1000000;
// Limits that keep a fleet's state within one API message and a quick save.
inline constexpr int kMaxListeners = 128;
inline constexpr size_t kMaxWorkerSpecBytes = 16 * 1024;  // command+args+env
inline constexpr int kMaxWorkerArgs = 256;                // args, env each
inline constexpr uint32_t kMaxDeferAcceptSeconds = 600;
inline constexpr uint32_t kDefaultStallWindowMs = 600;
inline constexpr uint32_t kMinStallWindowMs = 100;
inline constexpr uint32_t kMaxStallWindowMs = 60000;
inline constexpr uint32_t kDefaultStallGraceSeconds = 10;
inline constexpr uint32_t kMaxStallGraceSeconds = 3600;
// RebalanceSpec (continuous rebalancing): max/mean in percent, period,
// hand-offs per step.
inline constexpr uint32_t kDefaultRebalanceThresholdPercent = 125;
inline constexpr uint32_t kMinRebalanceThresholdPercent = 105;
inline constexpr uint32_t kDefaultRebalanceTargetPercent = 110;
inline constexpr uint32_t kMinRebalanceTargetPercent = 100;
inline constexpr uint32_t kMaxRebalancePercent = 1000;
inline constexpr uint32_t kDefaultRebalancePeriodSeconds = 10;
inline constexpr uint32_t kMinRebalancePeriodSeconds = 2;
inline constexpr uint32_t kMaxRebalancePeriodSeconds = 3600;
inline constexpr uint32_t kDefaultRebalanceMaxMoves = 1000;
inline constexpr uint32_t kMaxRebalanceMaxMoves = 100000;

enum class SpecFormat { kTextproto, kJson };

// Reads and validates a spec file. The format follows the extension: .json
// is JSON, .textproto/.txtpb/.pbtxt/.txt is protobuf text format. Errors name
// the file and, where the format gives one, the line and column:
//   "fleet.textproto:3:5: unknown field 'shard' in portfleet.v1.Listener"
absl::StatusOr<v1::FleetSpec> LoadFleetSpecFile(const std::string& path);

// Parses and validates `text`; `source` names it in errors.
absl::StatusOr<v1::FleetSpec> ParseFleetSpec(absl::string_view text,
                                             SpecFormat format,
                                             absl::string_view source);

// Checks every rule of the spec; the first violation is returned as
// InvalidArgument "<source>: listeners[1] (\"web\"): address: ...".
absl::Status ValidateFleetSpec(const v1::FleetSpec& spec,
                               absl::string_view source);
// One listener on its own (used by the API too).
absl::Status ValidateListener(const v1::Listener& listener);

// The one check of steering settings (policy, weights: HASH only, at most
// kMaxShards, each at most kMaxWeight, not all 0). With `shards`, the
// weights must number exactly that many. Messages name the field relative
// to the Steering message ("weights: ...").
absl::Status ValidateSteering(const v1::Steering& steering,
                              std::optional<uint32_t> shards);

// Makes a relative worker command with a '/' ("bin/w", "./w") absolute
// against the current directory, so that what is persisted does not depend
// on where a later agent starts. Bare names (looked up next to the agent and
// in PATH) and absolute paths are left as they are.
void MakeCommandAbsolute(v1::WorkerSpec* worker);

// True for a DNS label: 1-63 of [a-z0-9-], not starting or ending with '-'.
bool IsDnsLabel(absl::string_view name);

// Effective values with defaults applied.
uint32_t EffectiveShards(const v1::Listener& listener, int online_cpus);
uint32_t EffectiveBacklog(const v1::Listener& listener);
uint32_t EffectiveDrainTimeoutSeconds(const v1::Listener& listener);
uint32_t EffectiveStallWindowMs(const v1::Listener& listener);
uint32_t EffectiveStallGraceSeconds(const v1::Listener& listener);

// A listener's RebalanceSpec with its defaults applied.
struct EffectiveRebalance {
  bool automatic = false;  // mode AUTO
  v1::RebalanceMetric metric = v1::REBALANCE_METRIC_CONNECTIONS;
  double threshold = kDefaultRebalanceThresholdPercent / 100.0;  // max/mean
  double target = kDefaultRebalanceTargetPercent / 100.0;        // max/mean
  uint32_t period_seconds = kDefaultRebalancePeriodSeconds;
  uint32_t max_moves = kDefaultRebalanceMaxMoves;  // hand-offs per step
  bool move_connections = true;  // by the connections metric, not steering_only
};
EffectiveRebalance EffectiveRebalanceOf(const v1::Listener& listener);
// One line for humans: "off", or "auto connections 1.25->1.10 every 10s,
// 1000 moves" ("steering only" instead of the moves).
std::string DescribeRebalance(const v1::Listener& listener);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_SPEC_SPEC_H_
