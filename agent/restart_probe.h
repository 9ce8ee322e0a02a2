// RestartProbe: when the agent is asked to stop, whether its service manager
// is in fact restarting it. A restart must not drain the workers: the agent
// steps aside and the next agent re-adopts them (deploy/README.md, "Upgrades
// and restarts").
//
// The systemd implementation asks systemd over D-Bus (sd-bus) which unit this
// process is the main process of, and the type of that unit's job: a
// `restart` job (also what `try-restart` and `reload-or-restart` of a unit
// without ExecReload= become) is in its stop phase when the agent receives
// its SIGTERM. A plain `systemctl stop`, a shutdown or no job at all is a
// stop.
#ifndef PORTFLEET_AGENT_RESTART_PROBE_H_
#define PORTFLEET_AGENT_RESTART_PROBE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace portfleet {

// What the service manager is doing to the agent's unit.
struct RestartVerdict {
  // A restart: leave the workers to the next agent.
  bool restarting = false;
  // The agent's unit, e.g. "portfleet-agent.service"; empty when the agent
  // is not a service of the manager (then never a restart).
  std::string unit;
  // The unit's pending job ("restart", "stop", ...); empty for none.
  std::string job_type;
};

class RestartProbe {
 public:
  virtual ~RestartProbe() = default;
  // Blocking, called off the event loop; answers within about `timeout`. An
  // error means "cannot tell" (the caller then stops as usual).
  virtual absl::StatusOr<RestartVerdict> Probe(absl::Duration timeout) = 0;
};

// Whether a job of `job_type` (systemd's JobType property) on the agent's own
// unit is a restart.
bool IsRestartJob(absl::string_view job_type);

// Asks the systemd that started this process as a service ($INVOCATION_ID
// set): over its private socket when root (as systemctl does; needs no D-Bus
// daemon), else over the system bus. Outside a systemd service it answers
// "not restarting" without asking.
std::unique_ptr<RestartProbe> MakeSystemdRestartProbe();

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_RESTART_PROBE_H_
