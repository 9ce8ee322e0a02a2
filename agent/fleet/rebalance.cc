#include "agent/fleet/rebalance.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/load.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

#include "bpf/steering_shared.h"

namespace portfleet {

RebalancePlan PlanRebalance(const std::vector<RebalanceInput>& shards,
                            const RebalanceParams& params) {
  RebalancePlan plan;
  plan.slots.reserve(shards.size());
  std::vector<double> loads;
  uint32_t pool = 0;  // slots the eligible shards share
  for (const RebalanceInput& s : shards) {
    plan.slots.push_back(s.baseline_slots);
    if (s.eligible && s.baseline_slots > 0) {
      loads.push_back(s.load);
      pool += s.baseline_slots;
    }
  }
  plan.imbalance = Imbalance(loads);
  plan.even = plan.imbalance <= params.tolerance;
  if (!plan.even && loads.size() > 1) {
    const double mean =
        std::accumulate(loads.begin(), loads.end(), 0.0) / loads.size();
    // Share of each eligible shard: its baseline scaled by mean/load.
    std::vector<double> want(shards.size(), 0);
    double total = 0;
    for (size_t i = 0; i < shards.size(); ++i) {
      const RebalanceInput& s = shards[i];
      if (!s.eligible || s.baseline_slots == 0) continue;
      double factor = s.load > 0 ? mean / s.load : params.max_factor;
      factor = std::clamp(factor, 1 / params.max_factor, params.max_factor);
      want[i] = s.baseline_slots * factor;
      total += want[i];
    }
    // Largest remainder over the pool; every eligible shard keeps a slot.
    std::vector<double> exact(shards.size(), 0);
    uint32_t given = 0;
    for (size_t i = 0; i < shards.size(); ++i) {
      if (want[i] <= 0) continue;
      exact[i] = want[i] * pool / total;
      plan.slots[i] = std::max<uint32_t>(1, std::floor(exact[i]));
      given += plan.slots[i];
    }
    std::vector<size_t> order;
    for (size_t i = 0; i < shards.size(); ++i) {
      if (want[i] > 0) order.push_back(i);
    }
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return exact[a] - plan.slots[a] > exact[b] - plan.slots[b];
    });
    for (size_t k = 0; given < pool && !order.empty(); ++k, ++given) {
      ++plan.slots[order[k % order.size()]];
    }
    // Too many (the floor of 1): take from the largest.
    while (given > pool) {
      auto most = std::max_element(order.begin(), order.end(),
                                   [&](size_t a, size_t b) {
                                     return plan.slots[a] < plan.slots[b];
                                   });
      --plan.slots[*most];
      --given;
    }
  }
  for (size_t i = 0; i < shards.size(); ++i) {
    if (plan.slots[i] > shards[i].slots) {
      plan.slots_moved += plan.slots[i] - shards[i].slots;
    }
  }
  return plan;
}

double LoadBy(const v1::ShardLoad& load, v1::RebalanceMetric metric) {
  switch (metric) {
    case v1::REBALANCE_METRIC_CPU:
      return load.cpu();
    case v1::REBALANCE_METRIC_BYTES:
      return load.bytes_per_second();
    default:
      return static_cast<double>(load.connections());
  }
}

std::vector<uint32_t> SlotCounts(const SteeringTables& tables) {
  std::vector<uint32_t> out(tables.num_shards, 0);
  if (tables.policy == v1::STEERING_POLICY_CPU || tables.num_shards == 0) {
    return out;
  }
  absl::StatusOr<std::vector<uint32_t>> table =
      BuildIndirectionTable(tables.weights, tables.num_shards, PF_TABLE_SIZE);
  if (!table.ok()) return out;
  for (uint32_t shard : *table) {
    if (shard < out.size()) ++out[shard];
  }
  return out;
}

namespace {

std::string MetricName(v1::RebalanceMetric metric) {
  switch (metric) {
    case v1::REBALANCE_METRIC_CPU:
      return "cpu";
    case v1::REBALANCE_METRIC_BYTES:
      return "bytes";
    default:
      return "connections";
  }
}

void Refuse(v1::RebalanceListenerResponse* resp, int shard,
            std::string reason) {
  v1::RebalanceRefusal* r = resp->add_refusals();
  r->set_shard(shard);
  r->set_reason(std::move(reason));
}

}  // namespace

absl::StatusOr<v1::RebalanceListenerResponse> RebalanceListener(
    const FleetContext& ctx, Listener& listener,
    const v1::RebalanceListenerRequest& request) {
  const std::string& name = listener.spec.name();
  if (!listener.steering) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", name,
        ": rebalancing needs BPF steering, which is not active: ",
        ctx.steering_reason));
  }
  const v1::RebalanceMetric metric =
      request.metric() == v1::REBALANCE_METRIC_UNSPECIFIED
          ? v1::REBALANCE_METRIC_CONNECTIONS
          : request.metric();
  v1::RebalanceListenerResponse resp;
  resp.set_metric(metric);
  resp.set_dry_run(request.dry_run());
  resp.set_steering_only(true);

  // The tables from the operator's weights alone, and as they are now.
  std::map<uint32_t, uint32_t> saved = listener.rebalance_slots;
  listener.rebalance_slots.clear();
  const std::vector<uint32_t> baseline = SlotCounts(PlanTables(listener));
  listener.rebalance_slots = saved;
  const std::vector<uint32_t> now = SlotCounts(PlanTables(listener));

  std::vector<RebalanceInput> inputs;
  std::vector<const Shard*> steered;
  for (const auto& shard : listener.shards) {
    if (!shard->Steered()) continue;
    const uint32_t i = shard->index;
    const bool ready = shard->worker && shard->worker->ready;
    inputs.push_back(RebalanceInput{
        .index = i,
        .eligible = ready,
        .load = LoadBy(shard->load, metric),
        .baseline_slots = i < baseline.size() ? baseline[i] : 0,
        .slots = i < now.size() ? now[i] : 0});
    steered.push_back(shard.get());
    if (!ready) {
      Refuse(&resp, static_cast<int>(i),
             "worker not ready: keeps its baseline slots");
    }
  }
  if (std::none_of(inputs.begin(), inputs.end(),
                   [](const RebalanceInput& s) { return s.eligible; })) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", name, ": no ready shard in the steering tables"));
  }

  const bool cpu_policy =
      listener.spec.steering().policy() == v1::STEERING_POLICY_CPU;
  RebalancePlan plan = PlanRebalance(inputs, RebalanceParams{});
  if (cpu_policy) {
    // Locality first: the CPU table stays as it is.
    for (size_t k = 0; k < inputs.size(); ++k) plan.slots[k] = inputs[k].slots;
    plan.slots_moved = 0;
    Refuse(&resp, -1,
           "steering policy CPU keeps every connection on the CPU that "
           "received it: no table slots moved");
  }
  resp.set_imbalance_before(plan.imbalance);
  // Steering moves only new connections: the load now stays until they come.
  resp.set_expected_imbalance_after(plan.imbalance);
  resp.set_slots_moved(plan.slots_moved);
  if (request.move_connections()) {
    for (const RebalanceInput& s : inputs) {
      if (!s.eligible) continue;
      Refuse(&resp, static_cast<int>(s.index),
             "worker cannot hand off connections: steering only");
    }
  }

  for (const auto& shard : listener.shards) {
    v1::RebalanceShard* out = resp.add_shards();
    out->set_index(shard->index);
    out->set_load_before(LoadBy(shard->load, metric));
    out->set_expected_after(out->load_before());
    const uint32_t i = shard->index;
    out->set_baseline_slots(i < baseline.size() ? baseline[i] : 0);
    out->set_slots_before(i < now.size() ? now[i] : 0);
    out->set_slots_after(out->slots_before());
    for (size_t k = 0; k < steered.size(); ++k) {
      if (steered[k] != shard.get()) continue;
      out->set_eligible(inputs[k].eligible);
      out->set_slots_after(plan.slots[k]);
    }
  }
  if (!request.dry_run()) listener.rebalance_refusals += resp.refusals_size();
  if (!request.dry_run() && resp.refusals_size() > 0) {
    std::vector<std::string> why;
    for (const v1::RebalanceRefusal& r : resp.refusals()) {
      why.push_back(r.shard() < 0 ? r.reason()
                                  : absl::StrCat("shard ", r.shard(), ": ",
                                                 r.reason()));
    }
    ctx.Emit(v1::EVENT_TYPE_REBALANCE_REFUSED, listener, -1, 0,
             absl::StrJoin(why, "; "));
  }
  if (request.dry_run() || cpu_policy) return resp;

  std::map<uint32_t, uint32_t> next;
  if (!plan.even) {
    for (size_t k = 0; k < inputs.size(); ++k) {
      next[inputs[k].index] = plan.slots[k];
    }
  }
  listener.rebalance_slots = next;
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    listener.rebalance_slots = saved;
    ApplySteering(listener).IgnoreError();
    return s;
  }
  listener.rebalances++;
  listener.rebalance_slots_moved += plan.slots_moved;
  std::vector<std::string> moves;
  for (const v1::RebalanceShard& s : resp.shards()) {
    if (s.slots_after() != s.slots_before()) {
      moves.push_back(
          absl::StrCat(s.index(), ":", s.slots_before(), "->", s.slots_after()));
    }
  }
  std::string message = absl::StrFormat(
      "by %s, imbalance %.2f: %u slots moved%s%s", MetricName(metric),
      plan.imbalance, plan.slots_moved, moves.empty() ? "" : " (",
      moves.empty() ? "" : absl::StrCat(absl::StrJoin(moves, " "), ")"));
  if (plan.even) absl::StrAppend(&message, "; even: baseline tables");
  PF_LOG(INFO) << "listener " << name << ": rebalanced " << message;
  ctx.Emit(v1::EVENT_TYPE_REBALANCE_DONE, listener, -1, 0, message);
  return resp;
}

}  // namespace portfleet
