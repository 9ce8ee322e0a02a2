// Declarative mode's units without a kernel: ConfigReconciler against the
// API's fake controller on a real event loop (plans, phases, address moves,
// rejections), and ConfigModeController behind a real API server driven by
// portfleetctl in-process (refusals, status).
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/declarative.h"
#include "agent/options.h"
#include "gtest/gtest.h"
#include "tests/unit/ctl_test_env.h"

namespace portfleet {
namespace {

using ::portfleet::ctl::testing::CtlTest;
using ::portfleet::ctl::testing::Result;
using ::portfleet::testing::FakeController;

// The fake, refusing any listener with 7 shards (in dry runs too), as the
// real fleet refuses e.g. a worker outside --worker-allowlist.
class RefusingFake : public FakeController {
 public:
  using FakeController::CreateListener;
  using FakeController::UpdateListener;
  absl::Status CreateListener(const v1::Listener& spec) override {
    if (spec.shards() == 7) return Refused(spec);
    return FakeController::CreateListener(spec);
  }
  absl::Status UpdateListener(const v1::Listener& spec) override {
    if (spec.shards() == 7) return Refused(spec);
    return FakeController::UpdateListener(spec);
  }

 private:
  static absl::Status Refused(const v1::Listener& spec) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", spec.name(), ": 7 shards are unlucky"));
  }
};

std::string Listener(const std::string& name, const std::string& address,
                     int shards) {
  return absl::StrCat("listeners { name: \"", name, "\" address: \"", address,
                      "\" shards: ", shards,
                      " worker { command: \"portfleet-worker\" } }\n");
}

class ReconcilerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = EventLoop::Create();
    ASSERT_TRUE(loop.ok());
    loop_ = std::move(*loop);
    path_ = dir_.path() + "/fleet.textproto";
  }
  void TearDown() override {
    reconciler_.reset();
    loop_.reset();
  }

  // Replaces the file as an editor does (write a temp file, rename).
  void Write(const std::string& text) {
    std::ofstream(path_ + ".tmp") << text;
    ASSERT_EQ(::rename((path_ + ".tmp").c_str(), path_.c_str()), 0);
  }

  void StartReconciler() {
    reconciler_ = std::make_unique<ConfigReconciler>(
        loop_.get(), path_,
        ConfigReconcilerHooks{.controller = &fake_,
                              .desired = [this] { return fake_.DesiredSpec(); },
                              .publish =
                                  [this](const FleetEvent& e) {
                                    std::lock_guard<std::mutex> lock(mu_);
                                    events_.push_back(e);
                                  }},
        ConfigWatchOptions{.debounce = absl::Milliseconds(10),
                           .poll = absl::Seconds(10)});
    ASSERT_TRUE(reconciler_->Start().ok());
  }

  // Runs the loop until `pred` holds (at most 5 s).
  bool Pump(const std::function<bool()>& pred) {
    absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (absl::Now() < deadline) {
      loop_->RunOnce(absl::Milliseconds(10));
      if (pred()) return true;
    }
    return false;
  }
  bool PumpApplied(uint64_t generation) {
    return Pump([&] {
      v1::ConfigSource s = reconciler_->Status();
      return s.applied_generation() >= generation && !s.reconciling() &&
             s.error().empty();
    });
  }
  bool PumpError(const std::string& text) {
    return Pump([&] {
      return absl::StrContains(reconciler_->Status().error(), text) &&
             !reconciler_->Status().reconciling();
    });
  }
  std::map<std::string, v1::Listener> Fleet() {
    std::map<std::string, v1::Listener> out;
    const v1::FleetSpec spec = fake_.DesiredSpec();
    for (const v1::Listener& l : spec.listeners()) {
      out[l.name()] = l;
    }
    return out;
  }
  int Count(v1::EventType type) {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const FleetEvent& e : events_) n += e.type == type;
    return n;
  }

  testing::TempDir dir_;
  std::string path_;
  std::unique_ptr<EventLoop> loop_;
  RefusingFake fake_;
  std::unique_ptr<ConfigReconciler> reconciler_;
  std::mutex mu_;
  std::vector<FleetEvent> events_;
};

TEST_F(ReconcilerTest, CreatesUpdatesDeletesAndMovesAddresses) {
  Write(Listener("web", "127.0.0.1:8080", 2));
  StartReconciler();
  ASSERT_TRUE(PumpApplied(1)) << reconciler_->Status().DebugString();
  ASSERT_EQ(Fleet().size(), 1u);
  EXPECT_EQ(Fleet()["web"].shards(), 2u);
  EXPECT_EQ(reconciler_->Status().applied_hash().size(), 16u);

  Write(Listener("web", "127.0.0.1:8080", 3) +
        Listener("api", "127.0.0.1:9000", 1));
  ASSERT_TRUE(PumpApplied(2)) << reconciler_->Status().DebugString();
  EXPECT_EQ(Fleet()["web"].shards(), 3u);
  EXPECT_EQ(Fleet()["api"].address(), "127.0.0.1:9000");

  // api moves to another port (delete + create); web goes away.
  Write(Listener("api", "127.0.0.1:9001", 1));
  ASSERT_TRUE(PumpApplied(3)) << reconciler_->Status().DebugString();
  ASSERT_EQ(Fleet().size(), 1u);
  EXPECT_EQ(Fleet()["api"].address(), "127.0.0.1:9001");

  // Another listener takes api's address over in the same file: the
  // deletion runs first.
  Write(Listener("www", "127.0.0.1:9001", 2));
  ASSERT_TRUE(PumpApplied(4)) << reconciler_->Status().DebugString();
  ASSERT_EQ(Fleet().size(), 1u);
  EXPECT_EQ(Fleet()["www"].shards(), 2u);
  EXPECT_EQ(Count(v1::EVENT_TYPE_CONFIG_APPLIED), 4);
  EXPECT_EQ(Count(v1::EVENT_TYPE_CONFIG_REJECTED), 0);
}

// The spec file's rebalance block is a listener setting like any other:
// turning auto on (and off again) in the file updates the listener.
TEST_F(ReconcilerTest, AppliesTheRebalanceBlock) {
  Write(Listener("web", "127.0.0.1:8080", 2));
  StartReconciler();
  ASSERT_TRUE(PumpApplied(1)) << reconciler_->Status().DebugString();
  EXPECT_FALSE(Fleet()["web"].has_rebalance());
  std::string with = Listener("web", "127.0.0.1:8080", 2);
  with.insert(with.rfind('}'),
              "rebalance { mode: REBALANCE_MODE_AUTO period_seconds: 5 } ");
  Write(with);
  ASSERT_TRUE(PumpApplied(2)) << reconciler_->Status().DebugString();
  EXPECT_EQ(Fleet()["web"].rebalance().mode(), v1::REBALANCE_MODE_AUTO);
  EXPECT_EQ(Fleet()["web"].rebalance().period_seconds(), 5u);
  Write(Listener("web", "127.0.0.1:8080", 2));
  ASSERT_TRUE(PumpApplied(3)) << reconciler_->Status().DebugString();
  EXPECT_FALSE(Fleet()["web"].has_rebalance());
  // A bad block is refused with the field named; nothing changes.
  std::string bad = Listener("web", "127.0.0.1:8080", 2);
  bad.insert(bad.rfind('}'), "rebalance { period_seconds: 1 } ");
  Write(bad);
  ASSERT_TRUE(PumpError("rebalance.period_seconds: 1 is out of range"))
      << reconciler_->Status().DebugString();
  EXPECT_FALSE(Fleet()["web"].has_rebalance());
}

TEST_F(ReconcilerTest, RejectsWithoutChangingAnything) {
  Write(Listener("web", "127.0.0.1:8080", 2));
  StartReconciler();
  ASSERT_TRUE(PumpApplied(1));

  // Syntax error: the file, line and column.
  Write(Listener("web", "127.0.0.1:8080", 3) + "listeners { shards: }\n");
  ASSERT_TRUE(PumpError(path_ + ":2:")) << reconciler_->Status().DebugString();
  EXPECT_EQ(Fleet()["web"].shards(), 2u);

  // Refused by the controller's plan: nothing changes, not even the
  // listener that could be created.
  Write(Listener("web", "127.0.0.1:8080", 7) +
        Listener("api", "127.0.0.1:9000", 1));
  ASSERT_TRUE(PumpError("7 shards are unlucky"))
      << reconciler_->Status().DebugString();
  EXPECT_TRUE(absl::StrContains(reconciler_->Status().error(), path_));
  EXPECT_TRUE(absl::StrContains(reconciler_->Status().error(), "listener web"));
  EXPECT_EQ(Fleet().size(), 1u);
  EXPECT_EQ(Fleet()["web"].shards(), 2u);

  // An empty file is not "delete everything".
  Write("");
  ASSERT_TRUE(PumpError("is empty"));
  EXPECT_EQ(Fleet().size(), 1u);

  // A comment-only file is.
  Write("# no listeners\n");
  ASSERT_TRUE(PumpApplied(2)) << reconciler_->Status().DebugString();
  EXPECT_TRUE(Fleet().empty());
  EXPECT_EQ(Count(v1::EVENT_TYPE_CONFIG_REJECTED), 3);
  EXPECT_EQ(reconciler_->Status().applied_generation(), 2u);
}

TEST_F(ReconcilerTest, TakesOverTheAddressOfAListenerNotInTheFile) {
  ASSERT_TRUE(fake_
                  .CreateListener([] {
                    v1::Listener l;
                    l.set_name("outside");
                    l.set_address("127.0.0.1:7000");
                    l.set_shards(1);
                    l.mutable_worker()->set_command("portfleet-worker");
                    return l;
                  }())
                  .ok());
  // The file takes outside's address for a new listener but keeps outside
  // out of the file: outside is deleted first, so this is allowed.
  Write(Listener("inside", "127.0.0.1:7000", 1));
  StartReconciler();
  ASSERT_TRUE(PumpApplied(1)) << reconciler_->Status().DebugString();
  EXPECT_EQ(Fleet().count("outside"), 0u);
  EXPECT_EQ(Fleet()["inside"].address(), "127.0.0.1:7000");
}

class ConfigModeCtlTest : public CtlTest {
 protected:
  void SetUp() override {
    // The server talks to the guard, which talks to the fake.
    server_address_ = "unix://" + dir_.path() + "/api.sock";
    ApiServerOptions options;
    options.address = server_address_;
    guard_ = std::make_unique<ConfigModeController>(
        &fake_, ConfigMode::kDeclarative, "/etc/portfleet/fleet.textproto",
        nullptr);
    auto server = ApiServer::Start(options, guard_.get());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    v1::Listener web;
    web.set_name("web");
    web.set_address("127.0.0.1:8080");
    web.set_shards(2);
    web.mutable_worker()->set_command("portfleet-worker");
    ASSERT_TRUE(fake_.CreateListener(web).ok());
  }
  std::unique_ptr<ConfigModeController> guard_;
};

TEST_F(ConfigModeCtlTest, RefusesChangesAllowsReadsAndStatus) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{
           {"scale", "web", "--shards", "3"},
           {"drain", "web", "--shard", "1"},
           {"delete", "listener", "web"},
           {"steer", "web", "--policy", "hash"},
           {"adopt", "web", "--pid", "1"},
       }) {
    Result r = Ctl(args);
    EXPECT_EQ(r.code, 1) << args[0] << ": " << r.out << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, "FAILED_PRECONDITION")) << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, "/etc/portfleet/fleet.textproto"))
        << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, "--config-mode=declarative")) << r.err;
  }
  EXPECT_EQ(fake_.DesiredSpec().listeners(0).shards(), 2u);
  // A rebalance is runtime state: it reaches the controller (this fake
  // cannot rebalance and says so) instead of being refused.
  Result rebalance = Ctl({"rebalance", "web"});
  EXPECT_EQ(rebalance.code, 1);
  EXPECT_TRUE(absl::StrContains(rebalance.err, "cannot rebalance"))
      << rebalance.err;
  EXPECT_FALSE(absl::StrContains(rebalance.err, "--config-mode"))
      << rebalance.err;
  Result get = Ctl({"get", "listeners"});
  EXPECT_EQ(get.code, 0) << get.err;
  Result status = Ctl({"status"});
  EXPECT_EQ(status.code, 0) << status.err;
  EXPECT_TRUE(absl::StrContains(
      status.out, "config: declarative /etc/portfleet/fleet.textproto"))
      << status.out;
  Result json = Ctl({"status", "-o", "json"});
  EXPECT_TRUE(absl::StrContains(json.out, "\"declarative\"")) << json.out;
}

TEST(ConfigModeControllerTest, SeedModePassesChangesThrough) {
  FakeController fake;
  ConfigModeController guard(&fake, ConfigMode::kSeed, "fleet.textproto",
                             nullptr);
  v1::Listener web;
  web.set_name("web");
  web.set_address("127.0.0.1:8080");
  web.set_shards(1);
  web.mutable_worker()->set_command("portfleet-worker");
  absl::Status result = absl::UnknownError("not called");
  guard.CreateListener(
      web, MutationCall{.done = [&](absl::Status s) { result = s; }});
  EXPECT_TRUE(result.ok()) << result;
  EXPECT_EQ(guard.GetStatus().config.mode(), v1::CONFIG_MODE_SEED);
  EXPECT_EQ(guard.GetStatus().config.file(), "fleet.textproto");
}

TEST(ConfigModeOptionTest, ParsesAndNeedsAConfigFile) {
  ParsedArgs seed = ParseAgentArgs({"--config", "fleet.textproto"});
  EXPECT_FALSE(seed.exit_now);
  EXPECT_FALSE(seed.options.declarative_config);
  ParsedArgs declarative = ParseAgentArgs(
      {"--config", "fleet.textproto", "--config-mode", "declarative"});
  EXPECT_FALSE(declarative.exit_now);
  EXPECT_TRUE(declarative.options.declarative_config);
  ParsedArgs inline_seed =
      ParseAgentArgs({"--config=fleet.textproto", "--config-mode=seed"});
  EXPECT_FALSE(inline_seed.exit_now);
  EXPECT_FALSE(inline_seed.options.declarative_config);
  EXPECT_EQ(ParseAgentArgs({"--config-mode=declarative"}).exit_code, 2);
  EXPECT_EQ(ParseAgentArgs({"--config", "f.textproto", "--config-mode=bogus"})
                .exit_code,
            2);
}

}  // namespace
}  // namespace portfleet
