// Agent restarts under load: workers outlive the agent, reconnect to the new
// one and are re-adopted (same pids, same sockets); nothing is refused.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kAddress[] = "127.0.0.1:8080";

// What the fds of `pid` point at, counted by kind ("socket", "anon_inode:
// [eventfd]", "/dev/null", ...): printed when an fd check fails.
std::string FdKinds(pid_t pid) {
  std::map<std::string, int> kinds;
  for (int fd = 0; fd < 4096; ++fd) {
    char buf[256];
    std::string link = absl::StrCat("/proc/", pid, "/fd/", fd);
    ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf) - 1);
    if (n <= 0) continue;
    std::string target(buf, n);
    kinds[target.substr(0, target.find(":["))]++;
  }
  return absl::StrJoin(kinds, ", ", absl::PairFormatter("="));
}

// State after each scenario: the agent holds `fds_expected` fds (its count
// right after start-up) and has no zombie children.
void ExpectNoLeaks(pid_t agent, int fds_expected) {
  EXPECT_TRUE(WaitFor([&] { return CountFds(agent) == fds_expected; },
                      absl::Seconds(5)))
      << "agent fds: expected " << fds_expected << " (after start-up), now "
      << CountFds(agent) << " (" << FdKinds(agent) << ")";
  EXPECT_TRUE(ZombieChildren(agent).empty());
}

// Steps:
// 1. Three shards of http workers; short-lived load at 300 connections/s.
// 2. Five times: SIGKILL the agent, start it again, wait until it has
//    re-adopted every worker.
// 3. The load saw no failure; the workers are the same pids on the same
//    socket inodes throughout; the agent supervises them (ListShards); no
//    other worker process exists.
// After every round the re-adopted agent holds exactly as many fds as the
// first agent did after start-up (one copy of each shard socket, one control
// channel per worker) and has no zombie children.
TEST(LifecycleRestartTest, AgentSigkillAndRestartReadoptsWorkers) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(
                      R"pb(listeners {
                     name: "web"
                     address: "127.0.0.1:8080"
                     shards: 3
                     worker { command: "portfleet-worker" args: "--mode=http" }
                     steering { policy: STEERING_POLICY_HASH }
                   })pb")
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)));
  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 3u);
  const int fds_after_start = CountFds(agent.pid());
  std::map<int, uint64_t> inodes;
  for (const auto& [shard, pid] : workers) inodes[shard] = *SocketInode(pid, 3);

  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(40);
  o.max_connections = 15000;
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });

  for (int round = 1; round <= 5; ++round) {
    agent.process().Signal(SIGKILL);
    agent.process().Wait(absl::Seconds(5));
    absl::SleepFor(absl::Milliseconds(300));  // serving without an agent
    ASSERT_TRUE(agent.Restart().ok());
    ASSERT_TRUE(agent.WaitLog("re-adopted worker pid", 3)) << agent.Log();
    stub = FleetStub(agent.api_socket());
    ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                        absl::Seconds(10)))
        << "round " << round << "\n"
        << agent.Log();
    for (const v1::Shard& shard : Shards(*stub, "web")) {
      EXPECT_EQ(static_cast<pid_t>(shard.pid()), workers[shard.index()])
          << "round " << round << " shard " << shard.index();
      EXPECT_EQ(shard.socket_inode(), inodes[shard.index()]);
    }
    SCOPED_TRACE(absl::StrCat("round ", round));
    ExpectNoLeaks(agent.pid(), fds_after_start);
  }
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 500);
  for (const auto& [shard, pid] : workers) EXPECT_TRUE(ProcessExists(pid));
  // Every answer came from the original three workers.
  for (const auto& [pid, count] : result->by_pid) {
    bool known = false;
    for (const auto& [shard, w] : workers) known = known || w == pid;
    EXPECT_TRUE(known) << "pid " << pid << " answered " << count;
  }
  EXPECT_THAT(agent.Log(), ::testing::Not(HasSubstr("left by a previous")));
}

// The upgrade from an agent that had no "spill" map (its pin directory
// holds the four other maps, whose layout is unchanged). Steps:
// 1. Two shards with CPU steering; short-lived load at 300 connections/s.
// 2. SIGKILL the agent and remove the "spill" pin of its listener: the pin
//    directory is now what an older agent leaves behind.
// 3. Start the agent again: it re-adopts both workers (same pids), says in
//    its log that it created and pinned "spill" and reused the rest, and
//    the pin exists again.
// 4. The load saw no failure.
TEST(LifecycleRestartTest, PinsOfAnAgentWithoutTheSpillMapAreUpgraded) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(
                      R"pb(listeners {
                     name: "web"
                     address: "127.0.0.1:8080"
                     shards: 2
                     worker { command: "portfleet-worker" args: "--mode=http" }
                     steering { policy: STEERING_POLICY_CPU }
                   })pb")
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  if (agent.Log().find("BPF steering active") == std::string::npos) {
    PF_SKIP_OR_FAIL("BPF steering unavailable");
  }
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 2u);
  const std::string spill = agent.bpffs() + "/web/spill";
  struct stat st;
  ASSERT_EQ(::stat(spill.c_str(), &st), 0) << spill;

  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(8);
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Seconds(1));
  agent.process().Signal(SIGKILL);
  agent.process().Wait(absl::Seconds(5));
  ASSERT_EQ(::unlink(spill.c_str()), 0);
  absl::SleepFor(absl::Milliseconds(300));  // serving without an agent
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("re-adopted worker pid", 2)) << agent.Log();
  EXPECT_THAT(agent.Log(), HasSubstr("are from an older agent (no 'spill' "
                                     "map): created and pinned it"));
  EXPECT_EQ(::stat(spill.c_str(), &st), 0) << "spill not pinned again";
  stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)))
      << agent.Log();
  for (const v1::Shard& shard : Shards(*stub, "web")) {
    EXPECT_EQ(static_cast<pid_t>(shard.pid()), workers[shard.index()]);
  }
  absl::SleepFor(absl::Seconds(1));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 300);
}

// A reconnected worker that does not fit the restored state drains only
// once the listener's new socket is in the reuseport group. Steps:
// 1. Two shards; drain shard 0: the listener keeps one shard, index 1.
// 2. Under 300 connections/s, SIGKILL the agent and start it again: the
//    restored state has one shard (index 0), so the index-1 worker is
//    replaced by a new shard 0 and drains.
// 3. Nothing was refused or reset (it was: the old worker drained before the
//    new socket existed, so SYNs found no listener and its queue was reset).
TEST(LifecycleRestartTest, MismatchedWorkerDrainsAfterItsReplacementListens) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(
                      R"pb(listeners {
                     name: "web"
                     address: "127.0.0.1:8080"
                     shards: 2
                     worker { command: "portfleet-worker" args: "--mode=http" }
                     steering { policy: STEERING_POLICY_CPU }
                     drain_timeout_seconds: 5
                   })pb")
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  ASSERT_TRUE(Drain(*stub, "web", 0).ok());
  ASSERT_TRUE(WaitFor(
      [&] {
        std::vector<v1::Shard> shards = Shards(*stub, "web");
        return shards.size() == 1 && shards[0].index() == 1;
      },
      absl::Seconds(10)))
      << agent.Log();

  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(20);
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  agent.process().Signal(SIGKILL);
  agent.process().Wait(absl::Seconds(5));
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("does not match the desired state")) << agent.Log();
  stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 1; },
                      absl::Seconds(10)))
      << agent.Log();
  absl::SleepFor(absl::Seconds(1));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary() << "\n" << agent.Log();
  EXPECT_GT(result->ok(), 300);
}

// A stopped agent (SIGTERM) takes its workers with it; a new agent on the
// same state (and the pinned steering maps) starts fresh workers, finds no
// orphans, and holds as many fds as the first one did after start-up.
TEST(LifecycleRestartTest, CleanStopLeavesNothingBehind) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(
                      R"pb(listeners {
                     name: "web"
                     address: "127.0.0.1:8080"
                     shards: 2
                     worker { command: "portfleet-worker" args: "--mode=http" }
                   })pb")
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  const int fds_after_start = CountFds(agent.pid());
  std::vector<pid_t> workers = DescendantsOf(agent.pid());
  agent.process().Signal(SIGTERM);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(10)).has_value());
  for (pid_t w : workers) EXPECT_FALSE(ProcessExists(w));
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  EXPECT_THAT(agent.Log(), ::testing::Not(HasSubstr("previous agent")));
  stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  ExpectNoLeaks(agent.pid(), fds_after_start);
}

// Steps:
// 1. Three shards of http workers; short-lived load at 300 connections/s.
// 2. SIGUSR2 (step aside, what the agent does when systemd restarts its
//    unit): the agent exits 0 and says how many workers it leaves; the
//    workers keep running.
// 3. A new agent re-adopts them: same pids on the same socket inodes.
// 4. SIGTERM to the new agent still drains: no worker left.
// 5. The load saw no failure.
TEST(LifecycleRestartTest, StepAsideLeavesWorkersToTheNextAgent) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  // Plain literals: clang-format reflows R"pb(...)" pieces.
  ASSERT_TRUE(agent
                  .Start("listeners {\n"
                         "  name: \"web\"\n"
                         "  address: \"127.0.0.1:8080\"\n"
                         "  shards: 3\n"
                         "  worker { command: \"portfleet-worker\" "
                         "args: \"--mode=http\" }\n"
                         "  drain_timeout_seconds: 5\n"
                         "}\n")
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)));
  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 3u);
  std::map<int, uint64_t> inodes;
  for (const auto& [shard, pid] : workers) inodes[shard] = *SocketInode(pid, 3);

  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(30);
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Milliseconds(300));

  agent.process().Signal(SIGUSR2);
  std::optional<int> exit = agent.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(exit.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 0) << *exit;
  EXPECT_THAT(agent.Log(),
              HasSubstr("received SIGUSR2: leaving 3 workers of 1 listener "
                        "to the next agent"));
  EXPECT_THAT(agent.Log(), HasSubstr("stepped aside"));
  for (const auto& [shard, pid] : workers) EXPECT_TRUE(ProcessExists(pid));
  absl::SleepFor(absl::Milliseconds(300));  // serving without an agent

  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("re-adopted worker pid", 3)) << agent.Log();
  stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)))
      << agent.Log();
  for (const v1::Shard& shard : Shards(*stub, "web")) {
    EXPECT_EQ(static_cast<pid_t>(shard.pid()), workers[shard.index()])
        << "shard " << shard.index();
    EXPECT_EQ(shard.socket_inode(), inodes[shard.index()]);
  }
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 100);

  agent.process().Signal(SIGTERM);
  exit = agent.process().Wait(absl::Seconds(15));
  ASSERT_TRUE(exit.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 0) << *exit;
  for (const auto& [shard, pid] : workers) EXPECT_FALSE(ProcessExists(pid));
  EXPECT_THAT(agent.Log(), HasSubstr("stopping the API and the workers"));
}

// Steps:
// 1. Two shards of a third-party worker (a shell script running the
//    reference worker without PORTFLEET_AGENT_SOCKET, so it never
//    reconnects).
// 2. SIGKILL the agent; start it again.
// 3. The new agent starts its own workers, and the old ones, which it cannot
//    re-adopt, are drained (SIGTERM) and gone; the load saw no failure.
// 4. Once the old workers are gone, the new agent holds as many fds as the
//    first one did after start-up (nothing kept for the old workers) and has
//    no zombie children.
TEST(LifecycleRestartTest, WorkersThatCannotReconnectAreDrainedNotLeaked) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  std::string script = agent.dir().WriteFile(
      "third-party.sh",
      absl::StrCat("#!/bin/sh\nunset PORTFLEET_AGENT_SOCKET\nexec ",
                   BinaryPath("portfleet-worker"), " --mode=http\n"));
  ::chmod(script.c_str(), 0755);
  // Plain literals: clang-format reflows R"pb(...)" pieces.
  ASSERT_TRUE(agent
                  .Start(absl::StrCat("listeners {\n"
                                      "  name: \"web\"\n"
                                      "  address: \"127.0.0.1:8080\"\n"
                                      "  shards: 2\n"
                                      "  worker { command: \"",
                                      script,
                                      "\" }\n"
                                      "  drain_timeout_seconds: 5\n"
                                      "}\n"))
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 2; },
                      absl::Seconds(10)));
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  const int fds_after_start = CountFds(agent.pid());
  std::map<int, pid_t> old = agent.WorkersByShard();

  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(20);
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  agent.process().Signal(SIGKILL);
  agent.process().Wait(absl::Seconds(5));
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("old worker pid", 2)) << agent.Log();
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  for (const auto& [shard, pid] : old) EXPECT_FALSE(ProcessExists(pid));
  EXPECT_EQ(agent.WorkersByShard().size(), 2u);
  EXPECT_THAT(agent.Log(), HasSubstr("left by a previous agent"));
  stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  ExpectNoLeaks(agent.pid(), fds_after_start);
}

}  // namespace
}  // namespace portfleet::testing
