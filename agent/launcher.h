// Starting worker processes by the systemd socket-activation convention.
#ifndef PORTFLEET_AGENT_LAUNCHER_H_
#define PORTFLEET_AGENT_LAUNCHER_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

// A user to run a worker as, resolved from names ahead of fork().
struct Credentials {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups
  std::string user;           // for messages and HOME/USER
  std::string home;
};
// "www-data" or "33", and an optional group name/gid. NotFound with a
// precise message for an unknown user or group.
absl::StatusOr<Credentials> ResolveCredentials(const std::string& user,
                                               const std::string& group);

struct LaunchSpec {
  std::string path;               // resolved executable
  std::vector<std::string> argv;  // argv[0] included
  // Complete environment ("K=V"). LISTEN_PID is added in the child.
  std::vector<std::string> env;
  int listen_fd = -1;   // becomes fd 3 (LISTEN_FDS=1); -1 = none (self-bound)
  int control_fd = -1;  // becomes fd 4 (PORTFLEET_CONTROL_FD=4), -1 = none
  int cpu = -1;         // sched_setaffinity to this CPU before exec, -1 = any
  // Credentials to switch to before exec (resolved by ResolveCredentials);
  // unset = keep the agent's.
  std::optional<struct Credentials> credentials;
};

struct LaunchedProcess {
  pid_t pid = -1;
  Fd pidfd;  // readable when the process exits
};

// The seam between supervision logic and process creation.
class ProcessLauncher {
 public:
  virtual ~ProcessLauncher() = default;
  // Starts the process; an exec failure (missing binary, not executable) is
  // reported here, not as an exit later.
  virtual absl::StatusOr<LaunchedProcess> Launch(const LaunchSpec& spec) = 0;
  // Sends `sig` to the process and its process group; false if the process
  // is gone.
  virtual bool Signal(const LaunchedProcess& process, int sig) = 0;
  // True while a process of the process group `pgid` lives (a worker's
  // descendants that stayed in its group after it was reaped).
  virtual bool GroupAlive(pid_t pgid) = 0;
  // Sends `sig` to every process of the group `pgid`; false if none is left.
  virtual bool SignalGroup(pid_t pgid, int sig) = 0;
  // SIGKILLs one process that is not a worker the agent started (an orphan
  // holding a shard socket), through a pidfd; false if it is gone.
  virtual bool KillProcess(pid_t pid) = 0;
  // Reaps an exited process; returns its wait status (as waitpid's), or
  // nullopt if it has not exited.
  virtual absl::StatusOr<std::optional<int>> Reap(
      const LaunchedProcess& process) = 0;
  // Restricts a running process to `cpus` (sched_setaffinity). NotFound
  // when the process is gone.
  virtual absl::Status SetAffinity(const LaunchedProcess& process,
                                   const std::vector<int>& cpus) = 0;
};

// fork + exec, pidfd_open, pidfd_send_signal, waitid(P_PIDFD).
class RealProcessLauncher : public ProcessLauncher {
 public:
  absl::StatusOr<LaunchedProcess> Launch(const LaunchSpec& spec) override;
  bool Signal(const LaunchedProcess& process, int sig) override;
  bool GroupAlive(pid_t pgid) override;
  bool SignalGroup(pid_t pgid, int sig) override;
  bool KillProcess(pid_t pid) override;
  absl::StatusOr<std::optional<int>> Reap(
      const LaunchedProcess& process) override;
  absl::Status SetAffinity(const LaunchedProcess& process,
                           const std::vector<int>& cpus) override;
};

// Finds a worker command: a path containing '/' is used as is; a bare name is
// looked up next to the agent's own binary, then in PATH.
absl::StatusOr<std::string> ResolveCommand(const std::string& command);

// "exited with status 1", "killed by signal 9 (SIGKILL)".
std::string DescribeWaitStatus(int status);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_LAUNCHER_H_
