// The operator loop against the real agent, each case in its own network
// namespace: portfleetctl (in-process) inspects, diffs, applies, prunes and
// reads events; loads are counted from the client side by the load
// generator.
#include <atomic>
#include <future>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "agent/api/state_store.h"
#include "ctl/ctl.h"
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
using ::testing::Not;

// Plain literals (clang-format reflows textproto raw strings).
std::string ListenerText(const std::string& name, int port, int shards) {
  return absl::StrCat(
      "listeners {\n"
      "  name: \"",
      name,
      "\"\n"
      "  address: \"127.0.0.1:",
      port,
      "\"\n"
      "  shards: ",
      shards,
      "\n"
      "  worker { command: \"portfleet-worker\" args: \"--mode=http\" }\n"
      "  drain_timeout_seconds: 5\n"
      "}\n");
}

struct CtlResult {
  int code;
  std::string out;
  std::string err;
};

class OperatorTest : public ::testing::Test {
 protected:
  void Start(const std::string& spec) {
    WidenPortRange();
    ASSERT_TRUE(agent_.Start(spec).ok()) << agent_.Log();
    stub_ = FleetStub(agent_.api_socket());
  }
  // portfleetctl `args` against the agent.
  CtlResult Ctl(std::vector<std::string> args) {
    std::ostringstream out, err;
    ctl::CtlEnv env;
    env.out = &out;
    env.err = &err;
    args.insert(args.begin(), {"--server", "unix://" + agent_.api_socket()});
    int code = ctl::Run(env, args);
    return {code, out.str(), err.str()};
  }
  std::string StateFile() {
    return ReadFileOrEmpty(FleetStatePath(agent_.state_dir()));
  }
  std::set<pid_t> Pids(const std::string& name) {
    std::set<pid_t> out;
    for (const v1::Shard& s : Shards(*stub_, name)) out.insert(s.pid());
    return out;
  }
  bool AllReady(const std::string& name, int shards) {
    return WaitFor([&] { return ReadyShards(*stub_, name) == shards; },
                   absl::Seconds(15));
  }

  AgentHarness agent_;
  std::unique_ptr<v1::FleetService::Stub> stub_;
};

loadgen::Options Load(const std::string& target) {
  loadgen::Options o;
  o.target = target;
  o.rate = 300;
  o.duration = absl::Seconds(30);
  o.max_connections = 10000;
  return o;
}

// Steps:
// 1. Start the agent with "web" (2 shards); wait until it serves.
// 2. `get spec` into a file; `apply -f` it: unchanged, the state file
//    byte-identical, the same worker pids.
// 3. `diff -f` it: unchanged, nothing to do.
TEST_F(OperatorTest, GetSpecThenApplyIsANoOp) {
  PF_ENTER_NETNS_OR_SKIP();
  Start(ListenerText("web", 8080, 2));
  ASSERT_TRUE(AllReady("web", 2)) << agent_.Log();
  const std::string state = StateFile();
  const std::set<pid_t> pids = Pids("web");

  CtlResult spec = Ctl({"get", "spec"});
  ASSERT_EQ(spec.code, 0) << spec.err;
  const std::string file =
      agent_.dir().WriteFile("running.textproto", spec.out);
  CtlResult r = Ctl({"apply", "-f", file});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web unchanged\n");
  EXPECT_EQ(StateFile(), state);
  EXPECT_EQ(Pids("web"), pids);

  r = Ctl({"diff", "-f", file});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listener/web: unchanged\n"
            "plan: 0 to create, 0 to update, 0 to delete, 1 unchanged\n");
}

// Steps:
// 1. Start the agent with "web" (2 shards) and "old".
// 2. `apply --dry-run --prune` of a file that scales web to 4, adds "api"
//    and leaves out "old": the plan is printed; the state file is
//    byte-identical, no worker changed, api does not exist, old still
//    serves, and no event was published.
// 3. `diff --prune` shows the same plan with the changed field.
// 4. A dry run the agent refuses (api on web's address) fails like the real
//    call and changes nothing either.
TEST_F(OperatorTest, DryRunChangesNothing) {
  PF_ENTER_NETNS_OR_SKIP();
  Start(ListenerText("web", 8080, 2) + ListenerText("old", 8082, 1));
  ASSERT_TRUE(AllReady("web", 2)) << agent_.Log();
  ASSERT_TRUE(AllReady("old", 1)) << agent_.Log();
  const std::string state = StateFile();
  const std::set<pid_t> web = Pids("web");
  const std::set<pid_t> old = Pids("old");
  const std::string file = agent_.dir().WriteFile(
      "next.textproto",
      ListenerText("web", 8080, 4) + ListenerText("api", 8081, 1));
  const std::string since =
      absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone());

  CtlResult r = Ctl({"apply", "-f", file, "--dry-run", "--prune"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listener/web configured (dry run)\n"
            "listener/api created (dry run)\n"
            "listener/old deleted (dry run)\n");
  EXPECT_EQ(StateFile(), state);
  EXPECT_EQ(Pids("web"), web);
  EXPECT_EQ(Pids("old"), old);
  EXPECT_TRUE(Shards(*stub_, "api").empty());
  CtlResult events = Ctl({"events", "--since", since, "-o", "json"});
  EXPECT_EQ(events.code, 0) << events.err;
  EXPECT_EQ(events.out, "");

  r = Ctl({"diff", "-f", file, "--prune"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("listener/web: update (shards)\n"));
  EXPECT_THAT(r.out, HasSubstr("  -shards: 2\n  +shards: 4\n"));
  EXPECT_THAT(r.out, HasSubstr("listener/api: create\n"));
  EXPECT_THAT(r.out, HasSubstr("listener/old: delete\n"));
  EXPECT_THAT(r.out, HasSubstr("plan: 1 to create, 1 to update, 1 to delete, 0 "
                               "unchanged\n"));

  const std::string clash =
      agent_.dir().WriteFile("clash.textproto", ListenerText("api", 8080, 1));
  r = Ctl({"apply", "-f", clash, "--dry-run"});
  EXPECT_EQ(r.code, ctl::kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("listener/api: "));
  EXPECT_THAT(r.err, HasSubstr("127.0.0.1:8080"));
  EXPECT_EQ(StateFile(), state);
}

// Steps:
// 1. Start the agent with "web", "api" and "old"; load on web and api.
// 2. `apply --prune` of a file with web and api (unchanged).
// 3. Exactly old is deleted (its address refuses connections); web and api
//    keep their workers; the loads saw no failure.
TEST_F(OperatorTest, PruneDeletesExactlyTheOthersUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  const std::string keep =
      ListenerText("web", 8080, 2) + ListenerText("api", 8081, 2);
  Start(keep + ListenerText("old", 8082, 1));
  ASSERT_TRUE(AllReady("web", 2)) << agent_.Log();
  ASSERT_TRUE(AllReady("api", 2)) << agent_.Log();
  ASSERT_TRUE(AllReady("old", 1)) << agent_.Log();
  const std::set<pid_t> web = Pids("web");
  const std::set<pid_t> api = Pids("api");
  const std::string file = agent_.dir().WriteFile("keep.textproto", keep);

  std::atomic<bool> stop{false};
  auto load_web = std::async(std::launch::async, [&] {
    return loadgen::Run(Load("127.0.0.1:8080"), &stop);
  });
  auto load_api = std::async(std::launch::async, [&] {
    return loadgen::Run(Load("127.0.0.1:8081"), &stop);
  });
  absl::SleepFor(absl::Milliseconds(500));
  CtlResult r = Ctl({"apply", "-f", file, "--prune"});
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> web_result = load_web.get();
  absl::StatusOr<loadgen::Result> api_result = load_api.get();
  EXPECT_EQ(r.code, 0) << r.err << "\n" << agent_.Log();
  EXPECT_EQ(r.out,
            "listener/web unchanged\n"
            "listener/api unchanged\n"
            "listener/old deleted\n");
  ASSERT_TRUE(web_result.ok()) << web_result.status();
  ASSERT_TRUE(api_result.ok()) << api_result.status();
  EXPECT_EQ(web_result->failures(), 0) << web_result->Summary();
  EXPECT_EQ(api_result->failures(), 0) << api_result->Summary();
  EXPECT_GT(web_result->ok(), 100);
  EXPECT_GT(api_result->ok(), 100);

  v1::ListListenersResponse list;
  ASSERT_TRUE(stub_->ListListeners(RpcContext().get(), {}, &list).ok());
  std::set<std::string> names;
  for (const v1::ListenerState& l : list.listeners()) {
    names.insert(l.spec().name());
  }
  EXPECT_EQ(names, (std::set<std::string>{"api", "web"}));
  EXPECT_EQ(Pids("web"), web);
  EXPECT_EQ(Pids("api"), api);
  EXPECT_THAT(StateFile(), Not(HasSubstr("\"old\"")));
  EXPECT_EQ(HttpGet("127.0.0.1:8082").outcome, Outcome::kRefused);
}

// Steps:
// 1. Start the agent with "web".
// 2. `apply` a listener whose worker always exits (/bin/false).
// 3. apply exits 1, does not say "created", and says the listener does not
//    serve and why.
TEST_F(OperatorTest, ApplyOfAWorkerThatAlwaysExitsFails) {
  PF_ENTER_NETNS_OR_SKIP();
  Start(ListenerText("web", 8080, 1));
  ASSERT_TRUE(AllReady("web", 1)) << agent_.Log();
  const std::string file = agent_.dir().WriteFile(
      "bad.textproto",
      "listeners { name: \"bad\" address: \"127.0.0.1:8083\" shards: 1 "
      "worker { command: \"/bin/false\" } }\n");
  CtlResult r = Ctl({"apply", "-f", file, "--wait-timeout", "30s"});
  EXPECT_EQ(r.code, ctl::kExitAgentError) << r.out;
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err,
              HasSubstr("portfleetctl: listener/bad created but not serving: "
                        "shard 0: "));
}

// Steps:
// 1. Start the agent with "web" (1 shard); scale it to 2 through the API.
// 2. `events --since 1m` (no -f) prints what happened before the call (the
//    new shard started) and exits 0; `events --since` a time after that
//    prints nothing.
TEST_F(OperatorTest, EventsSinceShowsWhatHappenedBefore) {
  PF_ENTER_NETNS_OR_SKIP();
  Start(ListenerText("web", 8080, 1));
  ASSERT_TRUE(AllReady("web", 1)) << agent_.Log();
  ASSERT_TRUE(ScaleTo(*stub_, "web", 2).ok());
  ASSERT_TRUE(AllReady("web", 2)) << agent_.Log();
  const pid_t added = Shards(*stub_, "web").back().pid();

  CtlResult r = Ctl({"events", "--since", "1m", "--type", "shard-started",
                     "--listener", "web", "-o", "json"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat("\"shard\":1,\"pid\":", added)));
  absl::SleepFor(absl::Milliseconds(10));
  const std::string later =
      absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone());
  r = Ctl({"events", "--since", later});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "");
}

std::string Cmdline(pid_t pid) {
  std::string raw = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/cmdline"));
  for (char& c : raw) {
    if (c == '\0') c = ' ';
  }
  return raw;
}

// Steps:
// 1. Start the agent with "web" (4 shards); `rollout start --wait` new
//    worker arguments; every shard runs them.
// 2. Under load: `rollout undo --wait`.
// 3. Every shard runs a new worker with the previous arguments; the load saw
//    no failure; `rollout history` lists the undo and the first rollout.
TEST_F(OperatorTest, RolloutUndoUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  Start(ListenerText("web", 8080, 4));
  ASSERT_TRUE(AllReady("web", 4)) << agent_.Log();
  CtlResult r = Ctl({"rollout", "start", "web", "--wait", "--worker-args",
                     "--mode=http --drain-timeout=7s", "--max-surge", "2"});
  ASSERT_EQ(r.code, 0) << r.err << agent_.Log();
  ASSERT_TRUE(AllReady("web", 4)) << agent_.Log();
  std::set<pid_t> rolled = Pids("web");
  for (pid_t pid : rolled) {
    EXPECT_THAT(Cmdline(pid), HasSubstr("--drain-timeout=7s"));
  }

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load("127.0.0.1:8080"), &stop);
  });
  absl::SleepFor(absl::Milliseconds(500));
  r = Ctl({"rollout", "undo", "web", "--wait"});
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_EQ(r.code, 0) << r.err << agent_.Log();
  EXPECT_EQ(r.out, "listener/web rolled out (portfleet-worker --mode=http)\n");
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 100);

  std::vector<v1::Shard> shards = Shards(*stub_, "web");
  ASSERT_EQ(shards.size(), 4u);
  for (const v1::Shard& shard : shards) {
    EXPECT_EQ(rolled.count(shard.pid()), 0u) << "shard " << shard.index();
    EXPECT_THAT(Cmdline(shard.pid()), Not(HasSubstr("--drain-timeout")))
        << "shard " << shard.index();
  }
  EXPECT_THAT(StateFile(), Not(HasSubstr("--drain-timeout")));
  r = Ctl({"rollout", "history", "web", "--no-headers", "-o", "name"});
  EXPECT_EQ(r.out, "rollout/web/2\nrollout/web/1\n");
  r = Ctl({"rollout", "status", "web"});
  EXPECT_THAT(r.out, HasSubstr("rollout web/2 (undo) succeeded: 4 of 4"));
}

// Steps:
// 1. Start the agent with "web" (4 shards); under load, `rollout start`
//    (one shard at a time, returns at once) and `rollout pause` at once.
// 2. The rollout stays paused with fewer than 4 shards rolled.
// 3. `rollout undo`: the rolled shards go back; `rollout status --watch`
//    ends rolled-back (exit 1); every shard runs the original arguments;
//    the load saw no failure.
TEST_F(OperatorTest, RolloutPauseThenUndoUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  Start(ListenerText("web", 8080, 4));
  ASSERT_TRUE(AllReady("web", 4)) << agent_.Log();
  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load("127.0.0.1:8080"), &stop);
  });
  absl::SleepFor(absl::Milliseconds(300));
  CtlResult r = Ctl({"rollout", "start", "web", "--worker-args",
                     "--mode=http --drain-timeout=7s"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listener/web rollout web/1 started (portfleet-worker --mode=http "
            "--drain-timeout=7s)\n");
  r = Ctl({"rollout", "pause", "web", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(R"("state": "paused")"));
  // Shards in flight finish; no further one starts.
  absl::SleepFor(absl::Seconds(2));
  v1::GetRollOutRequest get;
  get.set_name("web");
  v1::GetRollOutResponse paused;
  ASSERT_TRUE(stub_->GetRollOut(RpcContext().get(), get, &paused).ok());
  EXPECT_EQ(paused.rollout().state(), v1::ROLL_OUT_STATE_PAUSED);
  EXPECT_LT(paused.rollout().shards_rolled(), 4u);
  absl::SleepFor(absl::Seconds(1));
  v1::GetRollOutResponse still;
  ASSERT_TRUE(stub_->GetRollOut(RpcContext().get(), get, &still).ok());
  EXPECT_EQ(still.rollout().shards_rolled(), paused.rollout().shards_rolled());

  r = Ctl({"rollout", "undo", "web"});
  ASSERT_EQ(r.code, 0) << r.err;
  r = Ctl({"rollout", "status", "web", "--watch", "--interval", "200ms"});
  EXPECT_EQ(r.code, ctl::kExitAgentError) << r.out;
  EXPECT_THAT(r.out, HasSubstr("rollout web/1 rolled-back"));
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  ASSERT_TRUE(AllReady("web", 4)) << agent_.Log();
  for (const v1::Shard& shard : Shards(*stub_, "web")) {
    EXPECT_THAT(Cmdline(shard.pid()), Not(HasSubstr("--drain-timeout")))
        << "shard " << shard.index();
  }
  EXPECT_THAT(StateFile(), Not(HasSubstr("--drain-timeout")));
}

}  // namespace
}  // namespace portfleet::testing
