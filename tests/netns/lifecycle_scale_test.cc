// Scale a listener 4 -> 1 -> 4 ten times under continuous short-lived load
// from portfleet-loadgen (in-process, 2 threads), in a private network
// namespace, with BPF steering. Failures are counted by the client.
//
// Steps:
// 1. Four shards (HASH, drain timeout 5 s). Wait until all four are ready;
//    record the agent's fd count.
// 2. Start the load: short-lived HTTP connections at 800/s, every answer
//    checked, for as long as the scaling runs.
// 3. Ten times: scale to 1, then back to 4 and wait until 4 shards are ready.
//    On even rounds the workers of shards 1-3 are SIGSTOPped 200 ms before
//    the scale-down (and SIGCONTed 100 ms after it was asked for), so their
//    accept queues are non-empty when their sockets are shut down and the
//    kernel must migrate them; on odd rounds queues are whatever the load
//    leaves (usually empty: each worker keeps up).
// 4. Stop the load: 0 failed connections. The `migrated` counters rose by
//    at least one in every SIGSTOP round (we print every round's delta).
// 5. The agent holds as many fds as in step 1, and has no zombie children.
#include <signal.h>

#include <atomic>
#include <future>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

constexpr char kAddress[] = "127.0.0.1:8080";
constexpr char kSpec[] =
    R"pb(listeners {
           name: "web"
           address: "127.0.0.1:8080"
           shards: 4
           worker { command: "portfleet-worker" args: "--mode=http" }
           drain_timeout_seconds: 5
           steering { policy: STEERING_POLICY_HASH }
         })pb";

TEST(LifecycleScaleTest, FourToOneToFourTenTimesUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(kSpec).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 4; },
                      absl::Seconds(15)))
      << agent.Log();
  const int fds_before = CountFds(agent.pid());

  loadgen::Options load;
  load.target = kAddress;
  load.rate = 800;
  load.duration = absl::Seconds(55);  // hard bound; stopped by `stop`
  load.max_connections = 60000;
  load.connect_timeout = absl::Seconds(3);
  load.request_timeout = absl::Seconds(5);
  std::atomic<bool> stop{false};
  auto running =
      std::async(std::launch::async, [&] { return loadgen::Run(load, &stop); });
  absl::SleepFor(absl::Milliseconds(500));

  std::vector<std::string> rounds;
  int stopped_rounds_with_migration = 0;
  for (int round = 0; round < 10; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    bool fill_queues = round % 2 == 0;
    uint64_t migrated_before = SumMigrated(*stub, "web");
    std::map<int, pid_t> workers = agent.WorkersByShard();
    std::vector<pid_t> victims;
    for (int shard : {1, 2, 3}) {
      if (workers.count(shard)) victims.push_back(workers[shard]);
    }
    if (fill_queues) {
      for (pid_t pid : victims) ::kill(pid, SIGSTOP);
      // Wait for the event the round is about: connections queued on the
      // stopped shards (not for a fixed time).
      uint32_t queued = 0;
      EXPECT_TRUE(WaitFor(
          [&] {
            queued = 0;
            for (const v1::Shard& s : Shards(*stub, "web")) {
              if (s.index() != 0) queued += s.queue_depth();
            }
            return queued > 0;
          },
          absl::Seconds(10)))
          << "nothing queued on the stopped shards";
    }
    auto down = std::async(std::launch::async,
                           [&] { return ScaleTo(*stub, "web", 1); });
    if (fill_queues) {
      absl::SleepFor(absl::Milliseconds(100));
      for (pid_t pid : victims) ::kill(pid, SIGCONT);
    }
    grpc::Status down_status = down.get();
    ASSERT_TRUE(down_status.ok()) << down_status.error_message();
    uint64_t migrated = SumMigrated(*stub, "web") - migrated_before;
    for (pid_t pid : victims) {
      EXPECT_TRUE(
          WaitFor([&] { return !ProcessExists(pid); }, absl::Seconds(2)))
          << "drained worker " << pid << " still running";
    }
    grpc::Status up = ScaleTo(*stub, "web", 4);
    ASSERT_TRUE(up.ok()) << up.error_message();
    ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 4; },
                        absl::Seconds(10)))
        << agent.Log();
    rounds.push_back(absl::StrCat("round ", round,
                                  fill_queues ? " (queues filled)" : "",
                                  ": migrated ", migrated));
    if (fill_queues && migrated > 0) stopped_rounds_with_migration++;
    absl::SleepFor(absl::Milliseconds(200));
  }
  stop = true;
  absl::StatusOr<loadgen::Result> result = running.get();
  ASSERT_TRUE(result.ok()) << result.status();
  for (const std::string& r : rounds) std::cout << r << "\n";
  std::cout << "load: " << result->Summary() << "\n";
  // failures() counts connections that fell due at the offered rate but
  // could not start (late_starts) too, so 0 also says the load ran
  // throughout; how fast it ran is for the benchmarks.
  EXPECT_GT(result->ok(), 0) << result->Summary();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(result->late_starts, 0) << result->Summary();
  EXPECT_EQ(stopped_rounds_with_migration, 5)
      << "every round with SIGSTOPped workers should have migrated "
         "connections";

  EXPECT_TRUE(WaitFor([&] { return CountFds(agent.pid()) == fds_before; },
                      absl::Seconds(5)))
      << "agent fds: before " << fds_before << ", after "
      << CountFds(agent.pid());
  EXPECT_TRUE(ZombieChildren(agent.pid()).empty());
  EXPECT_EQ(agent.WorkersByShard().size(), 4u);
}

}  // namespace
}  // namespace portfleet::testing
