// The fleet state file: the desired fleet as last changed through the API,
// written atomically to the state directory so that a restarted agent
// restores it.
//
// File: <state_dir>/fleet-state.textproto, protobuf text format of
// portfleet.v1.FleetSpec between a header comment line and an end marker
// line. A file without the end marker is truncated and is an error, never
// silently dropped.
#ifndef PORTFLEET_AGENT_API_STATE_STORE_H_
#define PORTFLEET_AGENT_API_STATE_STORE_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

inline constexpr char kFleetStateFileName[] = "fleet-state.textproto";
inline constexpr char kFleetStateHeader[] =
    "# portfleet fleet state (portfleet.v1.FleetSpec); written by the agent, "
    "do not edit";
inline constexpr char kFleetStateEndMarker[] = "# end of portfleet state";

// Path of the state file in `state_dir`.
std::string FleetStatePath(const std::string& state_dir);

// Validates `spec` and writes it: creates `state_dir` (0750) if missing, then
// temp file in the same directory, fsync, rename over the state file, fsync
// of the directory. On error the previous file is unchanged and no temp file
// is left behind.
absl::Status SaveFleetState(const std::string& state_dir,
                            const v1::FleetSpec& spec);

// Reads the state file. nullopt when there is none. A truncated, corrupt or
// invalid file is an error (InvalidArgument / DataLoss) whose message starts
// with the file path and, where known, the line: "<path>:7: ...".
absl::StatusOr<std::optional<v1::FleetSpec>> LoadFleetState(
    const std::string& state_dir);

// The checks and parsing of LoadFleetState on a file's contents; `path`
// names it in errors.
absl::StatusOr<v1::FleetSpec> ParseFleetState(absl::string_view text,
                                              const std::string& path);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_API_STATE_STORE_H_
