// Rolling upgrades through the real agent's API under continuous load, each
// case in its own network namespace; failures are counted from the client
// side by the load generator.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
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

// Plain literals, not R"pb(...)": clang-format reflows textproto raw
// strings, which would pad the pieces this function splices together.
std::string Spec(int shards, const std::string& mode) {
  return absl::StrCat(
      "listeners {\n"
      "  name: \"web\"\n"
      "  address: \"127.0.0.1:8080\"\n"
      "  shards: ",
      shards,
      "\n"
      "  worker { command: \"portfleet-worker\" args: \"--mode=",
      mode,
      "\" }\n"
      "  drain_timeout_seconds: 10\n"
      "  steering { policy: STEERING_POLICY_HASH }\n"
      "}\n");
}

std::set<pid_t> Pids(v1::FleetService::Stub& stub) {
  std::set<pid_t> out;
  for (const v1::Shard& s : Shards(stub, "web")) out.insert(s.pid());
  return out;
}

std::string Cmdline(pid_t pid) {
  std::string raw = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/cmdline"));
  for (char& c : raw) {
    if (c == '\0') c = ' ';
  }
  return raw;
}

grpc::Status RollOut(v1::FleetService::Stub& stub, const std::string& command,
                     const std::vector<std::string>& args, uint32_t surge) {
  v1::RollOutListenerRequest req;
  req.set_name("web");
  if (!command.empty()) req.mutable_worker()->set_command(command);
  for (const auto& a : args) req.mutable_worker()->add_args(a);
  req.set_max_surge(surge);
  v1::RollOutListenerResponse resp;
  return stub.RollOutListener(RpcContext(60).get(), req, &resp);
}

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

// State after each scenario: the agent holds as many fds as right after
// start-up (every listener, shard socket, control channel and API
// connection it opened since has been closed again) and has no zombie
// children.
void ExpectNoLeaks(pid_t agent, int fds_after_start) {
  EXPECT_TRUE(WaitFor([&] { return CountFds(agent) == fds_after_start; },
                      absl::Seconds(5)))
      << "agent fds: after start-up " << fds_after_start << ", now "
      << CountFds(agent) << " (" << FdKinds(agent) << ")";
  EXPECT_TRUE(ZombieChildren(agent).empty());
}

loadgen::Options ShortLoad() {
  loadgen::Options o;
  o.target = kAddress;
  o.rate = 400;
  o.duration = absl::Seconds(30);
  o.max_connections = 15000;
  return o;
}

// Steps:
// 1. Four shards of http workers; short-lived load at 400 connections/s.
// 2. Roll out new worker arguments, two shards at a time.
// 3. The load saw no failure; every shard runs a new worker pid with the new
//    arguments; the persisted spec names them.
// 4. The old workers are reaped; the agent holds as many fds as after
//    start-up and has no zombie children.
TEST(LifecycleRolloutTest, RollingUpgradeOfAllShardsUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(4, "http")).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 4; },
                      absl::Seconds(10)));
  std::set<pid_t> before = Pids(*stub);
  const int fds_after_start = CountFds(agent.pid());

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(ShortLoad(), &stop); });
  absl::SleepFor(absl::Milliseconds(500));
  grpc::Status s =
      RollOut(*stub, "", {"--mode=http", "--drain-timeout=20s"}, 2);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << agent.Log();
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 200);

  std::vector<v1::Shard> shards = Shards(*stub, "web");
  ASSERT_EQ(shards.size(), 4u);
  for (const v1::Shard& shard : shards) {
    EXPECT_EQ(before.count(shard.pid()), 0u) << "shard " << shard.index();
    EXPECT_THAT(Cmdline(shard.pid()), HasSubstr("--drain-timeout=20s"));
  }
  EXPECT_THAT(ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto"),
              HasSubstr("--drain-timeout=20s"));
  // The old workers drain and are reaped.
  EXPECT_TRUE(WaitFor(
      [&] {
        for (pid_t p : before) {
          if (ProcessExists(p)) return false;
        }
        return true;
      },
      absl::Seconds(10)));
  ExpectNoLeaks(agent.pid(), fds_after_start);
}

// Steps:
// 1. Two shards; short-lived load.
// 2. Roll out a worker that exits at once.
// 3. The call fails with FAILED_PRECONDITION saying it rolled back; the load
//    saw no failure; the old workers (same pids) still serve; the spec is
//    unchanged; the agent holds as many fds as after start-up (the failed
//    workers' control channels are closed) and has no zombie children.
TEST(LifecycleRolloutTest, WorkerThatExitsAtOnceIsRolledBack) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2, "http")).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  std::set<pid_t> before = Pids(*stub);
  const int fds_after_start = CountFds(agent.pid());

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(ShortLoad(), &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  grpc::Status s = RollOut(*stub, "/bin/false", {}, 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("rolled back"));
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(Pids(*stub), before);
  EXPECT_THAT(ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto"),
              ::testing::Not(HasSubstr("/bin/false")));
  ExpectNoLeaks(agent.pid(), fds_after_start);
}

// Steps:
// 1. Two shards; short-lived load.
// 2. Roll out, one shard at a time, a wrapper that marks its environment
//    (ROLLED=1) and execs the real worker on shard 0 but exits at once on
//    shard 1: shard 0 is rolled, then shard 1 fails.
// 3. The call fails saying it rolled back; shard 0 was rolled back too: no
//    shard's worker has ROLLED=1 in its environment; the load saw no
//    failure; the persisted spec does not name the wrapper.
TEST(LifecycleRolloutTest, ShardsAlreadyRolledAreRolledBack) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  const std::string started = agent.dir().path() + "/shard0-rolled";
  std::string wrapper = agent.dir().WriteFile(
      "half-good.sh",
      absl::StrCat("#!/bin/sh\nif [ \"$PORTFLEET_SHARD\" = 1 ]; then exit 1; "
                   "fi\ntouch ",
                   started, "\nROLLED=1 exec ", BinaryPath("portfleet-worker"),
                   " \"$@\"\n"));
  ::chmod(wrapper.c_str(), 0755);
  ASSERT_TRUE(agent.Start(Spec(2, "http")).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(ShortLoad(), &stop); });
  grpc::Status s = RollOut(*stub, wrapper, {"--mode=http"}, 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
      << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("rolled back"));
  // Shard 0's new worker really had been started before shard 1 failed.
  EXPECT_EQ(::access(started.c_str(), F_OK), 0) << agent.Log();
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  for (const v1::Shard& shard : Shards(*stub, "web")) {
    std::string env =
        ReadFileOrEmpty(absl::StrCat("/proc/", shard.pid(), "/environ"));
    ASSERT_FALSE(env.empty()) << "shard " << shard.index();
    EXPECT_EQ(env.find(std::string("ROLLED=1\0", 9)), std::string::npos)
        << "shard " << shard.index() << " still runs the rolled-out worker";
    EXPECT_THAT(Cmdline(shard.pid()), HasSubstr("--mode=http"));
  }
  EXPECT_THAT(ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto"),
              ::testing::Not(HasSubstr("half-good.sh")));
}

// Steps:
// 1. Two shards; short-lived load.
// 2. The real portfleetctl binary: `rollout web --worker-args "--mode=http
//    --drain-timeout=7s" --max-surge 1` against the agent's API socket.
// 3. It exits 0 and prints "listener/web rolled out (...)"; every shard runs
//    a new pid with the new arguments; the load saw no failure.
TEST(LifecycleRolloutTest, PortfleetctlRolloutOnTheRealAgent) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2, "http")).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  const std::set<pid_t> before = Pids(*stub);

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(ShortLoad(), &stop); });
  Subprocess ctl;
  ASSERT_TRUE(ctl.Start({BinaryPath("portfleetctl"), "--server",
                         "unix:" + agent.api_socket(), "rollout", "web",
                         "--worker-args", "--mode=http --drain-timeout=7s",
                         "--max-surge", "1"},
                        agent.dir().path() + "/ctl.log")
                  .ok());
  std::optional<int> status = ctl.Wait(absl::Seconds(60));
  ASSERT_TRUE(status.has_value()) << ctl.Log();
  EXPECT_TRUE(ExitedWith(*status, 0)) << ctl.Log() << "\n" << agent.Log();
  EXPECT_THAT(ctl.Log(), HasSubstr("listener/web rolled out ("));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  const std::vector<v1::Shard> shards = Shards(*stub, "web");
  ASSERT_EQ(shards.size(), 2u);
  for (const v1::Shard& shard : shards) {
    EXPECT_EQ(before.count(shard.pid()), 0u) << "shard " << shard.index();
    EXPECT_THAT(Cmdline(shard.pid()),
                HasSubstr("--mode=http --drain-timeout=7s"));
  }
}

// Steps:
// 1. Two shards of echo workers; 200 long-lived connections exchange a
//    message every 100 ms.
// 2. Roll out (same program, restarted in place).
// 3. No exchange failed and no connection was broken: the old workers
//    finish their connections while the new ones take the new connections.
// 4. Once the client has closed, the old workers exit; the agent holds as
//    many fds as after start-up and has no zombie children.
TEST(LifecycleRolloutTest, LongLivedConnectionsSurviveARollout) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2, "echo")).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)))
      << agent.Log();
  std::set<pid_t> before = Pids(*stub);
  const int fds_after_start = CountFds(agent.pid());
  loadgen::Options o;
  o.target = kAddress;
  o.mode = loadgen::Mode::kLong;
  o.protocol = loadgen::Protocol::kEcho;
  o.connections = 200;
  o.interval = absl::Milliseconds(100);
  o.duration = absl::Seconds(4);
  o.max_connections = 200;
  auto load = std::async(std::launch::async, [&] { return loadgen::Run(o); });
  absl::SleepFor(absl::Seconds(1));
  grpc::Status s = RollOut(*stub, "", {}, 1);
  ASSERT_TRUE(s.ok()) << s.error_message();
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(result->connections_opened, 200);
  EXPECT_EQ(result->reconnects, 0);
  EXPECT_GT(result->ok(), 2000);
  // The old workers finish once the client closed its connections.
  EXPECT_TRUE(WaitFor(
      [&] {
        for (pid_t p : before) {
          if (ProcessExists(p)) return false;
        }
        return true;
      },
      absl::Seconds(10)));
  ExpectNoLeaks(agent.pid(), fds_after_start);
}

grpc::Status Update(v1::FleetService::Stub& stub, const std::string& spec) {
  v1::FleetSpec fleet;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(spec, &fleet));
  v1::UpdateListenerRequest req;
  *req.mutable_listener() = fleet.listeners(0);
  v1::UpdateListenerResponse resp;
  return stub.UpdateListener(RpcContext(60).get(), req, &resp);
}

// Steps (apply of an edited spec, issue 17 item 6):
// 1. Three shards of http workers; short-lived load.
// 2. UpdateListener with new worker arguments and a larger shard count.
// 3. The load saw no failure; four shards, every one a new pid running the
//    new arguments; the persisted spec has both changes.
TEST(LifecycleRolloutTest, ApplyOfAnEditedWorkerRollsItOutUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(3, "http")).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)))
      << agent.Log();
  std::set<pid_t> before = Pids(*stub);
  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(ShortLoad(), &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  std::string edited = Spec(4, "http\" args: \"--drain-timeout=15s");
  grpc::Status s = Update(*stub, edited);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << agent.Log();
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  std::vector<v1::Shard> shards = Shards(*stub, "web");
  ASSERT_EQ(shards.size(), 4u);
  for (const v1::Shard& shard : shards) {
    EXPECT_EQ(before.count(shard.pid()), 0u) << "shard " << shard.index();
    EXPECT_THAT(Cmdline(shard.pid()), HasSubstr("--drain-timeout=15s"));
  }
  std::string state =
      ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto");
  EXPECT_THAT(state, HasSubstr("--drain-timeout=15s"));
  EXPECT_THAT(state, HasSubstr("shards: 4"));
}

// Steps:
// 1. Two shards; short-lived load.
// 2. UpdateListener with a worker that exits at once, a third shard and a
//    new backlog.
// 3. The call fails; the load saw no failure; the same two pids serve; the
//    persisted spec is byte-identical to before.
TEST(LifecycleRolloutTest, FailedApplyOfAnEditedWorkerChangesNothing) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2, "http")).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)))
      << agent.Log();
  std::set<pid_t> before = Pids(*stub);
  const std::string state_file = agent.state_dir() + "/fleet-state.textproto";
  std::string state_before = ReadFileOrEmpty(state_file);
  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(ShortLoad(), &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  std::string edited = Spec(3, "http");
  absl::StrReplaceAll(
      {{"portfleet-worker", "/bin/false"},
       {"drain_timeout_seconds: 10", "drain_timeout_seconds: 10 backlog: 99"}},
      &edited);
  grpc::Status s = Update(*stub, edited);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.error_message(), HasSubstr("rolled back"));
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_TRUE(WaitFor([&] { return Pids(*stub) == before; }, absl::Seconds(10)))
      << agent.Log();
  EXPECT_EQ(ReadFileOrEmpty(state_file), state_before);
}

}  // namespace
}  // namespace portfleet::testing
