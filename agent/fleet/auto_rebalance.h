// Continuous rebalancing (RebalanceSpec mode AUTO): per listener, on the
// load period, the imbalance (max/mean of the metric over the ready shards)
// is checked and acted upon with hysteresis:
//   idle     until max/mean has stayed above the threshold for a whole
//            period (a spike shorter than that does nothing); then
//   active   one bounded step per period (fleet/rebalance.h: the tables,
//            and at most max_moves_per_period connections handed off),
//            until max/mean is at or below the target; then the tables go
//            back to the operator's weights (a table still skewed toward
//            the formerly cold shards would overshoot) and it is idle again.
// Nothing happens while the listener changes (a scale, a rollout, a drain,
// a shard not ready or out of the tables, a rebalance in flight): the
// period starts again once it is stable. After a step, nothing is decided
// until every shard's load was reported and measured again (a decision on
// the loads from before the step would move the same connections twice). A
// scale-up's new shards, once ready, trigger a step at once (the classic
// scale-up skew), without waiting a period.
//
// AutoRebalancePolicy is the decision alone (pure, a clock passed in);
// AutoRebalancer applies it to the fleet's listeners on the event loop.
#ifndef PORTFLEET_AGENT_FLEET_AUTO_REBALANCE_H_
#define PORTFLEET_AGENT_FLEET_AUTO_REBALANCE_H_

#include <map>
#include <optional>
#include <string>

#include "absl/time/time.h"
#include "agent/fleet/handoff.h"
#include "agent/fleet/model.h"
#include "agent/spec/spec.h"

namespace portfleet {

class AutoRebalancePolicy {
 public:
  enum class Action {
    kNone,
    kStart,   // above the threshold for a period (or kicked): first step
    kStep,    // still above the target a period after the last step
    kSettle,  // at or below the target: the operator's tables again
    kPause,   // a rebalance runs but the listener is changing
  };
  struct Observation {
    absl::Time now;
    double imbalance = 0;  // max/mean by the metric; 0 when idle
    std::string busy;      // non-empty: the listener is changing (why)
  };

  // What to do now. `settings.automatic` false: kSettle once if a
  // rebalance was running (turned off), kNone otherwise.
  Action Decide(const EffectiveRebalance& settings, const Observation& o);
  // The next Decide acts at once if the imbalance is above the threshold
  // (a scale-up's new shards are ready), as soon as the listener is stable.
  void Kick() { kicked_ = true; }
  // The step Decide asked for ended (the next is a period from now).
  void StepEnded(absl::Time now) { last_step_ = now; }
  // Between kStart and kSettle.
  bool active() const { return active_; }

 private:
  bool active_ = false;
  bool paused_ = false;  // kPause was said for this pause
  bool kicked_ = false;
  std::optional<absl::Time> above_since_;
  absl::Time last_step_ = absl::InfinitePast();
};

class AutoRebalancer {
 public:
  AutoRebalancer(FleetContext* ctx, ListenerMap* listeners,
                 HandOffRouter* router);
  ~AutoRebalancer();
  AutoRebalancer(const AutoRebalancer&) = delete;
  AutoRebalancer& operator=(const AutoRebalancer&) = delete;

  // Checks every listener every `load_period` from now on.
  void Start();
  // One check of every listener now (the timer's work; unit tests).
  void Tick();
  // A scale-up of listener `name` is complete: checks it at once (on the
  // loop, after the caller returns).
  void Kick(const std::string& name);
  // Listener `name` is rebalancing automatically now.
  bool Active(const std::string& name) const;

 private:
  struct State {
    AutoRebalancePolicy policy;
    bool in_flight = false;  // a step runs (hand-offs)
    // When the last step ended: its effect is known once every shard's
    // load was reported and measured after this.
    absl::Time step_ended = absl::InfinitePast();
    bool noted_refusal = false;  // said once why it cannot act
    // The refusals of the last step, reported once (RebalanceLimits).
    std::string last_refusals;
  };
  void Check(Listener& listener, State& state);
  // Why the listener is not stable enough for a step; empty if it is.
  std::string Busy(const Listener& listener, const State& state) const;
  void RunStep(Listener& listener, State& state,
               const EffectiveRebalance& settings, double imbalance,
               bool first);

  FleetContext* const ctx_;
  ListenerMap* const listeners_;
  HandOffRouter* const router_;
  std::map<std::string, State> states_;
  std::optional<EventLoop::TimerId> timer_;
  std::optional<EventLoop::TimerId> kick_timer_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_AUTO_REBALANCE_H_
