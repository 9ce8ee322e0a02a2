// README promises about the agent's process life that had no test: restart
// backoff, SIGHUP, a second stop signal, a corrupt state file. Real
// portfleet-agent and workers, each case in its own network namespace.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "agent/api/state_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kAddress[] = "127.0.0.1:8080";

std::string Spec(const std::string& command, int shards, int drain_timeout,
                 const std::string& args = "") {
  return absl::StrCat(R"pb(listeners {
    name: "web" address: "127.0.0.1:8080" shards: )pb",
                      shards, R"pb( worker { command: ")pb", command, "\" ",
                      args, R"pb( } drain_timeout_seconds: )pb", drain_timeout,
                      " }\n");
}

// Steps:
// 1. A worker that records the time it starts (ns since the epoch) and
//    exits at once.
// 2. Wait for 5 starts.
// 3. The gaps between starts are at least 100, 200, 400, 800 ms (the
//    backoff doubles from 100 ms; a lower bound only, so a loaded machine
//    cannot fail it) and the log announces those delays.
TEST(AgentPromisesTest, RestartBackoffDoublesFrom100ms) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  const std::string starts = agent.dir().path() + "/starts";
  std::string script = agent.dir().WriteFile(
      "crash.sh",
      absl::StrCat("#!/bin/sh\ndate +%s%N >> ", starts, "\nexit 1\n"));
  ::chmod(script.c_str(), 0755);
  ASSERT_TRUE(agent.Start(Spec(script, 1, 1)).ok());
  std::vector<int64_t> ns;
  ASSERT_TRUE(WaitFor(
      [&] {
        ns.clear();
        for (absl::string_view line :
             absl::StrSplit(ReadFileOrEmpty(starts), '\n')) {
          int64_t v = 0;
          if (absl::SimpleAtoi(line, &v)) ns.push_back(v);
        }
        return ns.size() >= 5;
      },
      absl::Seconds(20)))
      << ns.size() << " starts\n"
      << agent.Log();
  int64_t want_ms = 100;
  for (size_t i = 1; i < 5; ++i, want_ms *= 2) {
    const int64_t gap_ms = (ns[i] - ns[i - 1]) / 1000000;
    EXPECT_GE(gap_ms, want_ms) << "gap before start " << i;
    EXPECT_THAT(agent.Log(), HasSubstr(absl::StrCat("restarting in ", want_ms,
                                                    "ms on the same socket")));
  }
}

// Steps:
// 1. Two shards serving.
// 2. SIGHUP the agent.
// 3. The log says it was ignored; the agent, its workers (same pids) and
//    the service are untouched.
TEST(AgentPromisesTest, SighupIsIgnored) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(
      agent.Start(Spec("portfleet-worker", 2, 5, "args: \"--mode=http\""))
          .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 2; },
                      absl::Seconds(10)));
  const std::map<int, pid_t> before = agent.WorkersByShard();
  agent.process().Signal(SIGHUP);
  ASSERT_TRUE(agent.WaitLog("SIGHUP ignored")) << agent.Log();
  EXPECT_TRUE(agent.process().running());
  EXPECT_EQ(agent.WorkersByShard(), before);
  for (int i = 0; i < 20; ++i) {
    Reply r = HttpGet(kAddress);
    EXPECT_EQ(r.outcome, Outcome::kOk) << r.error;
  }
  EXPECT_THAT(agent.Log(), ::testing::Not(HasSubstr("stopping the API")));
}

// Steps:
// 1. One shard whose worker ignores SIGTERM; drain timeout 60 s.
// 2. SIGTERM the agent: it starts draining and waits for the worker.
// 3. A second SIGTERM: the agent kills the worker at once and exits 0, far
//    sooner than the 60 s drain timeout; no worker process is left.
TEST(AgentPromisesTest, SecondSignalKillsWorkersAtOnce) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  const std::string marker = agent.dir().path() + "/trapped";
  std::string script = agent.dir().WriteFile(
      "stubborn.sh", absl::StrCat("#!/bin/sh\ntrap '' TERM\ntouch ", marker,
                                  "\nwhile :; do sleep 1; done\n"));
  ::chmod(script.c_str(), 0755);
  ASSERT_TRUE(agent.Start(Spec(script, 1, 60)).ok());
  ASSERT_TRUE(WaitFor([&] { return ::access(marker.c_str(), F_OK) == 0; },
                      absl::Seconds(10)))
      << agent.Log();
  std::vector<pid_t> workers = DescendantsOf(agent.pid());
  ASSERT_FALSE(workers.empty());

  agent.process().Signal(SIGTERM);
  // The first signal only drains: the worker ignores it and the agent waits.
  EXPECT_FALSE(agent.process().Wait(absl::Seconds(1)).has_value())
      << agent.Log();
  const absl::Time second = absl::Now();
  agent.process().Signal(SIGTERM);
  std::optional<int> status = agent.process().Wait(absl::Seconds(30));
  ASSERT_TRUE(status.has_value()) << "still waiting for the drain\n"
                                  << agent.Log();
  EXPECT_TRUE(ExitedWith(*status, 0)) << agent.Log();
  EXPECT_LT(absl::Now() - second, absl::Seconds(30));
  EXPECT_THAT(agent.Log(), HasSubstr("again: killing workers now"));
  for (pid_t p : workers) {
    EXPECT_TRUE(WaitFor([&] { return !ProcessExists(p); }, absl::Seconds(5)))
        << "worker " << p << " survived the second signal";
  }
}

// Steps:
// 1. A state directory whose state file is corrupt (text that is not a
//    fleet state).
// 2. The agent exits 1 at start, its log naming the file; the file is left
//    as it was (nothing silently dropped or rewritten); nothing listens.
TEST(AgentPromisesTest, CorruptStateFileStopsTheStart) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_EQ(::mkdir(agent.state_dir().c_str(), 0700), 0);
  const std::string path = FleetStatePath(agent.state_dir());
  const std::string corrupt =
      "listeners {\n  name: \"web\"\n  address: \"127.0.0.1:8080\"\n"
      "  shards: 2\n  worker { comm";
  { std::ofstream(path) << corrupt; }
  ASSERT_TRUE(
      agent.Start(Spec("portfleet-worker", 2, 5, "args: \"--mode=http\""))
          .ok());
  std::optional<int> status = agent.process().Wait(absl::Seconds(15));
  ASSERT_TRUE(status.has_value()) << "the agent started on a corrupt state\n"
                                  << agent.Log();
  EXPECT_TRUE(ExitedWith(*status, 1)) << agent.Log();
  EXPECT_THAT(agent.Log(), HasSubstr(path));
  EXPECT_EQ(ReadFileOrEmpty(path), corrupt);
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kRefused);
}

}  // namespace
}  // namespace portfleet::testing
