// The control API of the real portfleet-agent, each case in its own network
// namespace.

#include <grp.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "agent/api/state_store.h"
#include "gtest/gtest.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

std::string Spec() {
  return R"pb(listeners {
                name: "web"
                address: "127.0.0.1:8080"
                shards: 2
                worker { command: "portfleet-worker" args: "--mode=http" }
                drain_timeout_seconds: 2
              }
  )pb";
}

v1::Listener Listener(const std::string& name, int port, int shards = 1) {
  v1::Listener l;
  l.set_name(name);
  l.set_address(absl::StrCat("127.0.0.1:", port));
  l.set_shards(shards);
  l.mutable_worker()->set_command("portfleet-worker");
  l.mutable_worker()->add_args("--mode=http");
  l.set_drain_timeout_seconds(2);
  return l;
}

class ApiAgentTest : public ::testing::Test {
 protected:
  // Starts the agent and connects; a fatal failure when the agent serves no
  // API (callers wrap it in ASSERT_NO_FATAL_FAILURE).
  void StartAgent(const std::vector<std::string>& extra = {}) {
    ASSERT_TRUE(agent_.Start(Spec(), extra).ok()) << agent_.Log();
    Connect();
  }
  void Connect() {
    if (!WaitFor([&] { return access(agent_.api_socket().c_str(), F_OK) == 0; },
                 absl::Seconds(10))) {
      FAIL() << "portfleet-agent does not serve the "
                "API on "
             << agent_.api_socket() << "\n"
             << agent_.Log();
    }
    channel_ = grpc::CreateChannel("unix://" + agent_.api_socket(),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::FleetService::NewStub(channel_);
    ASSERT_TRUE(channel_->WaitForConnected(std::chrono::system_clock::now() +
                                           std::chrono::seconds(10)));
  }
  static std::unique_ptr<grpc::ClientContext> Ctx() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::seconds(30));
    return ctx;
  }
  std::string StateFile() {
    return ReadFileOrEmpty(FleetStatePath(agent_.state_dir()));
  }
  v1::ListenerState Get(const std::string& name) {
    v1::GetListenerRequest req;
    req.set_name(name);
    v1::GetListenerResponse resp;
    grpc::Status s = stub_->GetListener(Ctx().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.listener();
  }
  // `call` fails with `code`; the state file is unchanged.
  template <typename F>
  void ExpectRejected(F call, grpc::StatusCode code) {
    const std::string before = StateFile();
    grpc::Status s = call();
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_EQ(StateFile(), before);
  }

  AgentHarness agent_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::FleetService::Stub> stub_;
};

// Steps:
// 1. Start the agent with "web" (2 shards).
// 2. For every RPC: a happy path and two bad inputs, the state file unchanged
//    after each failure.
TEST_F(ApiAgentTest, EveryRpcHappyPathAndBadInputs) {
  PF_ENTER_NETNS_OR_SKIP();
  ASSERT_NO_FATAL_FAILURE(StartAgent());

  v1::GetStatusResponse status;
  ASSERT_TRUE(stub_->GetStatus(Ctx().get(), {}, &status).ok());
  EXPECT_FALSE(status.version().empty());

  v1::ListListenersResponse list;
  ASSERT_TRUE(stub_->ListListeners(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.listeners_size(), 1);

  v1::GetListenerRequest get;
  v1::GetListenerResponse got;
  get.set_name("web");
  ASSERT_TRUE(stub_->GetListener(Ctx().get(), get, &got).ok());
  get.set_name("");
  ExpectRejected([&] { return stub_->GetListener(Ctx().get(), get, &got); },
                 grpc::INVALID_ARGUMENT);
  get.set_name("nosuch");
  ExpectRejected([&] { return stub_->GetListener(Ctx().get(), get, &got); },
                 grpc::NOT_FOUND);

  v1::ListShardsRequest shards_req;
  v1::ListShardsResponse shards;
  shards_req.set_name("web");
  ASSERT_TRUE(stub_->ListShards(Ctx().get(), shards_req, &shards).ok());
  EXPECT_EQ(shards.shards_size(), 2);
  shards_req.set_name("Bad");
  ExpectRejected(
      [&] { return stub_->ListShards(Ctx().get(), shards_req, &shards); },
      grpc::INVALID_ARGUMENT);
  shards_req.set_name("nosuch");
  ExpectRejected(
      [&] { return stub_->ListShards(Ctx().get(), shards_req, &shards); },
      grpc::NOT_FOUND);

  v1::CreateListenerRequest create;
  v1::CreateListenerResponse created;
  *create.mutable_listener() = Listener("api", 9000);
  ASSERT_TRUE(stub_->CreateListener(Ctx().get(), create, &created).ok());
  EXPECT_NE(StateFile().find("\"api\""), std::string::npos);
  ExpectRejected(
      [&] { return stub_->CreateListener(Ctx().get(), create, &created); },
      grpc::ALREADY_EXISTS);
  *create.mutable_listener() = Listener("other", 8080);  // address taken
  ExpectRejected(
      [&] { return stub_->CreateListener(Ctx().get(), create, &created); },
      grpc::ALREADY_EXISTS);
  create.mutable_listener()->set_address("nowhere");
  ExpectRejected(
      [&] { return stub_->CreateListener(Ctx().get(), create, &created); },
      grpc::INVALID_ARGUMENT);

  v1::UpdateListenerRequest update;
  v1::UpdateListenerResponse updated;
  *update.mutable_listener() = Listener("api", 9000, 2);
  ASSERT_TRUE(stub_->UpdateListener(Ctx().get(), update, &updated).ok());
  *update.mutable_listener() = Listener("nosuch", 9100);
  ExpectRejected(
      [&] { return stub_->UpdateListener(Ctx().get(), update, &updated); },
      grpc::NOT_FOUND);
  update.mutable_listener()->set_shards(100);
  ExpectRejected(
      [&] { return stub_->UpdateListener(Ctx().get(), update, &updated); },
      grpc::INVALID_ARGUMENT);

  v1::ScaleListenerRequest scale;
  v1::ScaleListenerResponse scaled;
  scale.set_name("web");
  scale.set_shards(3);
  ASSERT_TRUE(stub_->ScaleListener(Ctx().get(), scale, &scaled).ok());
  EXPECT_EQ(Get("web").spec().shards(), 3u);
  scale.set_shards(0);
  ExpectRejected(
      [&] { return stub_->ScaleListener(Ctx().get(), scale, &scaled); },
      grpc::INVALID_ARGUMENT);
  scale.set_name("nosuch");
  scale.set_shards(2);
  ExpectRejected(
      [&] { return stub_->ScaleListener(Ctx().get(), scale, &scaled); },
      grpc::NOT_FOUND);

  v1::DrainShardRequest drain;
  v1::DrainShardResponse drained;
  drain.set_name("web");
  drain.set_index(2);
  ASSERT_TRUE(stub_->DrainShard(Ctx().get(), drain, &drained).ok());
  ExpectRejected(
      [&] { return stub_->DrainShard(Ctx().get(), drain, &drained); },
      grpc::NOT_FOUND);
  drain.set_name("");
  ExpectRejected(
      [&] { return stub_->DrainShard(Ctx().get(), drain, &drained); },
      grpc::INVALID_ARGUMENT);

  v1::SetSteeringRequest steer;
  v1::SetSteeringResponse steered;
  steer.set_name("web");
  steer.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  grpc::Status s = stub_->SetSteering(Ctx().get(), steer, &steered);
  // The test runs as root in its own namespace: BPF steering is there, and
  // the change is made and visible.
  ASSERT_TRUE(s.ok()) << s.error_code() << ": " << s.error_message();
  EXPECT_EQ(Get("web").spec().steering().policy(), v1::STEERING_POLICY_HASH);
  steer.mutable_steering()->set_policy(static_cast<v1::SteeringPolicy>(9));
  ExpectRejected(
      [&] { return stub_->SetSteering(Ctx().get(), steer, &steered); },
      grpc::INVALID_ARGUMENT);
  steer.clear_steering();
  ExpectRejected(
      [&] { return stub_->SetSteering(Ctx().get(), steer, &steered); },
      grpc::INVALID_ARGUMENT);

  v1::DeleteListenerRequest del;
  v1::DeleteListenerResponse deleted;
  del.set_name("api");
  ASSERT_TRUE(stub_->DeleteListener(Ctx().get(), del, &deleted).ok());
  EXPECT_EQ(StateFile().find("\"api\""), std::string::npos);
  ExpectRejected(
      [&] { return stub_->DeleteListener(Ctx().get(), del, &deleted); },
      grpc::NOT_FOUND);
  del.set_name("-x");
  ExpectRejected(
      [&] { return stub_->DeleteListener(Ctx().get(), del, &deleted); },
      grpc::INVALID_ARGUMENT);

  // WatchEvents sees a scale.
  ASSERT_EQ(Get("web").spec().shards(), 2u);  // shard 2 was drained away
  grpc::ClientContext watch_ctx;
  watch_ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(15));
  auto reader = stub_->WatchEvents(&watch_ctx, {});
  reader->WaitForInitialMetadata();
  scale.set_name("web");
  scale.set_shards(3);
  ASSERT_TRUE(stub_->ScaleListener(Ctx().get(), scale, &scaled).ok());
  // Earlier events (the drain's) may come first; the new shard's start must
  // come within the deadline.
  v1::WatchEventsResponse event;
  bool saw_start = false;
  std::string seen;
  while (!saw_start && reader->Read(&event)) {
    absl::StrAppend(&seen, v1::EventType_Name(event.event().type()), " ",
                    event.event().listener(), "/", event.event().shard(), "; ");
    saw_start = event.event().type() == v1::EVENT_TYPE_SHARD_STARTED &&
                event.event().listener() == "web" &&
                event.event().shard() == 2 && event.event().pid() > 0;
  }
  EXPECT_TRUE(saw_start) << "events: " << seen;
  watch_ctx.TryCancel();
  reader->Finish();
}

// Steps:
// 1. Start the agent.
// 2. Eight clients at once: four create/scale/delete their own listener, four
//    scale the shared "web" to different counts.
// 3. The agent is alive; the final state is one of the serial outcomes: the
//    own listeners are gone and web has one of the requested counts; the
//    state file agrees with the agent.
TEST_F(ApiAgentTest, EightConcurrentClients) {
  PF_ENTER_NETNS_OR_SKIP();
  ASSERT_NO_FATAL_FAILURE(StartAgent());
  std::vector<std::thread> clients;
  for (int i = 0; i < 8; ++i) {
    clients.emplace_back([&, i] {
      auto stub = v1::FleetService::NewStub(grpc::CreateChannel(
          "unix://" + agent_.api_socket(), grpc::InsecureChannelCredentials()));
      for (int round = 0; round < 3; ++round) {
        if (i < 4) {
          std::string name = absl::StrCat("own", i);
          v1::CreateListenerRequest c;
          *c.mutable_listener() = Listener(name, 9000 + i);
          v1::CreateListenerResponse cr;
          stub->CreateListener(Ctx().get(), c, &cr);
          v1::ScaleListenerRequest sc;
          sc.set_name(name);
          sc.set_shards(2);
          v1::ScaleListenerResponse sr;
          stub->ScaleListener(Ctx().get(), sc, &sr);
          v1::DeleteListenerRequest d;
          d.set_name(name);
          v1::DeleteListenerResponse dr;
          stub->DeleteListener(Ctx().get(), d, &dr);
        } else {
          v1::ScaleListenerRequest sc;
          sc.set_name("web");
          sc.set_shards(i - 3);  // 1..4
          v1::ScaleListenerResponse sr;
          stub->ScaleListener(Ctx().get(), sc, &sr);
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
  ASSERT_TRUE(agent_.process().running()) << agent_.Log();
  v1::ListListenersResponse list;
  ASSERT_TRUE(stub_->ListListeners(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.listeners_size(), 1);
  uint32_t shards = list.listeners(0).spec().shards();
  EXPECT_GE(shards, 1u);
  EXPECT_LE(shards, 4u);
  auto saved = LoadFleetState(agent_.state_dir());
  ASSERT_TRUE(saved.ok()) << saved.status();
  ASSERT_TRUE(saved->has_value());
  ASSERT_EQ((*saved)->listeners_size(), 1);
  EXPECT_EQ((*saved)->listeners(0).shards(), shards);
}

// Steps:
// 1. Start the agent; scale web to 3 and set hash steering with weights.
// 2. SIGKILL the agent, start it again with the same paths.
// 3. web has 3 shards and the steering as last set.
TEST_F(ApiAgentTest, RestartRestoresLastSetState) {
  PF_ENTER_NETNS_OR_SKIP();
  ASSERT_NO_FATAL_FAILURE(StartAgent());
  v1::ScaleListenerRequest scale;
  scale.set_name("web");
  scale.set_shards(3);
  v1::ScaleListenerResponse scaled;
  ASSERT_TRUE(stub_->ScaleListener(Ctx().get(), scale, &scaled).ok());
  v1::SetSteeringRequest steer;
  steer.set_name("web");
  steer.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  for (int w : {1, 2, 3}) steer.mutable_steering()->add_weights(w);
  v1::SetSteeringResponse steered;
  grpc::Status s = stub_->SetSteering(Ctx().get(), steer, &steered);
  ASSERT_TRUE(s.ok()) << s.error_code() << ": " << s.error_message();

  agent_.process().Signal(SIGKILL);
  agent_.process().Wait(absl::Seconds(5));
  ASSERT_TRUE(agent_.Restart().ok());
  ASSERT_NO_FATAL_FAILURE(Connect());
  v1::ListenerState web = Get("web");
  EXPECT_EQ(web.spec().shards(), 3u);
  EXPECT_EQ(web.spec().steering().policy(), v1::STEERING_POLICY_HASH);
  ASSERT_EQ(web.spec().steering().weights_size(), 3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(web.spec().steering().weights(i), static_cast<uint32_t>(i + 1));
  }
}

// An API socket directory that already exists (a hostPath the kubelet made,
// a RuntimeDirectory) 0755 is narrowed to 0751, as documented (others may
// pass through to the control socket, not list the directory).
TEST_F(ApiAgentTest, ExistingSocketDirectoryIsNarrowedTo0751) {
  PF_ENTER_NETNS_OR_SKIP();
  const std::string dir = agent_.dir().path() + "/run";
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0755), 0);
  const std::string sock = dir + "/api.sock";
  ASSERT_TRUE(agent_.Start(Spec(), {"--api", "unix://" + sock}).ok());
  ASSERT_TRUE(WaitFor([&] { return access(sock.c_str(), F_OK) == 0; },
                      absl::Seconds(10)))
      << agent_.Log();
  struct stat st;
  ASSERT_EQ(stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0751u);
}

// A socket directory shared with other files (here the worker binary that
// the workers, running as another user, must reach) keeps its mode.
TEST_F(ApiAgentTest, SharedSocketDirectoryKeepsItsMode) {
  PF_ENTER_NETNS_OR_SKIP();
  const std::string dir = agent_.dir().path() + "/run";
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0755), 0);
  agent_.dir().WriteFile("run/other-file", "x");
  const std::string sock = dir + "/api.sock";
  ASSERT_TRUE(agent_.Start(Spec(), {"--api", "unix://" + sock}).ok());
  ASSERT_TRUE(WaitFor([&] { return access(sock.c_str(), F_OK) == 0; },
                      absl::Seconds(10)))
      << agent_.Log();
  struct stat st;
  ASSERT_EQ(stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
}

// Steps:
// 1. Start the agent with its socket in a directory it creates.
// 2. The socket is 0660, the directory 0751.
// 3. A child running as uid/gid 65534 (outside the group) cannot connect.
TEST_F(ApiAgentTest, SocketPermissionsRefuseOthers) {
  PF_ENTER_NETNS_OR_SKIP();
  if (geteuid() != 0) {
    if (PrivilegedRequired()) FAIL() << "needs root to switch uid";
    GTEST_SKIP() << "needs root to switch uid";
  }
  const std::string sock = agent_.dir().path() + "/run/api.sock";
  // The later --api wins over the harness's.
  ASSERT_TRUE(agent_.Start(Spec(), {"--api", "unix://" + sock}).ok());
  if (!WaitFor([&] { return access(sock.c_str(), F_OK) == 0; },
               absl::Seconds(10))) {
    FAIL() << "no API socket at " << sock;
  }
  struct stat st;
  ASSERT_EQ(lstat(sock.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  ASSERT_EQ(stat((agent_.dir().path() + "/run").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0751u);
  // The temp dir itself must be traversable for the test to mean anything.
  chmod(agent_.dir().path().c_str(), 0755);

  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (setgroups(0, nullptr) != 0 || setgid(65534) != 0 ||
        setuid(65534) != 0) {
      _exit(10);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, sock.c_str(), sizeof(addr.sun_path) - 1);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      _exit(0);
    }
    _exit(errno == EACCES ? 1 : 2);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 1) << "0 = connected, 2 = other errno";
}

// Steps:
// 1. Start the agent.
// 2. A python3 client with no portfleet protos lists the services through
//    reflection and calls GetStatus.
TEST_F(ApiAgentTest, DiscoverableThroughReflection) {
  PF_ENTER_NETNS_OR_SKIP();
  // deploy/install-deps.sh installs them; CI sets
  // PORTFLEET_REQUIRE_PYTHON_DEPS=1 so that it cannot pass without.
  PF_REQUIRE_PYTHON_GRPC();
  ASSERT_NO_FATAL_FAILURE(StartAgent());
  const std::string out = agent_.dir().path() + "/reflection.out";
  const std::string cmd =
      absl::StrCat("/usr/bin/python3 ", PORTFLEET_SOURCE_DIR,
                   "/tests/e2e/api_reflection.py unix://", agent_.api_socket(),
                   " >", out, " 2>&1");
  EXPECT_EQ(system(cmd.c_str()), 0) << ReadFileOrEmpty(out);
  EXPECT_NE(ReadFileOrEmpty(out).find("GetStatus version:"), std::string::npos)
      << ReadFileOrEmpty(out);
}

}  // namespace
}  // namespace portfleet::testing
