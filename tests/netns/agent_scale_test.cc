// Scale-up puts a new shard in the steering tables only once its worker is
// ready; a worker that fails first leaves the listener as it was.
#include <sys/stat.h>

#include <atomic>
#include <future>

#include "absl/strings/str_cat.h"
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

// Steps:
// 1. Two shards of a worker that refuses to run as shard 2 or above.
// 2. Under load, scale to 3.
// 3. The call fails (UNAVAILABLE) naming shard 2; the listener still has 2
//    shards, the state file says 2; the load saw no failure.
TEST(AgentScaleTest, ScaleUpWithAFailingWorkerChangesNothing) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  std::string script = agent.dir().WriteFile(
      "picky.sh",
      absl::StrCat("#!/bin/sh\n[ \"$PORTFLEET_SHARD\" -ge 2 ] && "
                   "exit 3\nexec ",
                   BinaryPath("portfleet-worker"), " --mode=http\n"));
  ::chmod(script.c_str(), 0755);
  ASSERT_TRUE(agent
                  .Start(absl::StrCat(R"pb(listeners {
                    name: "web" address: "127.0.0.1:8080" shards: 2
                    worker { command: ")pb",
                                      script, R"pb(" }
                  })pb"))
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(20);
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Milliseconds(200));
  grpc::Status s = ScaleTo(*stub, "web", 3);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("listener web shard 2: worker pid"));
  EXPECT_THAT(s.error_message(), HasSubstr("before it was ready"));
  absl::SleepFor(absl::Milliseconds(200));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(Shards(*stub, "web").size(), 2u);
  EXPECT_THAT(ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto"),
              HasSubstr("shards: 2"));
  // And a good scale-up still works afterwards (to 2 is a no-op; drain one
  // and grow back to 2).
  ASSERT_TRUE(Drain(*stub, "web", 1).ok());
  EXPECT_TRUE(ScaleTo(*stub, "web", 2).ok());
  EXPECT_EQ(ReadyShards(*stub, "web"), 2);
}

}  // namespace
}  // namespace portfleet::testing
