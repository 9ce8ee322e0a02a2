// Runs the real portfleet-agent for a test: writes the spec, points every
// path flag into a temporary directory, and offers waits on the log and the
// workers.
#ifndef PORTFLEET_TESTS_TESTING_AGENT_HARNESS_H_
#define PORTFLEET_TESTS_TESTING_AGENT_HARNESS_H_

#include <sys/types.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tests/testing/process.h"

namespace portfleet::testing {

class AgentHarness {
 public:
  AgentHarness();
  ~AgentHarness();

  const TempDir& dir() const { return dir_; }
  std::string api_socket() const { return dir_.path() + "/api.sock"; }
  std::string state_dir() const { return dir_.path() + "/state"; }
  std::string bpffs() const { return bpffs_; }

  // Writes `spec_text` (textproto) and starts the agent with it. `extra_args`
  // are appended to the command line.
  absl::Status Start(const std::string& spec_text,
                     const std::vector<std::string>& extra_args = {});
  // Starts again with the same paths (after a stop or SIGKILL).
  absl::Status Restart(const std::vector<std::string>& extra_args = {});
  // A second agent with --takeover on the same directories; once the running
  // agent has handed over and exited 0 (within `timeout`), the new one is
  // this harness's process.
  absl::Status Takeover(absl::Duration timeout = absl::Seconds(30));
  // A command the agent is started through (e.g. {"prlimit",
  // "--nofile=128:128", "--"}); it must exec the agent in place.
  void set_wrapper(std::vector<std::string> wrapper) {
    wrapper_ = std::move(wrapper);
  }

  Subprocess& process() { return agent_; }
  pid_t pid() const { return agent_.pid(); }
  std::string Log() const { return agent_.Log(); }

  // Polls GET http://address/ until it answers 200, up to `timeout`.
  bool WaitServing(const std::string& address,
                   absl::Duration timeout = absl::Seconds(15));
  // Waits until the log contains `needle` `count` times.
  bool WaitLog(const std::string& needle, int count = 1,
               absl::Duration timeout = absl::Seconds(15));

  // Worker processes (direct children of the agent) by shard index, read
  // from PORTFLEET_SHARD in their environment.
  std::map<int, pid_t> WorkersByShard() const;

 private:
  std::vector<std::string> AgentArgv(
      const std::vector<std::string>& extra_args) const;

  TempDir dir_;
  std::string spec_path_;
  std::string bpffs_;
  std::vector<std::string> last_args_;
  std::vector<std::string> wrapper_;
  Subprocess agent_;
  int starts_ = 0;
};

// When this process is in a private network namespace, SIGKILLs every other
// process in it (workers a killed agent left behind, second agents): each
// test's namespace is its own, so nothing outlives the test.
void KillOthersInPrivateNetns();

// Every process but this one in this process's network namespace (in a
// private namespace: the processes this test started).
std::vector<pid_t> ProcessesInMyNetns();

// Value of NAME in /proc/PID/environ, or nullopt.
std::optional<std::string> ProcessEnv(pid_t pid, const std::string& name);

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_TESTING_AGENT_HARNESS_H_
