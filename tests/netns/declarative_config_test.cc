// Declarative mode (--config-mode=declarative): the real agent follows its
// --config file, in a private network namespace with BPF steering.
//
// KubeletSymlinkSwapsUnderLoad:
// 1. The config lives as the kubelet lays out a ConfigMap volume:
//    fleet.textproto -> ..data/fleet.textproto, ..data -> ..<generation>/.
//    Generation 1: listener web, 2 shards. Start the agent on it.
// 2. Continuous short-lived HTTP load on web at 500/s, every answer checked.
// 3. Swap ..data (new directory, symlink renamed over ..data, as the kubelet
//    does): web 4 shards and a new listener api. Wait until applied
//    (generation 2), 4 shards ready, api answers.
// 4. Swap: web 3 shards with a changed worker (an env var: a rollout shard
//    by shard), api removed. Wait until applied (generation 3): api is gone,
//    every web shard runs a worker with the new env.
// 5. Swap in a broken file (syntax error): rejected with the file, line and
//    column in GetStatus and a config-rejected event; the applied generation
//    stays 3 and web keeps its 3 shards.
// 6. Stop the load: 0 failed connections.
//
// FileChangedWhileAgentDownReadoptsThenReconciles: the agent is SIGKILLed,
// the file goes from 2 to 3 shards, the agent starts again: it re-adopts the
// two running workers (same pids) from its persisted state, then applies the
// file (a third shard).
//
// EditorRenameAndRefusedApiCalls:
// 1. A plain file, replaced by write-to-temp-and-rename (as editors do).
// 2. Every call that changes the desired state (scale, drain, create,
//    steer, rollout) fails with FAILED_PRECONDITION naming the file and the
//    mode; shard maintenance is allowed.
// 3. The rename is reconciled (2 -> 1 shard); removing the file is an
//    error, never an empty fleet; SIGHUP after it is back applies it.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

namespace fs = std::filesystem;

constexpr char kWeb[] = "127.0.0.1:8080";
constexpr char kApi[] = "127.0.0.1:8081";

std::string Web(int shards, const std::string& extra_worker = "") {
  return absl::StrCat(R"pb(listeners {
           name: "web"
           address: "127.0.0.1:8080"
           shards: )pb",
                      shards, R"pb(
           worker { command: "portfleet-worker" args: "--mode=http" )pb",
                      extra_worker, R"pb( }
           drain_timeout_seconds: 5
           steering { policy: STEERING_POLICY_HASH }
         }
)pb");
}

constexpr char kApiListener[] = R"pb(listeners {
                                       name: "api"
                                       address: "127.0.0.1:8081"
                                       shards: 1
                                       worker {
                                         command: "portfleet-worker"
                                         args: "--mode=http"
                                       }
                                       drain_timeout_seconds: 2
                                     }
)pb";

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

// A ConfigMap volume as the kubelet writes it (atomic_writer.go): each
// version in its own hidden directory, `..data` a symlink to the current
// one, replaced by renaming a new symlink over it; the file itself is a
// symlink through `..data`.
class ConfigMapVolume {
 public:
  explicit ConfigMapVolume(std::string dir) : dir_(std::move(dir)) {
    fs::create_directories(dir_);
  }
  std::string file() const { return dir_ + "/fleet.textproto"; }
  void Write(const std::string& text) {
    const std::string version = absl::StrCat("..2026_12_02_", ++n_);
    fs::create_directories(dir_ + "/" + version);
    WriteFile(absl::StrCat(dir_, "/", version, "/fleet.textproto"), text);
    fs::create_directory_symlink(version, dir_ + "/..data_tmp");
    fs::rename(dir_ + "/..data_tmp", dir_ + "/..data");
    if (!fs::is_symlink(file())) {
      fs::create_symlink("..data/fleet.textproto", file());
    }
    if (!old_.empty()) fs::remove_all(dir_ + "/" + old_);
    old_ = version;
  }

 private:
  std::string dir_;
  std::string old_;
  int n_ = 0;
};

v1::GetStatusResponse Status(v1::FleetService::Stub& stub) {
  v1::GetStatusResponse resp;
  grpc::Status s =
      stub.GetStatus(RpcContext().get(), v1::GetStatusRequest(), &resp);
  if (!s.ok()) resp.Clear();
  return resp;
}

bool WaitApplied(v1::FleetService::Stub& stub, uint64_t generation,
                 absl::Duration timeout = absl::Seconds(60)) {
  return WaitFor(
      [&] {
        v1::GetStatusResponse s = Status(stub);
        return s.config().applied_generation() >= generation &&
               !s.config().reconciling() && s.config().error().empty();
      },
      timeout);
}

std::vector<v1::Event> History(v1::FleetService::Stub& stub) {
  v1::WatchEventsRequest req;
  req.set_history_only(true);
  auto ctx = RpcContext();
  auto reader = stub.WatchEvents(ctx.get(), req);
  std::vector<v1::Event> out;
  v1::WatchEventsResponse resp;
  while (reader->Read(&resp)) out.push_back(resp.event());
  reader->Finish().IgnoreError();
  return out;
}

int CountEvents(v1::FleetService::Stub& stub, v1::EventType type) {
  int n = 0;
  for (const v1::Event& e : History(stub)) n += e.type() == type;
  return n;
}

bool Serves(const std::string& address) {
  return HttpGet(address).outcome == Outcome::kOk;
}

TEST(DeclarativeConfigTest, KubeletSymlinkSwapsUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ConfigMapVolume volume(agent.dir().path() + "/configmap");
  volume.Write(Web(2));
  ASSERT_TRUE(
      agent.Start("", {"--config-mode=declarative", "--config", volume.file()})
          .ok());
  ASSERT_TRUE(agent.WaitServing(kWeb)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitApplied(*stub, 1)) << agent.Log();
  v1::GetStatusResponse st = Status(*stub);
  EXPECT_EQ(st.config().mode(), v1::CONFIG_MODE_DECLARATIVE);
  EXPECT_EQ(st.config().file(), volume.file());
  EXPECT_EQ(st.config().applied_hash().size(), 16u);

  loadgen::Options load;
  load.target = kWeb;
  load.rate = 500;
  load.duration = absl::Seconds(150);  // hard bound; stopped by `stop`
  load.max_connections = 80000;
  load.connect_timeout = absl::Seconds(3);
  load.request_timeout = absl::Seconds(5);
  std::atomic<bool> stop{false};
  auto running =
      std::async(std::launch::async, [&] { return loadgen::Run(load, &stop); });
  absl::SleepFor(absl::Milliseconds(500));

  // 3. Scale up and add a listener.
  volume.Write(Web(4) + kApiListener);
  ASSERT_TRUE(WaitApplied(*stub, 2))
      << Status(*stub).DebugString() << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 4; },
                      absl::Seconds(20)))
      << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return Serves(kApi); }, absl::Seconds(20)));

  // 4. Roll out a changed worker while scaling down, delete api.
  volume.Write(Web(3, R"(env: "PORTFLEET_TEST_GENERATION=3")"));
  ASSERT_TRUE(WaitApplied(*stub, 3))
      << Status(*stub).DebugString() << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(20)))
      << agent.Log();
  v1::GetListenerRequest get;
  get.set_name("api");
  v1::GetListenerResponse got;
  EXPECT_EQ(stub->GetListener(RpcContext().get(), get, &got).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(Serves(kApi));
  for (const v1::Shard& s : Shards(*stub, "web")) {
    EXPECT_EQ(ProcessEnv(s.pid(), "PORTFLEET_TEST_GENERATION"), "3")
        << "shard " << s.index() << " pid " << s.pid();
  }

  // 5. A broken file is rejected; the fleet keeps serving as it was.
  volume.Write(Web(3) + "listeners { name: \"broken\" shards: }\n");
  ASSERT_TRUE(WaitFor([&] { return !Status(*stub).config().error().empty(); },
                      absl::Seconds(20)))
      << agent.Log();
  st = Status(*stub);
  EXPECT_TRUE(absl::StrContains(st.config().error(), volume.file()))
      << st.config().error();
  EXPECT_TRUE(absl::StrContains(st.config().error(), "fleet.textproto:9:"))
      << st.config().error();
  EXPECT_EQ(st.config().applied_generation(), 3u);
  EXPECT_EQ(CountEvents(*stub, v1::EVENT_TYPE_CONFIG_REJECTED), 1);
  EXPECT_EQ(CountEvents(*stub, v1::EVENT_TYPE_CONFIG_APPLIED), 3);
  absl::SleepFor(absl::Seconds(1));
  EXPECT_EQ(ReadyShards(*stub, "web"), 3);

  stop = true;
  absl::StatusOr<loadgen::Result> result = running.get();
  ASSERT_TRUE(result.ok()) << result.status();
  std::cout << "load: " << result->Summary() << "\n";
  EXPECT_GT(result->ok(), 0) << result->Summary();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(result->late_starts, 0) << result->Summary();
}

TEST(DeclarativeConfigTest, EditorRenameAndRefusedApiCalls) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  const std::string file = agent.dir().path() + "/declared.textproto";
  WriteFile(file, Web(2));
  ASSERT_TRUE(
      agent.Start("", {"--config-mode=declarative", "--config", file}).ok());
  ASSERT_TRUE(agent.WaitServing(kWeb)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitApplied(*stub, 1)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(15)));

  // 2. Refused: every change of the desired state, each naming the file.
  std::vector<std::pair<std::string, grpc::Status>> refused;
  refused.emplace_back("ScaleListener", ScaleTo(*stub, "web", 3));
  refused.emplace_back("DrainShard", Drain(*stub, "web", 1));
  {
    v1::CreateListenerRequest req;
    req.mutable_listener()->set_name("other");
    req.mutable_listener()->set_address("127.0.0.1:8082");
    req.mutable_listener()->mutable_worker()->set_command("portfleet-worker");
    v1::CreateListenerResponse resp;
    refused.emplace_back("CreateListener",
                         stub->CreateListener(RpcContext().get(), req, &resp));
  }
  {
    v1::SetSteeringRequest req;
    req.set_name("web");
    req.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
    v1::SetSteeringResponse resp;
    refused.emplace_back("SetSteering",
                         stub->SetSteering(RpcContext().get(), req, &resp));
  }
  {
    v1::RollOutListenerRequest req;
    req.set_name("web");
    req.mutable_worker()->add_env("X=1");
    v1::RollOutListenerResponse resp;
    refused.emplace_back("RollOutListener",
                         stub->RollOutListener(RpcContext().get(), req, &resp));
  }
  {
    v1::DeleteListenerRequest req;
    req.set_name("web");
    v1::DeleteListenerResponse resp;
    refused.emplace_back("DeleteListener",
                         stub->DeleteListener(RpcContext().get(), req, &resp));
  }
  for (const auto& [method, status] : refused) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
        << method << ": " << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), file))
        << method << ": " << status.error_message();
    EXPECT_TRUE(
        absl::StrContains(status.error_message(), "--config-mode=declarative"))
        << method << ": " << status.error_message();
  }
  EXPECT_EQ(ReadyShards(*stub, "web"), 2);
  {
    v1::SetShardMaintenanceRequest req;
    req.set_name("web");
    req.set_index(1);
    req.set_maintenance(true);
    v1::SetShardMaintenanceResponse resp;
    grpc::Status s = stub->SetShardMaintenance(RpcContext().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    req.set_maintenance(false);
    s = stub->SetShardMaintenance(RpcContext().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }

  // 3. An editor's save: write a temp file, rename it over the file.
  WriteFile(file + ".swp", Web(1));
  ASSERT_EQ(::rename((file + ".swp").c_str(), file.c_str()), 0);
  ASSERT_TRUE(WaitApplied(*stub, 2))
      << Status(*stub).DebugString() << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return Shards(*stub, "web").size() == 1; },
                      absl::Seconds(20)));

  // The file goes away: an error, the fleet stays.
  ASSERT_EQ(::unlink(file.c_str()), 0);
  ASSERT_TRUE(WaitFor(
      [&] {
        return absl::StrContains(Status(*stub).config().error(),
                                 "cannot read config file");
      },
      absl::Seconds(20)))
      << Status(*stub).DebugString();
  EXPECT_TRUE(Serves(kWeb));
  EXPECT_EQ(ReadyShards(*stub, "web"), 1);

  // Back with 2 shards, then SIGHUP (the watch sees it anyway; SIGHUP must
  // not hurt).
  WriteFile(file, Web(2));
  ASSERT_EQ(::kill(agent.pid(), SIGHUP), 0);
  ASSERT_TRUE(WaitApplied(*stub, 3))
      << Status(*stub).DebugString() << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(20)));
}

TEST(DeclarativeConfigTest, FileChangedWhileAgentDownReadoptsThenReconciles) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  const std::string file = agent.dir().path() + "/declared.textproto";
  const std::vector<std::string> args = {"--config-mode=declarative",
                                         "--config", file};
  WriteFile(file, Web(2));
  ASSERT_TRUE(agent.Start("", args).ok());
  ASSERT_TRUE(agent.WaitServing(kWeb)) << agent.Log();
  std::map<uint32_t, int> before;
  {
    auto stub = FleetStub(agent.api_socket());
    ASSERT_TRUE(WaitApplied(*stub, 1)) << agent.Log();
    ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                        absl::Seconds(15)));
    for (const v1::Shard& s : Shards(*stub, "web")) before[s.index()] = s.pid();
  }
  ASSERT_EQ(before.size(), 2u);

  // The agent dies; the file changes meanwhile; the agent comes back.
  agent.process().Signal(SIGKILL);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(5)).has_value());
  WriteFile(file + ".tmp", Web(3));
  ASSERT_EQ(::rename((file + ".tmp").c_str(), file.c_str()), 0);
  ASSERT_TRUE(agent.Restart(args).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitApplied(*stub, 1))
      << Status(*stub).DebugString() << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(20)))
      << agent.Log();
  // Shards 0 and 1 are the same workers, re-adopted; shard 2 is new.
  std::map<uint32_t, int> after;
  for (const v1::Shard& s : Shards(*stub, "web")) after[s.index()] = s.pid();
  EXPECT_EQ(after[0], before[0]);
  EXPECT_EQ(after[1], before[1]);
  EXPECT_GT(after[2], 0);
  EXPECT_TRUE(Serves(kWeb));
}

}  // namespace
}  // namespace portfleet::testing
