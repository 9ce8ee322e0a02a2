// The health monitor in the fleet, with fakes (FakeLauncher, FakeSteering,
// FakeObserver) and a manual clock: stalls are ejected from the tables and
// restored with hysteresis, replaced after the grace period, the last
// healthy shard is never ejected, workers without a control channel become
// ready, and maintenance takes a shard out of rotation by hand.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "agent/fleet/fleet.h"
#include "agent/health_board.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "tests/unit/fleet_fakes.h"
#include "worker/sdk/base/log.h"

namespace portfleet::testing {
namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class FleetHealthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetLogLevel(LogLevel::kError);
    loop_ = *EventLoop::Create(&clock_);
    FleetOptions options;
    options.cpus = {0, 1};
    options.base_env = {"PATH=/usr/bin:/bin"};
    fleet_ = std::make_unique<Fleet>(loop_.get(), &launcher_, options);
    fleet_->SetSteeringBackend(&steering_, "");
    fleet_->SetShardObserver(&observer_);
    fleet_->SetEventSink([this](const FleetEvent& e) { events_.push_back(e); });
    fleet_->StartHealthMonitor();
  }
  void TearDown() override { fleet_.reset(); }

  void Add(uint32_t shards, const std::string& extra = "") {
    v1::Listener l;
    std::string text = absl::StrCat(
        "name: 'web' address: '127.0.0.1:", port_, "' shards: ", shards,
        " worker { command: '/bin/true' } health { stall_grace_seconds: 5 } ",
        extra);
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &l));
    ASSERT_TRUE(fleet_->AddListener(l).ok());
    Advance(absl::Milliseconds(500));
  }
  // Moves the manual clock, running every timer (health rounds included).
  void Advance(absl::Duration d) {
    absl::Time until = clock_.Now() + d;
    loop_->RunUntilIdle();
    while (loop_->NextTimer() <= until) {
      loop_->AdvanceTo(&clock_, loop_->NextTimer());
      loop_->RunUntilIdle();
    }
    loop_->AdvanceTo(&clock_, until);
    loop_->RunUntilIdle();
  }

  ShardStatus Shard(uint32_t index) {
    ListenerStatus status = *fleet_->ListenerStatusOf("web");
    for (const ShardStatus& s : status.shards) {
      if (s.index == index) return s;
    }
    ADD_FAILURE() << "no shard " << index;
    return {};
  }
  std::vector<uint32_t> Weights() {
    return steering_.state.listeners["web"].applied.back().weights;
  }
  bool InSockarray(uint32_t index) {
    return steering_.state.listeners["web"].sockets.count(index) > 0;
  }
  int SocketOf(uint32_t index) {
    for (const Fleet::SharedSocket& s : fleet_->SharedSockets()) {
      if (s.shard == index) return s.fd;
    }
    return -1;
  }
  std::vector<v1::EventType> HealthEvents() {
    std::vector<v1::EventType> out;
    for (const FleetEvent& e : events_) {
      if (e.type >= v1::EVENT_TYPE_SHARD_STALLED) out.push_back(e.type);
    }
    return out;
  }
  v1::HealthState ListenerState() { return fleet_->Health().at(0).state; }

  int port_ = FreePort();
  ManualClock clock_;
  std::unique_ptr<EventLoop> loop_;
  FakeLauncher launcher_;
  FakeSteering steering_;
  FakeObserver observer_;
  std::vector<FleetEvent> events_;
  std::unique_ptr<Fleet> fleet_;
};

TEST_F(FleetHealthTest, HealthyShardsStayInTheTables) {
  Add(2);
  Advance(absl::Seconds(5));
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_THAT(Weights(), ElementsAre(1, 1));
  EXPECT_TRUE(HealthEvents().empty());
  EXPECT_EQ(ListenerState(), v1::HEALTH_STATE_SERVING);
}

TEST_F(FleetHealthTest, StoppedWorkerIsEjectedAfterTheWindowAndRestored) {
  Add(2);
  pid_t pid = Shard(1).pid;
  observer_.state[pid] = ProcessState::kStopped;
  Advance(absl::Milliseconds(400));  // within the 600 ms window
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_HEALTHY);
  Advance(absl::Milliseconds(600));
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_EJECTED);
  EXPECT_THAT(Shard(1).health_reason, HasSubstr("is stopped"));
  EXPECT_THAT(Weights(), ElementsAre(1, 0));
  EXPECT_FALSE(InSockarray(1));
  EXPECT_EQ(ListenerState(), v1::HEALTH_STATE_DEGRADED);
  EXPECT_THAT(HealthEvents(), ElementsAre(v1::EVENT_TYPE_SHARD_STALLED,
                                          v1::EVENT_TYPE_SHARD_EJECTED));
  // SIGCONT: back once it has been fine for restore_after (1 s).
  observer_.state[pid] = ProcessState::kRunning;
  Advance(absl::Milliseconds(600));
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_EJECTED);
  Advance(absl::Milliseconds(600));
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_THAT(Weights(), ElementsAre(1, 1));
  EXPECT_TRUE(InSockarray(1));
  EXPECT_EQ(HealthEvents().back(), v1::EVENT_TYPE_SHARD_RESTORED);
  // The grace period ends with the shard healthy: nothing is replaced.
  Advance(absl::Seconds(5));
  EXPECT_EQ(Shard(1).pid, pid);
  EXPECT_EQ(Shard(1).replacements, 0u);
  EXPECT_EQ(Shard(1).ejections, 1u);
}

TEST_F(FleetHealthTest, StillStalledAfterTheGracePeriodIsReplaced) {
  Add(2);
  pid_t pid = Shard(1).pid;
  observer_.state[pid] = ProcessState::kStopped;
  Advance(absl::Seconds(4));
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_EJECTED);
  EXPECT_TRUE(launcher_.Find(pid)->signals.empty());
  Advance(absl::Seconds(2));  // grace (5 s) over
  EXPECT_THAT(launcher_.Find(pid)->signals, ElementsAre(SIGKILL));
  pid_t fresh = Shard(1).pid;
  EXPECT_NE(fresh, pid);
  EXPECT_EQ(Shard(1).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_EQ(Shard(1).replacements, 1u);
  EXPECT_THAT(Weights(), ElementsAre(1, 1));
  EXPECT_TRUE(InSockarray(1));
  EXPECT_THAT(HealthEvents(), ElementsAre(v1::EVENT_TYPE_SHARD_STALLED,
                                          v1::EVENT_TYPE_SHARD_EJECTED,
                                          v1::EVENT_TYPE_SHARD_REPLACED,
                                          v1::EVENT_TYPE_SHARD_RESTORED));
  // The replacement runs on the shard's own socket.
  EXPECT_EQ(launcher_.Find(fresh)->spec.listen_fd, SocketOf(1));
}

TEST_F(FleetHealthTest, QueueThatIsNotAcceptedIsAStall) {
  Add(2);
  int fd = SocketOf(0);
  observer_.queue_depth[fd] = 7;  // waits; the counters do not move
  Advance(absl::Seconds(1));
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_EJECTED);
  EXPECT_THAT(Shard(0).health_reason, HasSubstr("7 connection(s) queued"));
  EXPECT_THAT(Weights(), ElementsAre(0, 1));
}

TEST_F(FleetHealthTest, QueueThatDrainsIsNotAStall) {
  Add(2);
  int fd = SocketOf(0);
  for (int i = 0; i < 20; ++i) {
    observer_.queue_depth[fd] = i % 2 == 0 ? 9 : 3;  // accepts between rounds
    Advance(absl::Milliseconds(200));
  }
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_TRUE(HealthEvents().empty());
}

TEST_F(FleetHealthTest, TheLastHealthyShardIsNeverEjected) {
  Add(2);
  observer_.state[Shard(0).pid] = ProcessState::kStopped;
  observer_.state[Shard(1).pid] = ProcessState::kStopped;
  Advance(absl::Seconds(1));
  // One goes; the other stays in the tables, stalled, and says so.
  std::vector<v1::ShardHealth> h = {Shard(0).health, Shard(1).health};
  EXPECT_THAT(h, Contains(v1::SHARD_HEALTH_EJECTED));
  EXPECT_THAT(h, Contains(v1::SHARD_HEALTH_STALLED));
  std::vector<uint32_t> w = Weights();
  EXPECT_EQ(w[0] + w[1], 1u);
  EXPECT_EQ(ListenerState(), v1::HEALTH_STATE_NOT_SERVING);
  bool said = false;
  for (const FleetEvent& e : events_) {
    said = said || (e.type == v1::EVENT_TYPE_ERROR &&
                    e.message.find("last healthy shard") != std::string::npos);
  }
  EXPECT_TRUE(said);
}

TEST_F(FleetHealthTest, SingleShardIsReplacedButNotEjected) {
  Add(1);
  pid_t pid = Shard(0).pid;
  observer_.state[pid] = ProcessState::kStopped;
  Advance(absl::Seconds(2));
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_STALLED);
  EXPECT_THAT(Weights(), ElementsAre(1));
  EXPECT_TRUE(InSockarray(0));
  Advance(absl::Seconds(4));
  EXPECT_NE(Shard(0).pid, pid);
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_HEALTHY);
}

TEST_F(FleetHealthTest, SilentWorkerIsReadyAfterTheGracePeriod) {
  launcher_.auto_ready = false;  // no hello, no ready: a third-party worker
  Add(1);
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_STARTING);
  EXPECT_EQ(ListenerState(), v1::HEALTH_STATE_STARTING);
  Advance(absl::Seconds(2));
  EXPECT_TRUE(Shard(0).ready);
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_TRUE(fleet_->AllReady());
}

TEST_F(FleetHealthTest, SilentWorkerThatDrainsItsQueueIsReadyAtOnce) {
  launcher_.auto_ready = false;
  v1::Listener l;
  Add(1);
  int fd = SocketOf(0);
  observer_.queue_depth[fd] = 4;
  Advance(absl::Milliseconds(200));
  observer_.queue_depth[fd] = 1;
  Advance(absl::Milliseconds(200));
  EXPECT_TRUE(Shard(0).ready);
}

TEST_F(FleetHealthTest, HelloButNeverReadyIsReplaced) {
  launcher_.auto_ready = false;
  Add(1);
  pid_t pid = Shard(0).pid;
  launcher_.SendHello(*launcher_.Find(pid));
  Advance(absl::Seconds(9));
  EXPECT_FALSE(Shard(0).ready);
  EXPECT_EQ(Shard(0).pid, pid);
  Advance(absl::Seconds(2));  // ready timeout (10 s)
  EXPECT_THAT(launcher_.Find(pid)->signals, ElementsAre(SIGKILL));
  EXPECT_NE(Shard(0).pid, pid);
  EXPECT_EQ(HealthEvents(),
            std::vector<v1::EventType>{v1::EVENT_TYPE_SHARD_REPLACED});
}

TEST_F(FleetHealthTest, MaintenanceTakesAShardOutOfRotationAndBack) {
  Add(2);
  ASSERT_TRUE(fleet_->SetShardMaintenance("web", 0, true).ok());
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_MAINTENANCE);
  EXPECT_THAT(Weights(), ElementsAre(0, 1));
  EXPECT_FALSE(InSockarray(0));
  // Not the last one.
  absl::Status last = fleet_->SetShardMaintenance("web", 1, true);
  EXPECT_TRUE(absl::IsFailedPrecondition(last)) << last;
  EXPECT_THAT(last.message(), HasSubstr("last healthy shard"));
  // It is not judged a stall while out of rotation, and comes back.
  Advance(absl::Seconds(3));
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_MAINTENANCE);
  ASSERT_TRUE(fleet_->SetShardMaintenance("web", 0, false).ok());
  EXPECT_THAT(Weights(), ElementsAre(1, 1));
  EXPECT_TRUE(InSockarray(0));
  Advance(absl::Milliseconds(400));
  EXPECT_EQ(Shard(0).health, v1::SHARD_HEALTH_HEALTHY);
  EXPECT_TRUE(absl::IsNotFound(fleet_->SetShardMaintenance("web", 7, true)));
}

TEST_F(FleetHealthTest, EjectedShardKeepsItsWeightPositionOthersKeepTheirs) {
  Add(3, "steering { weights: [3, 2, 1] }");
  EXPECT_THAT(Weights(), ElementsAre(3, 2, 1));
  observer_.state[Shard(1).pid] = ProcessState::kStopped;
  Advance(absl::Seconds(1));
  EXPECT_THAT(Weights(), ElementsAre(3, 0, 1));
}

TEST(AgentHealthTest, WorstListenerDecides) {
  ListenerHealthView ok{.name = "a",
                        .state = v1::HEALTH_STATE_SERVING,
                        .reason = "",
                        .healthy_shards = 2,
                        .shards = 2};
  ListenerHealthView degraded{.name = "b",
                              .state = v1::HEALTH_STATE_DEGRADED,
                              .reason = "shard 1 EJECTED: stopped",
                              .healthy_shards = 1,
                              .shards = 2};
  ListenerHealthView down{.name = "c",
                          .state = v1::HEALTH_STATE_NOT_SERVING,
                          .reason = "shard 0 STALLED",
                          .healthy_shards = 0,
                          .shards = 1};
  EXPECT_EQ(ComputeAgentHealth(AgentPhase::kServing, {ok}).state,
            v1::HEALTH_STATE_SERVING);
  AgentHealth h = ComputeAgentHealth(AgentPhase::kServing, {ok, degraded});
  EXPECT_EQ(h.state, v1::HEALTH_STATE_DEGRADED);
  EXPECT_TRUE(h.ready());
  EXPECT_THAT(h.reason, HasSubstr("listener b DEGRADED (1/2 shards healthy"));
  h = ComputeAgentHealth(AgentPhase::kServing, {ok, degraded, down});
  EXPECT_EQ(h.state, v1::HEALTH_STATE_NOT_SERVING);
  EXPECT_FALSE(h.ready());
  EXPECT_EQ(ComputeAgentHealth(AgentPhase::kStarting, {ok}).state,
            v1::HEALTH_STATE_STARTING);
  EXPECT_EQ(ComputeAgentHealth(AgentPhase::kStopping, {ok}).state,
            v1::HEALTH_STATE_STOPPING);
  EXPECT_EQ(ComputeAgentHealth(AgentPhase::kServing, {}).state,
            v1::HEALTH_STATE_SERVING);
  // Donating its sockets, the old agent is not ready: in a DaemonSet the new
  // pod's probes reach the old agent's endpoint (same host port) until the
  // new agent opens its own, which must not make the new pod ready.
  AgentHealth handing = ComputeAgentHealth(AgentPhase::kHandingOver, {ok});
  EXPECT_EQ(handing.state, v1::HEALTH_STATE_STOPPING);
  EXPECT_FALSE(handing.ready());
  EXPECT_THAT(handing.reason, HasSubstr("handing its sockets over"));
}

// Steps: the shard socket is held by its worker, a child in the worker's
// group, a stranger and a process left over from a stopped worker of this
// shard (named after it). Within a scan period the leftover is killed and
// counted, the stranger reported and left alone, each emitted once as
// SHARD_ORPHAN; holders that go away leave the view; once the sockets were
// handed to a new agent nothing is judged any more.
TEST_F(FleetHealthTest, OrphanScanKillsLeftoversAndReportsStrangers) {
  Add(1);
  ShardStatus shard = Shard(0);
  uint64_t inode = shard.socket_inode;
  ASSERT_NE(inode, 0u);
  pid_t worker = shard.pid;
  auto holder = [](pid_t pid, pid_t pgid, std::string listener,
                   std::string shard) {
    return SocketHolder{.pid = pid,
                        .pgid = pgid,
                        .ancestors = {},
                        .command = "w",
                        .listener = std::move(listener),
                        .shard = std::move(shard)};
  };
  observer_.holders[inode] = {
      holder(worker, worker, "web", "0"), holder(9001, worker, "web", "0"),
      holder(9002, 9002, "", ""), holder(9003, 9003, "web", "0")};
  Advance(absl::Milliseconds(1200));
  EXPECT_THAT(launcher_.killed_processes, ElementsAre(9003));
  shard = Shard(0);
  ASSERT_EQ(shard.orphans.size(), 2u);
  EXPECT_EQ(shard.orphans[0].pid, 9002);
  EXPECT_FALSE(shard.orphans[0].leftover);
  EXPECT_EQ(shard.orphans[1].pid, 9003);
  EXPECT_TRUE(shard.orphans[1].leftover);
  EXPECT_EQ(shard.orphans_killed, 1u);
  auto orphan_events = [&] {
    int n = 0;
    for (const FleetEvent& e : events_) {
      if (e.type == v1::EVENT_TYPE_SHARD_ORPHAN) n++;
    }
    return n;
  };
  EXPECT_EQ(orphan_events(), 2);
  Advance(absl::Seconds(3));  // still there: killed again, not re-emitted
  EXPECT_EQ(orphan_events(), 2);
  observer_.holders[inode].resize(2);
  Advance(absl::Milliseconds(1200));
  EXPECT_TRUE(Shard(0).orphans.empty());
  // Handed over to a new agent: its workers share the socket.
  fleet_->MarkSocketsShared();
  size_t kills = launcher_.killed_processes.size();
  observer_.holders[inode].push_back(holder(9004, 9004, "web", "0"));
  Advance(absl::Seconds(2));
  EXPECT_EQ(launcher_.killed_processes.size(), kills);
}

}  // namespace
}  // namespace portfleet::testing
