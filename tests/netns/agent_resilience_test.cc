// Fault containment at start-up and across agent restarts (issue 9): one bad
// listener never takes the others down, a state that cannot be saved refuses
// changes without stopping service, what is persisted does not depend on the
// agent's working directory, workers of a listener that is no longer desired
// drain, and a rollout cut short by an agent crash does not leave two worker
// versions serving. Each case in its own network namespace; failures counted
// from the client side.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
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

std::string Listener(const std::string& name, int port,
                     const std::string& command, int shards = 2) {
  return absl::StrCat(
      "listeners {\n  name: \"", name, "\"\n  address: \"127.0.0.1:", port,
      "\"\n  shards: ", shards, "\n  worker { command: \"", command,
      "\" args: \"--mode=http\" }\n"
      "  drain_timeout_seconds: 5\n}\n");
}

std::map<uint32_t, pid_t> PidsByShard(v1::FleetService::Stub& stub,
                                      const std::string& name) {
  std::map<uint32_t, pid_t> out;
  for (const v1::Shard& s : Shards(stub, name)) out[s.index()] = s.pid();
  return out;
}

std::string ListenerError(v1::FleetService::Stub& stub,
                          const std::string& name) {
  v1::GetListenerRequest req;
  req.set_name(name);
  v1::GetListenerResponse resp;
  grpc::Status s = stub.GetListener(RpcContext().get(), req, &resp);
  if (!s.ok()) return "GetListener: " + s.error_message();
  return resp.listener().error();
}

loadgen::Options Load(int port) {
  loadgen::Options o;
  o.target = absl::StrCat("127.0.0.1:", port);
  o.rate = 300;
  o.duration = absl::Seconds(30);
  return o;
}

std::string CopyWorker(const TempDir& dir, const std::string& name) {
  std::string path = dir.path() + "/" + name;
  std::filesystem::copy_file(BinaryPath("portfleet-worker"), path);
  ::chmod(path.c_str(), 0755);
  return path;
}

// Steps:
// 1. Listeners web (the build's worker) and api (a copy of it); load on web.
// 2. SIGKILL the agent; kill api's workers and delete its binary.
// 3. Restart: web's workers are re-adopted (same pids) and web never fails a
//    connection; api is reported not serving (log, API); the loaded state
//    file is not rewritten.
// 4. Put the binary back: a retry starts api.
TEST(AgentResilienceTest, OneUnstartableListenerDoesNotStopTheOthers) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  std::string api_worker = CopyWorker(agent.dir(), "api-worker");
  ASSERT_TRUE(agent
                  .Start(Listener("web", 8080, "portfleet-worker") +
                         Listener("api", 8081, api_worker))
                  .ok());
  ASSERT_TRUE(agent.WaitServing("127.0.0.1:8080")) << agent.Log();
  ASSERT_TRUE(agent.WaitServing("127.0.0.1:8081")) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "api") == 2; },
                      absl::Seconds(10)));
  std::map<uint32_t, pid_t> web = PidsByShard(*stub, "web");
  std::map<uint32_t, pid_t> api = PidsByShard(*stub, "api");
  const std::string state_file = agent.state_dir() + "/fleet-state.textproto";
  std::string state = ReadFileOrEmpty(state_file);
  struct stat before {};
  ASSERT_EQ(::stat(state_file.c_str(), &before), 0);

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(Load(8080), &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  agent.process().Signal(SIGKILL);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(5)).has_value());
  for (const auto& [shard, pid] : api) ::kill(pid, SIGKILL);
  ASSERT_EQ(::unlink(api_worker.c_str()), 0);
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("listener api is not serving: ")) << agent.Log();
  stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return PidsByShard(*stub, "web") == web; },
                      absl::Seconds(10)))
      << agent.Log();
  EXPECT_THAT(ListenerError(*stub, "api"),
              HasSubstr("is not an executable file"));
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  struct stat after {};
  ASSERT_EQ(::stat(state_file.c_str(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino) << "the state file was rewritten";
  EXPECT_EQ(ReadFileOrEmpty(state_file), state);

  CopyWorker(agent.dir(), "api-worker");
  EXPECT_TRUE(agent.WaitServing("127.0.0.1:8081", absl::Seconds(20)))
      << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return ReadyShards(*stub, "api") == 2; },
                      absl::Seconds(10)));
  EXPECT_EQ(ListenerError(*stub, "api"), "");
}

// Steps:
// 1. The state directory is a 1 MiB tmpfs (private mount namespace).
// 2. Start, then fill the tmpfs.
// 3. Restart with the (loaded) state: it serves; a scale is refused with
//    RESOURCE_EXHAUSTED and changes nothing; the state file is intact.
// 4. Free the space: the same scale succeeds.
TEST(AgentResilienceTest, FullStateDirRefusesChangesAndKeepsServing) {
  PF_ENTER_NETNS_OR_SKIP();
  ASSERT_EQ(::unshare(CLONE_NEWNS), 0) << strerror(errno);
  ASSERT_EQ(::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr), 0);
  AgentHarness agent;
  ::mkdir(agent.state_dir().c_str(), 0700);
  ASSERT_EQ(::mount("tmpfs", agent.state_dir().c_str(), "tmpfs", 0,
                    "size=1m,mode=0700"),
            0)
      << strerror(errno);
  ASSERT_TRUE(agent.Start(Listener("web", 8080, "portfleet-worker")).ok());
  ASSERT_TRUE(agent.WaitServing("127.0.0.1:8080")) << agent.Log();
  const std::string state_file = agent.state_dir() + "/fleet-state.textproto";
  std::string state = ReadFileOrEmpty(state_file);
  ASSERT_THAT(state, HasSubstr("shards: 2"));
  {
    std::ofstream filler(agent.state_dir() + "/filler");
    std::string block(4096, 'x');
    while (filler.write(block.data(), block.size())) {
    }
  }
  agent.process().Signal(SIGTERM);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(15)).has_value());
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitServing("127.0.0.1:8080")) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  grpc::Status s = ScaleTo(*stub, "web", 3);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("nothing was changed"));
  EXPECT_EQ(Shards(*stub, "web").size(), 2u);
  EXPECT_EQ(ReadFileOrEmpty(state_file), state);
  ::unlink((agent.state_dir() + "/filler").c_str());
  s = ScaleTo(*stub, "web", 3);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_THAT(ReadFileOrEmpty(state_file), HasSubstr("shards: 3"));
  agent.process().Signal(SIGTERM);
  agent.process().Wait(absl::Seconds(15));
  ::umount2(agent.state_dir().c_str(), MNT_DETACH);
}

// Steps:
// 1. The agent starts in directory D; a listener is created through the API
//    with the relative command "./w" (a copy of the worker in D).
// 2. The persisted spec names D/w; the agent restarted from another
//    directory (after its workers were killed) starts the listener.
TEST(AgentResilienceTest, RelativeWorkerCommandIsStoredAbsolute) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  TempDir work;
  CopyWorker(work, "w");
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof(cwd)), nullptr);
  ASSERT_EQ(::chdir(work.path().c_str()), 0);
  absl::Status started = agent.Start("");
  ASSERT_EQ(::chdir(cwd), 0);
  ASSERT_TRUE(started.ok());
  auto stub = FleetStub(agent.api_socket());
  v1::CreateListenerRequest req;
  req.mutable_listener()->set_name("web");
  req.mutable_listener()->set_address("127.0.0.1:8080");
  req.mutable_listener()->set_shards(1);
  req.mutable_listener()->mutable_worker()->set_command("./w");
  v1::CreateListenerResponse resp;
  grpc::Status s = stub->CreateListener(RpcContext().get(), req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message() << agent.Log();
  EXPECT_EQ(resp.listener().spec().worker().command(), work.path() + "/w");
  EXPECT_THAT(ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto"),
              HasSubstr(absl::StrCat("command: \"", work.path(), "/w\"")));
  agent.process().Signal(SIGKILL);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(5)).has_value());
  KillOthersInPrivateNetns();
  ASSERT_TRUE(agent.Restart().ok());  // from the test's own directory
  EXPECT_TRUE(agent.WaitServing("127.0.0.1:8080")) << agent.Log();
}

// Steps:
// 1. Listeners web and api; SIGKILL the agent.
// 2. api is removed from the persisted state (as a delete that was
//    persisted but not carried out before a crash leaves it).
// 3. Restart: web's workers are re-adopted (same pids); api's workers are
//    told to drain and exit; nothing serves api's port afterwards.
TEST(AgentResilienceTest, WorkersOfAListenerNoLongerDesiredDrain) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(Listener("web", 8080, "portfleet-worker") +
                         Listener("api", 8081, "portfleet-worker"))
                  .ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor(
      [&] {
        return ReadyShards(*stub, "web") == 2 && ReadyShards(*stub, "api") == 2;
      },
      absl::Seconds(10)));
  std::map<uint32_t, pid_t> web = PidsByShard(*stub, "web");
  std::map<uint32_t, pid_t> api = PidsByShard(*stub, "api");
  agent.process().Signal(SIGKILL);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(5)).has_value());
  const std::string state_file = agent.state_dir() + "/fleet-state.textproto";
  std::string state = ReadFileOrEmpty(state_file);
  size_t api_at = state.find("listeners {\n  name: \"api\"");
  ASSERT_NE(api_at, std::string::npos) << state;
  size_t end = state.find("\n}\n", api_at);
  state.erase(api_at, end + 3 - api_at);
  std::ofstream(state_file) << state;
  ASSERT_TRUE(agent.Restart().ok());
  stub = FleetStub(agent.api_socket());
  EXPECT_TRUE(WaitFor([&] { return PidsByShard(*stub, "web") == web; },
                      absl::Seconds(10)))
      << agent.Log();
  EXPECT_TRUE(WaitFor(
      [&] {
        for (const auto& [shard, pid] : api) {
          if (ProcessExists(pid)) return false;
        }
        return true;
      },
      absl::Seconds(10)))
      << agent.Log();
  EXPECT_EQ(HttpGet("127.0.0.1:8081").outcome, Outcome::kRefused);
}

std::string Cmdline(pid_t pid) {
  std::string raw = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/cmdline"));
  for (char& c : raw) {
    if (c == '\0') c = ' ';
  }
  return raw;
}

// Steps:
// 1. Four shards; a rollout to a new version starts, one shard at a time,
//    whose workers take 1 s to start (a wrapper script that then runs the
//    worker with new arguments).
// 2. SIGKILL the agent after the first shard rolled; restart it.
// 3. Every shard ends up running the persisted (new) arguments: no old
//    version serves beside the new one; the persisted spec says the same.
TEST(AgentResilienceTest, AgentDeathMidRolloutDoesNotMixVersions) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Listener("web", 8080, "portfleet-worker", 4)).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 4; },
                      absl::Seconds(10)));
  std::string slow = agent.dir().WriteFile(
      "slow-worker.sh",
      absl::StrCat("#!/bin/sh\nsleep 1\nexec ", BinaryPath("portfleet-worker"),
                   " \"$@\"\n"));
  ::chmod(slow.c_str(), 0755);
  std::thread roll([&] {
    v1::RollOutListenerRequest req;
    req.set_name("web");
    req.mutable_worker()->set_command(slow);
    req.mutable_worker()->add_args("--mode=http");
    req.mutable_worker()->add_args("--drain-timeout=7s");
    v1::RollOutListenerResponse resp;
    stub->RollOutListener(RpcContext(30).get(), req, &resp);  // cut short
  });
  ASSERT_TRUE(WaitFor(
      [&] {
        int rolled = 0;
        for (const auto& [shard, pid] : PidsByShard(*stub, "web")) {
          if (absl::StrContains(Cmdline(pid), "--drain-timeout=7s")) rolled++;
        }
        return rolled >= 1;
      },
      absl::Seconds(10)));
  agent.process().Signal(SIGKILL);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(5)).has_value());
  roll.join();
  ASSERT_TRUE(agent.Restart().ok());
  stub = FleetStub(agent.api_socket());
  EXPECT_TRUE(WaitFor(
      [&] {
        std::map<uint32_t, pid_t> pids = PidsByShard(*stub, "web");
        if (pids.size() != 4 || ReadyShards(*stub, "web") != 4) return false;
        for (const auto& [shard, pid] : pids) {
          if (!absl::StrContains(Cmdline(pid), "--drain-timeout=7s")) {
            return false;
          }
        }
        return true;
      },
      absl::Seconds(15)))
      << agent.Log();
  EXPECT_THAT(ReadFileOrEmpty(agent.state_dir() + "/fleet-state.textproto"),
              HasSubstr("--drain-timeout=7s"));
  // And no process of the old version answers any more.
  EXPECT_TRUE(WaitFor(
      [&] {
        for (pid_t pid : ProcessesInMyNetns()) {
          std::string cmd = Cmdline(pid);
          if (absl::StrContains(cmd, "portfleet-worker") &&
              !absl::StrContains(cmd, "--drain-timeout=7s")) {
            return false;
          }
        }
        return true;
      },
      absl::Seconds(15)));
}

}  // namespace
}  // namespace portfleet::testing
