// Retired instances: the direction of a takeover, kept in the state
// directory. An agent started with --instance-id ID (in Kubernetes the pod's
// UID, which stays the same when the container restarts) that has handed its
// sockets over to a newer agent is "retired": the ID is written to
// <state_dir>/retired-instances before the hand-over completes. An agent
// whose ID is listed there never takes sockets back nor starts a fleet: it
// stays idle (nothing opened, not ready) until it is terminated. So a
// restarting container of the old pod (restartPolicy Always) cannot flap the
// sockets back and forth with the new one.
#ifndef PORTFLEET_AGENT_RETIRED_H_
#define PORTFLEET_AGENT_RETIRED_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace portfleet {

inline constexpr char kRetiredInstancesFileName[] = "retired-instances";
// Only the most recent entries are kept (older pods are long gone).
inline constexpr size_t kMaxRetiredInstances = 32;

// An instance ID: 1 to 128 characters of [A-Za-z0-9._:-].
absl::Status ValidateInstanceId(absl::string_view id);

// The retired IDs in `state_dir`, oldest first (empty when the file does not
// exist). Lines that are not valid IDs are an error naming the file and line.
absl::StatusOr<std::vector<std::string>> LoadRetiredInstances(
    const std::string& state_dir);

// Adds `id` (atomically: temp file, fsync, rename; `state_dir` is created
// 0750 if missing), keeping the last kMaxRetiredInstances.
absl::Status RetireInstance(const std::string& state_dir,
                            const std::string& id);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_RETIRED_H_
