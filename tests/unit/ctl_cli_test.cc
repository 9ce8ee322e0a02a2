// portfleetctl in-process: every command and output format against a
// FakeController behind a real ApiServer, and the exit codes for usage
// errors (2), agent errors (1), an unreachable agent (3), a socket this user
// may not open (4) and an agent that is shutting down (5).
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/netns.h"
#include "tests/unit/ctl_test_env.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::ctl {
namespace {

using ::portfleet::ctl::testing::Background;
using ::portfleet::ctl::testing::CtlTest;
using ::portfleet::ctl::testing::Result;
using ::portfleet::testing::FakeController;
using ::portfleet::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

CtlEnv Env(std::ostream* out, std::ostream* err) {
  CtlEnv env;
  env.out = out;
  env.err = err;
  return env;
}

TEST_F(CtlTest, ApplyCreatesUpdatesAndReportsUnchanged) {
  std::string spec = dir_.WriteFile("fleet.textproto", R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:8080"
      shards: 2
      worker { command: "portfleet-worker" }
    }
  )pb");
  Result r = Ctl({"apply", "-f", spec});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web created\n");
  r = Ctl({"apply", "-f", spec});
  EXPECT_EQ(r.out, "listener/web unchanged\n");
  spec = dir_.WriteFile("fleet.textproto", R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:8080"
      shards: 4
      worker { command: "portfleet-worker" }
    }
    listeners {
      name: "api"
      address: "127.0.0.1:9000"
      worker { command: "portfleet-worker" }
    }
  )pb");
  r = Ctl({"-o", "json", "apply", "-f", spec});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, R"({
  "listeners": [
    {
      "name": "web",
      "action": "configured",
      "changedFields": [
        "shards"
      ]
    },
    {
      "name": "api",
      "action": "created",
      "changedFields": []
    }
  ],
  "dryRun": false
}
)");
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 4u);
  r = Ctl({"apply", "-f", spec, "-o", "name"});
  EXPECT_EQ(r.out, "listener/web\nlistener/api\n");
}

TEST_F(CtlTest, ApplyFromStandardInput) {
  Result r = Ctl({"apply", "-f", "-"}, R"({"listeners": [{"name": "web",
      "address": "127.0.0.1:8080", "worker": {"command": "w"}}]})");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web created\n");
  r = Ctl({"apply", "-f", "-"},
          "listeners { name: \"api\" address: \"127.0.0.1:9000\" "
          "worker { command: \"w\" } }");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/api created\n");
  r = Ctl({"apply", "-f", "-"}, "listeners { nme: \"x\" }");
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("<stdin>:1:"));
}

TEST_F(CtlTest, ApplyStopsAtTheFirstRefusedListener) {
  ApplyWeb();
  // "db" takes web's address: the agent refuses it; "zz" is not tried.
  std::string spec = dir_.WriteFile("clash.textproto", R"pb(
    listeners {
      name: "db"
      address: "127.0.0.1:8080"
      worker { command: "w" }
    }
    listeners {
      name: "zz"
      address: "127.0.0.1:7000"
      worker { command: "w" }
    }
  )pb");
  Result r = Ctl({"apply", "-f", spec, "-o", "yaml"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.out, "listeners: []\ndryRun: false\n");
  EXPECT_THAT(r.err, StartsWith("portfleetctl: listener/db: address "
                                "127.0.0.1:8080 is taken"));
  EXPECT_THAT(r.err, HasSubstr("(ALREADY_EXISTS)"));
  EXPECT_FALSE(fake_.GetListener("zz").ok());
}

TEST_F(CtlTest, ApplyDryRunChangesNothing) {
  ApplyWeb();
  std::string spec = dir_.WriteFile("next.textproto", R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:8080"
      shards: 4
      worker { command: "portfleet-worker" args: "--mode=http" }
    }
    listeners {
      name: "new"
      address: "127.0.0.1:7000"
      worker { command: "w" }
    }
  )pb");
  Result r = Ctl({"apply", "-f", spec, "--dry-run", "--prune"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listener/web configured (dry run)\n"
            "listener/new created (dry run)\n"
            "listener/api deleted (dry run)\n");
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 2u);
  EXPECT_FALSE(fake_.GetListener("new").ok());
  EXPECT_TRUE(fake_.GetListener("api").ok());
  // A change the agent would refuse fails the dry run the same way.
  std::string clash = dir_.WriteFile("clash.textproto", R"pb(
    listeners {
      name: "db"
      address: "127.0.0.1:9000"
      worker { command: "w" }
    }
  )pb");
  r = Ctl({"apply", "-f", clash, "--dry-run"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, StartsWith("portfleetctl: listener/db: address "
                                "127.0.0.1:9000 is taken"));
  EXPECT_FALSE(fake_.GetListener("db").ok());
}

TEST_F(CtlTest, ApplyChecksEveryListenerBeforeChangingAny) {
  // "ok" and web's update are fine, "db" takes web's address: the agent's
  // check of db fails before ok is created or web changed.
  ApplyWeb();
  std::string bad = dir_.WriteFile("bad.textproto", R"pb(
    listeners {
      name: "ok"
      address: "127.0.0.1:7000"
      worker { command: "w" }
    }
    listeners {
      name: "web"
      address: "127.0.0.1:9000"
      worker { command: "w" }
    }
    listeners {
      name: "db"
      address: "127.0.0.1:8080"
      worker { command: "w" }
    }
  )pb");
  Result r = Ctl({"apply", "-f", bad});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, StartsWith("portfleetctl: listener/db: address "
                                "127.0.0.1:8080 is taken"));
  EXPECT_EQ(r.out, "");
  EXPECT_FALSE(fake_.GetListener("ok").ok());
  EXPECT_EQ(fake_.GetListener("web")->spec.address(), "127.0.0.1:8080");
}

TEST_F(CtlTest, ApplyPruneDeletesExactlyTheListenersNotInTheFile) {
  ApplyWeb();
  std::string spec = dir_.WriteFile("only-api.textproto", R"pb(
    listeners {
      name: "api"
      address: "127.0.0.1:9000"
      shards: 3
      worker { command: "portfleet-worker" }
      steering { policy: STEERING_POLICY_CPU }
    }
  )pb");
  Result r = Ctl({"apply", "-f", spec});
  EXPECT_EQ(r.out, "listener/api unchanged\n");
  EXPECT_TRUE(fake_.GetListener("web").ok());
  r = Ctl({"apply", "-f", spec, "--prune", "-o", "json"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, R"({
  "listeners": [
    {
      "name": "api",
      "action": "unchanged",
      "changedFields": []
    },
    {
      "name": "web",
      "action": "deleted",
      "changedFields": []
    }
  ],
  "dryRun": false
}
)");
  EXPECT_FALSE(fake_.GetListener("web").ok());
  EXPECT_TRUE(fake_.GetListener("api").ok());
}

TEST_F(CtlTest, ApplyOfAListenerThatNeverServesFails) {
  std::string spec = dir_.WriteFile("crash.textproto", R"pb(
    listeners {
      name: "bad"
      address: "127.0.0.1:7000"
      shards: 1
      worker { command: "crashes" }
    }
  )pb");
  Result r = Ctl({"apply", "-f", spec});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err,
            "portfleetctl: listener/bad created but not serving: shard 0: the "
            "worker keeps exiting (4 restarts; backoff: worker exited with "
            "status 1)\n");
}

TEST_F(CtlTest, DiffShowsTheAgentsPlan) {
  ApplyWeb();
  std::string spec = dir_.WriteFile("next.textproto", R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:8080"
      shards: 4
      worker { command: "portfleet-worker" args: "--mode=http" }
    }
    listeners {
      name: "new"
      address: "127.0.0.1:7000"
      worker { command: "w" }
    }
  )pb");
  Result r = Ctl({"diff", "-f", spec, "--prune"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, R"(listener/web: update (shards)
   name: "web"
   address: "127.0.0.1:8080"
  -shards: 2
  +shards: 4
   worker {
     command: "portfleet-worker"
     args: "--mode=http"
   }
listener/new: create
  +name: "new"
  +address: "127.0.0.1:7000"
  +worker {
  +  command: "w"
  +}
listener/api: delete
  -name: "api"
  -address: "127.0.0.1:9000"
  -shards: 3
  -worker {
  -  command: "portfleet-worker"
  -}
  -steering {
  -  policy: STEERING_POLICY_CPU
  -}
plan: 1 to create, 1 to update, 1 to delete, 0 unchanged
)");
  r = Ctl({"diff", "-f", spec, "-o", "name"});
  EXPECT_EQ(r.out, "listener/web\nlistener/new\n");
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 2u);
  EXPECT_FALSE(fake_.GetListener("new").ok());
}

TEST_F(CtlTest, EventsWithoutFollowPrintsTheHistoryAndExits) {
  fake_.Emit({v1::EVENT_TYPE_SHARD_EXITED, absl::Now() - absl::Minutes(20),
              "web", 0, 77, "old"});
  fake_.Emit({v1::EVENT_TYPE_SHARD_RESTARTED, absl::Now() - absl::Minutes(1),
              "web", 0, 78, "recent"});
  Result r = Ctl({"events", "--no-headers"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("old"));
  EXPECT_THAT(r.out, HasSubstr("recent"));
  r = Ctl({"events", "--since", "10m", "-o", "json"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, Not(HasSubstr("old")));
  EXPECT_THAT(r.out, StartsWith(R"({"type":"shard-restarted",)"));
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1);
  r = Ctl({"events", "--since", "yesterday"});
  EXPECT_EQ(r.code, kExitUsage);
  // -f --since: the history first, then new events.
  std::unique_ptr<Background> events =
      Start({"events", "-f", "--since", "10m", "--no-headers"});
  ASSERT_TRUE(events->WaitForOutput("recent"));
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  fake_.Emit(v1::EVENT_TYPE_ERROR, "web", "new one");
  ASSERT_TRUE(events->WaitForOutput("new one"));
  EXPECT_EQ(events->Stop(), 0);
  EXPECT_THAT(events->out(), Not(HasSubstr("old")));
}

TEST_F(CtlTest, ApplyBadFileIsUsageErrorWithFileName) {
  std::string spec =
      dir_.WriteFile("bad.textproto", "listeners { name: \"web\" shardz: 1 }");
  Result r = Ctl({"apply", "-f", spec});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, StartsWith("portfleetctl: "));
  EXPECT_THAT(r.err, HasSubstr("bad.textproto"));
  r = Ctl({"apply"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("apply: --filename FILE required"));
}

TEST_F(CtlTest, Status) {
  Result r = Ctl({"status"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out,
              StartsWith("VERSION   UPTIME   LISTENERS   SERVING   HEALTH    "
                         "BPF-STEERING\n9.8.7     1h2m     0           yes   "
                         "    serving   active\n"));
  r = Ctl({"status", "-o", "wide", "--no-headers"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, ::testing::MatchesRegex(
                         "9\\.8\\.7   1h2m   [0-9T:-]+Z   0   yes   serving   "
                         "active\n"));
  r = Ctl({"status", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(R"("version": "9.8.7")"));
  EXPECT_THAT(r.out, HasSubstr(R"("uptimeSeconds": 3725)"));
  EXPECT_THAT(r.out, HasSubstr(R"("bpfSteeringActive": true)"));
  r = Ctl({"status", "-o", "proto-json"});
  EXPECT_THAT(r.out, HasSubstr(R"("uptimeSeconds": "3725")"));
}

TEST_F(CtlTest, GetListeners) {
  EXPECT_EQ(Ctl({"get", "listeners"}).out, "No listeners.\n");
  EXPECT_EQ(Ctl({"get", "listeners", "-o", "name"}).out, "");
  ApplyWeb();
  Result r = Ctl({"get", "listeners"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "NAME   ADDRESS          SHARDS   READY   STEERING   WORKER\n"
            "api    127.0.0.1:9000   3        3/3     cpu        "
            "portfleet-worker\n"
            "web    127.0.0.1:8080   2        2/2     hash       "
            "portfleet-worker --mode=http\n");
  r = Ctl({"get", "listeners", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(R"("name": "api")"));
  EXPECT_THAT(r.out, HasSubstr(R"("policy": "cpu")"));
  r = Ctl({"get", "listeners", "-o", "proto-json"});
  EXPECT_THAT(r.out, HasSubstr(R"("policy": "STEERING_POLICY_CPU")"));
  EXPECT_EQ(Ctl({"get", "listeners", "-o", "name"}).out,
            "listener/api\nlistener/web\n");
}

TEST_F(CtlTest, GetListener) {
  ApplyWeb();
  Result r = Ctl({"get", "listener", "web"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, StartsWith("NAME   ADDRESS          SHARDS"));
  EXPECT_THAT(r.out, HasSubstr("\nweb    127.0.0.1:8080   2        2/2"));
  r = Ctl({"-o", "json", "get", "listener", "web"});
  EXPECT_THAT(r.out, HasSubstr(R"("address": "127.0.0.1:8080")"));

  r = Ctl({"get", "listener", "nosuch"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.err, "portfleetctl: listener \"nosuch\" not found (NOT_FOUND)\n");
  EXPECT_EQ(r.out, "");
}

TEST_F(CtlTest, GetShards) {
  ApplyWeb();
  Result r = Ctl({"get", "shards", "web"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "INDEX   STATE     READY   HEALTH    PID    CPU   RESTARTS   "
            "QUEUE   CONNECTIONS   SELECTED   MIGRATED   FALLBACK   ORPHANS   "
            "REASON\n"
            "0       running   yes     healthy   1000   0     0          0     "
            "  0             5          0          0          0         -\n"
            "1       running   yes     healthy   1001   1     0          1     "
            "  10            10         0          0          1         "
            "orphan pid 4242 (nc)\n");
  r = Ctl({"get", "shards", "web", "-o", "json"});
  EXPECT_THAT(r.out, HasSubstr(R"("state": "running")"));
  EXPECT_THAT(r.out, HasSubstr(R"("pid": 1001)"));
  EXPECT_THAT(r.out, HasSubstr(R"("activeConnections": 10)"));
  r = Ctl({"get", "shards", "web", "-o", "proto-json"});
  EXPECT_THAT(r.out, HasSubstr(R"("state": "SHARD_STATE_RUNNING")"));
  EXPECT_THAT(r.out, HasSubstr(R"("activeConnections": "10")"));
  EXPECT_EQ(Ctl({"get", "shards", "web", "-o", "name"}).out,
            "listener/web/shard/0\nlistener/web/shard/1\n");
}

TEST_F(CtlTest, GetShardsWatchPrintsChanges) {
  ApplyWeb();
  std::unique_ptr<Background> watch =
      Start({"get", "shards", "web", "--watch", "--interval", "100ms"});
  ASSERT_TRUE(watch->WaitForOutput("\n1       running")) << watch->err();
  ASSERT_EQ(Ctl({"scale", "web", "--shards", "3"}).code, 0);
  ASSERT_TRUE(watch->WaitForOutput("\n2       running")) << watch->out();
  ASSERT_EQ(Ctl({"drain", "web", "--shard", "2"}).code, 0);
  ASSERT_TRUE(watch->WaitForOutput("\n2       stopped")) << watch->out();
  EXPECT_EQ(watch->Stop(), 0) << watch->err();
  const std::string out = watch->out();
  // One header; rows printed later line up with the first table.
  EXPECT_EQ(out.find("INDEX"), 0u);
  EXPECT_EQ(out.find("INDEX", 1), std::string::npos);
  EXPECT_THAT(out, HasSubstr("\n2       running   yes     healthy   1002   2"));
  EXPECT_THAT(out, HasSubstr("\n2       stopped   no      -         -      2"));
}

TEST_F(CtlTest, GetShardsWatchJsonLines) {
  ApplyWeb();
  std::unique_ptr<Background> watch = Start(
      {"get", "shards", "web", "-w", "--interval", "100ms", "-o", "json"});
  ASSERT_TRUE(watch->WaitForOutput("\"index\":1,")) << watch->err();
  EXPECT_EQ(watch->Stop(), 0);
  std::vector<std::string> lines =
      absl::StrSplit(watch->out(), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0],
              StartsWith(R"({"index":0,"state":"running","pid":1000)"));
}

TEST_F(CtlTest, GetShardsWatchEndsWithTheListener) {
  ApplyWeb();
  std::unique_ptr<Background> watch =
      Start({"get", "shards", "web", "--watch", "--interval", "100ms"});
  ASSERT_TRUE(watch->WaitForOutput("\n1       running"));
  ASSERT_EQ(Ctl({"delete", "listener", "web"}).code, 0);
  EXPECT_EQ(watch->Join(), kExitAgentError);
  EXPECT_THAT(watch->err(), HasSubstr("not found (NOT_FOUND)"));
}

TEST_F(CtlTest, ScaleDrainSteerDelete) {
  ApplyWeb();
  Result r = Ctl({"scale", "web", "--shards", "4"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web scaled to 4 shards\n");
  r = Ctl({"drain", "web", "--shard=3"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web shard 3 drained\n");
  r = Ctl({"steer", "web", "--policy", "hash", "--weights", "1,2,3"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web steering set to hash (1,2,3)\n");
  r = Ctl({"-o", "json", "steer", "web", "--policy", "cpu"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(R"("policy": "cpu")"));
  r = Ctl({"-o", "name", "scale", "web", "--shards", "2"});
  EXPECT_EQ(r.out, "listener/web\n");
  r = Ctl({"rollout", "web", "--worker-command", "/opt/v2", "--worker-args",
           "--mode=echo  -v", "-o", "yaml"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("    worker:\n      command: /opt/v2\n"
                               "      args:\n      - \"--mode=echo\"\n"
                               "      - \"-v\"\n"));
  r = Ctl({"delete", "listener", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web deleted\n");
  r = Ctl({"delete", "listener", "web"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.err, "portfleetctl: listener \"web\" not found (NOT_FOUND)\n");
}

TEST_F(CtlTest, RolloutStartStatusPauseResumeUndoHistory) {
  ApplyWeb();
  fake_.hold_rollouts = true;
  Result r = Ctl({"rollout", "start", "web", "--worker-args", "--mode=echo"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listener/web rollout web/1 started (portfleet-worker "
            "--mode=echo)\n");
  r = Ctl({"rollout", "status", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "rollout web/1 rolling: 0 of 2 shards rolled\n"
            "  worker:   portfleet-worker --mode=echo\n"
            "  previous: portfleet-worker --mode=http\n");
  r = Ctl({"rollout", "pause", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web rollout web/1 paused: 0 of 2 shards rolled\n");
  r = Ctl({"rollout", "resume", "web", "-o", "json"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(R"("state": "rolling")"));
  // Another rollout while one runs is refused.
  r = Ctl({"rollout", "start", "web"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("already in progress (FAILED_PRECONDITION)"));
  fake_.FinishRollOut("web");
  r = Ctl({"rollout", "status", "web", "--watch", "--interval", "100ms"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "rollout web/1 succeeded: 2 of 2 shards rolled\n");
  r = Ctl({"rollout", "pause", "web"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("no rollout in progress"));

  // Undo with nothing in progress: the previous worker, rolled out.
  fake_.hold_rollouts = false;
  r = Ctl({"rollout", "undo", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listener/web rollout web/2 started (portfleet-worker "
            "--mode=http)\n");
  EXPECT_EQ(fake_.GetListener("web")->spec.worker().args(0), "--mode=http");

  // Undo of a rollout in progress: it rolls back; status says so (exit 1).
  fake_.hold_rollouts = true;
  ASSERT_EQ(Ctl({"rollout", "start", "web", "--worker-args", "x"}).code, 0);
  r = Ctl({"rollout", "undo", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web rollout web/3 rolled-back\n");
  r = Ctl({"rollout", "status", "web", "--watch"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.out, StartsWith("rollout web/3 rolled-back: 0 of 2 shards "
                                "rolled (rollout web/3 undone by request)"));

  r = Ctl({"rollout", "history", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "ROLLOUT        STATE         SHARDS   STARTED                "
            "ENDED                  WORKER\n"
            "web/3          rolled-back   0/2      2023-11-14T22:13:20Z   -"
            "                      portfleet-worker x\n"
            "web/2 (undo)   succeeded     2/2      2023-11-14T22:13:20Z   "
            "2023-11-14T22:14:20Z   portfleet-worker --mode=http\n"
            "web/1          succeeded     2/2      2023-11-14T22:13:20Z   "
            "2023-11-14T22:14:20Z   portfleet-worker --mode=echo\n");
  r = Ctl({"rollout", "history", "web", "-o", "name"});
  EXPECT_EQ(r.out, "rollout/web/3\nrollout/web/2\nrollout/web/1\n");
  r = Ctl({"rollout", "status", "nosuch"});
  EXPECT_EQ(r.code, kExitAgentError);
}

TEST_F(CtlTest, AgentErrorsExitOne) {
  ApplyWeb();
  Result r = Ctl({"scale", "web", "--shards", "0"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.err,
            "portfleetctl: shards: 0 is out of range (1-64) "
            "(INVALID_ARGUMENT)\n");
  EXPECT_EQ(Ctl({"drain", "web", "--shard", "9"}).code, kExitAgentError);
  fake_.bpf_active = false;
  r = Ctl({"steer", "web", "--policy", "hash"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("FAILED_PRECONDITION"));
  r = Ctl({"rollout", "web", "--worker-command", "fails-to-start"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("rolled back (FAILED_PRECONDITION)"));
}

TEST_F(CtlTest, GetSpecRoundTripsThroughApply) {
  ApplyWeb();
  ASSERT_EQ(Ctl({"steer", "web", "--policy", "hash", "--weights", "1,3"}).code,
            0);
  // Another agent (fake) to copy the fleet to.
  FakeController other;
  const std::string other_address = "unix://" + dir_.path() + "/other.sock";
  ApiServerOptions options;
  options.address = other_address;
  auto other_server = ApiServer::Start(options, &other);
  ASSERT_TRUE(other_server.ok()) << other_server.status();

  for (const std::string format : {"textproto", "json"}) {
    SCOPED_TRACE(format);
    Result spec = Ctl({"get", "spec", "-o", format});
    ASSERT_EQ(spec.code, 0) << spec.err;
    const std::string file = dir_.WriteFile(
        format == "json" ? "spec.json" : "spec.textproto", spec.out);
    // Applied back to the same agent: nothing to do.
    Result r = Ctl({"apply", "-f", file});
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(r.out, "listener/api unchanged\nlistener/web unchanged\n");
    // Applied to another agent: the same spec, byte for byte.
    r = Ctl({"--server", other_address, "apply", "-f", "-"}, spec.out);
    EXPECT_EQ(r.code, 0) << r.err;
    r = Ctl({"--server", other_address, "get", "spec", "-o", format});
    EXPECT_EQ(r.out, spec.out);
    for (const char* name : {"api", "web"}) {
      ASSERT_EQ(
          Ctl({"--server", other_address, "delete", "listener", name}).code, 0);
    }
  }
}

TEST_F(CtlTest, GetSpecOfOneListener) {
  ApplyWeb();
  Result r = Ctl({"get", "spec", "api"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "listeners {\n"
            "  name: \"api\"\n"
            "  address: \"127.0.0.1:9000\"\n"
            "  shards: 3\n"
            "  worker {\n"
            "    command: \"portfleet-worker\"\n"
            "  }\n"
            "  steering {\n"
            "    policy: STEERING_POLICY_CPU\n"
            "  }\n"
            "}\n");
  r = Ctl({"get", "spec", "nosuch"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("not found (NOT_FOUND)"));
  r = Ctl({"get", "spec", "-o", "table"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("use one of textproto, json, yaml"));
}

TEST_F(CtlTest, Health) {
  Result r = Ctl({"health"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  EXPECT_THAT(r.err, HasSubstr("not serving"));
  server_->SetServing(true);
  r = Ctl({"health"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  r = Ctl({"health", "--service", "portfleet.v1.FleetService", "-o", "json"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "{\n  \"status\": \"serving\"\n}\n");
  r = Ctl({"health", "-o", "proto-json"});
  EXPECT_EQ(r.out, "{\n \"status\": \"SERVING\"\n}\n");
  r = Ctl({"health", "--service", "no.such.Service"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_THAT(r.err, HasSubstr("(NOT_FOUND)"));
}

TEST_F(CtlTest, Version) {
  Result r = Ctl({"version"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("Client: "));
  EXPECT_THAT(r.out, HasSubstr("Server: 9.8.7\n"));
  r = Ctl({"version", "-o", "json"});
  EXPECT_THAT(r.out, HasSubstr("\"server\": \"9.8.7\""));
  r = Ctl({"version", "-o", "json", "--server",
           "unix://" + dir_.path() + "/nothing.sock", "--timeout", "1s"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("\"client\": "));
  EXPECT_THAT(r.out, Not(HasSubstr("\"server\"")));
  EXPECT_THAT(r.out, HasSubstr("\"serverError\": \"cannot reach the agent"));
}

TEST_F(CtlTest, EventsFollowsUntilInterrupted) {
  ApplyWeb();
  std::unique_ptr<Background> events = Start({"events", "-f", "-o", "json"});
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  fake_.Emit(v1::EVENT_TYPE_DRAIN_BEGUN, "web", "draining", 1);
  ASSERT_TRUE(events->WaitForOutput("\n"));
  EXPECT_EQ(events->Stop(), 0) << events->err();
  EXPECT_THAT(events->out(),
              StartsWith(R"({"type":"drain-begun","timeUnixMicros":)"));
  EXPECT_THAT(
      events->out(),
      HasSubstr(
          R"("listener":"web","shard":1,"pid":1234,"message":"draining"})"));
}

TEST_F(CtlTest, EventsTable) {
  std::unique_ptr<Background> events = Start({"events", "--follow"});
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  fake_.Emit(v1::EVENT_TYPE_SHARD_RESTARTED, "web", "exit status 1", 2);
  ASSERT_TRUE(events->WaitForOutput("exit status 1"));
  events->Stop();
  EXPECT_THAT(events->out(),
              StartsWith("TIME                       TYPE                "
                         "LISTENER         SHARD   PID      MESSAGE\n"));
  EXPECT_THAT(events->out(),
              HasSubstr("Z   shard-restarted     web              2       "
                        "1234     exit status 1\n"));
}

TEST_F(CtlTest, EventsFilterByType) {
  std::unique_ptr<Background> events =
      Start({"events", "-f", "--type", "error",
             "--type=drain-done,shard-exited", "--no-headers", "-o", "yaml"});
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  fake_.Emit(v1::EVENT_TYPE_SHARD_RESTARTED, "web", "not shown", 2);
  fake_.Emit(v1::EVENT_TYPE_DRAIN_DONE, "web", "drained", 2);
  fake_.Emit(v1::EVENT_TYPE_ERROR, "api", "bad", -1);
  ASSERT_TRUE(events->WaitForOutput("message: bad\n"));
  events->Stop();
  const std::string out = events->out();
  EXPECT_THAT(out, StartsWith("---\ntype: drain-done\n"));
  EXPECT_THAT(out, HasSubstr("---\ntype: error\n"));
  EXPECT_THAT(out, Not(HasSubstr("not shown")));
}

TEST_F(CtlTest, EventsEndWhenTheAgentShutsDown) {
  std::unique_ptr<Background> events = Start({"events", "-f"});
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  server_->Shutdown();
  EXPECT_EQ(events->Join(), kExitShuttingDown);
  EXPECT_THAT(events->err(), StartsWith("portfleetctl: the agent at unix://"));
  EXPECT_THAT(events->err(), HasSubstr("is shutting down"));
}

// A controller that is closing: every call fails as the agent's does.
class ClosingController : public FakeController {
 public:
  absl::StatusOr<std::vector<ListenerStatus>> ListListeners() override {
    return absl::UnavailableError("the agent is shutting down");
  }
};

TEST(CtlShuttingDownTest, ExitsFive) {
  TempDir dir;
  ClosingController closing;
  ApiServerOptions options;
  options.address = "unix://" + dir.path() + "/api.sock";
  auto server = ApiServer::Start(options, &closing);
  ASSERT_TRUE(server.ok()) << server.status();
  std::ostringstream out, err;
  EXPECT_EQ(::portfleet::ctl::Run(Env(&out, &err), {"--server", options.address,
                                                    "get", "listeners"}),
            kExitShuttingDown);
  EXPECT_EQ(err.str(), "portfleetctl: the agent at " + options.address +
                           " is shutting down (the agent is shutting down); "
                           "retry once it, or the agent taking over from it, "
                           "serves\n");
}

TEST_F(CtlTest, TopShowsShardsAndShare) {
  ApplyWeb();
  Result r = Ctl({"top", "web", "--iterations", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("LISTENER   SHARD   STATE     HEALTH    PID    "
                               "CONNECTIONS   CPU%   BYTES/S   REQ/S   QUEUE  "
                               " ACCEPTED   SLOTS   SHARE\n"));
  // selected counters 5 and 10 -> 33% and 66%.
  EXPECT_THAT(r.out,
              HasSubstr("web        0       running   healthy   1000   0  "
                        "           0      -         -       0       0      "
                        "    -       33%\n"));
  // Connections 0 and 10 over 2 ready shards.
  EXPECT_THAT(r.out, HasSubstr("web: imbalance 2.00 (max/mean connections "
                               "over 2 ready shards); rebalance off\n"));
  EXPECT_THAT(r.out, HasSubstr("66%"));
  EXPECT_THAT(r.out, Not(HasSubstr("api ")));
  r = Ctl({"top", "-o", "json", "--iterations", "2", "--interval", "100ms"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2);
}

TEST_F(CtlTest, UsageErrorsExitTwo) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{
           {},
           {"frobnicate"},
           {"get"},
           {"get", "widgets"},
           {"get", "listener"},
           {"get", "listener", "a", "b"},
           {"get", "spec", "-o", "wide"},
           {"scale", "web"},
           {"scale", "web", "--shards", "many"},
           {"steer", "web", "--policy", "random"},
           {"steer", "web", "--policy", "hash", "--weights", "1,x"},
           {"status", "-o", "xml"},
           {"status", "-o", "name"},
           {"status", "--timeout", "soon"},
           {"status", "--shards", "3"},
           {"status", "--bogus"},
           {"status", "--no-headers=maybe"},
           {"--shards", "3", "scale", "web"},
           {"drain", "web"},
           {"events", "--type", "bogus"},
           {"top", "--interval", "10ms"},
           {"get", "shards", "web", "--watch", "--interval", "soon"},
           {"events", "-f", "x"},
           {"apply", "-f"},
           {"completion", "fish"},
           {"man", "-o", "json"},
           {"--server"},
       }) {
    Result r = Ctl(args);
    EXPECT_EQ(r.code, kExitUsage) << ::testing::PrintToString(args);
    EXPECT_THAT(r.err, HasSubstr("portfleetctl: "));
    EXPECT_EQ(r.out, "");
  }
  Result r = Ctl({"get", "widgets"});
  EXPECT_THAT(r.err, StartsWith("portfleetctl: unknown command \"get "
                                "widgets\"; did you mean get listeners |"));
  r = Ctl({"events", "--type", "bogus"});
  EXPECT_THAT(r.err, HasSubstr("--type: 'bogus' is not one of shard-started, "
                               "shard-exited, shard-restarted"));
  EXPECT_THAT(r.err, HasSubstr("Run 'portfleetctl events --help' for usage."));
}

TEST_F(CtlTest, TheAgentsApiFlagPointsToServer) {
  Result r = Ctl({"status", "--api", "unix:///tmp/x.sock"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("status: unknown flag --api (the agent's API "
                               "address is --server here)"));
}

TEST_F(CtlTest, HelpOnEveryCommandHasAnExample) {
  Result r = Ctl({"--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("Exit codes:\n  0   ok\n"));
  EXPECT_THAT(r.out, HasSubstr("  5   the agent is shutting down"));
  EXPECT_THAT(r.out, Not(HasSubstr("__complete")));
  r = Ctl({"get", "--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("  get spec [NAME]"));
  for (const std::vector<std::string>& cmd :
       std::vector<std::vector<std::string>>{{"status"},
                                             {"get", "listeners"},
                                             {"get", "listener"},
                                             {"get", "shards"},
                                             {"get", "spec"},
                                             {"events"},
                                             {"top"},
                                             {"health"},
                                             {"version"},
                                             {"apply"},
                                             {"delete", "listener"},
                                             {"scale"},
                                             {"drain"},
                                             {"steer"},
                                             {"rollout"},
                                             {"rollout", "start"},
                                             {"rollout", "status"},
                                             {"rollout", "pause"},
                                             {"rollout", "resume"},
                                             {"rollout", "undo"},
                                             {"rollout", "history"},
                                             {"diff"},
                                             {"completion"},
                                             {"man"}}) {
    std::vector<std::string> args = cmd;
    args.push_back("--help");
    r = Ctl(args);
    EXPECT_EQ(r.code, 0) << cmd[0];
    EXPECT_THAT(r.out, ::testing::ContainsRegex("Examples?:\n(  # .*\n)?  "));
    EXPECT_THAT(r.out, HasSubstr("\nUsage:\n  portfleetctl [global flags] " +
                                 absl::StrJoin(cmd, " ")));
  }
}

TEST(CtlUnreachableTest, ExitsThree) {
  TempDir dir;
  std::ostringstream out, err;
  CtlEnv env = Env(&out, &err);
  const std::string server = "unix://" + dir.path() + "/absent.sock";
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"status"},
                                             {"get", "listeners"},
                                             {"scale", "web", "--shards", "2"},
                                             {"health"},
                                             {"events"}}) {
    std::vector<std::string> full = {"--server", server, "--timeout", "1s"};
    full.insert(full.end(), args.begin(), args.end());
    err.str("");
    EXPECT_EQ(::portfleet::ctl::Run(env, full), kExitUnreachable) << args[0];
    EXPECT_EQ(err.str(), "portfleetctl: cannot reach the agent at " + server +
                             ": no socket at " + dir.path() +
                             "/absent.sock (is portfleet-agent running? set "
                             "--server or PORTFLEET_SERVER)\n");
  }
}

TEST(CtlUnreachableTest, StaleSocketIsConnectionRefused) {
  TempDir dir;
  const std::string path = dir.path() + "/stale.sock";
  {
    // Bound, never listened on: connect() is refused.
    Fd fd(::socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(
        ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  }
  std::ostringstream out, err;
  EXPECT_EQ(::portfleet::ctl::Run(Env(&out, &err),
                                  {"--server", "unix:" + path, "status"}),
            kExitUnreachable);
  EXPECT_THAT(err.str(),
              HasSubstr("nothing listens on " + path + " (connection refused"));
}

TEST(CtlUnreachableTest, TcpAgentAbsentFailsFast) {
  std::ostringstream out, err;
  const absl::Time start = absl::Now();
  // Port 1 on loopback: nothing listens, the connection is refused at once.
  EXPECT_EQ(::portfleet::ctl::Run(Env(&out, &err),
                                  {"--server", "127.0.0.1:1", "status"}),
            kExitUnreachable);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_THAT(err.str(),
              StartsWith("portfleetctl: cannot reach the agent at "
                         "127.0.0.1:1 (is portfleet-agent running?"));
}

TEST(CtlUnreachableTest, ServerFromEnvironment) {
  TempDir dir;
  std::ostringstream out, err;
  const std::string server = "unix://" + dir.path() + "/env.sock";
  CtlEnv env = Env(&out, &err);
  env.getenv = [&](const std::string& n) -> std::optional<std::string> {
    if (n == "PORTFLEET_SERVER") return server;
    return std::nullopt;
  };
  EXPECT_EQ(::portfleet::ctl::Run(env, {"--timeout", "500ms", "status"}),
            kExitUnreachable);
  EXPECT_THAT(err.str(), HasSubstr(server));
}

// The API socket as the agent makes it (0660 in a 0750 directory of its
// --api-group, here "daemon"), and portfleetctl run by a user outside that
// group (nobody) in a child process: exit 4 and how to get access.
TEST(CtlPermissionTest, SocketThisUserMayNotOpenExitsFour) {
  if (geteuid() != 0) {
    PF_SKIP_OR_FAIL("needs root to run portfleetctl as another user");
  }
  const group* daemon = getgrnam("daemon");
  ASSERT_NE(daemon, nullptr);
  const gid_t gid = daemon->gr_gid;
  TempDir dir;
  ASSERT_EQ(::chmod(dir.path().c_str(), 0755), 0);
  const std::string run = dir.path() + "/run";
  ASSERT_EQ(::mkdir(run.c_str(), 0750), 0);
  ASSERT_EQ(::chown(run.c_str(), 0, gid), 0);
  const std::string path = run + "/api.sock";
  Fd listener(::socket(AF_UNIX, SOCK_STREAM, 0));
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(
      ::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
      0);
  ASSERT_EQ(::listen(listener.get(), 4), 0);
  ASSERT_EQ(::chown(path.c_str(), 0, gid), 0);
  ASSERT_EQ(::chmod(path.c_str(), 0660), 0);

  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipe_fds[0]);
    if (::setgroups(0, nullptr) != 0 || ::setresgid(65534, 65534, 65534) != 0 ||
        ::setresuid(65534, 65534, 65534) != 0) {
      ::_exit(100);
    }
    std::ostringstream out, err;
    int code = ::portfleet::ctl::Run(Env(&out, &err),
                                     {"--server", "unix://" + path, "status"});
    const std::string text = err.str();
    (void)!::write(pipe_fds[1], text.data(), text.size());
    ::_exit(code);
  }
  ::close(pipe_fds[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = ::read(pipe_fds[0], buf, sizeof(buf))) > 0;) {
    text.append(buf, n);
  }
  ::close(pipe_fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kExitPermissionDenied) << text;
  EXPECT_EQ(text, "portfleetctl: permission denied on the agent's API socket " +
                      path + " (unix://" + path +
                      "): run portfleetctl as root or as a member of group "
                      "'daemon' (usermod -aG daemon USER, then log in "
                      "again)\n");
}

}  // namespace
}  // namespace portfleet::ctl
