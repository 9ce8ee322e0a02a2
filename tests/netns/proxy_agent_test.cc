// Proxy shards under the real agent, in a private network namespace:
//
// 1. The agent runs three listeners: `backend` (2 HTTP shards), `front`
//    (3 proxy shards forwarding to backend) and `dead` (1 proxy shard whose
//    upstream refuses).
// 2. HTTP load with one new connection per request runs against `front`;
//    every answer must be a complete 200 from a backend worker.
// 3. While it runs: `front` is scaled 3 -> 1 (two shards drained), 1 -> 4,
//    shard 1 is drained, and it is scaled back to 3.
// 4. Clients of `dead` are reset; its error is logged with the listener,
//    shard and upstream; the agent and `front` keep serving.
// 5. The load ends with 0 failed connections, answered by backend workers
//    only, and the proxy shards' load reports count connections.
#include <signal.h>

#include <atomic>
#include <future>
#include <iostream>
#include <map>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet {
namespace {

using testing::AgentHarness;
using testing::FleetStub;
using ::testing::HasSubstr;
using testing::ProcessExists;
using testing::ReadyShards;
using testing::ScaleTo;
using testing::Shards;
using testing::WaitFor;

constexpr char kFront[] = "127.0.0.1:18000";
constexpr char kDead[] = "127.0.0.1:18001";
constexpr char kSpec[] = R"pb(
  listeners {
    name: "backend"
    address: "127.0.0.1:18080"
    shards: 2
    worker { command: "portfleet-worker" args: "--mode=http" }
    drain_timeout_seconds: 5
  }
  listeners {
    name: "front"
    address: "127.0.0.1:18000"
    shards: 3
    worker {
      command: "portfleet-worker"
      args: "--mode=proxy"
      args: "--upstream=127.0.0.1:18080"
    }
    drain_timeout_seconds: 10
    steering { policy: STEERING_POLICY_HASH }
  }
  listeners {
    name: "dead"
    address: "127.0.0.1:18001"
    shards: 1
    worker {
      command: "portfleet-worker"
      args: "--mode=proxy"
      args: "--upstream=127.0.0.1:18999"
    }
    drain_timeout_seconds: 5
  }
)pb";

TEST(ProxyAgentTest, ScaleAndDrainUnderLoadWithoutAFailedConnection) {
  PF_ENTER_NETNS_OR_SKIP();
  testing::WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(kSpec).ok());
  ASSERT_TRUE(agent.WaitServing(kFront)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor(
      [&] {
        return ReadyShards(*stub, "front") == 3 &&
               ReadyShards(*stub, "backend") == 2;
      },
      absl::Seconds(15)))
      << agent.Log();
  std::set<int> backend_pids;
  for (const v1::Shard& s : Shards(*stub, "backend")) {
    backend_pids.insert(static_cast<int>(s.pid()));
  }

  loadgen::Options load;
  load.target = kFront;
  load.rate = 400;
  load.duration = absl::Seconds(60);  // hard bound; stopped by `stop`
  load.max_connections = 30000;
  load.connect_timeout = absl::Seconds(5);
  load.request_timeout = absl::Seconds(10);
  std::atomic<bool> stop{false};
  const absl::Time load_start = absl::Now();
  auto running =
      std::async(std::launch::async, [&] { return loadgen::Run(load, &stop); });
  absl::SleepFor(absl::Seconds(1));

  // Step 3.
  for (uint32_t shards : {1u, 4u}) {
    grpc::Status s = ScaleTo(*stub, "front", shards);
    ASSERT_TRUE(s.ok()) << "scale to " << shards << ": " << s.error_message();
    ASSERT_TRUE(WaitFor(
        [&] { return ReadyShards(*stub, "front") == static_cast<int>(shards); },
        absl::Seconds(20)))
        << agent.Log();
    absl::SleepFor(absl::Milliseconds(500));
  }
  grpc::Status drained = testing::Drain(*stub, "front", 1);
  ASSERT_TRUE(drained.ok()) << drained.error_message();
  absl::SleepFor(absl::Milliseconds(500));
  grpc::Status back = ScaleTo(*stub, "front", 3);
  ASSERT_TRUE(back.ok()) << back.error_message();
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "front") == 3; },
                      absl::Seconds(20)))
      << agent.Log();

  // Step 4.
  int dead_reset = 0;
  for (int i = 0; i < 10; ++i) {
    testing::Reply r = testing::HttpGet(kDead);
    if (r.outcome == testing::Outcome::kReset) ++dead_reset;
  }
  EXPECT_EQ(dead_reset, 10);
  EXPECT_TRUE(agent.WaitLog(
      "listener dead shard 0: upstream 127.0.0.1:18999: connect: Connection "
      "refused"))
      << agent.Log();
  absl::SleepFor(absl::Seconds(1));

  // The proxy shards report their connections through the control channel.
  uint64_t accepted = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        accepted = 0;
        for (const v1::Shard& s : Shards(*stub, "front")) {
          accepted += s.accepted_total();
        }
        return accepted > 0;
      },
      absl::Seconds(5)));

  // At least 6 s of load, so that the count below means something.
  absl::SleepFor(load_start + absl::Seconds(6) - absl::Now());
  stop = true;
  absl::StatusOr<loadgen::Result> result = running.get();
  ASSERT_TRUE(result.ok()) << result.status();
  std::cout << "load through the proxy: " << result->Summary() << "\n";
  EXPECT_GT(result->ok(), 1500) << result->Summary();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(result->late_starts, 0) << result->Summary();
  for (const auto& [pid, answers] : result->by_pid) {
    EXPECT_TRUE(backend_pids.count(pid))
        << answers << " answers from pid " << pid << ", not a backend worker";
  }
  EXPECT_TRUE(ProcessExists(agent.pid()));
  EXPECT_TRUE(agent.WaitServing(kFront, absl::Seconds(5)));
}

}  // namespace
}  // namespace portfleet
