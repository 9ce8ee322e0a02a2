// portfleetctl in-process: every command's table and JSON output against a
// FakeController behind a real ApiServer, and the exit codes for usage
// errors (2), agent errors (1) and an unreachable agent (3).
#include <grpcpp/grpcpp.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "agent/api/server.h"
#include "ctl/ctl.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"
#include "tests/unit/api_fake_controller.h"

namespace portfleet::ctl {
namespace {

using ::portfleet::testing::FakeController;
using ::portfleet::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::StartsWith;

ApiServerOptions Options(const std::string& address) {
  ApiServerOptions options;
  options.address = address;
  return options;
}

CtlEnv Env(std::ostream* out, std::ostream* err,
           const std::atomic<bool>* interrupted = nullptr) {
  CtlEnv env;
  env.out = out;
  env.err = err;
  env.interrupted = interrupted;
  return env;
}

struct Result {
  int code;
  std::string out;
  std::string err;
};

class CtlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_address_ = "unix://" + dir_.path() + "/api.sock";
    auto server = ApiServer::Start(Options(server_address_), &fake_);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  // Runs portfleetctl with `args`, the server from PORTFLEET_SERVER.
  Result Ctl(std::vector<std::string> args) {
    std::ostringstream out, err;
    CtlEnv env;
    env.out = &out;
    env.err = &err;
    env.getenv = [this](const std::string& name) -> std::optional<std::string> {
      if (name == "PORTFLEET_SERVER") return server_address_;
      return std::nullopt;
    };
    int code = ::portfleet::ctl::Run(env, args);
    return {code, out.str(), err.str()};
  }

  void ApplyWeb() {
    std::string spec = dir_.WriteFile("fleet.textproto", R"pb(
      listeners {
        name: "web"
        address: "127.0.0.1:8080"
        shards: 2
        worker { command: "portfleet-worker" args: "--mode=http" }
      }
      listeners {
        name: "api"
        address: "127.0.0.1:9000"
        shards: 3
        worker { command: "portfleet-worker" }
        steering { policy: STEERING_POLICY_CPU }
      }
    )pb");
    Result r = Ctl({"apply", "-f", spec});
    ASSERT_EQ(r.code, 0) << r.err;
  }

  TempDir dir_;
  FakeController fake_;
  std::string server_address_;
  std::unique_ptr<ApiServer> server_;
};

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
  EXPECT_THAT(r.out, HasSubstr(R"({"name": "web", "action": "configured"})"));
  EXPECT_THAT(r.out, HasSubstr(R"({"name": "api", "action": "created"})"));
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 4u);
}

TEST_F(CtlTest, ApplyBadFileIsUsageErrorWithFileName) {
  std::string spec =
      dir_.WriteFile("bad.textproto", "listeners { name: \"web\" shardz: 1 }");
  Result r = Ctl({"apply", "-f", spec});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, StartsWith("portfleetctl: "));
  EXPECT_THAT(r.err, HasSubstr("bad.textproto"));
  EXPECT_EQ(Ctl({"apply"}).code, kExitUsage);
}

TEST_F(CtlTest, Status) {
  Result r = Ctl({"status"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, StartsWith("VERSION   UPTIME   LISTENERS   SERVING   "
                                "BPF-STEERING\n9.8.7     1h2m     0"));
  r = Ctl({"status", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(R"("version": "9.8.7")"));
  EXPECT_THAT(r.out, HasSubstr(R"("bpfSteeringActive": true)"));
}

TEST_F(CtlTest, GetListeners) {
  EXPECT_EQ(Ctl({"get", "listeners"}).out, "No listeners.\n");
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
  EXPECT_THAT(r.out, HasSubstr(R"("policy": "STEERING_POLICY_CPU")"));
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
            "INDEX   STATE     READY   PID    CPU   RESTARTS   QUEUE   "
            "CONNECTIONS   SELECTED   MIGRATED   FALLBACK\n"
            "0       running   yes     1000   0     0          0       0    "
            "         5          0          0\n"
            "1       running   yes     1001   1     0          1       10   "
            "         10         0          0\n");
  r = Ctl({"get", "shards", "web", "-o", "json"});
  EXPECT_THAT(r.out, HasSubstr(R"("state": "SHARD_STATE_RUNNING")"));
  EXPECT_THAT(r.out, HasSubstr(R"("pid": 1001)"));
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
  EXPECT_THAT(r.out, HasSubstr(R"("policy": "STEERING_POLICY_CPU")"));
  r = Ctl({"delete", "listener", "web"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "listener/web deleted\n");
  EXPECT_EQ(Ctl({"delete", "listener", "web"}).code, kExitAgentError);
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
}

TEST_F(CtlTest, Health) {
  Result r = Ctl({"health"});
  EXPECT_EQ(r.code, kExitAgentError);
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  server_->SetServing(true);
  r = Ctl({"health"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  r = Ctl({"health", "--service", "portfleet.v1.FleetService", "-o", "json"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "{\n  \"status\": \"SERVING\"\n}\n");
}

TEST_F(CtlTest, Version) {
  Result r = Ctl({"version"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("Client: "));
  EXPECT_THAT(r.out, HasSubstr("Server: 9.8.7\n"));
  r = Ctl({"version", "-o", "json", "--server",
           "unix://" + dir_.path() + "/nothing.sock", "--timeout", "1s"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("\"client\": "));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("server")));
}

TEST_F(CtlTest, EventsFollowsUntilInterrupted) {
  ApplyWeb();
  std::atomic<bool> interrupted{false};
  std::ostringstream out, err;
  CtlEnv env;
  env.out = &out;
  env.err = &err;
  env.interrupted = &interrupted;
  int code = -1;
  std::thread t([&] {
    code = ::portfleet::ctl::Run(
        env, {"--server", server_address_, "events", "-o", "json"});
  });
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  fake_.Emit(v1::EVENT_TYPE_DRAIN_BEGUN, "web", "draining", 1);
  absl::SleepFor(absl::Milliseconds(300));
  interrupted = true;
  t.join();
  EXPECT_EQ(code, 0) << err.str();
  EXPECT_THAT(out.str(), HasSubstr(R"("type":"EVENT_TYPE_DRAIN_BEGUN")"));
  EXPECT_THAT(out.str(), HasSubstr(R"("message":"draining")"));
}

TEST_F(CtlTest, EventsTable) {
  std::atomic<bool> interrupted{false};
  std::ostringstream out, err;
  CtlEnv env = Env(&out, &err, &interrupted);
  std::thread t([&] {
    ::portfleet::ctl::Run(env, {"--server", server_address_, "events"});
  });
  ASSERT_TRUE(::portfleet::testing::WaitFor(
      [&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  fake_.Emit(v1::EVENT_TYPE_SHARD_RESTARTED, "web", "exit status 1", 2);
  absl::SleepFor(absl::Milliseconds(300));
  interrupted = true;
  t.join();
  EXPECT_THAT(out.str(), StartsWith("TIME "));
  EXPECT_THAT(out.str(), HasSubstr("shard-restarted    web              2 "));
  EXPECT_THAT(out.str(), HasSubstr("exit status 1"));
}

TEST_F(CtlTest, TopShowsShardsAndShare) {
  ApplyWeb();
  Result r = Ctl({"top", "web", "--iterations", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("LISTENER   SHARD   STATE     PID    "
                               "CONNECTIONS   QUEUE   ACCEPTED   SHARE\n"));
  // selected counters 5 and 10 -> 33% and 66%.
  EXPECT_THAT(r.out, HasSubstr("web        0       running   1000   0  "
                               "           0       0          33%\n"));
  EXPECT_THAT(r.out, HasSubstr("66%"));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("api ")));
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
           {"scale", "web"},
           {"scale", "web", "--shards", "many"},
           {"steer", "web", "--policy", "random"},
           {"steer", "web", "--policy", "hash", "--weights", "1,x"},
           {"status", "-o", "yaml"},
           {"status", "--timeout", "soon"},
           {"status", "--shards", "3"},
           {"status", "--bogus"},
           {"drain", "web"},
           {"--server"},
       }) {
    Result r = Ctl(args);
    EXPECT_EQ(r.code, kExitUsage) << ::testing::PrintToString(args);
    EXPECT_THAT(r.err, HasSubstr("portfleetctl: "));
    EXPECT_EQ(r.out, "");
  }
}

TEST_F(CtlTest, HelpOnEveryCommandHasAnExample) {
  Result r = Ctl({"--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("Exit codes"));
  for (const std::vector<std::string>& cmd :
       std::vector<std::vector<std::string>>{{"status"},
                                             {"get", "listeners"},
                                             {"get", "listener"},
                                             {"get", "shards"},
                                             {"events"},
                                             {"top"},
                                             {"health"},
                                             {"version"},
                                             {"apply"},
                                             {"delete", "listener"},
                                             {"scale"},
                                             {"drain"},
                                             {"steer"}}) {
    std::vector<std::string> args = cmd;
    args.push_back("--help");
    r = Ctl(args);
    EXPECT_EQ(r.code, 0) << cmd[0];
    EXPECT_THAT(r.out, HasSubstr("Example:\n  portfleetctl " + cmd[0]));
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
    EXPECT_THAT(err.str(), StartsWith("portfleetctl: cannot reach the agent"));
    const std::string text = err.str();
    EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1);
  }
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

}  // namespace
}  // namespace portfleet::ctl
