// Fleet logic with fakes (FakeLauncher, FakeSteering) and a manual clock: no
// processes, no BPF, no privileges, no real waiting. The real system is
// proven by the netns tier; these cases pin down the state machine: restart
// backoff, rollout and its rollback, drain timeouts, shutdown while a change
// is in flight, and that every mutating call that fails changes nothing
// (spec, tables, CPU pinning, backlog, persisted state).
#include "agent/fleet/fleet.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>

#include <future>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "agent/fleet/orphans.h"
#include "agent/fleet_controller.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "tests/unit/fleet_fakes.h"
#include "worker/sdk/base/log.h"

namespace portfleet::testing {
namespace {

using ::google::protobuf::util::MessageDifferencer;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class FleetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetLogLevel(LogLevel::kError);
    loop_ = *EventLoop::Create(&clock_);
    FleetOptions options;
    options.cpus = {0, 1};
    options.base_env = {"PATH=/usr/bin:/bin"};
    fleet_ = std::make_unique<Fleet>(loop_.get(), &launcher_, options);
    fleet_->SetSteeringBackend(&steering_, "");
  }
  void TearDown() override {
    // Leave nothing registered on the loop.
    fleet_.reset();
  }

  v1::Listener Spec(uint32_t shards, const std::string& extra = "") {
    v1::Listener l;
    std::string text = absl::StrCat(
        "name: 'web' address: '127.0.0.1:", port_, "' shards: ", shards,
        " worker { command: '/bin/true' args: '--v1' }"
        " drain_timeout_seconds: 5 ",
        extra);
    EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &l))
        << text;
    return l;
  }

  // Runs the loop until nothing happens; workers told to drain exit (when
  // the launcher says they do).
  void Settle() {
    for (int round = 0; round < 100; ++round) {
      loop_->RunUntilIdle();
      bool more = false;
      if (launcher_.exit_on_term) {
        for (FakeLauncher::Process* p : launcher_.Running()) {
          for (const v1::AgentMessage& m : launcher_.Received(p->pid)) {
            if (m.has_drain()) {
              launcher_.ExitWith(p->pid, 0);
              more = true;
            }
          }
        }
      }
      if (!more) return;
    }
  }
  void Advance(absl::Duration d) {
    Settle();
    absl::Time until = clock_.Now() + d;
    while (loop_->NextTimer() <= until) {
      loop_->AdvanceTo(&clock_, loop_->NextTimer());
      Settle();
    }
    loop_->AdvanceTo(&clock_, until);
    Settle();
  }

  // Records the result of an asynchronous call.
  struct Result {
    bool called = false;
    absl::Status status;
  };
  Done Record(Result* r) {
    return [r](absl::Status s) {
      EXPECT_FALSE(r->called) << "done called twice";
      r->called = true;
      r->status = std::move(s);
    };
  }

  ListenerStatus Status() { return *fleet_->ListenerStatusOf("web"); }
  std::vector<pid_t> ServingPids() {
    std::vector<pid_t> out;
    for (const ShardStatus& s : Status().shards) out.push_back(s.pid);
    return out;
  }
  const FakeSteeringState::Listener& Tables() {
    return steering_.state.listeners["web"];
  }
  std::vector<int> ShardFds() {
    std::vector<int> out;
    for (const Fleet::SharedSocket& s : fleet_->SharedSockets()) {
      out.push_back(s.fd);
    }
    return out;
  }

  int port_ = FreePort();
  ManualClock clock_;
  std::unique_ptr<EventLoop> loop_;
  FakeLauncher launcher_;
  FakeSteering steering_;
  std::unique_ptr<Fleet> fleet_;
};

TEST_F(FleetTest, StartsOneWorkerPerShardOnItsOwnSocket) {
  ASSERT_TRUE(fleet_->AddListener(Spec(3)).ok());
  Settle();
  ASSERT_EQ(launcher_.launches(), 3u);
  std::set<uint64_t> inodes;
  for (FakeLauncher::Process* p : launcher_.All()) {
    EXPECT_EQ(p->Arg(1), "--v1");
    inodes.insert(*SocketInodeOf(p->spec.listen_fd));
    EXPECT_THAT(p->spec.env, ::testing::Contains("LISTEN_FDS=1"));
    EXPECT_THAT(p->spec.env, ::testing::Contains("LISTEN_FDNAMES=web"));
  }
  EXPECT_EQ(inodes.size(), 3u);
  EXPECT_TRUE(fleet_->AllReady());
  ASSERT_EQ(Tables().applied.size(), 1u);
  EXPECT_THAT(Tables().applied.back().weights, ElementsAre(1, 1, 1));
  EXPECT_EQ(Tables().sockets.size(), 3u);
}

// Steps: a worker that keeps exiting at once is restarted after 100 ms, then
// 200, 400 ... capped at 10 s; one that ran 10 s resets the delay to 100 ms.
TEST_F(FleetTest, RestartBackoffDoublesToTenSecondsAndResetsAfterUptime) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  std::vector<absl::Duration> delays;
  for (int i = 0; i < 9; ++i) {
    pid_t pid = ServingPids()[0];
    launcher_.ExitWith(pid, 1);
    Settle();
    EXPECT_EQ(Status().shards[0].state, v1::SHARD_STATE_BACKOFF);
    absl::Time exited = clock_.Now();
    size_t before = launcher_.launches();
    while (launcher_.launches() == before) {
      ASSERT_LT(loop_->NextTimer(), absl::InfiniteFuture());
      loop_->AdvanceTo(&clock_, loop_->NextTimer());
      Settle();
    }
    delays.push_back(clock_.Now() - exited);
  }
  EXPECT_THAT(delays,
              ElementsAre(absl::Milliseconds(100), absl::Milliseconds(200),
                          absl::Milliseconds(400), absl::Milliseconds(800),
                          absl::Milliseconds(1600), absl::Milliseconds(3200),
                          absl::Milliseconds(6400), absl::Seconds(10),
                          absl::Seconds(10)));
  EXPECT_EQ(Status().shards[0].restarts, 9u);
  // Stable for 10 s: the next exit is restarted after 100 ms again.
  Advance(absl::Seconds(10));
  launcher_.ExitWith(ServingPids()[0], 1);
  Settle();
  size_t before = launcher_.launches();
  Advance(absl::Milliseconds(99));
  EXPECT_EQ(launcher_.launches(), before);
  Advance(absl::Milliseconds(1));
  EXPECT_EQ(launcher_.launches(), before + 1);
}

TEST_F(FleetTest, ScaleDownDrainsWithinTheTimeoutThenKills) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  launcher_.exit_on_term = false;  // a straggler
  pid_t victim = ServingPids()[1];
  Result r;
  ASSERT_TRUE(fleet_->ScaleListener("web", 1, Record(&r)).ok());
  Settle();
  // Out of the tables and the sockarray at once; told to drain.
  EXPECT_THAT(Tables().applied.back().weights, ElementsAre(1, 0));
  EXPECT_EQ(Tables().sockets.count(1), 0u);
  EXPECT_FALSE(r.called);
  Advance(absl::Milliseconds(4999));
  EXPECT_FALSE(launcher_.Find(victim)->Exited());
  EXPECT_FALSE(r.called);
  Advance(absl::Milliseconds(1));
  EXPECT_THAT(launcher_.Find(victim)->signals, ElementsAre(SIGKILL));
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(Status().shards.size(), 1u);
  EXPECT_EQ(fleet_->DesiredSpec().listeners(0).shards(), 1u);
}

// Steps: roll 3 shards one at a time; the third new worker exits before it is
// ready; the two rolled shards are rolled back; the old program is what runs
// and what the spec says.
TEST_F(FleetTest, RolloutFailureRollsBackTheShardsAlreadyRolled) {
  ASSERT_TRUE(fleet_->AddListener(Spec(3)).ok());
  Settle();
  std::vector<pid_t> old_pids = ServingPids();
  v1::WorkerSpec v2;
  v2.add_args("--v2");
  launcher_.auto_ready = false;
  Result r;
  ASSERT_TRUE(fleet_->RollOut("web", v2, 1, Record(&r)).ok());
  for (int i = 0; i < 2; ++i) {
    Settle();
    FakeLauncher::Process* c = launcher_.All().back();
    EXPECT_EQ(c->Arg(1), "--v2");
    launcher_.SendHello(*c);
    launcher_.SendReady(*c);
    Settle();
  }
  FakeLauncher::Process* third = launcher_.All().back();
  ASSERT_EQ(third->Arg(1), "--v2");
  launcher_.ExitWith(third->pid, 3);
  // Rollback: new workers of the old program on shards 1, then 0.
  for (int i = 0; i < 2; ++i) {
    Settle();
    FakeLauncher::Process* back = launcher_.All().back();
    EXPECT_EQ(back->Arg(1), "--v1");
    launcher_.SendHello(*back);
    launcher_.SendReady(*back);
  }
  Settle();
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(absl::IsFailedPrecondition(r.status)) << r.status;
  EXPECT_THAT(r.status.message(), HasSubstr("before it was ready"));
  for (pid_t pid : ServingPids()) {
    EXPECT_EQ(launcher_.Find(pid)->Arg(1), "--v1");
  }
  EXPECT_EQ(ServingPids()[2], old_pids[2]);  // never replaced
  EXPECT_EQ(fleet_->DesiredSpec().listeners(0).worker().args(0), "--v1");
  EXPECT_EQ(launcher_.Running().size(), 3u);
}

TEST_F(FleetTest, RolloutReplacesEveryWorkerAndUpdatesTheSpec) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  std::vector<pid_t> old_pids = ServingPids();
  v1::WorkerSpec v2;
  v2.add_args("--v2");
  Result r;
  ASSERT_TRUE(fleet_->RollOut("web", v2, 2, Record(&r)).ok());
  Settle();
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(r.status.ok()) << r.status;
  for (pid_t pid : ServingPids()) {
    EXPECT_EQ(launcher_.Find(pid)->Arg(1), "--v2");
  }
  for (pid_t pid : old_pids) EXPECT_TRUE(launcher_.Find(pid)->Exited());
  EXPECT_EQ(fleet_->DesiredSpec().listeners(0).worker().args(0), "--v2");
}

// Steps:
// 1. Three shards; roll out --v2 one at a time, the first new worker not
//    ready yet; pause.
// 2. It becomes ready: that shard is rolled, no further one starts.
// 3. Resume: the rest roll; the record says succeeded, 3 of 3; undo then
//    rolls the previous worker out again (a new rollout marked undo).
TEST_F(FleetTest, RolloutPauseResumeAndUndo) {
  ASSERT_TRUE(fleet_->AddListener(Spec(3)).ok());
  Settle();
  const size_t processes = launcher_.All().size();
  launcher_.auto_ready = false;
  v1::WorkerSpec v2;
  v2.add_args("--v2");
  Result r;
  ASSERT_TRUE(fleet_->RollOut("web", v2, 1, Record(&r)).ok());
  Settle();
  ASSERT_EQ(launcher_.All().size(), processes + 1);
  absl::StatusOr<v1::RollOut> paused = fleet_->PauseRollOut("web", true);
  ASSERT_TRUE(paused.ok()) << paused.status();
  EXPECT_EQ(paused->state(), v1::ROLL_OUT_STATE_PAUSED);
  EXPECT_EQ(paused->id(), "web/1");
  auto& first = *launcher_.All().back();
  launcher_.SendHello(first);
  launcher_.SendReady(first);
  Settle();
  Advance(absl::Seconds(1));
  EXPECT_EQ(launcher_.All().size(), processes + 1);  // nothing more started
  absl::StatusOr<std::vector<v1::RollOut>> all = fleet_->RollOuts("web");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all->front().shards_rolled(), 1u);
  EXPECT_FALSE(r.called);

  launcher_.auto_ready = true;
  ASSERT_TRUE(fleet_->PauseRollOut("web", false).ok());
  Settle();
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(r.status.ok()) << r.status;
  all = fleet_->RollOuts("web");
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all->front().state(), v1::ROLL_OUT_STATE_SUCCEEDED);
  EXPECT_EQ(all->front().shards_rolled(), 3u);
  EXPECT_TRUE(
      absl::IsFailedPrecondition(fleet_->PauseRollOut("web", true).status()));

  Result undone;
  ASSERT_TRUE(fleet_->RollOutPrevious("web", 3, Record(&undone)).ok());
  Settle();
  ASSERT_TRUE(undone.called);
  EXPECT_TRUE(undone.status.ok()) << undone.status;
  for (pid_t pid : ServingPids()) {
    EXPECT_NE(launcher_.Find(pid)->Arg(1), "--v2");
  }
  all = fleet_->RollOuts("web");
  ASSERT_EQ(all->size(), 2u);
  EXPECT_TRUE(all->front().undo());
  EXPECT_EQ(all->front().id(), "web/2");
  EXPECT_EQ(all->front().state(), v1::ROLL_OUT_STATE_SUCCEEDED);
}

// Steps:
// 1. Two shards; roll out --v2 one at a time; the second new worker is not
//    ready yet when the rollout is undone.
// 2. Without waiting for the pending new worker's readiness timeout: it is
//    stopped, the first shard goes back to the old worker; the rollout ends
//    rolled back with the undo as its reason.
TEST_F(FleetTest, UndoOfARolloutInProgressRollsItBack) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  std::vector<pid_t> old_pids = ServingPids();
  launcher_.auto_ready = false;
  v1::WorkerSpec v2;
  v2.add_args("--v2");
  Result r;
  ASSERT_TRUE(fleet_->RollOut("web", v2, 1, Record(&r)).ok());
  Settle();
  auto& first = *launcher_.All().back();
  launcher_.SendHello(first);
  launcher_.SendReady(first);
  Settle();  // shard 0 rolled; shard 1's new worker is waiting
  absl::StatusOr<std::optional<v1::RollOut>> u =
      fleet_->UndoRollOutInProgress("web");
  ASSERT_TRUE(u.ok()) << u.status();
  ASSERT_TRUE(u->has_value());
  EXPECT_EQ((*u)->state(), v1::ROLL_OUT_STATE_ROLLING_BACK);
  launcher_.auto_ready = true;
  Settle();  // the pending new worker is stopped, shard 0 rolled back
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(absl::IsAborted(r.status)) << r.status;
  for (pid_t pid : ServingPids()) {
    EXPECT_NE(launcher_.Find(pid)->Arg(1), "--v2");
  }
  absl::StatusOr<std::vector<v1::RollOut>> all = fleet_->RollOuts("web");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->front().state(), v1::ROLL_OUT_STATE_ROLLED_BACK);
  EXPECT_THAT(all->front().message(), HasSubstr("undone by request"));
  EXPECT_FALSE(fleet_->DesiredSpec().listeners(0).worker().args_size() > 0 &&
               fleet_->DesiredSpec().listeners(0).worker().args(0) == "--v2");
}

TEST_F(FleetTest, NewWorkerThatNeverSaysReadyTimesOut) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  launcher_.auto_ready = false;
  Result r;
  ASSERT_TRUE(fleet_->ScaleListener("web", 2, Record(&r)).ok());
  Settle();
  launcher_.SendHello(*launcher_.All().back());  // hello, never ready
  Advance(absl::Milliseconds(9999));
  EXPECT_FALSE(r.called);
  Advance(absl::Milliseconds(1));
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(absl::IsUnavailable(r.status)) << r.status;
  EXPECT_THAT(r.status.message(), HasSubstr("was not ready within 10s"));
  EXPECT_TRUE(launcher_.All().back()->Exited());
  EXPECT_EQ(Status().shards.size(), 1u);
}

TEST_F(FleetTest, WorkerWithoutControlChannelIsReadyAfterTheGracePeriod) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  launcher_.auto_ready = false;  // says nothing at all
  Result r;
  ASSERT_TRUE(fleet_->ScaleListener("web", 2, Record(&r)).ok());
  Advance(absl::Milliseconds(1999));
  EXPECT_FALSE(r.called);
  Advance(absl::Milliseconds(1));
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(r.status.ok()) << r.status;
  EXPECT_THAT(Tables().applied.back().weights, ElementsAre(1, 1));
}

// --- A worker is a process tree ---------------------------------------------

// Steps: a pre-fork worker is drained (scale-down); its parent exits at once
// and leaves children in its process group. The drain waits for the group,
// SIGTERMs it, and SIGKILLs it at the drain deadline (5 s from the drain's
// start), then completes.
TEST_F(FleetTest, DrainWaitsForTheGroupAndKillsItAtTheDeadline) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  launcher_.exit_on_term = false;
  pid_t victim = ServingPids()[1];
  launcher_.surviving_groups.insert(victim);
  Result r;
  ASSERT_TRUE(fleet_->ScaleListener("web", 1, Record(&r)).ok());
  Settle();
  Advance(absl::Seconds(1));
  launcher_.ExitWith(victim, 0);  // the parent leaves first
  Advance(absl::Milliseconds(500));
  EXPECT_FALSE(r.called) << "the drain ended with the group alive";
  EXPECT_THAT(launcher_.group_signals,
              ::testing::Contains(std::make_pair(victim, SIGTERM)));
  Advance(absl::Milliseconds(3400));  // 4.9 s after the drain began
  EXPECT_FALSE(r.called);
  EXPECT_TRUE(launcher_.GroupAlive(victim));
  Advance(absl::Milliseconds(300));
  EXPECT_THAT(launcher_.group_signals,
              ::testing::Contains(std::make_pair(victim, SIGKILL)));
  EXPECT_FALSE(launcher_.GroupAlive(victim));
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(Status().shards.size(), 1u);
}

// Steps: a serving pre-fork worker's parent crashes; its children stay in
// its group. The shard restarts as usual and the old group gets SIGTERM
// (its children finish what they hold and leave).
TEST_F(FleetTest, CrashedParentsGroupIsToldToStopAndTheShardRestarts) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  pid_t parent = ServingPids()[0];
  launcher_.surviving_groups.insert(parent);
  launcher_.ExitWith(parent, 1);
  Settle();
  EXPECT_THAT(launcher_.group_signals,
              ElementsAre(std::make_pair(parent, SIGTERM)));
  Advance(absl::Milliseconds(200));
  EXPECT_FALSE(launcher_.GroupAlive(parent));
  EXPECT_NE(ServingPids()[0], parent);
  EXPECT_NE(ServingPids()[0], 0);
}

// Steps: the agent stops; a worker's parent exits on SIGTERM but its
// children do not. The stop waits for them, SIGKILLs the group at the drain
// timeout, and only then completes; a second signal (KillAll) on the way
// kills the group at once.
TEST_F(FleetTest, ShutdownWaitsForTheWholeTree) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  launcher_.exit_on_term = false;
  std::vector<pid_t> pids = ServingPids();
  for (pid_t p : pids) launcher_.surviving_groups.insert(p);
  bool stopped = false;
  fleet_->Shutdown([&] { stopped = true; });
  Settle();
  for (pid_t p : pids) launcher_.ExitWith(p, 0);
  Advance(absl::Seconds(2));
  EXPECT_FALSE(stopped);
  EXPECT_TRUE(launcher_.GroupAlive(pids[0]));
  fleet_->KillAll();  // a second signal
  Advance(absl::Milliseconds(200));
  EXPECT_TRUE(stopped);
  for (pid_t p : pids) EXPECT_FALSE(launcher_.GroupAlive(p));
}

// Steps: a third-party worker that never said hello (its fd 4 open but
// unread) is told to drain with SIGTERM, not only on its control channel.
TEST_F(FleetTest, WorkerWithoutHelloDrainsOnSigterm) {
  launcher_.auto_ready = false;
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Advance(absl::Seconds(3));  // ready by the grace period
  launcher_.exit_on_term = false;
  pid_t victim = ServingPids()[1];
  Result r;
  ASSERT_TRUE(fleet_->ScaleListener("web", 1, Record(&r)).ok());
  Settle();
  EXPECT_THAT(launcher_.Find(victim)->signals, ElementsAre(SIGTERM));
}

TEST(ClassifyHolderTest, TreesLeftoversAndStrangers) {
  ShardTrees trees{.agent_pid = 10,
                   .groups = {100, 200},
                   .pids = {100, 200},
                   .past_groups = {50},
                   .listener = "web",
                   .shard = 1};
  auto holder = [](pid_t pid, pid_t pgid, std::vector<pid_t> ancestors,
                   std::string listener, std::string shard) {
    return SocketHolder{.pid = pid,
                        .pgid = pgid,
                        .ancestors = std::move(ancestors),
                        .command = "x",
                        .listener = std::move(listener),
                        .shard = std::move(shard)};
  };
  // The agent, a worker, a child in its group, a child that left the group.
  EXPECT_EQ(ClassifyHolder(holder(10, 10, {1}, "", ""), trees),
            HolderVerdict::kOurs);
  EXPECT_EQ(ClassifyHolder(holder(100, 100, {10}, "web", "1"), trees),
            HolderVerdict::kOurs);
  EXPECT_EQ(ClassifyHolder(holder(101, 100, {100}, "web", "1"), trees),
            HolderVerdict::kOurs);
  EXPECT_EQ(ClassifyHolder(holder(102, 102, {101, 100}, "web", "1"), trees),
            HolderVerdict::kOurs);
  // The agent's child between fork and exec.
  EXPECT_EQ(ClassifyHolder(holder(103, 5, {10}, "", ""), trees),
            HolderVerdict::kOurs);
  // Left over: in a past worker's group (environment overwritten), or named
  // after this shard with no tie to a current worker.
  EXPECT_EQ(ClassifyHolder(holder(51, 50, {}, "", ""), trees),
            HolderVerdict::kLeftover);
  EXPECT_EQ(ClassifyHolder(holder(60, 60, {}, "web", "1"), trees),
            HolderVerdict::kLeftover);
  // Strangers: another shard's or listener's name, or none.
  EXPECT_EQ(ClassifyHolder(holder(61, 61, {}, "web", "2"), trees),
            HolderVerdict::kForeign);
  EXPECT_EQ(ClassifyHolder(holder(62, 62, {}, "api", "1"), trees),
            HolderVerdict::kForeign);
  EXPECT_EQ(ClassifyHolder(holder(63, 63, {7}, "", ""), trees),
            HolderVerdict::kForeign);
}

// --- Shutdown while a change is in flight --------------------------------

TEST_F(FleetTest, ShutdownDuringScaleUpCompletesAndStartsNothingMore) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  launcher_.auto_ready = false;
  Result scaled;
  ASSERT_TRUE(fleet_->ScaleListener("web", 3, Record(&scaled)).ok());
  Settle();
  size_t launches = launcher_.launches();
  bool stopped = false;
  fleet_->Shutdown([&] { stopped = true; });
  Settle();
  ASSERT_TRUE(stopped);
  ASSERT_TRUE(scaled.called);
  EXPECT_TRUE(absl::IsUnavailable(scaled.status)) << scaled.status;
  EXPECT_EQ(launcher_.launches(), launches);
  EXPECT_TRUE(launcher_.Running().empty());
  EXPECT_EQ(fleet_->listener_count(), 0u);
}

TEST_F(FleetTest, ShutdownWithASlowNewWorkerKillsItAtTheDrainTimeout) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  launcher_.auto_ready = false;
  launcher_.exit_on_term = false;
  Result scaled;
  ASSERT_TRUE(fleet_->ScaleListener("web", 2, Record(&scaled)).ok());
  Settle();
  bool stopped = false;
  fleet_->Shutdown([&] { stopped = true; });
  Advance(absl::Milliseconds(4999));
  EXPECT_FALSE(stopped);
  Advance(absl::Milliseconds(1));
  EXPECT_TRUE(stopped);
  EXPECT_TRUE(launcher_.Running().empty());
}

TEST_F(FleetTest, ShutdownDuringRolloutDoesNotRollBack) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  launcher_.auto_ready = false;
  v1::WorkerSpec v2;
  v2.add_args("--v2");
  Result r;
  ASSERT_TRUE(fleet_->RollOut("web", v2, 1, Record(&r)).ok());
  Settle();
  FakeLauncher::Process* c = launcher_.All().back();
  launcher_.SendHello(*c);
  launcher_.SendReady(*c);
  Settle();  // shard 0 rolled; shard 1's candidate waits
  size_t launches = launcher_.launches();
  bool stopped = false;
  fleet_->Shutdown([&] { stopped = true; });
  Settle();
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(absl::IsUnavailable(r.status)) << r.status;
  EXPECT_TRUE(stopped);
  EXPECT_EQ(launcher_.launches(), launches);  // no rollback worker
  EXPECT_TRUE(launcher_.Running().empty());
}

TEST_F(FleetTest, DeleteDuringRolloutStopsItWithoutRollingBack) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  launcher_.auto_ready = false;
  v1::WorkerSpec v2;
  v2.add_args("--v2");
  Result rolled, deleted;
  ASSERT_TRUE(fleet_->RollOut("web", v2, 1, Record(&rolled)).ok());
  Settle();
  size_t launches = launcher_.launches();
  ASSERT_TRUE(fleet_->DeleteListener("web", Record(&deleted)).ok());
  Settle();
  ASSERT_TRUE(rolled.called);
  EXPECT_TRUE(absl::IsAborted(rolled.status)) << rolled.status;
  ASSERT_TRUE(deleted.called);
  EXPECT_TRUE(deleted.status.ok());
  EXPECT_EQ(launcher_.launches(), launches);
  EXPECT_TRUE(launcher_.Running().empty());
  EXPECT_TRUE(Tables().pins_removed);
}

// --- A failed call changes nothing ---------------------------------------

// The state a failed call must leave as it was.
struct Snapshot {
  v1::FleetSpec spec;
  size_t tables_written;
  std::vector<int> cpus;
  std::vector<pid_t> pids;
  std::vector<uint32_t> backlogs;
};

class FleetAtomicityTest : public FleetTest {
 protected:
  Snapshot Take() {
    Snapshot s;
    s.spec = fleet_->DesiredSpec();
    s.tables_written = Tables().applied.size();
    for (const ShardStatus& shard : Status().shards) {
      s.cpus.push_back(shard.cpu);
      s.pids.push_back(shard.pid);
    }
    for (int fd : ShardFds()) s.backlogs.push_back(*ListenBacklog(fd));
    return s;
  }
  void ExpectUnchanged(const Snapshot& before) {
    Settle();
    Snapshot now = Take();
    EXPECT_TRUE(MessageDifferencer::Equivalent(now.spec, before.spec))
        << now.spec.DebugString() << "\nwas\n"
        << before.spec.DebugString();
    EXPECT_EQ(now.cpus, before.cpus);
    EXPECT_EQ(now.pids, before.pids);
    EXPECT_EQ(now.backlogs, before.backlogs);
    // Tables: either never rewritten, or rewritten back to what they were
    // (slots of shards that are gone again count as empty).
    if (now.tables_written != before.tables_written) {
      SteeringTables last = Trimmed(Tables().applied.back());
      SteeringTables was = Trimmed(Tables().applied[before.tables_written - 1]);
      EXPECT_EQ(last.policy, was.policy);
      EXPECT_EQ(last.weights, was.weights);
      EXPECT_EQ(last.shard_cpus, was.shard_cpus);
    }
  }
  static SteeringTables Trimmed(SteeringTables t) {
    while (!t.weights.empty() && t.weights.back() == 0 &&
           t.shard_cpus.back() == -1) {
      t.weights.pop_back();
      t.shard_cpus.pop_back();
    }
    return t;
  }
  // The CPU set each running worker was last pinned to (empty = never
  // re-pinned since its start).
  std::vector<int> LastAffinity(pid_t pid) {
    FakeLauncher::Process* p = launcher_.Find(pid);
    if (p->affinity.empty()) {
      return p->spec.cpu >= 0 ? std::vector<int>{p->spec.cpu}
                              : std::vector<int>{0, 1};
    }
    return p->affinity.back();
  }
};

// Regression (440c57c): UpdateListener applied the new drain timeout and
// re-listen()ed with the new backlog before failing on the steering.
TEST_F(FleetAtomicityTest, FailedUpdateKeepsDrainTimeoutBacklogAndTables) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  steering_.state.fail_next_apply = absl::InternalError("map update failed");
  v1::Listener edited = Spec(2, "backlog: 77 steering { weights: [3, 1] }");
  edited.set_drain_timeout_seconds(9);
  absl::Status s = fleet_->UpdateListener(edited, [](absl::Status) {});
  EXPECT_TRUE(absl::IsInternal(s)) << s;
  ExpectUnchanged(before);
  EXPECT_EQ(before.backlogs, (std::vector<uint32_t>{1024, 1024}));
  EXPECT_EQ(fleet_->DesiredSpec().listeners(0).drain_timeout_seconds(), 5u);
}

TEST_F(FleetAtomicityTest, InvalidUpdateChangesNothing) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  std::vector<v1::Listener> bad(3, Spec(2, "backlog: 99"));
  bad[0].mutable_steering()->add_weights(0);  // all weights 0
  bad[0].mutable_steering()->add_weights(0);
  bad[1].set_drain_timeout_seconds(9);  // 3 weights for 2 shards
  for (int w : {1, 2, 3}) bad[1].mutable_steering()->add_weights(w);
  bad[2].set_address("127.0.0.1:1");  // the address cannot change
  for (const v1::Listener& spec : bad) {
    absl::Status s = fleet_->UpdateListener(spec, [](absl::Status) {});
    EXPECT_FALSE(s.ok()) << spec.DebugString();
    ExpectUnchanged(before);
  }
}

// Regression (440c57c): SetSteering's rollback did not undo the CPU pinning
// it had already applied to running workers.
TEST_F(FleetAtomicityTest, FailedSteeringChangeKeepsThePinning) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  std::vector<pid_t> pids = ServingPids();
  steering_.state.fail_next_apply = absl::InternalError("map update failed");
  v1::Steering cpu;
  cpu.set_policy(v1::STEERING_POLICY_CPU);
  EXPECT_FALSE(fleet_->SetSteering("web", cpu).ok());
  ExpectUnchanged(before);
  for (pid_t pid : pids) {
    EXPECT_EQ(LastAffinity(pid), (std::vector<int>{0, 1}));
  }
}

TEST_F(FleetAtomicityTest, FailedPinningPutsTablesAndPinsBack) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  std::vector<pid_t> pids = ServingPids();
  launcher_.affinity_errors[pids[1]] = absl::PermissionDeniedError("EPERM");
  v1::Steering cpu;
  cpu.set_policy(v1::STEERING_POLICY_CPU);
  absl::Status s = fleet_->SetSteering("web", cpu);
  EXPECT_TRUE(absl::IsPermissionDenied(s)) << s;
  EXPECT_THAT(s.message(), HasSubstr("listener web shard 1"));
  ExpectUnchanged(before);
  EXPECT_EQ(LastAffinity(pids[0]), (std::vector<int>{0, 1}));
  EXPECT_EQ(Tables().applied.back().policy, v1::STEERING_POLICY_HASH);
}

TEST_F(FleetAtomicityTest, SteeringChangeRepinsRunningWorkers) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  std::vector<pid_t> pids = ServingPids();
  v1::Steering cpu;
  cpu.set_policy(v1::STEERING_POLICY_CPU);
  ASSERT_TRUE(fleet_->SetSteering("web", cpu).ok());
  EXPECT_EQ(LastAffinity(pids[0]), (std::vector<int>{0}));
  EXPECT_EQ(LastAffinity(pids[1]), (std::vector<int>{1}));
  EXPECT_EQ(Tables().applied.back().policy, v1::STEERING_POLICY_CPU);
  EXPECT_THAT(Tables().applied.back().shard_cpus, ElementsAre(0, 1));
}

TEST_F(FleetAtomicityTest, FailedScaleUpRemovesTheNewShards) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  launcher_.auto_ready = false;
  Result r;
  ASSERT_TRUE(fleet_->ScaleListener("web", 4, Record(&r)).ok());
  Settle();
  std::vector<FakeLauncher::Process*> all = launcher_.All();
  launcher_.SendHello(*all[2]);
  launcher_.SendReady(*all[2]);
  launcher_.ExitWith(all[3]->pid, 3);
  Settle();
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(absl::IsUnavailable(r.status)) << r.status;
  EXPECT_THAT(r.status.message(),
              HasSubstr("listener web shard 3: worker pid"));
  ExpectUnchanged(before);
  EXPECT_TRUE(all[2]->Exited());
  EXPECT_EQ(Tables().sockets.size(), 2u);
  // The new shards never entered a table.
  for (const SteeringTables& t : Tables().applied) {
    EXPECT_LE(t.weights.size(), 2u);
  }
}

TEST_F(FleetAtomicityTest, LaunchFailureDuringScaleUpChangesNothing) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  launcher_.fail_next_launch = absl::NotFoundError("exec: no such file");
  Result r;
  absl::Status s = fleet_->ScaleListener("web", 3, Record(&r));
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_FALSE(r.called);
  ExpectUnchanged(before);
}

TEST_F(FleetAtomicityTest, RefusedCallsChangeNothing) {
  ASSERT_TRUE(fleet_->AddListener(Spec(1)).ok());
  Settle();
  Snapshot before = Take();
  auto ignore = [](absl::Status) {};
  EXPECT_TRUE(absl::IsFailedPrecondition(fleet_->DrainShard("web", 0, ignore)));
  EXPECT_TRUE(absl::IsNotFound(fleet_->DrainShard("web", 7, ignore)));
  EXPECT_TRUE(absl::IsInvalidArgument(fleet_->ScaleListener("web", 0, ignore)));
  EXPECT_TRUE(absl::IsNotFound(fleet_->ScaleListener("nope", 2, ignore)));
  v1::WorkerSpec missing;
  missing.set_command("/no/such/worker");
  EXPECT_TRUE(
      absl::IsInvalidArgument(fleet_->RollOut("web", missing, 1, ignore)));
  v1::Steering weights;
  weights.add_weights(1);
  weights.add_weights(1);
  EXPECT_TRUE(absl::IsInvalidArgument(fleet_->SetSteering("web", weights)));
  EXPECT_TRUE(absl::IsAlreadyExists(fleet_->AddListener(Spec(1))));
  ExpectUnchanged(before);
}

// --- apply of an edited spec -------------------------------------------------

TEST_F(FleetTest, UpdateWithANewWorkerRollsItOut) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  v1::Listener edited = Spec(2, "backlog: 512");
  edited.mutable_worker()->set_args(0, "--v2");
  absl::StatusOr<ListenerUpdate> plan = fleet_->PlanListenerUpdate(edited);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->Changes(),
              ElementsAre("backlog: 1024 -> 512",
                          "worker: '/bin/true --v1' -> '/bin/true --v2' "
                          "(rolled out shard by shard)"));
  Result r;
  ASSERT_TRUE(fleet_->UpdateListener(edited, Record(&r)).ok());
  Settle();
  ASSERT_TRUE(r.called);
  EXPECT_TRUE(r.status.ok()) << r.status;
  for (pid_t pid : ServingPids()) {
    EXPECT_EQ(launcher_.Find(pid)->Arg(1), "--v2");
  }
  for (int fd : ShardFds()) EXPECT_EQ(*ListenBacklog(fd), 512u);
  EXPECT_EQ(fleet_->DesiredSpec().listeners(0).worker().args(0), "--v2");
}

TEST_F(FleetAtomicityTest, UpdateWhoseRolloutFailsPutsShardsAndSteeringBack) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Snapshot before = Take();
  v1::Listener edited = Spec(3, "steering { weights: [2, 1, 1] }");
  edited.mutable_worker()->set_args(0, "--v2");
  launcher_.auto_ready = false;
  Result r;
  ASSERT_TRUE(fleet_->UpdateListener(edited, Record(&r)).ok());
  Settle();
  // Shard 2 is added with the current program, then the rollout starts.
  FakeLauncher::Process* added = launcher_.All().back();
  ASSERT_EQ(added->Arg(1), "--v1");
  launcher_.SendHello(*added);
  launcher_.SendReady(*added);
  Settle();
  EXPECT_THAT(Tables().applied.back().weights, ElementsAre(2, 1, 1));
  // Fail every new-program worker.
  for (int i = 0; i < 10 && !r.called; ++i) {
    for (FakeLauncher::Process* p : launcher_.Running()) {
      if (p->Arg(1) == "--v2") launcher_.ExitWith(p->pid, 1);
    }
    Settle();
  }
  ASSERT_TRUE(r.called);
  EXPECT_FALSE(r.status.ok());
  ExpectUnchanged(before);
  EXPECT_EQ(Status().shards.size(), 2u);
  EXPECT_THAT(Trimmed(Tables().applied.back()).weights, ElementsAre(1, 1));
}

int DeferAcceptOf(int fd) {
  int value = 0;
  socklen_t len = sizeof(value);
  ::getsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &value, &len);
  return value;
}

TEST_F(FleetTest, DeferAcceptIsSetAtCreationAndByAnUpdate) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2, "defer_accept_seconds: 3")).ok());
  Settle();
  for (int fd : ShardFds()) EXPECT_GT(DeferAcceptOf(fd), 0);
  Result r;
  ASSERT_TRUE(fleet_->UpdateListener(Spec(2), Record(&r)).ok());
  Settle();
  EXPECT_TRUE(r.called && r.status.ok());
  for (int fd : ShardFds()) EXPECT_EQ(DeferAcceptOf(fd), 0);
  EXPECT_EQ(fleet_->DesiredSpec().listeners(0).defer_accept_seconds(), 0u);
}

TEST_F(FleetTest, UnchangedUpdateDoesNothing) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  size_t launches = launcher_.launches();
  size_t writes = Tables().applied.size();
  Result r;
  ASSERT_TRUE(fleet_->UpdateListener(Spec(2), Record(&r)).ok());
  Settle();
  EXPECT_TRUE(r.called && r.status.ok());
  EXPECT_EQ(launcher_.launches(), launches);
  EXPECT_EQ(Tables().applied.size(), writes);
}

// --- Through the controller: the persisted state, ordering, threads --------

// A fleet on a real loop thread with fake processes, behind the controller.
class FleetControllerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetLogLevel(LogLevel::kError);
    loop_ = *EventLoop::Create();
    FleetOptions options;
    options.base_env = {"PATH=/usr/bin"};
    fleet_ = std::make_unique<Fleet>(loop_.get(), &launcher_, options);
    fleet_->SetSteeringBackend(&steering_, "");
    controller_ = std::make_unique<LoopFleetController>(
        loop_.get(), fleet_.get(),
        [this](const v1::FleetSpec& spec) {
          std::lock_guard<std::mutex> lock(mu_);
          if (fail_persist_) return absl::ResourceExhaustedError("disk full");
          saved_.push_back(spec);
          return absl::OkStatus();
        },
        "test");
    runner_ = std::thread([this] { loop_->Run(); });
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
        absl::StrCat("name: 'web' address: '127.0.0.1:", FreePort(),
                     "' shards: 1 worker { command: '/bin/true' }"),
        &spec_));
  }
  void TearDown() override {
    std::promise<void> stopped;
    loop_->Post([&] { fleet_->Shutdown([&] { stopped.set_value(); }); });
    stopped.get_future().wait();
    loop_->Stop();
    runner_.join();
    controller_.reset();
    fleet_.reset();
  }
  // Starts an asynchronous call; the future has its status.
  std::future<absl::Status> Call(const std::function<void(MutationCall)>& start,
                                 std::function<bool()> cancelled = nullptr) {
    auto done = std::make_shared<std::promise<absl::Status>>();
    std::future<absl::Status> f = done->get_future();
    start({.done = [done](absl::Status s) { done->set_value(s); },
           .cancelled = std::move(cancelled)});
    return f;
  }
  absl::Status Scale(uint32_t shards) {
    return Call([&](MutationCall c) {
             controller_->ScaleListener("web", shards, std::move(c));
           })
        .get();
  }
  size_t Saves() {
    std::lock_guard<std::mutex> lock(mu_);
    return saved_.size();
  }
  v1::FleetSpec LastSaved() {
    std::lock_guard<std::mutex> lock(mu_);
    return saved_.back();
  }

  FakeLauncher launcher_;
  FakeSteering steering_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Fleet> fleet_;
  std::unique_ptr<LoopFleetController> controller_;
  std::thread runner_;
  std::mutex mu_;
  std::vector<v1::FleetSpec> saved_;
  bool fail_persist_ = false;
  v1::Listener spec_;
};

TEST_F(FleetControllerTest, PersistsWhatSucceededOnly) {
  EXPECT_TRUE(Call([&](MutationCall c) {
                controller_->CreateListener(spec_, std::move(c));
              })
                  .get()
                  .ok());
  ASSERT_EQ(Saves(), 1u);
  EXPECT_FALSE(Scale(0).ok());
  EXPECT_FALSE(Call([&](MutationCall c) {
                 controller_->DrainShard("web", 0, std::move(c));
               })
                   .get()
                   .ok());
  EXPECT_EQ(Saves(), 1u);
  EXPECT_TRUE(Scale(2).ok());
  ASSERT_EQ(Saves(), 2u);
  EXPECT_EQ(LastSaved().listeners(0).shards(), 2u);
  controller_->Close();
  EXPECT_TRUE(absl::IsUnavailable(Scale(3)));
  EXPECT_EQ(Saves(), 2u);
}

// Issue 9 item 9: a state that cannot be saved refuses the change, and
// the fleet is not changed.
TEST_F(FleetControllerTest, UnsavableStateRefusesTheChange) {
  ASSERT_TRUE(Call([&](MutationCall c) {
                controller_->CreateListener(spec_, std::move(c));
              })
                  .get()
                  .ok());
  {
    std::lock_guard<std::mutex> lock(mu_);
    fail_persist_ = true;
  }
  size_t launches = launcher_.launches();
  absl::Status s = Scale(3);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_THAT(s.message(), HasSubstr("nothing was changed"));
  EXPECT_EQ(launcher_.launches(), launches);
  EXPECT_EQ(controller_->GetListener("web")->shards.size(), 1u);
  v1::Listener other = spec_;
  other.set_name("api");
  other.set_address(absl::StrCat("127.0.0.1:", FreePort()));
  EXPECT_TRUE(absl::IsResourceExhausted(Call([&](MutationCall c) {
                                          controller_->CreateListener(
                                              other, std::move(c));
                                        }).get()));
  EXPECT_EQ(controller_->ListListeners()->size(), 1u);
}

// A change whose undo follows a failure leaves the state file as it was.
TEST_F(FleetControllerTest, FailedChangeSavesTheStateBack) {
  ASSERT_TRUE(Call([&](MutationCall c) {
                controller_->CreateListener(spec_, std::move(c));
              })
                  .get()
                  .ok());
  launcher_.fail_next_launch = absl::NotFoundError("exec failed");
  EXPECT_FALSE(Scale(2).ok());
  EXPECT_EQ(LastSaved().listeners(0).shards(), 1u);
}

// Issue 9 item 7: a slow mutation holds no thread and blocks neither reads
// nor mutations of other listeners; mutations of one listener run in order;
// a queued one that is cancelled never starts.
TEST_F(FleetControllerTest, SlowMutationBlocksOnlyItsOwnListener) {
  ASSERT_TRUE(Call([&](MutationCall c) {
                controller_->CreateListener(spec_, std::move(c));
              })
                  .get()
                  .ok());
  launcher_.auto_ready = false;  // a scale-up waits for ready (10 s)
  launcher_.exit_on_term = false;
  std::future<absl::Status> slow = Call([&](MutationCall c) {
    controller_->ScaleListener("web", 2, std::move(c));
  });
  std::atomic<bool> cancel{false};
  std::future<absl::Status> queued = Call(
      [&](MutationCall c) {
        controller_->ScaleListener("web", 1, std::move(c));
      },
      [&] { return cancel.load(); });
  // Reads answer, another listener can be created.
  EXPECT_TRUE(controller_->ListListeners().ok());
  v1::Listener other = spec_;
  other.set_name("api");
  other.set_address(absl::StrCat("127.0.0.1:", FreePort()));
  launcher_.auto_ready = true;
  EXPECT_TRUE(Call([&](MutationCall c) {
                controller_->CreateListener(other, std::move(c));
              })
                  .get()
                  .ok());
  EXPECT_EQ(slow.wait_for(std::chrono::milliseconds(0)),
            std::future_status::timeout);
  cancel = true;
  // The slow one fails when its new worker dies before it is ready.
  loop_->Post([&] {
    for (FakeLauncher::Process* p : launcher_.Running()) {
      bool shard1 = std::find(p->spec.env.begin(), p->spec.env.end(),
                              "PORTFLEET_SHARD=1") != p->spec.env.end();
      if (shard1 && p->channel) launcher_.ExitWith(p->pid, 1);
    }
  });
  EXPECT_FALSE(slow.get().ok());
  absl::Status q = queued.get();
  EXPECT_TRUE(absl::IsCancelled(q)) << q;
  EXPECT_EQ(controller_->GetListener("web")->shards.size(), 1u);
  loop_->RunSync([&] { launcher_.exit_on_term = true; });
}

}  // namespace
}  // namespace portfleet::testing
