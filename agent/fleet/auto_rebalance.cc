#include "agent/fleet/auto_rebalance.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "agent/fleet/load.h"
#include "agent/fleet/rebalance.h"
#include "agent/spec/enum_names.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

using Action = AutoRebalancePolicy::Action;

Action AutoRebalancePolicy::Decide(const EffectiveRebalance& settings,
                                   const Observation& o) {
  if (!settings.automatic) {
    const bool was = active_;
    *this = AutoRebalancePolicy();
    return was ? Action::kSettle : Action::kNone;
  }
  if (!o.busy.empty()) {
    // The listener changes: whatever was seen before says nothing now.
    above_since_.reset();
    if (active_ && !paused_) {
      paused_ = true;
      return Action::kPause;
    }
    return Action::kNone;
  }
  paused_ = false;
  const absl::Duration period = absl::Seconds(settings.period_seconds);
  if (std::exchange(kicked_, false) && o.imbalance > settings.threshold) {
    const bool was = active_;
    active_ = true;
    above_since_.reset();
    return was ? Action::kStep : Action::kStart;
  }
  if (!active_) {
    if (o.imbalance <= settings.threshold) {
      above_since_.reset();
      return Action::kNone;
    }
    if (!above_since_) above_since_ = o.now;
    if (o.now - *above_since_ < period) return Action::kNone;
    above_since_.reset();
    active_ = true;
    return Action::kStart;
  }
  if (o.imbalance <= settings.target) {
    active_ = false;
    return Action::kSettle;
  }
  if (o.now - last_step_ < period) return Action::kNone;
  return Action::kStep;
}

AutoRebalancer::AutoRebalancer(FleetContext* ctx, ListenerMap* listeners,
                               HandOffRouter* router)
    : ctx_(ctx), listeners_(listeners), router_(router) {}

AutoRebalancer::~AutoRebalancer() {
  if (timer_) ctx_->loop->CancelTimer(*timer_);
  if (kick_timer_) ctx_->loop->CancelTimer(*kick_timer_);
}

void AutoRebalancer::Start() {
  if (timer_) return;
  timer_ = ctx_->loop->AddTimer(ctx_->options.load_period, [this] {
    timer_.reset();
    Tick();
    Start();
  });
}

void AutoRebalancer::Tick() {
  for (auto it = states_.begin(); it != states_.end();) {
    auto l = listeners_->find(it->first);
    // Gone, or turned off with nothing left to undo: forget it.
    if (l == listeners_->end() ||
        (!EffectiveRebalanceOf(l->second->spec).automatic &&
         !it->second.policy.active() && !it->second.in_flight)) {
      it = states_.erase(it);
    } else {
      ++it;
    }
  }
  if (ctx_->shutting_down) return;
  for (auto& [name, listener] : *listeners_) {
    auto state = states_.find(name);
    if (state == states_.end()) {
      if (!EffectiveRebalanceOf(listener->spec).automatic) continue;
      state = states_.emplace(name, State()).first;
    }
    Check(*listener, state->second);
  }
}

void AutoRebalancer::Kick(const std::string& name) {
  auto l = listeners_->find(name);
  if (l == listeners_->end() ||
      !EffectiveRebalanceOf(l->second->spec).automatic) {
    return;
  }
  states_[name].policy.Kick();
  if (kick_timer_) return;
  kick_timer_ = ctx_->loop->AddTimer(absl::ZeroDuration(), [this] {
    kick_timer_.reset();
    Tick();
  });
}

bool AutoRebalancer::Active(const std::string& name) const {
  auto it = states_.find(name);
  return it != states_.end() && it->second.policy.active();
}

namespace {

// Every shard's load was measured (and, for a worker that reports, reported)
// at or after `since`.
bool MeasuredSince(const Listener& listener, absl::Time since) {
  for (const auto& shard : listener.shards) {
    if (shard->load_track.time < since) return false;
    const Worker* w = shard->worker.get();
    if (w != nullptr && w->reports && w->control && w->last_report < since) {
      return false;
    }
  }
  return true;
}

}  // namespace

std::string AutoRebalancer::Busy(const Listener& listener,
                                 const State& state) const {
  if (listener.deleting) return "the listener is being deleted";
  if (state.in_flight || router_->Busy(listener.spec.name())) {
    return "a rebalance is in flight";
  }
  if (listener.rollout) return "a rollout is in progress";
  for (const auto& shard : listener.shards) {
    if (shard->draining()) {
      return absl::StrCat("shard ", shard->index, " is draining");
    }
    if (!shard->in_service) {
      return absl::StrCat("shard ", shard->index, " is being added");
    }
    if (shard->health.ejected || shard->health.maintenance) {
      return absl::StrCat("shard ", shard->index, " is out of the tables");
    }
    if (!shard->worker || !shard->worker->ready || shard->candidate) {
      return absl::StrCat("shard ", shard->index, " is not ready");
    }
  }
  return "";
}

void AutoRebalancer::Check(Listener& listener, State& state) {
  const EffectiveRebalance settings = EffectiveRebalanceOf(listener.spec);
  const std::string& name = listener.spec.name();
  if (settings.automatic && !listener.steering) {
    if (!std::exchange(state.noted_refusal, true)) {
      ctx_->Emit(v1::EVENT_TYPE_REBALANCE_REFUSED, listener, -1, 0,
                 absl::StrCat("auto: rebalancing needs BPF steering, which is "
                              "not active: ",
                              ctx_->steering_reason));
    }
    return;
  }
  if (!MeasuredSince(listener, state.step_ended)) return;
  std::vector<double> loads;
  for (const auto& shard : listener.shards) {
    if (shard->Steered() && shard->worker && shard->worker->ready) {
      loads.push_back(LoadBy(shard->load, settings.metric));
    }
  }
  const AutoRebalancePolicy::Observation o{.now = ctx_->Now(),
                                           .imbalance = Imbalance(loads),
                                           .busy = Busy(listener, state)};
  switch (state.policy.Decide(settings, o)) {
    case Action::kNone:
      return;
    case Action::kPause:
      ctx_->Emit(v1::EVENT_TYPE_REBALANCE_AUTO_PAUSED, listener, -1, 0,
                 absl::StrCat("auto: paused: ", o.busy));
      return;
    case Action::kStart:
      ctx_->Emit(v1::EVENT_TYPE_REBALANCE_AUTO_STARTED, listener, -1, 0,
                 absl::StrFormat("auto: by %s, imbalance %.2f above the "
                                 "threshold %.2f",
                                 ShortName(settings.metric), o.imbalance,
                                 settings.threshold));
      state.last_refusals.clear();  // said again once per episode
      RunStep(listener, state, settings, o.imbalance, true);
      return;
    case Action::kStep:
      RunStep(listener, state, settings, o.imbalance, false);
      return;
    case Action::kSettle: {
      const std::string why =
          settings.automatic
              ? absl::StrFormat(
                    "auto: imbalance %.2f at or below the target "
                    "%.2f",
                    o.imbalance, settings.target)
              : std::string("auto: turned off");
      absl::StatusOr<uint32_t> moved =
          RestoreBaselineSteering(*ctx_, listener, why);
      if (!moved.ok()) {
        PF_LOG(ERROR) << "listener " << name << ": " << moved.status();
      }
      ctx_->Emit(v1::EVENT_TYPE_REBALANCE_AUTO_SETTLED, listener, -1, 0, why);
      return;
    }
  }
}

void AutoRebalancer::RunStep(Listener& listener, State& state,
                             const EffectiveRebalance& settings,
                             double imbalance, bool first) {
  v1::RebalanceListenerRequest request;
  request.set_name(listener.spec.name());
  request.set_metric(settings.metric);
  // Hand-offs only where a worker can take part, and by a metric they can
  // move (connections, bytes; not cpu): otherwise the listener is rebalanced
  // by steering alone, without a refusal event every period.
  bool can_hand_off = false;
  for (const auto& shard : listener.shards) {
    const Worker* w = shard->worker.get();
    can_hand_off = can_hand_off || (w != nullptr && w->handoff && w->control);
  }
  request.set_move_connections(settings.move_connections && can_hand_off &&
                               settings.metric != v1::REBALANCE_METRIC_CPU);
  listener.auto_rebalance_steps++;
  PF_LOG(INFO) << "listener " << listener.spec.name() << ": auto-rebalance "
               << (first ? "starts" : "step") << ", imbalance "
               << absl::StrFormat("%.2f", imbalance);
  state.in_flight = true;
  const std::string name = listener.spec.name();
  // `done` may run now (no hand-offs) or later: it finds the state by name.
  ::portfleet::RebalanceListener(
      *ctx_, *router_, listener, request,
      [this, name](absl::StatusOr<v1::RebalanceListenerResponse> r) {
        if (!r.ok()) {
          PF_LOG(WARNING) << "listener " << name
                          << ": auto-rebalance step: " << r.status();
        }
        auto it = states_.find(name);
        if (it == states_.end()) return;
        it->second.in_flight = false;
        it->second.step_ended = ctx_->Now();
        it->second.policy.StepEnded(ctx_->Now());
      },
      RebalanceLimits{.max_moves = settings.max_moves,
                      .origin = "auto",
                      .last_refusals = &state.last_refusals});
}

}  // namespace portfleet
