// The rebalancer: the planner as a pure function (loads in, slots out), and
// the fleet's one-shot rebalance and load measurement over fakes
// (FakeLauncher, FakeSteering, a fake connection counter, a manual clock).
#include "agent/fleet/rebalance.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/fleet/fleet.h"
#include "agent/fleet/load.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "tests/unit/fleet_fakes.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/handoff_choice.h"
#include "worker/sdk/handoff_pauses.h"

namespace portfleet::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// One end of a loopback TCP connection, as a worker releases it (the router
// checks that a released socket is a connected TCP socket). The other ends
// stay open for the test's life.
Fd ConnectedSocket() {
  static Fd listener;
  static sockaddr_in address{};
  static std::vector<Fd>* accepted = new std::vector<Fd>();
  if (!listener) {
    listener = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&address),
                     sizeof(address)),
              0);
    EXPECT_EQ(::listen(listener.get(), 64), 0);
    socklen_t length = sizeof(address);
    ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&address),
                  &length);
  }
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&address),
                      sizeof(address)),
            0);
  accepted->emplace_back(
      ::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  return fd;
}

std::vector<RebalanceInput> Shards(const std::vector<double>& loads,
                                   uint32_t slots_each = 64) {
  std::vector<RebalanceInput> out;
  for (size_t i = 0; i < loads.size(); ++i) {
    out.push_back(RebalanceInput{.index = static_cast<uint32_t>(i),
                                 .eligible = true,
                                 .load = loads[i],
                                 .baseline_slots = slots_each,
                                 .slots = slots_each});
  }
  return out;
}

uint32_t Sum(const std::vector<uint32_t>& v) {
  return std::accumulate(v.begin(), v.end(), 0u);
}

// One shard per CPU: shard i on CPU i.
std::vector<SpillInput> OnePerCpu(const std::vector<double>& loads) {
  std::vector<SpillInput> out;
  for (size_t i = 0; i < loads.size(); ++i) {
    out.push_back(SpillInput{.index = static_cast<uint32_t>(i),
                             .cpu = static_cast<int>(i),
                             .eligible = true,
                             .load = loads[i]});
  }
  return out;
}

std::vector<uint32_t> After(const SpillPlan& plan) {
  std::vector<uint32_t> out;
  for (const CpuSpillPlan& c : plan.cpus) out.push_back(c.after);
  return out;
}

TEST(PlanSpillTest, BalancedFleetSpillsNothing) {
  SpillPlan plan = PlanSpill(OnePerCpu({50, 51, 49}), {}, {});
  EXPECT_TRUE(plan.even);
  EXPECT_FALSE(plan.spilling());
  EXPECT_THAT(After(plan), ElementsAre(0, 0, 0));
  EXPECT_TRUE(plan.table_weights.empty());
  // Idle: nothing either.
  EXPECT_FALSE(PlanSpill(OnePerCpu({0, 0}), {}, {}).spilling());
}

TEST(PlanSpillTest, HotCpuSpillsOnlyItsExcess) {
  // Mean 40: CPU 0 carries 60, 20 above its target: a third of its new
  // connections (ceil(256 * 20 / 60) = 86) spill; CPU 1 keeps locality.
  SpillPlan plan = PlanSpill(OnePerCpu({60, 20}), {}, {});
  EXPECT_FALSE(plan.even);
  EXPECT_DOUBLE_EQ(plan.imbalance, 1.5);
  ASSERT_EQ(plan.cpus.size(), 2u);
  EXPECT_EQ(plan.cpus[0].cpu, 0);
  EXPECT_THAT(plan.cpus[0].shards, ElementsAre(0));
  EXPECT_DOUBLE_EQ(plan.cpus[0].load, 60);
  EXPECT_DOUBLE_EQ(plan.cpus[0].target, 40);
  EXPECT_THAT(After(plan), ElementsAre(86, 0));
  // The spilled connections go to the cold shard only.
  EXPECT_THAT(plan.table_weights, ElementsAre(0, 500));
}

TEST(PlanSpillTest, AllOnOneCpu) {
  // Everything on CPU 0 of two: half of its new connections spill, to
  // shard 1.
  SpillPlan plan = PlanSpill(OnePerCpu({50, 0}), {}, {});
  EXPECT_THAT(After(plan), ElementsAre(128, 0));
  EXPECT_THAT(plan.table_weights, ElementsAre(0, 1000));
}

TEST(PlanSpillTest, BoundedPerStepAndCapped) {
  // 4 CPUs, all on CPU 0: 3/4 (192) is its excess; a step gives 128 at most.
  SpillPlan first = PlanSpill(OnePerCpu({100, 0, 0, 0}), {}, {});
  EXPECT_THAT(After(first), ElementsAre(128, 0, 0, 0));
  SpillPlan second = PlanSpill(OnePerCpu({100, 0, 0, 0}), {{0, 128}}, {});
  EXPECT_THAT(After(second), ElementsAre(192, 0, 0, 0));
  EXPECT_EQ(second.cpus[0].before, 128u);
  // 16 CPUs: 240 would be the excess; a CPU keeps 32 of 256 at least.
  std::vector<double> loads(16, 0);
  loads[0] = 160;
  SpillPlan capped = PlanSpill(OnePerCpu(loads), {{0, 200}}, {});
  EXPECT_EQ(capped.cpus[0].after, 224u);
  SpillParams small{.max_step = 16};
  EXPECT_EQ(PlanSpill(OnePerCpu({100, 0}), {{0, 10}}, small).cpus[0].after,
            26u);
}

TEST(PlanSpillTest, HysteresisHoldsThenResets) {
  // Mean 50, imbalance 1.06. CPU 0 is still hot but its spill already
  // worked: 128 is held, not lowered to its excess. CPU 1 is above its
  // target within the band: its spill is held. CPU 2 is below: none.
  SpillPlan plan =
      PlanSpill(OnePerCpu({53, 51, 46}), {{0, 128}, {1, 40}, {2, 64}}, {});
  EXPECT_FALSE(plan.even);
  EXPECT_THAT(After(plan), ElementsAre(128, 40, 0));
  EXPECT_EQ(plan.table_weights[2], 80u);
  EXPECT_EQ(plan.table_weights[0], 0u);
  // Even again (max/mean 1.04): every spill goes.
  SpillPlan even = PlanSpill(OnePerCpu({52, 48}), {{0, 128}}, {});
  EXPECT_TRUE(even.even);
  EXPECT_THAT(After(even), ElementsAre(0, 0));
  EXPECT_TRUE(even.table_weights.empty());
}

TEST(PlanSpillTest, CpusWithSeveralShardsAndUnpinnedOnes) {
  // CPU 0: shards 0 and 2 (80 together, target 2 * 30); CPU 1: shard 1;
  // shard 3 unpinned (cold: takes table connections); shard 4 not ready.
  std::vector<SpillInput> in = {
      {.index = 0, .cpu = 0, .eligible = true, .load = 40},
      {.index = 1, .cpu = 1, .eligible = true, .load = 30},
      {.index = 2, .cpu = 0, .eligible = true, .load = 40},
      {.index = 3, .cpu = -1, .eligible = true, .load = 10},
      {.index = 4, .cpu = 1, .eligible = false, .load = 0},
  };
  SpillPlan plan = PlanSpill(in, {}, {});
  ASSERT_EQ(plan.cpus.size(), 2u);
  EXPECT_THAT(plan.cpus[0].shards, ElementsAre(0, 2));
  EXPECT_DOUBLE_EQ(plan.cpus[0].target, 60);
  // ceil(256 * 20 / 80) = 64.
  EXPECT_THAT(After(plan), ElementsAre(64, 0));
  EXPECT_THAT(plan.cpus[1].shards, ElementsAre(1));
  EXPECT_THAT(plan.table_weights, ElementsAre(0, 0, 0, 667, 0));
}

TEST(ImbalanceTest, MaxOverMean) {
  EXPECT_DOUBLE_EQ(Imbalance({}), 0);
  EXPECT_DOUBLE_EQ(Imbalance({0, 0}), 0);
  EXPECT_DOUBLE_EQ(Imbalance({5, 5, 5}), 1);
  EXPECT_DOUBLE_EQ(Imbalance({200, 200, 0, 0}), 2);
}

TEST(PlanRebalanceTest, EvenLoadKeepsTheBaseline) {
  RebalancePlan plan = PlanRebalance(Shards({100, 102, 99, 101}), {});
  EXPECT_TRUE(plan.even);
  EXPECT_THAT(plan.slots, ElementsAre(64, 64, 64, 64));
  EXPECT_EQ(plan.slots_moved, 0u);
}

TEST(PlanRebalanceTest, IdleListenerKeepsTheBaseline) {
  RebalancePlan plan = PlanRebalance(Shards({0, 0, 0}, 85), {});
  EXPECT_TRUE(plan.even);
  EXPECT_DOUBLE_EQ(plan.imbalance, 0);
  EXPECT_THAT(plan.slots, ElementsAre(85, 85, 85));
}

// The scale-up skew: two old shards hold everything, two new ones nothing.
TEST(PlanRebalanceTest, ScaleUpSkewSendsNewConnectionsToTheNewShards) {
  RebalancePlan plan = PlanRebalance(Shards({200, 200, 0, 0}), {});
  EXPECT_FALSE(plan.even);
  EXPECT_DOUBLE_EQ(plan.imbalance, 2);
  ASSERT_EQ(plan.slots.size(), 4u);
  EXPECT_EQ(Sum(plan.slots), 256u);
  EXPECT_EQ(plan.slots[0], plan.slots[1]);
  EXPECT_EQ(plan.slots[2], plan.slots[3]);
  // Hot at half their baseline share, cold at up to 4 times: 14 vs 114.
  EXPECT_LT(plan.slots[0], 32u);
  EXPECT_GT(plan.slots[2], 100u);
  EXPECT_EQ(plan.slots_moved, 2 * (plan.slots[2] - 64));
}

TEST(PlanRebalanceTest, EveryEligibleShardKeepsASlotAndTheTotalIsKept) {
  RebalancePlan plan =
      PlanRebalance(Shards({10000, 1, 1, 1, 1, 1, 1, 1}, 32), {});
  EXPECT_EQ(Sum(plan.slots), 256u);
  for (uint32_t s : plan.slots) EXPECT_GE(s, 1u);
  EXPECT_LT(plan.slots[0], plan.slots[1]);
}

TEST(PlanRebalanceTest, OperatorWeightsAreTheBaseline) {
  // Weights 3:1 (192 and 64 slots); equal load per weight is not even by
  // count, so the heavier shard gives slots, but stays within its factor.
  std::vector<RebalanceInput> in = Shards({300, 100});
  in[0].baseline_slots = in[0].slots = 192;
  RebalancePlan plan = PlanRebalance(in, {});
  EXPECT_EQ(Sum(plan.slots), 256u);
  EXPECT_LT(plan.slots[0], 192u);
  EXPECT_GE(plan.slots[0], 192u / 4);
  // Even again: back to the operator's 3:1.
  in[0].load = 200;
  in[1].load = 200;
  in[0].slots = plan.slots[0];
  in[1].slots = plan.slots[1];
  RebalancePlan back = PlanRebalance(in, {});
  EXPECT_TRUE(back.even);
  EXPECT_THAT(back.slots, ElementsAre(192, 64));
}

TEST(PlanRebalanceTest, ShardsNotEligibleKeepTheirBaseline) {
  std::vector<RebalanceInput> in = Shards({200, 0, 0});
  in[2].eligible = false;  // not ready yet
  RebalancePlan plan = PlanRebalance(in, {});
  EXPECT_EQ(plan.slots[2], 64u);
  EXPECT_EQ(plan.slots[0] + plan.slots[1], 128u);
  EXPECT_GT(plan.slots[1], plan.slots[0]);
}

// The plan depends on the loads, not on the slots now: asking twice with the
// same loads gives the same table (no drift, no oscillation).
TEST(PlanRebalanceTest, SameLoadsSamePlan) {
  std::vector<RebalanceInput> in = Shards({300, 100, 50, 0});
  RebalancePlan first = PlanRebalance(in, {});
  for (size_t i = 0; i < in.size(); ++i) in[i].slots = first.slots[i];
  RebalancePlan second = PlanRebalance(in, {});
  EXPECT_EQ(second.slots, first.slots);
  EXPECT_EQ(second.slots_moved, 0u);
}

TEST(PlanHandOffsTest, EvensCapableShardsLargestFirst) {
  std::vector<HandOffTransfer> t =
      PlanHandOffs({{.index = 0, .connections = 200, .capable = true},
                    {.index = 1, .connections = 200, .capable = true},
                    {.index = 2, .connections = 0, .capable = true},
                    {.index = 3, .connections = 0, .capable = true}});
  std::map<uint32_t, int64_t> after = {{0, 200}, {1, 200}, {2, 0}, {3, 0}};
  for (const HandOffTransfer& x : t) {
    after[x.from] -= x.count;
    after[x.to] += x.count;
  }
  EXPECT_EQ(after, (std::map<uint32_t, int64_t>{
                       {0, 100}, {1, 100}, {2, 100}, {3, 100}}));
  EXPECT_EQ(t.size(), 2u);
}

TEST(PlanHandOffsTest, RemainderStaysOnTheHottestAndEvenMovesNothing) {
  std::vector<HandOffTransfer> t =
      PlanHandOffs({{.index = 0, .connections = 7, .capable = true},
                    {.index = 1, .connections = 0, .capable = true}});
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].count, 3u);  // 4 and 3
  EXPECT_TRUE(PlanHandOffs({{.index = 0, .connections = 4, .capable = true},
                            {.index = 1, .connections = 3, .capable = true}})
                  .empty());
}

TEST(PlanHandOffsTest, ShardsThatCannotHandOffNeitherGiveNorTake) {
  std::vector<HandOffTransfer> t =
      PlanHandOffs({{.index = 0, .connections = 300, .capable = false},
                    {.index = 1, .connections = 100, .capable = true},
                    {.index = 2, .connections = 0, .capable = true}});
  // Mean 133: shard 1 is below it too; nothing can come from shard 0.
  EXPECT_TRUE(t.empty());
  t = PlanHandOffs({{.index = 0, .connections = 90, .capable = true},
                    {.index = 1, .connections = 0, .capable = false},
                    {.index = 2, .connections = 0, .capable = true}});
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].from, 0u);
  EXPECT_EQ(t[0].to, 2u);
  EXPECT_EQ(t[0].count, 30u);
}

TEST(PlanByteHandOffsTest, FourStreamsOnOneShardGoOneToEachColdShard) {
  // 4 MB/s on shard 0 (four streams of 1 MB/s), a little on the others.
  std::vector<HandOffTransfer> t = PlanByteHandOffs(
      {{.index = 0, .bytes_per_second = 4.0e6, .capable = true},
       {.index = 1, .bytes_per_second = 1e3, .capable = true},
       {.index = 2, .bytes_per_second = 2e3, .capable = true},
       {.index = 3, .bytes_per_second = 0, .capable = true}});
  ASSERT_EQ(t.size(), 3u);
  std::set<uint32_t> to;
  for (const HandOffTransfer& x : t) {
    EXPECT_EQ(x.from, 0u);
    to.insert(x.to);
    EXPECT_NEAR(static_cast<double>(x.bytes_per_second), 1.0e6, 3e3);
    EXPECT_EQ(x.count, kMaxConnectionsPerByteTransfer);
  }
  EXPECT_EQ(to, (std::set<uint32_t>{1, 2, 3}));
}

TEST(PlanByteHandOffsTest, SmallDifferencesAndIdleListenersMoveNothing) {
  EXPECT_TRUE(PlanByteHandOffs(
                  {{.index = 0, .bytes_per_second = 1.03e6, .capable = true},
                   {.index = 1, .bytes_per_second = 0.97e6, .capable = true}})
                  .empty());
  EXPECT_TRUE(PlanByteHandOffs({{.index = 0, .capable = true},
                                {.index = 1, .capable = true}})
                  .empty());
}

TEST(PlanByteHandOffsTest, ShardsThatCannotHandOffNeitherGiveNorTake) {
  std::vector<HandOffTransfer> t =
      PlanByteHandOffs({{.index = 0, .bytes_per_second = 3e6, .capable = false},
                        {.index = 1, .bytes_per_second = 2e6, .capable = true},
                        {.index = 2, .bytes_per_second = 0, .capable = true}});
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].from, 1u);
  EXPECT_EQ(t[0].to, 2u);
  // The mean counts shard 0 (5e6 / 3); shard 1 gives what it has above it.
  EXPECT_NEAR(static_cast<double>(t[0].bytes_per_second), 2e6 - 5e6 / 3, 1);
}

TEST(HandOffChoiceTest, ByCountTakesTheFirst) {
  HandOffChoice c = ChooseForHandOff(
      {{.key = 7, .bytes_per_second = 5}, {.key = 8}, {.key = 9}}, 2, 0);
  EXPECT_EQ(c.keys, (std::vector<int>{7, 8}));
  EXPECT_EQ(c.bytes_per_second, 5);
}

TEST(HandOffChoiceTest, ByBytesTakesTheBusiestThatNarrowTheGap) {
  // Budget 1 MB/s: the 1.5 MB/s stream fits (at most twice the budget) and
  // spends it; the 3 MB/s one would overshoot; idle ones never move.
  HandOffChoice c = ChooseForHandOff({{.key = 1, .bytes_per_second = 3e6},
                                      {.key = 2, .bytes_per_second = 0},
                                      {.key = 3, .bytes_per_second = 1.5e6},
                                      {.key = 4, .bytes_per_second = 0.2e6}},
                                     32, 1'000'000);
  EXPECT_EQ(c.keys, (std::vector<int>{3}));
  EXPECT_EQ(c.bytes_per_second, 1.5e6);
  // Budget 2 MB/s: 1.5 MB/s, then 0.2 MB/s (0.5 MB/s remain), no idle one.
  c = ChooseForHandOff({{.key = 1, .bytes_per_second = 5e6},
                        {.key = 2, .bytes_per_second = 0},
                        {.key = 3, .bytes_per_second = 1.5e6},
                        {.key = 4, .bytes_per_second = 0.2e6}},
                       32, 2'000'000);
  EXPECT_EQ(c.keys, (std::vector<int>{3, 4}));
  // A crowd of small connections (each under 5% of the budget) stays.
  EXPECT_TRUE(ChooseForHandOff({{.key = 1, .bytes_per_second = 640},
                                {.key = 2, .bytes_per_second = 640}},
                               32, 1'000'000)
                  .keys.empty());
  // The count still bounds it.
  EXPECT_EQ(ChooseForHandOff({{.key = 1, .bytes_per_second = 100},
                              {.key = 2, .bytes_per_second = 100}},
                             1, 1'000)
                .keys.size(),
            1u);
}

TEST(LoadByTest, PicksTheMetric) {
  v1::ShardLoad load;
  load.set_connections(7);
  load.set_cpu(0.5);
  load.set_bytes_per_second(1000);
  EXPECT_EQ(LoadBy(load, v1::REBALANCE_METRIC_UNSPECIFIED), 7);
  EXPECT_EQ(LoadBy(load, v1::REBALANCE_METRIC_CONNECTIONS), 7);
  EXPECT_EQ(LoadBy(load, v1::REBALANCE_METRIC_CPU), 0.5);
  EXPECT_EQ(LoadBy(load, v1::REBALANCE_METRIC_BYTES), 1000);
}

// Established connections per process group, as the test sets them.
class FakeCounter : public ConnectionCounter {
 public:
  std::map<pid_t, uint64_t> by_pgid;
  std::set<pid_t> asked;
  absl::StatusOr<std::map<pid_t, uint64_t>> Count(
      uint16_t, const std::set<pid_t>& pgids) override {
    std::map<pid_t, uint64_t> out;
    for (pid_t g : pgids) {
      asked.insert(g);
      out[g] = by_pgid.count(g) > 0 ? by_pgid[g] : 0;
    }
    return out;
  }
};

class FleetRebalanceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetLogLevel(LogLevel::kError);
    loop_ = *EventLoop::Create(&clock_);
    FleetOptions options;
    options.cpus = {0, 1};
    options.base_env = {"PATH=/usr/bin:/bin"};
    fleet_ = std::make_unique<Fleet>(loop_.get(), &launcher_, options);
    fleet_->SetSteeringBackend(&steering_, "");
    fleet_->SetLoadSeams(&observer_, &counter_);
    fleet_->SetEventSink([this](const FleetEvent& e) { events_.push_back(e); });
  }
  void TearDown() override { fleet_.reset(); }

  v1::Listener Spec(uint32_t shards, const std::string& extra = "") {
    v1::Listener l;
    std::string text = absl::StrCat("name: 'web' address: '127.0.0.1:", port_,
                                    "' shards: ", shards,
                                    " worker { command: '/bin/true' } ", extra);
    EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &l));
    return l;
  }
  void Settle() {
    for (int i = 0; i < 10; ++i) loop_->RunUntilIdle();
  }
  // A load report from every running worker, in launch order.
  void Report(const std::vector<uint64_t>& connections) {
    std::vector<FakeLauncher::Process*> running = launcher_.Running();
    ASSERT_EQ(running.size(), connections.size());
    for (size_t i = 0; i < running.size(); ++i) {
      v1::WorkerMessage m;
      m.mutable_load()->set_active_connections(connections[i]);
      m.mutable_load()->set_bytes_in_total(1000 * (i + 1));
      m.mutable_load()->set_requests_total(10 * (i + 1));
      ASSERT_TRUE(running[i]->channel->Send(m).ok());
    }
    Settle();
  }
  std::vector<uint32_t> AppliedWeights() {
    return steering_.state.listeners["web"].applied.back().weights;
  }
  // The one-shot rebalance, run to its end on the loop.
  absl::StatusOr<v1::RebalanceListenerResponse> Rebalance(
      const v1::RebalanceListenerRequest& request) {
    std::optional<absl::StatusOr<v1::RebalanceListenerResponse>> out;
    fleet_->RebalanceListener(
        request, [&](absl::StatusOr<v1::RebalanceListenerResponse> r) {
          out = std::move(r);
        });
    for (int i = 0; i < 100 && !out; ++i) {
      Settle();
      if (!out && loop_->NextTimer() < absl::InfiniteFuture()) {
        loop_->AdvanceTo(&clock_, loop_->NextTimer());
      }
    }
    if (!out) return absl::InternalError("rebalance never ended");
    return *out;
  }
  v1::RebalanceListenerRequest Request(bool dry_run = false) {
    v1::RebalanceListenerRequest r;
    r.set_name("web");
    r.set_dry_run(dry_run);
    return r;
  }

  int port_ = FreePort();
  ManualClock clock_;
  std::unique_ptr<EventLoop> loop_;
  FakeLauncher launcher_;
  FakeSteering steering_;
  FakeObserver observer_;
  FakeCounter counter_;
  std::vector<FleetEvent> events_;
  std::unique_ptr<Fleet> fleet_;
};

TEST_F(FleetRebalanceTest, LoadComesFromReportsAndRatesFromTheirDeltas) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Report({3, 5});
  fleet_->MeasureLoadNow();
  loop_->AdvanceTo(&clock_, clock_.Now() + absl::Seconds(1));
  Report({3, 5});
  fleet_->MeasureLoadNow();
  ListenerStatus st = *fleet_->ListenerStatusOf("web");
  ASSERT_EQ(st.shards.size(), 2u);
  EXPECT_EQ(st.shards[0].load.connections(), 3u);
  EXPECT_EQ(st.shards[1].load.connections(), 5u);
  EXPECT_EQ(st.shards[1].load.connections_source(),
            v1::ShardLoad::SOURCE_WORKER);
  EXPECT_EQ(st.shards[1].load.bytes_in_total(), 2000u);
  EXPECT_EQ(st.shards[1].load.requests_total(), 20u);
  EXPECT_TRUE(counter_.asked.empty()) << "reporting workers need no kernel";
  EXPECT_EQ(st.shards[0].steering_slots, 128u);
  EXPECT_EQ(st.shards[0].rebalance_slot_delta, 0);
}

TEST_F(FleetRebalanceTest, WorkersWithoutReportsAreCountedByTheKernel) {
  launcher_.auto_ready = false;  // no hello, no reports: a third-party worker
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  std::vector<FakeLauncher::Process*> running = launcher_.Running();
  ASSERT_EQ(running.size(), 2u);
  counter_.by_pgid[running[0]->pid] = 7;
  counter_.by_pgid[running[1]->pid] = 2;
  fleet_->MeasureLoadNow();
  ListenerStatus st = *fleet_->ListenerStatusOf("web");
  EXPECT_EQ(st.shards[0].load.connections(), 7u);
  EXPECT_EQ(st.shards[0].load.connections_source(),
            v1::ShardLoad::SOURCE_KERNEL);
  EXPECT_FALSE(st.shards[0].load.reports());
  EXPECT_EQ(st.shards[1].load.connections(), 2u);
}

// The counts the program starts from include each shard's accept queue: a
// shard whose worker died (no load, its queue growing) does not look empty.
TEST(WriteConnectionCountsTest, QueuedConnectionsCount) {
  FakeSteeringState state;
  Listener listener;
  listener.spec.set_name("web");
  listener.steering = std::make_unique<FakeListenerSteering>(&state, "web");
  for (uint32_t i = 0; i < 3; ++i) {
    listener.shards.push_back(std::make_unique<Shard>());
    listener.shards.back()->index = i;
  }
  listener.shards[0]->load.set_connections(7);
  listener.shards[1]->health.last_depth = 5;
  listener.shards[2]->load.set_connections(2);
  listener.shards[2]->health.last_depth = 1;
  ASSERT_TRUE(WriteConnectionCounts(listener).ok());
  ASSERT_EQ(state.listeners["web"].counts.size(), 1u);
  EXPECT_EQ(state.listeners["web"].counts[0], (std::vector<uint64_t>{7, 5, 3}));
}

// LEAST_CONNECTIONS: every load measurement writes the measured counts for
// the program to count on from; a rebalance by connections leaves the
// operator's weights (the program already fills the emptiest shard), one by
// bytes still weights the tables.
TEST_F(FleetRebalanceTest, LeastConnectionsGetsTheMeasuredCounts) {
  ASSERT_TRUE(fleet_
                  ->AddListener(Spec(3,
                                     "steering { policy: "
                                     "STEERING_POLICY_LEAST_CONNECTIONS }"))
                  .ok());
  Settle();
  FakeSteeringState::Listener& web = steering_.state.listeners["web"];
  ASSERT_FALSE(web.applied.empty());
  EXPECT_EQ(web.applied.back().policy, v1::STEERING_POLICY_LEAST_CONNECTIONS);
  Report({30, 10, 0});
  fleet_->MeasureLoadNow();
  ASSERT_FALSE(web.counts.empty());
  EXPECT_EQ(web.counts.back(), (std::vector<uint64_t>{30, 10, 0}));

  const size_t writes = web.applied.size();
  absl::StatusOr<v1::RebalanceListenerResponse> done = Rebalance(Request());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->slots_moved(), 0u);
  for (const v1::RebalanceShard& shard : done->shards()) {
    EXPECT_EQ(shard.slots_after(), shard.baseline_slots());
  }
  EXPECT_EQ(AppliedWeights(), (std::vector<uint32_t>{1, 1, 1}));
  EXPECT_GE(web.applied.size(), writes);
}

// Steps: 4 shards, the first two hold 200 connections each; a dry run
// changes nothing; the rebalance moves slots to the cold shards, says it is
// steering only and records an event; once the load is even, a rebalance
// puts the operator's table back.
TEST_F(FleetRebalanceTest, MovesSlotsFromHotToColdAndBackWhenEven) {
  ASSERT_TRUE(fleet_->AddListener(Spec(4)).ok());
  Settle();
  Report({200, 200, 0, 0});
  fleet_->MeasureLoadNow();
  const size_t writes = steering_.state.listeners["web"].applied.size();
  events_.clear();

  absl::StatusOr<v1::RebalanceListenerResponse> plan =
      Rebalance(Request(/*dry_run=*/true));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(steering_.state.listeners["web"].applied.size(), writes);
  EXPECT_DOUBLE_EQ(plan->imbalance_before(), 2);
  ASSERT_EQ(plan->shards_size(), 4);
  EXPECT_EQ(plan->shards(0).slots_before(), 64u);
  EXPECT_LT(plan->shards(0).slots_after(), 64u);
  EXPECT_GT(plan->shards(3).slots_after(), 64u);
  EXPECT_TRUE(events_.empty());

  v1::RebalanceListenerRequest req = Request();
  req.set_move_connections(true);
  absl::StatusOr<v1::RebalanceListenerResponse> done = Rebalance(req);
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_TRUE(done->steering_only());
  EXPECT_EQ(done->connections_moved(), 0u);
  ASSERT_EQ(done->refusals_size(), 4);
  EXPECT_THAT(done->refusals(0).reason(), HasSubstr("steering only"));
  std::vector<uint32_t> w = AppliedWeights();
  ASSERT_EQ(w.size(), 4u);
  EXPECT_EQ(w[0] + w[1] + w[2] + w[3], 256u);
  EXPECT_EQ(w[0], plan->shards(0).slots_after());
  EXPECT_EQ(w[3], plan->shards(3).slots_after());
  ListenerStatus st = *fleet_->ListenerStatusOf("web");
  EXPECT_EQ(st.shards[3].steering_slots, w[3]);
  EXPECT_EQ(st.shards[3].rebalance_slot_delta, static_cast<int32_t>(w[3]) - 64);
  bool done_event = false;
  for (const FleetEvent& e : events_) {
    done_event = done_event || e.type == v1::EVENT_TYPE_REBALANCE_DONE;
  }
  EXPECT_TRUE(done_event);

  Report({100, 100, 100, 100});
  fleet_->MeasureLoadNow();
  ASSERT_TRUE(Rebalance(Request()).ok());
  // The spec's weights again (none: equal).
  EXPECT_THAT(AppliedWeights(), ElementsAre(1, 1, 1, 1));
}

// Steps: 3 workers that hand off (hello.handoff); shard 0 holds 60
// connections, the others none. The rebalance asks shard 0 for 20 each to
// shards 1 and 2; the fake worker releases 15 for shard 1 (5 busy) and all
// 20 for shard 2, each socket attached; the agent passes every socket to
// the cold worker and reports 35 moved, and why 5 were not.
TEST_F(FleetRebalanceTest, HandsIdleConnectionsToColdWorkers) {
  launcher_.auto_ready = false;
  ASSERT_TRUE(fleet_->AddListener(Spec(3)).ok());
  Settle();
  std::vector<FakeLauncher::Process*> w = launcher_.Running();
  ASSERT_EQ(w.size(), 3u);
  for (FakeLauncher::Process* p : w) {
    v1::WorkerMessage hello;
    hello.mutable_hello()->set_pid(p->pid);
    hello.mutable_hello()->set_handoff(true);
    ASSERT_TRUE(p->channel->Send(hello).ok());
    launcher_.SendReady(*p);
  }
  Settle();
  Report({60, 0, 0});
  fleet_->MeasureLoadNow();

  v1::RebalanceListenerRequest req = Request();
  req.set_move_connections(true);
  std::optional<absl::StatusOr<v1::RebalanceListenerResponse>> out;
  fleet_->RebalanceListener(
      req, [&](absl::StatusOr<v1::RebalanceListenerResponse> r) {
        out = std::move(r);
      });
  Settle();
  ASSERT_FALSE(out.has_value()) << "returned before the hand-offs ended";
  std::vector<v1::HandOffRequest> asked;
  for (const v1::AgentMessage& m : launcher_.Received(w[0]->pid)) {
    if (m.has_handoff_request()) asked.push_back(m.handoff_request());
  }
  ASSERT_EQ(asked.size(), 2u);
  uint32_t busy = 5;
  for (const v1::HandOffRequest& a : asked) {
    EXPECT_EQ(a.count(), 20u);
    const uint32_t release = a.count() - busy;
    for (uint32_t i = 0; i < release; ++i) {
      Fd conn = ConnectedSocket();
      v1::WorkerMessage m;
      m.mutable_handoff_connection()->set_id(a.id());
      ASSERT_TRUE(w[0]->channel->SendWithFd(m, conn.get()).ok());
    }
    v1::WorkerMessage done;
    done.mutable_handoff_done()->set_id(a.id());
    done.mutable_handoff_done()->set_released(release);
    done.mutable_handoff_done()->set_busy(busy);
    ASSERT_TRUE(w[0]->channel->Send(done).ok());
    busy = 0;
  }
  Settle();
  ASSERT_TRUE(out.has_value());
  ASSERT_TRUE(out->ok()) << out->status();
  const v1::RebalanceListenerResponse& r = **out;
  EXPECT_FALSE(r.steering_only());
  EXPECT_EQ(r.connections_moved(), 35u);
  EXPECT_EQ(r.shards(0).connections_moved(), -35);
  EXPECT_EQ(r.shards(0).expected_after(), 25);
  EXPECT_EQ(r.shards(1).connections_moved() + r.shards(2).connections_moved(),
            35);
  ASSERT_EQ(r.refusals_size(), 1);
  EXPECT_THAT(r.refusals(0).reason(),
              HasSubstr("5 connections had data in flight (never moved)"));
  int adopted = 0;
  for (FakeLauncher::Process* p : {w[1], w[2]}) {
    for (const v1::AgentMessage& m : launcher_.Received(p->pid)) {
      adopted += m.has_adopt_connection();
    }
  }
  EXPECT_EQ(adopted, 35);
  bool handoff_event = false;
  for (const FleetEvent& e : events_) {
    handoff_event = handoff_event || e.type == v1::EVENT_TYPE_REBALANCE_HANDOFF;
  }
  EXPECT_TRUE(handoff_event);
}

int OpenFdCount() {
  int n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (::readdir(dir) != nullptr) ++n;
  ::closedir(dir);
  return n;
}

// Proxied pairs. Steps: 3 workers that hand off; shards 0 and 1 say
// handoff_pairs (proxy workers), shard 2 does not. Shard 0 holds 60
// connections and is asked for 20 each to shards 1 and 2. For shard 1 it
// releases 2 pairs (both sockets in one packet), one pair with its
// upstream missing and one with a pipe for the upstream; for shard 2 one
// pair. Shard 1 receives the 2 good pairs, both sockets each, in order;
// the two bad ones are closed; shard 2 is refused the pair (counted),
// which goes back to shard 0. No descriptor is left open.
TEST_F(FleetRebalanceTest, ProxiedPairsTravelWithBothSocketsOrAreRefused) {
  launcher_.auto_ready = false;
  ASSERT_TRUE(fleet_->AddListener(Spec(3)).ok());
  Settle();
  std::vector<FakeLauncher::Process*> w = launcher_.Running();
  ASSERT_EQ(w.size(), 3u);
  for (size_t k = 0; k < w.size(); ++k) {
    v1::WorkerMessage hello;
    hello.mutable_hello()->set_pid(w[k]->pid);
    hello.mutable_hello()->set_handoff(true);
    hello.mutable_hello()->set_handoff_pairs(k < 2);
    ASSERT_TRUE(w[k]->channel->Send(hello).ok());
    launcher_.SendReady(*w[k]);
  }
  Settle();
  Report({60, 0, 0});
  fleet_->MeasureLoadNow();
  ConnectedSocket();  // the loopback listener exists before the count
  const int fds_before = OpenFdCount();

  v1::RebalanceListenerRequest req = Request();
  req.set_move_connections(true);
  std::optional<absl::StatusOr<v1::RebalanceListenerResponse>> out;
  fleet_->RebalanceListener(
      req, [&](absl::StatusOr<v1::RebalanceListenerResponse> r) {
        out = std::move(r);
      });
  Settle();
  std::vector<v1::HandOffRequest> asked;
  for (const v1::AgentMessage& m : launcher_.Received(w[0]->pid)) {
    if (m.has_handoff_request()) asked.push_back(m.handoff_request());
  }
  ASSERT_EQ(asked.size(), 2u);
  std::vector<std::pair<ino_t, ino_t>> sent;  // pairs for shard 1
  auto inode = [](int fd) {
    struct stat st {};
    ::fstat(fd, &st);
    return st.st_ino;
  };
  auto release = [&](uint64_t id, int client, int upstream) {
    v1::WorkerMessage m;
    m.mutable_handoff_connection()->set_id(id);
    m.mutable_handoff_connection()->set_upstream_attached(true);
    std::vector<int> fds = {client};
    if (upstream >= 0) fds.push_back(upstream);
    ASSERT_TRUE(w[0]->channel->SendWithFds(m, fds).ok());
  };
  uint32_t released[2] = {0, 0};
  for (size_t k = 0; k < 2; ++k) {
    const bool to_shard1 = k == 0;
    const int pairs = to_shard1 ? 2 : 1;
    for (int i = 0; i < pairs; ++i) {
      Fd client = ConnectedSocket(), upstream = ConnectedSocket();
      if (to_shard1)
        sent.emplace_back(inode(client.get()), inode(upstream.get()));
      release(asked[k].id(), client.get(), upstream.get());
      ++released[k];
    }
    if (to_shard1) {
      Fd client = ConnectedSocket();
      release(asked[k].id(), client.get(), -1);  // upstream missing
      int p[2];
      ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
      Fd r(p[0]), wr(p[1]);
      release(asked[k].id(), client.get(), r.get());  // not a socket
      released[k] += 2;
    }
    v1::WorkerMessage done;
    done.mutable_handoff_done()->set_id(asked[k].id());
    done.mutable_handoff_done()->set_released(released[k]);
    ASSERT_TRUE(w[0]->channel->Send(done).ok());
  }
  Settle();
  ASSERT_TRUE(out.has_value());
  ASSERT_TRUE(out->ok()) << out->status();
  EXPECT_EQ((*out)->connections_moved(), 2u);
  std::string reasons;
  for (const v1::RebalanceRefusal& r : (*out)->refusals()) {
    reasons += r.reason() + "\n";
  }
  EXPECT_THAT(reasons, HasSubstr("2 released with wrong sockets (closed)"));
  EXPECT_THAT(reasons, HasSubstr("1 proxied pairs refused (the receiver "
                                 "cannot adopt proxied pairs)"));

  // Shard 1 got both sockets of each good pair, client first.
  std::vector<std::pair<ino_t, ino_t>> adopted;
  for (;;) {
    auto got = w[1]->channel->ReceiveWithFds<v1::AgentMessage>();
    ASSERT_TRUE(got.ok()) << got.status();
    if (!got->has_value()) break;
    if (!(*got)->first.has_adopt_connection()) continue;
    EXPECT_TRUE((*got)->first.adopt_connection().upstream_attached());
    ASSERT_EQ((*got)->second.size(), 2u);
    adopted.emplace_back(inode((*got)->second[0].get()),
                         inode((*got)->second[1].get()));
  }
  EXPECT_EQ(adopted, sent);
  // Shard 2 got nothing; shard 0 got its refused pair back, both sockets.
  int back = 0;
  for (;;) {
    auto got = w[0]->channel->ReceiveWithFds<v1::AgentMessage>();
    ASSERT_TRUE(got.ok()) << got.status();
    if (!got->has_value()) break;
    if (!(*got)->first.has_adopt_connection()) continue;
    EXPECT_TRUE((*got)->first.adopt_connection().upstream_attached());
    EXPECT_EQ((*got)->second.size(), 2u);
    ++back;
  }
  EXPECT_EQ(back, 1);
  for (const v1::AgentMessage& m : launcher_.Received(w[2]->pid)) {
    EXPECT_FALSE(m.has_adopt_connection());
  }
  // Every descriptor that travelled is closed again (the loopback peers
  // that ConnectedSocket keeps are the only new ones: 5 pairs' worth
  // plus one lone client).
  EXPECT_EQ(OpenFdCount(), fds_before + 3 * 2 + 1);
}

TEST_F(FleetRebalanceTest, ByBytesAsksTheHotWorkerForTrafficNotCount) {
  launcher_.auto_ready = false;
  ASSERT_TRUE(fleet_->AddListener(Spec(4)).ok());
  Settle();
  std::vector<FakeLauncher::Process*> w = launcher_.Running();
  ASSERT_EQ(w.size(), 4u);
  for (FakeLauncher::Process* p : w) {
    v1::WorkerMessage hello;
    hello.mutable_hello()->set_pid(p->pid);
    hello.mutable_hello()->set_handoff(true);
    ASSERT_TRUE(p->channel->Send(hello).ok());
    launcher_.SendReady(*p);
  }
  Settle();
  // One second apart: shard 0 moved 4 MB, the others 1 kB each.
  auto report = [&](uint64_t hot, uint64_t cold) {
    for (size_t i = 0; i < w.size(); ++i) {
      v1::WorkerMessage m;
      m.mutable_load()->set_active_connections(i == 0 ? 14 : 10);
      m.mutable_load()->set_bytes_in_total(i == 0 ? hot : cold);
      ASSERT_TRUE(w[i]->channel->Send(m).ok());
    }
    Settle();
    fleet_->MeasureLoadNow();
  };
  report(0, 0);
  loop_->AdvanceTo(&clock_, clock_.Now() + absl::Seconds(1));
  report(4'000'000, 1'000);

  v1::RebalanceListenerRequest req = Request();
  req.set_metric(v1::REBALANCE_METRIC_BYTES);
  req.set_move_connections(true);
  std::optional<absl::StatusOr<v1::RebalanceListenerResponse>> out;
  fleet_->RebalanceListener(
      req, [&](absl::StatusOr<v1::RebalanceListenerResponse> r) {
        out = std::move(r);
      });
  Settle();
  std::vector<v1::HandOffRequest> asked;
  for (const v1::AgentMessage& m : launcher_.Received(w[0]->pid)) {
    if (m.has_handoff_request()) asked.push_back(m.handoff_request());
  }
  ASSERT_EQ(asked.size(), 3u);
  for (size_t k = 0; k < asked.size(); ++k) {
    EXPECT_NEAR(static_cast<double>(asked[k].bytes_per_second()), 1e6, 1e3);
    // One stream each, except the last: nothing fits (refused).
    const uint32_t release = k < 2 ? 1 : 0;
    for (uint32_t i = 0; i < release; ++i) {
      Fd conn = ConnectedSocket();
      v1::WorkerMessage m;
      m.mutable_handoff_connection()->set_id(asked[k].id());
      ASSERT_TRUE(w[0]->channel->SendWithFd(m, conn.get()).ok());
    }
    v1::WorkerMessage done;
    done.mutable_handoff_done()->set_id(asked[k].id());
    done.mutable_handoff_done()->set_released(release);
    done.mutable_handoff_done()->set_bytes_per_second(release * 1'000'000);
    done.mutable_handoff_done()->set_busy(1);
    ASSERT_TRUE(w[0]->channel->Send(done).ok());
  }
  Settle();
  ASSERT_TRUE(out.has_value());
  ASSERT_TRUE(out->ok()) << out->status();
  const v1::RebalanceListenerResponse& r = **out;
  EXPECT_FALSE(r.steering_only());
  EXPECT_EQ(r.connections_moved(), 2u);
  EXPECT_EQ(r.shards(0).connections_moved(), -2);
  EXPECT_NEAR(r.shards(0).expected_after(), 2e6, 1e3);
  ASSERT_EQ(r.refusals_size(), 1);
  EXPECT_EQ(r.refusals(0).shard(), 0);
  EXPECT_THAT(r.refusals(0).reason(),
              HasSubstr("no idle connection with traffic of at most 2.0 MB/s"));
}

TEST_F(FleetRebalanceTest, ByCpuMovesNoConnection) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Report({3, 5});
  fleet_->MeasureLoadNow();
  v1::RebalanceListenerRequest req = Request();
  req.set_metric(v1::REBALANCE_METRIC_CPU);
  req.set_move_connections(true);
  absl::StatusOr<v1::RebalanceListenerResponse> r = Rebalance(req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->connections_moved(), 0u);
  bool said = false;
  for (const v1::RebalanceRefusal& x : r->refusals()) {
    said = said || absl::StrContains(x.reason(), "by cpu only new connections");
  }
  EXPECT_TRUE(said);
}

TEST_F(FleetRebalanceTest, SteeringChangeDropsTheAdjustment) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  Report({50, 0});
  fleet_->MeasureLoadNow();
  ASSERT_TRUE(Rebalance(Request()).ok());
  EXPECT_NE(AppliedWeights()[0], AppliedWeights()[1]);
  v1::Steering hash;
  hash.set_policy(v1::STEERING_POLICY_HASH);
  ASSERT_TRUE(fleet_->SetSteering("web", hash).ok());
  EXPECT_THAT(AppliedWeights(), ElementsAre(1, 1));
}

TEST_F(FleetRebalanceTest, CpuSteeringKeepsLocalityWhenEven) {
  ASSERT_TRUE(
      fleet_->AddListener(Spec(2, "steering { policy: STEERING_POLICY_CPU }"))
          .ok());
  Settle();
  Report({50, 50});
  fleet_->MeasureLoadNow();
  absl::StatusOr<v1::RebalanceListenerResponse> r = Rebalance(Request());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->slots_moved(), 0u);
  ASSERT_EQ(r->spills_size(), 2);
  for (const v1::RebalanceSpill& c : r->spills()) {
    EXPECT_EQ(c.share_after(), 0u) << "cpu " << c.cpu();
  }
  const SteeringTables& t = steering_.state.listeners["web"].applied.back();
  EXPECT_TRUE(t.cpu_spill.empty());
  EXPECT_TRUE(t.table_weights.empty());
  ASSERT_FALSE(events_.empty());
  EXPECT_THAT(events_.back().message, HasSubstr("no spill (locality kept)"));
}

// Steps:
// 1. CPU steering, shard i on CPU i; shard 0 holds 50, shard 1 none.
// 2. A dry run plans CPU 0 spilling 128 of 256 to a table of shard 1 only,
//    and writes nothing.
// 3. The rebalance writes it: both shards stay on their CPUs (weights
//    1,1), CPU 1 spills nothing; the event says so.
// 4. Even again: the spill and the table go back to the operator's.
TEST_F(FleetRebalanceTest, CpuSteeringSpillsOnlyTheHotCpusExcess) {
  ASSERT_TRUE(
      fleet_->AddListener(Spec(2, "steering { policy: STEERING_POLICY_CPU }"))
          .ok());
  Settle();
  Report({50, 0});
  fleet_->MeasureLoadNow();
  const size_t writes = steering_.state.listeners["web"].applied.size();
  absl::StatusOr<v1::RebalanceListenerResponse> plan = Rebalance(Request(true));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(steering_.state.listeners["web"].applied.size(), writes);
  ASSERT_EQ(plan->spills_size(), 2);
  EXPECT_EQ(plan->spills(0).cpu(), 0);
  EXPECT_EQ(plan->spills(0).share_before(), 0u);
  EXPECT_EQ(plan->spills(0).share_after(), 128u);
  EXPECT_DOUBLE_EQ(plan->spills(0).target(), 25);
  EXPECT_EQ(plan->spills(1).share_after(), 0u);
  ASSERT_EQ(plan->shards_size(), 2);
  EXPECT_EQ(plan->shards(0).slots_before(), 128u);
  EXPECT_EQ(plan->shards(0).slots_after(), 0u);
  EXPECT_EQ(plan->shards(1).slots_after(), 256u);
  EXPECT_EQ(plan->slots_moved(), 128u);

  absl::StatusOr<v1::RebalanceListenerResponse> r = Rebalance(Request());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->spills(0).share_after(), 128u);
  const SteeringTables& t = steering_.state.listeners["web"].applied.back();
  EXPECT_EQ(t.policy, v1::STEERING_POLICY_CPU);
  EXPECT_THAT(t.weights, ElementsAre(1, 1));
  EXPECT_THAT(t.shard_cpus, ElementsAre(0, 1));
  EXPECT_THAT(t.table_weights, ElementsAre(0, 1000));
  EXPECT_THAT(t.cpu_spill, ElementsAre(128));
  ASSERT_FALSE(events_.empty());
  EXPECT_EQ(events_.back().type, v1::EVENT_TYPE_REBALANCE_DONE);
  EXPECT_THAT(events_.back().message, HasSubstr("cpu 0 spills 0 -> 128/256"));

  Report({50, 50});
  fleet_->MeasureLoadNow();
  r = Rebalance(Request());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->spills(0).share_before(), 128u);
  EXPECT_EQ(r->spills(0).share_after(), 0u);
  const SteeringTables& back = steering_.state.listeners["web"].applied.back();
  EXPECT_TRUE(back.cpu_spill.empty());
  EXPECT_TRUE(back.table_weights.empty());
  EXPECT_THAT(events_.back().message, HasSubstr("cpu 0 spills 128 -> 0/256"));
  EXPECT_THAT(events_.back().message, HasSubstr("even: baseline tables"));
}

TEST_F(FleetRebalanceTest, CpuSpillIsDroppedBySteeringChange) {
  ASSERT_TRUE(
      fleet_->AddListener(Spec(2, "steering { policy: STEERING_POLICY_CPU }"))
          .ok());
  Settle();
  Report({50, 0});
  fleet_->MeasureLoadNow();
  ASSERT_TRUE(Rebalance(Request()).ok());
  ASSERT_FALSE(
      steering_.state.listeners["web"].applied.back().cpu_spill.empty());
  v1::Steering hash;
  hash.set_policy(v1::STEERING_POLICY_HASH);
  ASSERT_TRUE(fleet_->SetSteering("web", hash).ok());
  const SteeringTables& t = steering_.state.listeners["web"].applied.back();
  EXPECT_TRUE(t.cpu_spill.empty());
  EXPECT_TRUE(t.table_weights.empty());
}

TEST_F(FleetRebalanceTest, RefusedWithoutSteeringOrListener) {
  EXPECT_TRUE(absl::IsNotFound(Rebalance(Request()).status()));
  fleet_->SetSteeringBackend(nullptr, "no CAP_BPF");
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  absl::Status s = Rebalance(Request()).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_THAT(s.message(), HasSubstr("listener web"));
  EXPECT_THAT(s.message(), HasSubstr("no CAP_BPF"));
}

// --- Continuous rebalancing (fleet/auto_rebalance.h) -------------------------

class FleetAutoRebalanceTest : public FleetRebalanceTest {
 protected:
  static constexpr char kAuto[] =
      "rebalance { mode: REBALANCE_MODE_AUTO period_seconds: 2 }";
  // `seconds` later: a load report, a measurement and a check.
  void Observe(const std::vector<uint64_t>& connections, int seconds = 1) {
    clock_.Advance(absl::Seconds(seconds));
    Report(connections);
    fleet_->MeasureLoadNow();
    fleet_->AutoRebalanceNow();
    Settle();
  }
  int Count(v1::EventType type, const std::string& text = "") {
    int n = 0;
    for (const FleetEvent& e : events_) {
      n += e.type == type && e.message.find(text) != std::string::npos;
    }
    return n;
  }
  // Applies `spec` with UpdateListener, to its end.
  absl::Status Update(const v1::Listener& spec) {
    std::optional<absl::Status> out;
    absl::Status s =
        fleet_->UpdateListener(spec, [&](absl::Status r) { out = r; });
    if (!s.ok()) return s;
    Settle();
    return out.value_or(absl::InternalError("update never ended"));
  }
};

// Steps: 4 shards, auto with a 2 s period; shards 0-1 hold 200 each.
// 1. One second above the threshold: nothing (the period has not passed).
// 2. Two seconds: AUTO_STARTED and an "auto:" REBALANCE_DONE; the tables
//    favour shards 2-3 (steering only: these workers do not hand off).
// 3. Even loads: AUTO_SETTLED, the operator's tables again; then idle.
TEST_F(FleetAutoRebalanceTest, StartsAfterAPeriodAndSettlesAtTheTarget) {
  ASSERT_TRUE(fleet_->AddListener(Spec(4, kAuto)).ok());
  Settle();
  events_.clear();
  Observe({200, 200, 0, 0});
  Observe({200, 200, 0, 0});
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_STARTED), 0);
  Observe({200, 200, 0, 0}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_STARTED), 1);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE, "auto: by connections"), 1);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_REFUSED), 0)
      << "no worker hands off: steering alone, nothing to refuse";
  std::vector<uint32_t> w = AppliedWeights();
  ASSERT_EQ(w.size(), 4u);
  EXPECT_GT(w[2], w[0]);
  ListenerStatus st = *fleet_->ListenerStatusOf("web");
  EXPECT_TRUE(st.auto_rebalancing);
  EXPECT_EQ(st.auto_rebalance_steps, 1u);

  Observe({100, 100, 100, 100});
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_SETTLED), 1);
  EXPECT_THAT(AppliedWeights(), ElementsAre(1, 1, 1, 1));
  EXPECT_FALSE(fleet_->ListenerStatusOf("web")->auto_rebalancing);
  const size_t events = events_.size();
  for (int i = 0; i < 20; ++i) Observe({110, 100, 95, 100});
  EXPECT_EQ(events_.size(), events) << "idle between target and threshold";
}

// Steps: 2 shards with CPU steering (shard i on CPU i), auto with a 2 s
// period; shard 0 holds 60, shard 1 20.
// 1. After a period: CPU 0 spills ceil(256 * 20 / 60) = 86, to a table of
//    shard 1 only; every shard stays on its CPU.
// 2. Still above the target: the next step holds 86 (the excess shrank).
// 3. Even: AUTO_SETTLED resets the spill and the table; then idle.
TEST_F(FleetAutoRebalanceTest, CpuSteeringSpillsThenSettles) {
  ASSERT_TRUE(
      fleet_
          ->AddListener(Spec(
              2,
              absl::StrCat("steering { policy: STEERING_POLICY_CPU } ", kAuto)))
          .ok());
  Settle();
  events_.clear();
  Observe({60, 20});
  Observe({60, 20}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_STARTED), 1);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE, "cpu 0 spills 0 -> 86/256"),
            1);
  const SteeringTables* t = &steering_.state.listeners["web"].applied.back();
  EXPECT_THAT(t->cpu_spill, ElementsAre(86));
  EXPECT_THAT(t->table_weights, ElementsAre(0, 500));
  EXPECT_THAT(t->weights, ElementsAre(1, 1));

  Observe({66, 50}, 2);  // 1.14: above the target 1.10
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE, "cpu 0 spills 86/256"), 1);
  t = &steering_.state.listeners["web"].applied.back();
  EXPECT_THAT(t->cpu_spill, ElementsAre(86));

  Observe({70, 68}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_SETTLED), 1);
  t = &steering_.state.listeners["web"].applied.back();
  EXPECT_TRUE(t->cpu_spill.empty());
  EXPECT_TRUE(t->table_weights.empty());
  EXPECT_EQ(
      Count(v1::EVENT_TYPE_REBALANCE_DONE, "even: baseline tables, no spill"),
      1);
  const size_t events = events_.size();
  for (int i = 0; i < 20; ++i) Observe({75, 70});
  EXPECT_EQ(events_.size(), events) << "idle between target and threshold";
}

// Steps: 2 shards whose workers hand off, auto with at most 50 moves; shard
// 0 holds 300. A check after the period asks shard 0 for 50 connections in
// all (chunks of at most 32), not the 150 that would even the load.
TEST_F(FleetAutoRebalanceTest, AStepHandsOffAtMostMaxMoves) {
  launcher_.auto_ready = false;
  ASSERT_TRUE(fleet_
                  ->AddListener(Spec(2,
                                     "rebalance { mode: REBALANCE_MODE_AUTO "
                                     "period_seconds: 2 "
                                     "max_moves_per_period: 50 }"))
                  .ok());
  Settle();
  std::vector<FakeLauncher::Process*> w = launcher_.Running();
  ASSERT_EQ(w.size(), 2u);
  for (FakeLauncher::Process* p : w) {
    v1::WorkerMessage hello;
    hello.mutable_hello()->set_pid(p->pid);
    hello.mutable_hello()->set_handoff(true);
    ASSERT_TRUE(p->channel->Send(hello).ok());
    launcher_.SendReady(*p);
  }
  Settle();
  Observe({300, 0});
  Observe({300, 0}, 2);
  uint32_t asked = 0;
  for (int round = 0; round < 10; ++round) {
    // The receiver reads what it was sent (the router waits for that before
    // it asks for the next chunk).
    launcher_.Received(w[1]->pid);
    for (const v1::AgentMessage& got : launcher_.Received(w[0]->pid)) {
      if (!got.has_handoff_request()) continue;
      const v1::HandOffRequest& a = got.handoff_request();
      EXPECT_LE(a.count(), 32u);
      asked += a.count();
      for (uint32_t i = 0; i < a.count(); ++i) {
        Fd conn = ConnectedSocket();
        v1::WorkerMessage m;
        m.mutable_handoff_connection()->set_id(a.id());
        ASSERT_TRUE(w[0]->channel->SendWithFd(m, conn.get()).ok());
      }
      v1::WorkerMessage done;
      done.mutable_handoff_done()->set_id(a.id());
      done.mutable_handoff_done()->set_released(a.count());
      ASSERT_TRUE(w[0]->channel->Send(done).ok());
    }
    Settle();
    launcher_.Received(w[1]->pid);
    loop_->AdvanceTo(&clock_, clock_.Now() + absl::Milliseconds(2));
    Settle();
  }
  EXPECT_EQ(asked, 50u);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_HANDOFF, "auto: handed off 50"), 1);
  EXPECT_EQ(fleet_->ListenerStatusOf("web")->rebalance_connections_moved, 50u);
}

// Steps: 3 shards, auto on; shards 1-2 hand off, shard 0's worker cannot
// (no hello) and holds every connection, so every step refuses it the same
// way.
// 1. Four periods above the threshold: four steps, one REBALANCE_REFUSED
//    (not one per step), and every step's refusal is counted.
// 2. Even loads settle; a new episode says it once more.
TEST_F(FleetAutoRebalanceTest, ARepeatedRefusalIsReportedOncePerEpisode) {
  launcher_.auto_ready = false;
  ASSERT_TRUE(fleet_->AddListener(Spec(3, kAuto)).ok());
  Settle();
  std::vector<FakeLauncher::Process*> w = launcher_.Running();
  ASSERT_EQ(w.size(), 3u);
  for (size_t i = 0; i < w.size(); ++i) {
    if (i > 0) {
      v1::WorkerMessage hello;
      hello.mutable_hello()->set_pid(w[i]->pid);
      hello.mutable_hello()->set_handoff(true);
      ASSERT_TRUE(w[i]->channel->Send(hello).ok());
    }
    launcher_.SendReady(*w[i]);
  }
  Settle();
  events_.clear();
  for (int i = 0; i < 4; ++i) Observe({300, 0, 0}, 2);
  ListenerStatus st = *fleet_->ListenerStatusOf("web");
  ASSERT_GE(st.auto_rebalance_steps, 3u);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_REFUSED,
                  "auto: shard 0: worker cannot hand off"),
            1);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_REFUSED), 1);
  EXPECT_EQ(st.rebalance_refusals, st.auto_rebalance_steps)
      << "each step's refusal is still counted";

  Observe({100, 100, 100}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_SETTLED), 1);
  for (int i = 0; i < 2; ++i) Observe({300, 0, 0}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_STARTED), 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_REFUSED), 2);
}

// Steps: 2 shards, auto on, shard 0 holds everything for half a period;
// scale to 3 with a worker that is slow to be ready: no step while it
// starts, though the period passes; once it is ready, a step at once.
TEST_F(FleetAutoRebalanceTest, PausesDuringAScaleUpThenActsAtOnce) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2, kAuto)).ok());
  Settle();
  Observe({100, 0});
  Observe({100, 0});  // above the threshold for 1 s of the 2 s period
  launcher_.auto_ready = false;
  bool scaled = false;
  ASSERT_TRUE(fleet_
                  ->ScaleListener("web", 3,
                                  [&](absl::Status s) {
                                    EXPECT_TRUE(s.ok()) << s;
                                    scaled = true;
                                  })
                  .ok());
  Settle();
  events_.clear();
  std::vector<FakeLauncher::Process*> w = launcher_.Running();
  ASSERT_EQ(w.size(), 3u);
  // 1.5 s more: past the period, which a scale restarts.
  for (int i = 0; i < 3; ++i) {
    clock_.Advance(absl::Milliseconds(500));
    fleet_->AutoRebalanceNow();
    Settle();
  }
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE), 0) << "acted mid-scale";
  launcher_.SendReady(*w[2]);
  Settle();
  ASSERT_TRUE(scaled);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_STARTED), 1);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE, "auto:"), 1);
  std::vector<uint32_t> slots = AppliedWeights();
  ASSERT_EQ(slots.size(), 3u);
  EXPECT_LT(slots[0], slots[1]);
  EXPECT_LT(slots[0], slots[2]);
}

// Steps: 2 shards, auto off: skewed load does nothing. UpdateListener turns
// it on (no worker restarts; the plan says "rebalance: off -> auto ..."),
// a step follows a period later; UpdateListener turns it off again: the
// operator's tables come back at the next check.
TEST_F(FleetAutoRebalanceTest, UpdateListenerTurnsItOnAndOffLive) {
  ASSERT_TRUE(fleet_->AddListener(Spec(2)).ok());
  Settle();
  const size_t launches = launcher_.launches();
  for (int i = 0; i < 5; ++i) Observe({100, 0});
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE), 0);

  absl::StatusOr<ListenerUpdate> plan =
      fleet_->PlanListenerUpdate(Spec(2, kAuto));
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->Changes().size(), 1u);
  EXPECT_EQ(plan->Changes()[0],
            "rebalance: off -> auto connections 1.25->1.10 every 2s, 1000 "
            "moves");
  ASSERT_TRUE(Update(Spec(2, kAuto)).ok());
  EXPECT_EQ(launcher_.launches(), launches) << "a worker was restarted";
  Observe({100, 0});
  Observe({100, 0}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE, "auto:"), 1);
  EXPECT_NE(AppliedWeights()[0], AppliedWeights()[1]);

  ASSERT_TRUE(Update(Spec(2)).ok());
  EXPECT_EQ(launcher_.launches(), launches);
  Observe({100, 0});
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_AUTO_SETTLED, "turned off"), 1);
  EXPECT_THAT(AppliedWeights(), ElementsAre(1, 1));
  for (int i = 0; i < 5; ++i) Observe({100, 0}, 2);
  EXPECT_EQ(Count(v1::EVENT_TYPE_REBALANCE_DONE, "auto:"), 2)
      << "one step, one settle: nothing after it was turned off";
}

// Hand-off pauses from load reports (fleet/load.h): each report is the
// worker's cumulative histogram; the shard and the listener add what is new,
// so a worker replaced keeps its counts there.
TEST(HandOffPausesTest, ReportsAddWhatIsNewAndOutliveTheirWorker) {
  auto report = [](std::vector<uint64_t> pauses_ns) {
    DurationHistogram h;
    for (uint64_t ns : pauses_ns) h.Record(ns);
    v1::DurationHistogram m;
    HistogramToProto(h, &m);
    return m;
  };
  Listener listener;
  Shard shard;
  Worker first, second;
  AddHandOffPauses(report({20'000, 30'000}), first, shard, listener);
  // The same report again adds nothing; a later one adds its new pause.
  AddHandOffPauses(report({20'000, 30'000}), first, shard, listener);
  AddHandOffPauses(report({20'000, 30'000, 400'000}), first, shard, listener);
  EXPECT_EQ(shard.handoff_pauses.count(), 3u);
  EXPECT_EQ(shard.handoff_pauses.sum_ns(), 450'000u);
  // The replacement starts from 0: its pauses add to the first one's.
  AddHandOffPauses(report({50'000}), second, shard, listener);
  EXPECT_EQ(shard.handoff_pauses.count(), 4u);
  EXPECT_EQ(listener.handoff_pauses, shard.handoff_pauses);
  // A report with fewer pauses than the worker's last (it counted again
  // from 0) counts whole; an empty one (adopted nothing) adds nothing.
  AddHandOffPauses(report({}), second, shard, listener);
  AddHandOffPauses(report({60'000}), second, shard, listener);
  EXPECT_EQ(shard.handoff_pauses.count(), 5u);

  v1::HandOffPauses view;
  FillHandOffPauses(shard.handoff_pauses, &view);
  EXPECT_EQ(view.adopted(), 5u);
  EXPECT_NEAR(view.p50_us(), 50, 50 * 0.0625);
  EXPECT_NEAR(view.p99_us(), 400, 400 * 0.0625);
  ASSERT_EQ(view.histogram().buckets_size(), 5);
  EXPECT_EQ(view.histogram().buckets(4).upper_ns(),
            DurationHistogram::UpperNs(view.histogram().buckets(4).index()));
}

}  // namespace
}  // namespace portfleet::testing
