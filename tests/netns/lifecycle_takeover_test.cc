// Agent takeover under load: a second agent started with --takeover receives
// the running agent's shard sockets, starts its own workers on them, and the
// first agent drains its workers and exits. Failures are counted from the
// client side.
#include <signal.h>
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
#include "tests/testing/client.h"
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
// 1. Agent A runs 3 shards; short-lived load at 300 connections/s.
// 2. Agent B starts with --takeover on the same paths.
// 3. A exits 0 after draining its workers; B serves the API.
// 4. The load saw no failure; afterwards only B and its 3 workers run, on the
//    same socket inodes as before.
//    Once A's workers are gone, B's orphan scan sees each socket held by
//    its own workers only (and reports no orphan).
// 5. B holds as many fds as A did after start-up (same listener and shards;
//    nothing kept from the hand-over) and has no zombie children.
TEST(LifecycleTakeoverTest, TakeoverUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness a;
  ASSERT_TRUE(a.Start(R"pb(listeners {
                     name: "web"
                     address: "127.0.0.1:8080"
                     shards: 3
                     worker { command: "portfleet-worker" args: "--mode=http" }
                     drain_timeout_seconds: 5
                     steering { policy: STEERING_POLICY_HASH }
                   })pb")
                  .ok());
  ASSERT_TRUE(a.WaitServing(kAddress)) << a.Log();
  auto stub = FleetStub(a.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)));
  std::map<int, pid_t> old_workers = a.WorkersByShard();
  const int a_fds_after_start = CountFds(a.pid());
  std::set<uint64_t> inodes;
  for (const auto& [shard, pid] : old_workers) {
    inodes.insert(*SocketInode(pid, 3));
  }

  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(40);
  o.max_connections = 15000;
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Milliseconds(300));

  Subprocess b;
  ASSERT_TRUE(b.Start({BinaryPath("portfleet-agent"), "--config",
                       a.dir().path() + "/fleet.textproto", "--api",
                       "unix://" + a.api_socket(), "--state-dir", a.state_dir(),
                       "--bpffs", a.bpffs(), "--metrics", "127.0.0.1:0",
                       "--takeover", "--log-level=debug"},
                      a.dir().path() + "/agent-b.log")
                  .ok());
  std::optional<int> a_status = a.process().Wait(absl::Seconds(20));
  ASSERT_TRUE(a_status.has_value()) << a.Log() << "\n---\n" << b.Log();
  EXPECT_TRUE(ExitedWith(*a_status, 0)) << a.Log();
  ASSERT_TRUE(WaitFor(
      [&] { return CountOccurrences(b.Log(), "takeover complete") == 1; },
      absl::Seconds(10)))
      << b.Log();
  stub = FleetStub(a.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)))
      << b.Log();
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 100);

  for (const auto& [shard, pid] : old_workers) {
    EXPECT_FALSE(ProcessExists(pid)) << "old worker " << pid;
  }
  // Once A's workers are gone B's orphan scan judges the sockets' holders
  // again (until then they were A's workers, not orphans).
  EXPECT_TRUE(WaitFor(
      [&] {
        return CountOccurrences(b.Log(),
                                "no worker of the previous agent holds the "
                                "socket any more") == 3;
      },
      absl::Seconds(5)))
      << b.Log();
  EXPECT_THAT(b.Log(), ::testing::Not(HasSubstr("orphan")));
  std::vector<pid_t> children = ChildrenOf(b.pid());
  EXPECT_EQ(children.size(), 3u);
  for (const v1::Shard& shard : Shards(*stub, "web")) {
    EXPECT_TRUE(std::count(children.begin(), children.end(),
                           static_cast<pid_t>(shard.pid())) == 1);
    EXPECT_EQ(inodes.count(shard.socket_inode()), 1u)
        << "shard " << shard.index() << " is on a new socket";
  }
  EXPECT_THAT(a.Log(), HasSubstr("handed over; stopped"));
  ExpectNoLeaks(b.pid(), a_fds_after_start);
  b.Signal(SIGTERM);
  std::optional<int> b_status = b.Wait(absl::Seconds(15));
  ASSERT_TRUE(b_status.has_value());
  EXPECT_TRUE(ExitedWith(*b_status, 0)) << b.Log();
}

// Steps:
// 1. Agent A serves "web" (2 shards).
// 2. Agent B starts beside it with the same paths and --takeover=auto (the
//    DaemonSet surge case).
// 3. B finds A, takes over (its log says so), A exits 0, and B's workers
//    answer on the sockets A's workers had.
TEST(LifecycleTakeoverTest, TakeoverAutoBesideARunningAgentTakesOver) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness a;
  ASSERT_TRUE(a.Start(R"pb(listeners {
                     name: "web"
                     address: "127.0.0.1:8080"
                     shards: 2
                     worker { command: "portfleet-worker" args: "--mode=http" }
                     drain_timeout_seconds: 5
                   })pb")
                  .ok());
  ASSERT_TRUE(a.WaitServing(kAddress)) << a.Log();
  ASSERT_TRUE(WaitFor([&] { return a.WorkersByShard().size() == 2; },
                      absl::Seconds(10)));
  std::set<uint64_t> inodes;
  for (const auto& [shard, pid] : a.WorkersByShard()) {
    absl::StatusOr<uint64_t> inode = SocketInode(pid, 3);
    ASSERT_TRUE(inode.ok()) << inode.status();
    inodes.insert(*inode);
  }
  Subprocess b;
  ASSERT_TRUE(b.Start({BinaryPath("portfleet-agent"), "--config",
                       a.dir().path() + "/fleet.textproto", "--api",
                       "unix://" + a.api_socket(), "--state-dir", a.state_dir(),
                       "--bpffs", a.bpffs(), "--metrics", "127.0.0.1:0",
                       "--takeover=auto"},
                      a.dir().path() + "/agent-b.log")
                  .ok());
  std::optional<int> a_status = a.process().Wait(absl::Seconds(20));
  ASSERT_TRUE(a_status.has_value()) << a.Log() << "\n---\n" << b.Log();
  EXPECT_TRUE(ExitedWith(*a_status, 0)) << a.Log();
  ASSERT_TRUE(WaitFor(
      [&] { return CountOccurrences(b.Log(), "takeover complete") == 1; },
      absl::Seconds(10)))
      << b.Log();
  EXPECT_THAT(b.Log(), ::testing::Not(HasSubstr("no agent answers on")));
  auto stub = FleetStub(a.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)))
      << b.Log();
  std::set<pid_t> b_workers;
  for (const v1::Shard& shard : Shards(*stub, "web")) {
    EXPECT_EQ(inodes.count(shard.socket_inode()), 1u)
        << "shard " << shard.index() << " is on a new socket";
    b_workers.insert(static_cast<pid_t>(shard.pid()));
  }
  for (int i = 0; i < 20; ++i) {
    Reply r = HttpGet(kAddress);
    ASSERT_EQ(r.outcome, Outcome::kOk) << r.error;
    EXPECT_EQ(b_workers.count(r.pid), 1u) << "answered by pid " << r.pid;
  }
  b.Signal(SIGTERM);
  std::optional<int> b_status = b.Wait(absl::Seconds(15));
  ASSERT_TRUE(b_status.has_value());
  EXPECT_TRUE(ExitedWith(*b_status, 0)) << b.Log();
}

// Without a running agent, --takeover fails with a clear message.
TEST(LifecycleTakeoverTest, TakeoverWithoutARunningAgentIsAClearError) {
  PF_ENTER_NETNS_OR_SKIP();
  TempDir dir;
  Subprocess b;
  ASSERT_TRUE(
      b.Start({BinaryPath("portfleet-agent"), "--api",
               "unix://" + dir.path() + "/api.sock", "--state-dir",
               dir.path() + "/state", "--metrics", "127.0.0.1:0", "--takeover"},
              dir.path() + "/b.log")
          .ok());
  std::optional<int> status = b.Wait(absl::Seconds(15));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(ExitedWith(*status, 1));
  EXPECT_THAT(b.Log(), HasSubstr("start-up failed: takeover via " + dir.path() +
                                 "/control.sock"));
}

}  // namespace
}  // namespace portfleet::testing
