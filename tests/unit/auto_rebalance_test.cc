// The auto-rebalancer's decision (AutoRebalancePolicy) as a pure state
// machine over a clock passed in: hysteresis, one step per period, pauses,
// the scale-up kick, turning off; and convergence without oscillation over
// a simple model of the loads.
#include "agent/fleet/auto_rebalance.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "agent/fleet/load.h"
#include "gtest/gtest.h"

namespace portfleet::testing {
namespace {

using Action = AutoRebalancePolicy::Action;

EffectiveRebalance Auto() {
  return EffectiveRebalance{.automatic = true,
                            .threshold = 1.25,
                            .target = 1.10,
                            .period_seconds = 10,
                            .max_moves = 50};
}

class PolicyTest : public ::testing::Test {
 protected:
  // One observation `seconds` after the previous one.
  Action See(double imbalance, int seconds = 1, std::string busy = "") {
    now_ += absl::Seconds(seconds);
    Action a = policy_.Decide(
        settings_,
        {.now = now_, .imbalance = imbalance, .busy = std::move(busy)});
    if (a == Action::kStart || a == Action::kStep) policy_.StepEnded(now_);
    return a;
  }

  EffectiveRebalance settings_ = Auto();
  AutoRebalancePolicy policy_;
  absl::Time now_ = absl::FromUnixSeconds(1000);
};

TEST_F(PolicyTest, OffDoesNothing) {
  settings_.automatic = false;
  for (int i = 0; i < 30; ++i) EXPECT_EQ(See(3.0), Action::kNone);
  EXPECT_FALSE(policy_.active());
}

// Above the threshold for a whole period starts; a step per period while
// above the target; at or below the target the tables go back; between
// target and threshold nothing starts again.
TEST_F(PolicyTest, HysteresisBetweenThresholdAndTarget) {
  // Seen above it at 1 s, ..., 10 s: a period (10 s) after the first.
  for (int i = 0; i < 10; ++i) EXPECT_EQ(See(1.3), Action::kNone) << i;
  EXPECT_EQ(See(1.3), Action::kStart);
  EXPECT_TRUE(policy_.active());
  for (int i = 0; i < 9; ++i) EXPECT_EQ(See(1.15), Action::kNone) << i;
  EXPECT_EQ(See(1.15), Action::kStep);
  EXPECT_EQ(See(1.10), Action::kSettle);
  EXPECT_FALSE(policy_.active());
  // Between target and threshold: idle, for as long as it stays there.
  for (int i = 0; i < 100; ++i) EXPECT_EQ(See(1.24), Action::kNone) << i;
}

TEST_F(PolicyTest, ASpikeShorterThanAPeriodDoesNothing) {
  for (int round = 0; round < 20; ++round) {
    for (int i = 0; i < 9; ++i) EXPECT_EQ(See(2.0), Action::kNone);
    EXPECT_EQ(See(1.0), Action::kNone);
  }
  EXPECT_FALSE(policy_.active());
}

TEST_F(PolicyTest, PausesWhileTheListenerChanges) {
  for (int i = 0; i < 8; ++i) See(1.5);
  // A scale starts: the window starts again once it is over.
  EXPECT_EQ(See(1.5, 1, "shard 2 is being added"), Action::kNone);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(See(1.5), Action::kNone) << i;
  EXPECT_EQ(See(1.5), Action::kStart);
  // Active: one pause notice, then nothing while busy.
  EXPECT_EQ(See(1.5, 1, "a rollout is in progress"), Action::kPause);
  for (int i = 0; i < 30; ++i) {
    EXPECT_EQ(See(1.5, 1, "a rollout is in progress"), Action::kNone);
  }
  EXPECT_EQ(See(1.5), Action::kStep) << "a period has passed since the step";
}

TEST_F(PolicyTest, AKickActsAtOnceWhenStable) {
  EXPECT_EQ(See(1.0), Action::kNone);
  policy_.Kick();
  EXPECT_EQ(See(2.0, 1, "shard 3 is not ready"), Action::kNone);
  EXPECT_EQ(See(2.0), Action::kStart) << "no period to wait after a scale-up";
  // A kick below the threshold is forgotten.
  EXPECT_EQ(See(1.05), Action::kSettle);
  policy_.Kick();
  EXPECT_EQ(See(1.2), Action::kNone);
  EXPECT_EQ(See(1.2), Action::kNone);
}

TEST_F(PolicyTest, TurnedOffWhileActiveSettlesOnce) {
  for (int i = 0; i < 11; ++i) See(1.5);
  ASSERT_TRUE(policy_.active());
  settings_.automatic = false;
  EXPECT_EQ(See(1.5), Action::kSettle);
  EXPECT_EQ(See(1.5), Action::kNone);
  // On again: a new period of observation first.
  settings_.automatic = true;
  for (int i = 0; i < 10; ++i) EXPECT_EQ(See(1.5), Action::kNone) << i;
  EXPECT_EQ(See(1.5), Action::kStart);
}

// A model of a listener: connections per shard; a step hands off at most
// max_moves from the hottest to the coldest (as PlanHandOffs then
// LimitHandOffs do); churn replaces connections at random.
struct Model {
  std::vector<double> conns;
  void Step(uint32_t max_moves) {
    const double mean =
        std::accumulate(conns.begin(), conns.end(), 0.0) / conns.size();
    double budget = max_moves;
    for (;;) {
      auto hot = std::max_element(conns.begin(), conns.end());
      auto cold = std::min_element(conns.begin(), conns.end());
      const double n = std::min({*hot - mean, mean - *cold, budget});
      if (n < 1) break;
      *hot -= std::floor(n);
      *cold += std::floor(n);
      budget -= std::floor(n);
    }
  }
};

// The scale-up skew (200, 200, 0, 0) with 50 moves per period: steps
// every period until at or below the target, then settles and stays idle.
TEST_F(PolicyTest, ConvergesInBoundedStepsThenStaysIdle) {
  Model m{.conns = {200, 200, 0, 0}};
  policy_.Kick();
  int steps = 0, settles = 0;
  for (int t = 0; t < 600; ++t) {
    Action a = See(Imbalance(m.conns));
    if (a == Action::kStart || a == Action::kStep) {
      ++steps;
      m.Step(settings_.max_moves);
    }
    settles += a == Action::kSettle;
  }
  // 200 connections to move, 50 per step: 4 steps (the last may stop
  // short once within the target).
  EXPECT_LE(steps, 4);
  EXPECT_GE(steps, 3);
  EXPECT_EQ(settles, 1);
  EXPECT_LE(Imbalance(m.conns), settings_.target);
}

// Balanced, then noisy loads (every shard's count jumps by up to +-30%
// each second, independently): the imbalance crosses the threshold often
// but never for a whole period, so nothing moves in an hour.
TEST_F(PolicyTest, NoisyBalancedLoadsDoNotOscillate) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<double> noise(-0.3, 0.3);
  int crossings = 0, actions = 0;
  for (int t = 0; t < 3600; ++t) {
    std::vector<double> conns;
    for (int s = 0; s < 4; ++s) conns.push_back(100 * (1 + noise(rng)));
    const double imbalance = Imbalance(conns);
    crossings += imbalance > settings_.threshold;
    actions += See(imbalance) != Action::kNone;
  }
  EXPECT_GT(crossings, 100) << "the noise should cross the threshold";
  EXPECT_EQ(actions, 0);
}

TEST(LimitHandOffsTest, KeepsTheOrderAndTheBound) {
  std::vector<HandOffTransfer> t = {{.from = 0, .to = 2, .count = 100},
                                    {.from = 1, .to = 3, .count = 100}};
  std::vector<HandOffTransfer> cut = LimitHandOffs(t, 150);
  ASSERT_EQ(cut.size(), 2u);
  EXPECT_EQ(cut[0].count, 100u);
  EXPECT_EQ(cut[1].count, 50u);
  cut = LimitHandOffs(t, 60);
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(cut[0].count, 60u);
  EXPECT_TRUE(LimitHandOffs(t, 0).empty());
  EXPECT_EQ(LimitHandOffs(t, 1000).size(), 2u);
}

}  // namespace
}  // namespace portfleet::testing
