// FleetService through a real gRPC server on a unix socket in a temporary
// directory, backed by an in-memory FakeController: every RPC's happy path,
// bad inputs with their status codes (and no state change), WatchEvents
// (delivery, filter, cancel, slow reader), health and the socket itself.
#include <grpcpp/grpcpp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "agent/api/server.h"
#include "agent/api/service.h"
#include "agent/api/state_store.h"
#include "agent/event_history.h"
#include "gtest/gtest.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "tests/unit/api_fake_controller.h"

namespace portfleet {
namespace {

using ::portfleet::testing::FakeController;
using ::portfleet::testing::ReadFileOrEmpty;
using ::portfleet::testing::TempDir;
using ::portfleet::testing::WaitFor;

ApiServerOptions Address(const std::string& address) {
  ApiServerOptions options;
  options.address = address;
  return options;
}
ApiServerOptions Unix(const std::string& path) {
  return Address("unix://" + path);
}
ApiServerOptions TlsOnly(const std::string& address) {
  ApiServerOptions options;
  options.address = "";
  options.tls_address = address;
  return options;
}

v1::Listener Web(const std::string& name = "web",
                 const std::string& address = "127.0.0.1:8080") {
  v1::Listener l;
  l.set_name(name);
  l.set_address(address);
  l.set_shards(2);
  l.mutable_worker()->set_command("portfleet-worker");
  return l;
}

class ApiServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fake_.state_dir = dir_.path() + "/state";
    StartServer({});
  }

  void StartServer(FleetServiceOptions service) {
    socket_ = dir_.path() + "/run/api.sock";
    ApiServerOptions options = Unix(socket_);
    options.service = service;
    auto server = ApiServer::Start(options, &fake_);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = grpc::CreateChannel("unix://" + socket_,
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::FleetService::NewStub(channel_);
  }

  std::unique_ptr<grpc::ClientContext> Ctx() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::seconds(10));
    return ctx;
  }

  grpc::Status Create(const v1::Listener& l) {
    v1::CreateListenerRequest req;
    *req.mutable_listener() = l;
    v1::CreateListenerResponse resp;
    return stub_->CreateListener(Ctx().get(), req, &resp);
  }

  std::string StateFile() {
    return ReadFileOrEmpty(FleetStatePath(fake_.state_dir));
  }

  // Runs `call`, expects `code` with `needle` in the message and the state
  // file unchanged.
  template <typename F>
  void ExpectRejected(F call, grpc::StatusCode code,
                      const std::string& needle) {
    const std::string before = StateFile();
    grpc::Status s = call();
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_NE(s.error_message().find(needle), std::string::npos)
        << "'" << s.error_message() << "' lacks '" << needle << "'";
    EXPECT_EQ(StateFile(), before);
  }

  TempDir dir_;
  FakeController fake_;
  std::string socket_;
  std::unique_ptr<ApiServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::FleetService::Stub> stub_;
};

TEST_F(ApiServiceTest, GetStatus) {
  v1::GetStatusResponse resp;
  ASSERT_TRUE(stub_->GetStatus(Ctx().get(), {}, &resp).ok());
  EXPECT_EQ(resp.version(), "9.8.7");
  EXPECT_GE(resp.uptime_seconds(), 3725);
  EXPECT_TRUE(resp.bpf_steering_active());
  EXPECT_TRUE(resp.bpf_unavailable_reason().empty());
}

TEST_F(ApiServiceTest, GetStatusReportsWhyBpfIsInactive) {
  fake_.bpf_active = false;
  v1::GetStatusResponse resp;
  ASSERT_TRUE(stub_->GetStatus(Ctx().get(), {}, &resp).ok());
  EXPECT_FALSE(resp.bpf_steering_active());
  EXPECT_EQ(resp.bpf_unavailable_reason(), "no CAP_BPF");
}

TEST_F(ApiServiceTest, CreateListener) {
  v1::CreateListenerRequest req;
  *req.mutable_listener() = Web();
  v1::CreateListenerResponse resp;
  grpc::Status s = stub_->CreateListener(Ctx().get(), req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.listener().spec().name(), "web");
  EXPECT_EQ(resp.listener().shards_size(), 2);
  EXPECT_EQ(resp.listener().shards(1).state(), v1::SHARD_STATE_RUNNING);
  EXPECT_NE(StateFile().find("name: \"web\""), std::string::npos);
}

TEST_F(ApiServiceTest, CreateListenerBadInputs) {
  ASSERT_TRUE(Create(Web()).ok());
  ExpectRejected(
      [&] {
        v1::CreateListenerResponse resp;
        return stub_->CreateListener(Ctx().get(), {}, &resp);
      },
      grpc::INVALID_ARGUMENT, "listener: required");
  ExpectRejected([&] { return Create(Web("")); }, grpc::INVALID_ARGUMENT,
                 "listener.name: required");
  ExpectRejected([&] { return Create(Web("Web_1")); }, grpc::INVALID_ARGUMENT,
                 "listener.name");
  ExpectRejected([&] { return Create(Web("api", "localhost")); },
                 grpc::INVALID_ARGUMENT, "listener.address");
  v1::Listener too_many = Web("api", "127.0.0.1:9000");
  too_many.set_shards(65);
  ExpectRejected([&] { return Create(too_many); }, grpc::INVALID_ARGUMENT,
                 "listener.shards");
  ExpectRejected([&] { return Create(Web("web", "127.0.0.1:9000")); },
                 grpc::ALREADY_EXISTS, "already exists");
  ExpectRejected([&] { return Create(Web("api", "127.0.0.1:8080")); },
                 grpc::ALREADY_EXISTS, "127.0.0.1:8080");
}

TEST_F(ApiServiceTest, ListAndGetListeners) {
  ASSERT_TRUE(Create(Web()).ok());
  ASSERT_TRUE(Create(Web("api", "127.0.0.1:9000")).ok());
  v1::ListListenersResponse list;
  ASSERT_TRUE(stub_->ListListeners(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.listeners_size(), 2);
  EXPECT_EQ(list.listeners(0).spec().name(), "api");
  EXPECT_EQ(list.listeners(1).spec().name(), "web");

  v1::GetListenerRequest req;
  req.set_name("web");
  v1::GetListenerResponse get;
  ASSERT_TRUE(stub_->GetListener(Ctx().get(), req, &get).ok());
  EXPECT_EQ(get.listener().spec().address(), "127.0.0.1:8080");
}

TEST_F(ApiServiceTest, GetListenerBadInputs) {
  v1::GetListenerResponse resp;
  v1::GetListenerRequest req;
  ExpectRejected([&] { return stub_->GetListener(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "name: required");
  req.set_name("-web");
  ExpectRejected([&] { return stub_->GetListener(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "not a DNS label");
  req.set_name("nosuch");
  ExpectRejected([&] { return stub_->GetListener(Ctx().get(), req, &resp); },
                 grpc::NOT_FOUND, "nosuch");
}

TEST_F(ApiServiceTest, ListShards) {
  ASSERT_TRUE(Create(Web()).ok());
  v1::ListShardsRequest req;
  req.set_name("web");
  v1::ListShardsResponse resp;
  ASSERT_TRUE(stub_->ListShards(Ctx().get(), req, &resp).ok());
  ASSERT_EQ(resp.shards_size(), 2);
  EXPECT_EQ(resp.shards(1).index(), 1u);
  EXPECT_EQ(resp.shards(1).pid(), 1001);
  EXPECT_EQ(resp.shards(1).queue_depth(), 1u);
  EXPECT_EQ(resp.shards(1).active_connections(), 10u);
  EXPECT_EQ(resp.shards(1).counters().selected(), 10u);

  req.set_name("");
  ExpectRejected([&] { return stub_->ListShards(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "name: required");
  req.set_name("nosuch");
  ExpectRejected([&] { return stub_->ListShards(Ctx().get(), req, &resp); },
                 grpc::NOT_FOUND, "nosuch");
}

TEST_F(ApiServiceTest, UpdateListener) {
  ASSERT_TRUE(Create(Web()).ok());
  v1::UpdateListenerRequest req;
  *req.mutable_listener() = Web();
  req.mutable_listener()->set_shards(3);
  v1::UpdateListenerResponse resp;
  ASSERT_TRUE(stub_->UpdateListener(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(resp.listener().shards_size(), 3);
  EXPECT_NE(StateFile().find("shards: 3"), std::string::npos);

  req.mutable_listener()->set_name("nosuch");
  ExpectRejected([&] { return stub_->UpdateListener(Ctx().get(), req, &resp); },
                 grpc::NOT_FOUND, "nosuch");
  *req.mutable_listener() = Web();
  req.mutable_listener()->set_drain_timeout_seconds(99999);
  ExpectRejected([&] { return stub_->UpdateListener(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "listener.drain_timeout_seconds");
}

TEST_F(ApiServiceTest, DeleteListener) {
  ASSERT_TRUE(Create(Web()).ok());
  v1::DeleteListenerRequest req;
  v1::DeleteListenerResponse resp;
  ExpectRejected([&] { return stub_->DeleteListener(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "name: required");
  req.set_name("nosuch");
  ExpectRejected([&] { return stub_->DeleteListener(Ctx().get(), req, &resp); },
                 grpc::NOT_FOUND, "nosuch");
  req.set_name("web");
  ASSERT_TRUE(stub_->DeleteListener(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(StateFile().find("web"), std::string::npos);
}

TEST_F(ApiServiceTest, ScaleListener) {
  ASSERT_TRUE(Create(Web()).ok());
  v1::ScaleListenerRequest req;
  req.set_name("web");
  req.set_shards(5);
  v1::ScaleListenerResponse resp;
  ASSERT_TRUE(stub_->ScaleListener(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(resp.listener().shards_size(), 5);

  req.set_shards(0);
  ExpectRejected([&] { return stub_->ScaleListener(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "shards: 0 is out of range");
  req.set_shards(65);
  ExpectRejected([&] { return stub_->ScaleListener(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "shards: 65");
  req.set_shards(3);
  req.set_name("nosuch");
  ExpectRejected([&] { return stub_->ScaleListener(Ctx().get(), req, &resp); },
                 grpc::NOT_FOUND, "nosuch");
}

TEST_F(ApiServiceTest, DrainShard) {
  ASSERT_TRUE(Create(Web()).ok());
  v1::DrainShardRequest req;
  req.set_name("web");
  req.set_index(1);
  v1::DrainShardResponse resp;
  ASSERT_TRUE(stub_->DrainShard(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(resp.listener().shards_size(), 1);

  ExpectRejected([&] { return stub_->DrainShard(Ctx().get(), req, &resp); },
                 grpc::NOT_FOUND, "no shard 1");
  req.set_index(64);
  ExpectRejected([&] { return stub_->DrainShard(Ctx().get(), req, &resp); },
                 grpc::INVALID_ARGUMENT, "index: 64");
  req.set_index(0);
  ExpectRejected([&] { return stub_->DrainShard(Ctx().get(), req, &resp); },
                 grpc::FAILED_PRECONDITION, "last shard");
}

TEST_F(ApiServiceTest, SetSteering) {
  ASSERT_TRUE(Create(Web()).ok());
  v1::SetSteeringRequest req;
  req.set_name("web");
  req.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  req.mutable_steering()->add_weights(1);
  req.mutable_steering()->add_weights(3);
  v1::SetSteeringResponse resp;
  ASSERT_TRUE(stub_->SetSteering(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(resp.listener().spec().steering().weights_size(), 2);

  v1::SetSteeringRequest bad;
  bad.set_name("web");
  ExpectRejected([&] { return stub_->SetSteering(Ctx().get(), bad, &resp); },
                 grpc::INVALID_ARGUMENT, "steering: required");
  bad.mutable_steering()->set_policy(v1::STEERING_POLICY_CPU);
  bad.mutable_steering()->add_weights(1);
  ExpectRejected([&] { return stub_->SetSteering(Ctx().get(), bad, &resp); },
                 grpc::INVALID_ARGUMENT, "steering.weights");
  bad.mutable_steering()->set_policy(static_cast<v1::SteeringPolicy>(7));
  ExpectRejected([&] { return stub_->SetSteering(Ctx().get(), bad, &resp); },
                 grpc::INVALID_ARGUMENT, "steering.policy: unknown value 7");
  fake_.bpf_active = false;
  ExpectRejected([&] { return stub_->SetSteering(Ctx().get(), req, &resp); },
                 grpc::FAILED_PRECONDITION, "BPF");
}

TEST_F(ApiServiceTest, ValidateOnlyAnswersWithAPlanAndChangesNothing) {
  ASSERT_TRUE(Create(Web()).ok());
  const std::string state = StateFile();
  grpc::ClientContext watch_ctx;
  auto watch = stub_->WatchEvents(&watch_ctx, {});
  watch->WaitForInitialMetadata();
  ASSERT_TRUE(
      WaitFor([&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));

  v1::CreateListenerRequest create;
  *create.mutable_listener() = Web("api", "127.0.0.1:9000");
  create.set_validate_only(true);
  v1::CreateListenerResponse created;
  ASSERT_TRUE(stub_->CreateListener(Ctx().get(), create, &created).ok());
  EXPECT_EQ(created.plan().name(), "api");
  EXPECT_EQ(created.plan().action(), v1::ListenerPlan::ACTION_CREATE);
  EXPECT_FALSE(created.plan().has_current());
  EXPECT_EQ(created.plan().desired().address(), "127.0.0.1:9000");
  EXPECT_FALSE(created.has_listener());
  EXPECT_FALSE(fake_.GetListener("api").ok());

  v1::UpdateListenerRequest update;
  *update.mutable_listener() = Web();
  update.mutable_listener()->set_shards(4);
  update.set_validate_only(true);
  v1::UpdateListenerResponse updated;
  ASSERT_TRUE(stub_->UpdateListener(Ctx().get(), update, &updated).ok());
  EXPECT_EQ(updated.plan().action(), v1::ListenerPlan::ACTION_UPDATE);
  ASSERT_EQ(updated.plan().changed_fields_size(), 1);
  EXPECT_EQ(updated.plan().changed_fields(0), "shards");
  EXPECT_EQ(updated.plan().current().shards(), 2u);
  EXPECT_EQ(updated.plan().desired().shards(), 4u);
  *update.mutable_listener() = Web();
  ASSERT_TRUE(stub_->UpdateListener(Ctx().get(), update, &updated).ok());
  EXPECT_EQ(updated.plan().action(), v1::ListenerPlan::ACTION_UNCHANGED);

  v1::ScaleListenerRequest scale;
  scale.set_name("web");
  scale.set_shards(3);
  scale.set_validate_only(true);
  v1::ScaleListenerResponse scaled;
  ASSERT_TRUE(stub_->ScaleListener(Ctx().get(), scale, &scaled).ok());
  EXPECT_EQ(scaled.plan().action(), v1::ListenerPlan::ACTION_UPDATE);
  EXPECT_EQ(scaled.plan().desired().shards(), 3u);

  v1::SetSteeringRequest steer;
  steer.set_name("web");
  steer.mutable_steering()->set_policy(v1::STEERING_POLICY_CPU);
  steer.set_validate_only(true);
  v1::SetSteeringResponse steered;
  ASSERT_TRUE(stub_->SetSteering(Ctx().get(), steer, &steered).ok());
  ASSERT_EQ(steered.plan().changed_fields_size(), 1);
  EXPECT_EQ(steered.plan().changed_fields(0), "steering");

  v1::DeleteListenerRequest del;
  del.set_name("web");
  del.set_validate_only(true);
  v1::DeleteListenerResponse deleted;
  ASSERT_TRUE(stub_->DeleteListener(Ctx().get(), del, &deleted).ok());
  EXPECT_EQ(deleted.plan().action(), v1::ListenerPlan::ACTION_DELETE);
  EXPECT_FALSE(deleted.plan().has_desired());

  // What the real call would refuse, the dry run refuses the same way.
  *create.mutable_listener() = Web("dup", "127.0.0.1:8080");
  ExpectRejected(
      [&] { return stub_->CreateListener(Ctx().get(), create, &created); },
      grpc::ALREADY_EXISTS, "127.0.0.1:8080");
  del.set_name("nosuch");
  ExpectRejected(
      [&] { return stub_->DeleteListener(Ctx().get(), del, &deleted); },
      grpc::NOT_FOUND, "nosuch");
  fake_.bpf_active = false;
  ExpectRejected(
      [&] { return stub_->SetSteering(Ctx().get(), steer, &steered); },
      grpc::FAILED_PRECONDITION, "BPF");

  // Nothing changed: the state file, the listener, no event.
  EXPECT_EQ(StateFile(), state);
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 2u);
  EXPECT_EQ(fake_.GetListener("web")->spec.steering().policy(),
            v1::STEERING_POLICY_UNSPECIFIED);
  EXPECT_TRUE(fake_.Events(absl::InfinitePast()).size() == 1u);  // created
  watch_ctx.TryCancel();
  watch->Finish();
}

TEST_F(ApiServiceTest, ExpiredDeadlineDoesNotRun) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() - std::chrono::seconds(1));
  v1::CreateListenerRequest req;
  *req.mutable_listener() = Web();
  v1::CreateListenerResponse resp;
  EXPECT_EQ(stub_->CreateListener(&ctx, req, &resp).error_code(),
            grpc::DEADLINE_EXCEEDED);
  v1::ListListenersResponse list;
  ASSERT_TRUE(stub_->ListListeners(Ctx().get(), {}, &list).ok());
  EXPECT_EQ(list.listeners_size(), 0);
}

TEST_F(ApiServiceTest, WatchEventsDeliversFiltersAndCancels) {
  grpc::ClientContext all_ctx, web_ctx;
  v1::WatchEventsRequest web_only;
  web_only.set_listener("web");
  auto all = stub_->WatchEvents(&all_ctx, {});
  auto web = stub_->WatchEvents(&web_ctx, web_only);
  all->WaitForInitialMetadata();
  web->WaitForInitialMetadata();
  ASSERT_TRUE(
      WaitFor([&] { return fake_.subscribers() == 2; }, absl::Seconds(5)));

  fake_.Emit(v1::EVENT_TYPE_SHARD_STARTED, "api", "one", 0);
  fake_.Emit(v1::EVENT_TYPE_SHARD_RESTARTED, "web", "two", 3);
  v1::WatchEventsResponse e;
  ASSERT_TRUE(all->Read(&e));
  EXPECT_EQ(e.event().type(), v1::EVENT_TYPE_SHARD_STARTED);
  EXPECT_EQ(e.event().listener(), "api");
  ASSERT_TRUE(all->Read(&e));
  EXPECT_EQ(e.event().message(), "two");
  ASSERT_TRUE(web->Read(&e));
  EXPECT_EQ(e.event().type(), v1::EVENT_TYPE_SHARD_RESTARTED);
  EXPECT_EQ(e.event().shard(), 3);
  EXPECT_EQ(e.event().pid(), 1234);
  EXPECT_GT(e.event().time_unix_micros(), 0);

  all_ctx.TryCancel();
  EXPECT_FALSE(all->Read(&e));
  EXPECT_EQ(all->Finish().error_code(), grpc::CANCELLED);
  EXPECT_TRUE(
      WaitFor([&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  web_ctx.TryCancel();
  web->Finish();
  EXPECT_TRUE(
      WaitFor([&] { return fake_.subscribers() == 0; }, absl::Seconds(5)));
}

TEST_F(ApiServiceTest, WatchEventsBadListener) {
  grpc::ClientContext ctx;
  v1::WatchEventsRequest req;
  req.set_listener("NOT VALID");
  auto reader = stub_->WatchEvents(&ctx, req);
  v1::WatchEventsResponse e;
  EXPECT_FALSE(reader->Read(&e));
  EXPECT_EQ(reader->Finish().error_code(), grpc::INVALID_ARGUMENT);
}

TEST_F(ApiServiceTest, SlowWatcherIsDroppedWithBoundedQueue) {
  server_.reset();
  FleetServiceOptions options;
  options.max_queued_events = 4;
  StartServer(options);
  grpc::ClientContext ctx;
  auto reader = stub_->WatchEvents(&ctx, {});
  reader->WaitForInitialMetadata();
  ASSERT_TRUE(
      WaitFor([&] { return fake_.subscribers() == 1; }, absl::Seconds(5)));
  // Far more events than the queue holds, faster than they can be written.
  const std::string big(16 << 10, 'x');
  for (int i = 0; i < 2000; ++i) {
    fake_.Emit(v1::EVENT_TYPE_ERROR, "web", big);
  }
  v1::WatchEventsResponse e;
  int read = 0;
  while (reader->Read(&e)) ++read;
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("too slow"), std::string::npos);
  EXPECT_LT(read, 2000);
  EXPECT_TRUE(
      WaitFor([&] { return fake_.subscribers() == 0; }, absl::Seconds(5)));
}

TEST_F(ApiServiceTest, WatchEventsHistory) {
  const absl::Time now = absl::Now();
  fake_.Emit({v1::EVENT_TYPE_SHARD_EXITED, now - absl::Minutes(30), "web", 0, 1,
              "old"});
  fake_.Emit(
      {v1::EVENT_TYPE_ERROR, now - absl::Minutes(5), "api", -1, 0, "mid"});
  fake_.Emit({v1::EVENT_TYPE_SHARD_RESTARTED, now - absl::Seconds(1), "web", 1,
              2, "new"});
  auto read_all = [&](const v1::WatchEventsRequest& req, grpc::Status* end) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(10));
    auto reader = stub_->WatchEvents(&ctx, req);
    std::vector<std::string> out;
    v1::WatchEventsResponse e;
    while (reader->Read(&e)) out.push_back(e.event().message());
    *end = reader->Finish();
    return out;
  };
  grpc::Status end;
  v1::WatchEventsRequest req;
  req.set_history_only(true);
  EXPECT_EQ(read_all(req, &end),
            (std::vector<std::string>{"old", "mid", "new"}));
  EXPECT_TRUE(end.ok()) << end.error_message();
  req.set_since_unix_micros(absl::ToUnixMicros(now - absl::Minutes(10)));
  EXPECT_EQ(read_all(req, &end), (std::vector<std::string>{"mid", "new"}));
  req.set_listener("web");
  EXPECT_EQ(read_all(req, &end), (std::vector<std::string>{"new"}));
  EXPECT_TRUE(end.ok());
  EXPECT_EQ(fake_.subscribers(), 0);

  // Following with since: the history first, then new events, in order.
  grpc::ClientContext ctx;
  v1::WatchEventsRequest follow;
  follow.set_since_unix_micros(absl::ToUnixMicros(now - absl::Minutes(10)));
  auto reader = stub_->WatchEvents(&ctx, follow);
  v1::WatchEventsResponse e;
  ASSERT_TRUE(reader->Read(&e));
  EXPECT_EQ(e.event().message(), "mid");
  ASSERT_TRUE(reader->Read(&e));
  EXPECT_EQ(e.event().message(), "new");
  fake_.Emit(v1::EVENT_TYPE_ERROR, "web", "live");
  ASSERT_TRUE(reader->Read(&e));
  EXPECT_EQ(e.event().message(), "live");
  ctx.TryCancel();
  reader->Finish();
}

TEST(EventHistoryTest, KeepsTheLastEventsAndReplaysWithoutGaps) {
  EventHistory history(3);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  for (int i = 0; i < 5; ++i) {
    history.Publish({v1::EVENT_TYPE_ERROR, t0 + absl::Seconds(i), "web", i, 0,
                     absl::StrCat("e", i)});
  }
  std::vector<FleetEvent> kept = history.Since(absl::InfinitePast());
  ASSERT_EQ(kept.size(), 3u);
  EXPECT_EQ(kept[0].message, "e2");
  EXPECT_EQ(kept[2].message, "e4");
  EXPECT_EQ(history.Since(t0 + absl::Seconds(4)).size(), 1u);
  std::vector<std::string> seen;
  uint64_t id =
      history.Subscribe([&](const FleetEvent& e) { seen.push_back(e.message); },
                        t0 + absl::Seconds(3));
  history.Publish(
      {v1::EVENT_TYPE_ERROR, t0 + absl::Seconds(9), "web", 0, 0, "e9"});
  history.Unsubscribe(id);
  history.Publish(
      {v1::EVENT_TYPE_ERROR, t0 + absl::Seconds(10), "web", 0, 0, "e10"});
  EXPECT_EQ(seen, (std::vector<std::string>{"e3", "e4", "e9"}));
  EXPECT_EQ(history.subscribers(), 0u);
  seen.clear();
  id =
      history.Subscribe([&](const FleetEvent& e) { seen.push_back(e.message); },
                        absl::InfiniteFuture());
  EXPECT_TRUE(seen.empty());
  history.Unsubscribe(id);
}

TEST_F(ApiServiceTest, TooManyWatchers) {
  server_.reset();
  FleetServiceOptions options;
  options.max_watchers = 1;
  StartServer(options);
  grpc::ClientContext first_ctx, second_ctx;
  auto first = stub_->WatchEvents(&first_ctx, {});
  first->WaitForInitialMetadata();
  auto second = stub_->WatchEvents(&second_ctx, {});
  v1::WatchEventsResponse e;
  EXPECT_FALSE(second->Read(&e));
  EXPECT_EQ(second->Finish().error_code(), grpc::RESOURCE_EXHAUSTED);
  first_ctx.TryCancel();
  first->Finish();
}

TEST_F(ApiServiceTest, ShutdownEndsOpenStreams) {
  grpc::ClientContext ctx;
  auto reader = stub_->WatchEvents(&ctx, {});
  reader->WaitForInitialMetadata();
  server_->Shutdown();
  v1::WatchEventsResponse e;
  EXPECT_FALSE(reader->Read(&e));
  EXPECT_EQ(reader->Finish().error_code(), grpc::UNAVAILABLE);
  EXPECT_EQ(fake_.subscribers(), 0);
  struct stat st;
  EXPECT_NE(stat(socket_.c_str(), &st), 0) << "socket left behind";
}

TEST_F(ApiServiceTest, SocketIs0660InA0751Directory) {
  struct stat st;
  ASSERT_EQ(lstat(socket_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  ASSERT_EQ(stat((dir_.path() + "/run").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0751u);
}

TEST_F(ApiServiceTest, RefusesToStartOverALiveAgent) {
  FakeController other;
  auto second = ApiServer::Start(Unix(socket_), &other);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("another agent"), std::string::npos);
  // The first one still answers.
  v1::GetStatusResponse resp;
  EXPECT_TRUE(stub_->GetStatus(Ctx().get(), {}, &resp).ok());
}

// A client that knows nothing of our protos lists the services through
// reflection and calls GetStatus (tests/e2e/api_reflection.py).
TEST_F(ApiServiceTest, DiscoverableThroughReflection) {
  // deploy/install-deps.sh installs them; CI sets
  // PORTFLEET_REQUIRE_PYTHON_DEPS=1 so that it cannot pass without.
  PF_REQUIRE_PYTHON_GRPC();
  const std::string out = dir_.path() + "/reflection.out";
  const std::string cmd =
      std::string("/usr/bin/python3 ") + PORTFLEET_SOURCE_DIR +
      "/tests/e2e/api_reflection.py unix://" + socket_ + " >" + out + " 2>&1";
  EXPECT_EQ(system(cmd.c_str()), 0) << ReadFileOrEmpty(out);
  const std::string text = ReadFileOrEmpty(out);
  EXPECT_NE(text.find("service portfleet.v1.FleetService"), std::string::npos)
      << text;
  EXPECT_NE(text.find("service grpc.health.v1.Health"), std::string::npos)
      << text;
  EXPECT_NE(text.find("GetStatus version: \"9.8.7\""), std::string::npos)
      << text;
}

TEST(ApiServerTest, ReplacesAStaleSocket) {
  TempDir dir;
  const std::string path = dir.path() + "/api.sock";
  {
    // A socket file nobody listens on: what a SIGKILLed agent leaves.
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    close(fd);
  }
  FakeController fake;
  auto server = ApiServer::Start(Unix(path), &fake);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::FleetService::NewStub(grpc::CreateChannel(
      "unix://" + path, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::GetStatusResponse resp;
  EXPECT_TRUE(stub->GetStatus(&ctx, {}, &resp).ok());
}

TEST(ApiServerTest, RefusesToReplaceARegularFile) {
  TempDir dir;
  const std::string path = dir.WriteFile("api.sock", "not a socket");
  FakeController fake;
  auto server = ApiServer::Start(Unix(path), &fake);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ApiServerTest, BadAddresses) {
  FakeController fake;
  EXPECT_EQ(ApiServer::Start(Address("127.0.0.1:1"), &fake).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ApiServer::Start(Address("unix:///tmp/"), &fake).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ApiServer::Start(TlsOnly("127.0.0.1:0"), &fake).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ToGrpcStatusTest, KeepsCodeAndMessage) {
  grpc::Status s = ToGrpcStatus(absl::NotFoundError("listener \"x\""));
  EXPECT_EQ(s.error_code(), grpc::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "listener \"x\"");
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("")).error_code(),
            grpc::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ToGrpcStatus(absl::FailedPreconditionError("")).error_code(),
            grpc::FAILED_PRECONDITION);
}

}  // namespace
}  // namespace portfleet
