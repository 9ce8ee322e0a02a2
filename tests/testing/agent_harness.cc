#include "tests/testing/agent_harness.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"

namespace portfleet::testing {

AgentHarness::AgentHarness()
    : bpffs_(absl::StrCat("/sys/fs/bpf/portfleet-test-", ::getpid())) {}

AgentHarness::~AgentHarness() {
  if (agent_.running()) {
    // Stop workers too: they are in their own process groups.
    std::vector<pid_t> workers = DescendantsOf(agent_.pid());
    agent_.Signal(SIGKILL);
    agent_.Wait(absl::Seconds(5));
    for (pid_t w : workers) ::kill(w, SIGKILL);
  }
  KillOthersInPrivateNetns();
  std::error_code ec;
  std::filesystem::remove_all(bpffs_, ec);
}

absl::Status AgentHarness::Start(const std::string& spec_text,
                                 const std::vector<std::string>& extra_args) {
  spec_path_ = dir_.WriteFile("fleet.textproto", spec_text);
  return Restart(extra_args);
}

absl::Status AgentHarness::Restart(const std::vector<std::string>& extra_args) {
  starts_++;
  return agent_.Start(AgentArgv(extra_args),
                      absl::StrCat(dir_.path(), "/agent.", starts_, ".log"));
}

absl::Status AgentHarness::Takeover(absl::Duration timeout) {
  Subprocess next;
  starts_++;
  absl::Status started =
      next.Start(AgentArgv({"--takeover"}),
                 absl::StrCat(dir_.path(), "/agent.", starts_, ".log"));
  if (!started.ok()) return started;
  std::optional<int> status = agent_.Wait(timeout);
  if (!status.has_value()) {
    return absl::DeadlineExceededError(absl::StrCat(
        "the running agent (pid ", agent_.pid(), ") did not hand over within ",
        absl::FormatDuration(timeout), "; new agent's log:\n", next.Log()));
  }
  if (!WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
    return absl::InternalError(
        absl::StrCat("the running agent ended with wait status ", *status,
                     " instead of exit 0; new agent's log:\n", next.Log()));
  }
  agent_ = std::move(next);
  return absl::OkStatus();
}

std::vector<std::string> AgentHarness::AgentArgv(
    const std::vector<std::string>& extra_args) const {
  std::vector<std::string> argv = wrapper_;
  std::vector<std::string> agent = {
      BinaryPath("portfleet-agent"),
      "--config",
      spec_path_,
      "--api",
      absl::StrCat("unix://", api_socket()),
      "--state-dir",
      state_dir(),
      "--bpffs",
      bpffs_,
      "--metrics",
      "127.0.0.1:0",
  };
  argv.insert(argv.end(), agent.begin(), agent.end());
  for (const auto& a : extra_args) argv.push_back(a);
  return argv;
}

bool AgentHarness::WaitServing(const std::string& address,
                               absl::Duration timeout) {
  ClientOptions options;
  options.timeout = absl::Milliseconds(500);
  return WaitFor(
      [&] {
        return agent_.running() &&
               HttpGet(address, options).outcome == Outcome::kOk;
      },
      timeout);
}

bool AgentHarness::WaitLog(const std::string& needle, int count,
                           absl::Duration timeout) {
  return WaitFor([&] { return CountOccurrences(Log(), needle) >= count; },
                 timeout);
}

std::map<int, pid_t> AgentHarness::WorkersByShard() const {
  std::map<int, pid_t> out;
  for (pid_t child : ChildrenOf(agent_.pid())) {
    std::optional<std::string> shard = ProcessEnv(child, "PORTFLEET_SHARD");
    int index;
    if (shard && absl::SimpleAtoi(*shard, &index) && ProcessExists(child)) {
      out[index] = child;
    }
  }
  return out;
}

std::vector<pid_t> ProcessesInMyNetns() {
  std::vector<pid_t> out;
  char self_ns[64] = {};
  if (::readlink("/proc/self/ns/net", self_ns, sizeof(self_ns) - 1) <= 0) {
    return out;
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    pid_t pid = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid) ||
        pid == ::getpid()) {
      continue;
    }
    char ns[64] = {};
    std::string link = absl::StrCat("/proc/", pid, "/ns/net");
    if (::readlink(link.c_str(), ns, sizeof(ns) - 1) > 0 &&
        std::string(ns) == self_ns) {
      out.push_back(pid);
    }
  }
  return out;
}

void KillOthersInPrivateNetns() {
  char self_ns[64] = {};
  if (!InPrivateNetns() ||
      ::readlink("/proc/self/ns/net", self_ns, sizeof(self_ns) - 1) <= 0) {
    return;  // not in a private namespace: nothing is ours alone
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    pid_t pid;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid) ||
        pid == ::getpid()) {
      continue;
    }
    char ns[64] = {};
    std::string link = absl::StrCat("/proc/", pid, "/ns/net");
    if (::readlink(link.c_str(), ns, sizeof(ns) - 1) > 0 &&
        std::string(ns) == self_ns) {
      ::kill(pid, SIGKILL);
    }
  }
}

std::optional<std::string> ProcessEnv(pid_t pid, const std::string& name) {
  std::string env = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/environ"));
  std::string prefix = name + "=";
  for (absl::string_view entry : absl::StrSplit(env, '\0')) {
    if (absl::StartsWith(entry, prefix)) {
      return std::string(entry.substr(prefix.size()));
    }
  }
  return std::nullopt;
}

}  // namespace portfleet::testing
