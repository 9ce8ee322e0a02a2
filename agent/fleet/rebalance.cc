#include "agent/fleet/rebalance.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/handoff.h"
#include "agent/fleet/load.h"
#include "bpf/steering_shared.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

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
      auto most = std::max_element(
          order.begin(), order.end(),
          [&](size_t a, size_t b) { return plan.slots[a] < plan.slots[b]; });
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

SpillPlan PlanSpill(const std::vector<SpillInput>& shards,
                    const std::map<int, uint32_t>& spill_now,
                    const SpillParams& params) {
  SpillPlan plan;
  std::vector<double> loads;
  for (const SpillInput& s : shards) {
    if (s.eligible) loads.push_back(s.load);
  }
  plan.imbalance = Imbalance(loads);
  plan.even = plan.imbalance <= params.tolerance;
  const double mean = loads.empty()
                          ? 0
                          : std::accumulate(loads.begin(), loads.end(), 0.0) /
                                static_cast<double>(loads.size());
  std::map<int, CpuSpillPlan> by_cpu;
  for (const SpillInput& s : shards) {
    if (!s.eligible || s.cpu < 0) continue;
    CpuSpillPlan& c = by_cpu[s.cpu];
    c.cpu = s.cpu;
    c.shards.push_back(s.index);
    c.load += s.load;
    c.target += mean;
  }
  const uint32_t cap = std::min(params.max_share, kSpillScale);
  for (auto& [cpu, c] : by_cpu) {
    auto now = spill_now.find(cpu);
    c.before = now == spill_now.end() ? 0 : now->second;
    if (plan.even || c.load <= c.target) {
      c.after = 0;  // no excess: locality
    } else if (c.load > c.target * params.hot_factor) {
      // The share of this CPU's connections above its target.
      const uint32_t want = static_cast<uint32_t>(
          std::ceil(kSpillScale * (c.load - c.target) / c.load));
      c.after = std::max(c.before, std::min(want, c.before + params.max_step));
    } else {
      c.after = c.before;  // within the band: held
    }
    c.after = std::min(c.after, cap);
    plan.cpus.push_back(std::move(c));
  }
  if (plan.spilling()) {
    // Spilled connections go to the shards below the mean, by how far.
    plan.table_weights.assign(shards.size(), 0);
    bool any = false;
    for (size_t i = 0; i < shards.size(); ++i) {
      const SpillInput& s = shards[i];
      if (!s.eligible || mean <= 0 || s.load >= mean) continue;
      plan.table_weights[i] = std::max<uint32_t>(
          1, static_cast<uint32_t>(std::lround(1000 * (mean - s.load) / mean)));
      any = true;
    }
    if (!any) plan.table_weights.clear();
  }
  return plan;
}

std::vector<uint32_t> TableSlotCounts(const SteeringTables& tables) {
  std::vector<uint32_t> out(tables.num_shards, 0);
  if (tables.num_shards == 0) return out;
  absl::StatusOr<std::vector<uint32_t>> table = BuildIndirectionTable(
      tables.table_weights.empty() ? tables.weights : tables.table_weights,
      tables.num_shards, PF_TABLE_SIZE);
  if (!table.ok()) return out;
  for (uint32_t shard : *table) {
    if (shard < out.size()) ++out[shard];
  }
  return out;
}

namespace {

// "cpu 0 spills 0 -> 128/256" for each CPU whose spill changes (or spills).
std::string DescribeSpill(const v1::RebalanceListenerResponse& resp) {
  std::vector<std::string> parts;
  for (const v1::RebalanceSpill& c : resp.spills()) {
    if (c.share_before() == 0 && c.share_after() == 0) continue;
    parts.push_back(c.share_before() == c.share_after()
                        ? absl::StrCat("cpu ", c.cpu(), " spills ",
                                       c.share_after(), "/", kSpillScale)
                        : absl::StrCat("cpu ", c.cpu(), " spills ",
                                       c.share_before(), " -> ",
                                       c.share_after(), "/", kSpillScale));
  }
  return absl::StrJoin(parts, ", ");
}

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

// "2.1 MB", "350 kB", "80 B" (decimal units, as rates are shown).
std::string HumanBytes(double bytes) {
  if (bytes >= 1e9) return absl::StrFormat("%.1f GB", bytes / 1e9);
  if (bytes >= 1e6) return absl::StrFormat("%.1f MB", bytes / 1e6);
  if (bytes >= 1e3) return absl::StrFormat("%.0f kB", bytes / 1e3);
  return absl::StrFormat("%.0f B", bytes);
}

void Refuse(v1::RebalanceListenerResponse* resp, int shard,
            std::string reason) {
  v1::RebalanceRefusal* r = resp->add_refusals();
  r->set_shard(shard);
  r->set_reason(std::move(reason));
}

}  // namespace

namespace {

// The steering half of a rebalance, done; and the hand-offs it plans.
struct SteeringStep {
  v1::RebalanceListenerResponse resp;
  std::vector<HandOffTransfer> transfers;
};

// Per shard expected load after `transfers`, of which `moved` connections
// carrying `moved_load` of the metric (connections: the same count; bytes:
// their bytes/s) went, and their imbalance over the eligible shards.
void ExpectAfter(const std::vector<HandOffTransfer>& transfers,
                 const std::vector<uint32_t>& moved,
                 const std::vector<double>& moved_load,
                 v1::RebalanceListenerResponse* resp) {
  std::map<uint32_t, int64_t> delta;
  std::map<uint32_t, double> load_delta;
  for (size_t k = 0; k < transfers.size(); ++k) {
    delta[transfers[k].from] -= moved[k];
    delta[transfers[k].to] += moved[k];
    load_delta[transfers[k].from] -= moved_load[k];
    load_delta[transfers[k].to] += moved_load[k];
  }
  std::vector<double> after;
  for (v1::RebalanceShard& s : *resp->mutable_shards()) {
    s.set_connections_moved(delta[s.index()]);
    if (resp->metric() == v1::REBALANCE_METRIC_CONNECTIONS ||
        resp->metric() == v1::REBALANCE_METRIC_BYTES) {
      s.set_expected_after(
          std::max(0.0, s.load_before() + load_delta[s.index()]));
    }
    if (s.eligible()) after.push_back(s.expected_after());
  }
  resp->set_expected_imbalance_after(Imbalance(after));
}

// "auto: " before a message of the auto-rebalancer.
std::string Prefixed(const RebalanceLimits& limits, std::string message) {
  return limits.origin.empty() ? message
                               : absl::StrCat(limits.origin, ": ", message);
}

absl::StatusOr<SteeringStep> Steer(const FleetContext& ctx, Listener& listener,
                                   const v1::RebalanceListenerRequest& request,
                                   const RebalanceLimits& limits) {
  const std::string& name = listener.spec.name();
  if (!listener.steering) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name,
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

  const bool cpu_policy =
      listener.spec.steering().policy() == v1::STEERING_POLICY_CPU;
  const bool least_connections = listener.spec.steering().policy() ==
                                 v1::STEERING_POLICY_LEAST_CONNECTIONS;
  // The tables from the operator's weights alone, and as they are now (CPU
  // steering: the indirection table that spilled connections follow).
  const auto counts = cpu_policy ? TableSlotCounts : SlotCounts;
  const std::map<uint32_t, uint32_t> saved = listener.rebalance_slots;
  const std::map<int, uint32_t> saved_spill = listener.rebalance_spill;
  const std::vector<uint32_t> baseline = counts(PlanBaselineTables(listener));
  const std::vector<uint32_t> now = counts(PlanTables(listener));

  std::vector<RebalanceInput> inputs;
  std::vector<const Shard*> steered;
  for (const auto& shard : listener.shards) {
    if (!shard->Steered()) continue;
    const uint32_t i = shard->index;
    const bool ready = shard->worker && shard->worker->ready;
    inputs.push_back(
        RebalanceInput{.index = i,
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

  std::vector<HandOffTransfer> transfers;
  if (request.move_connections() && metric == v1::REBALANCE_METRIC_CPU) {
    Refuse(&resp, -1,
           "hand-off moves connections by their count or their traffic; by "
           "cpu only new connections are rebalanced");
  } else if (request.move_connections()) {
    std::vector<HandOffInput> by_count;
    std::vector<ByteHandOffInput> by_bytes;
    for (size_t k = 0; k < inputs.size(); ++k) {
      if (!inputs[k].eligible) continue;
      const Worker& w = *steered[k]->worker;
      const bool capable = w.handoff && w.control.has_value();
      by_count.push_back(
          HandOffInput{.index = inputs[k].index,
                       .connections = steered[k]->load.connections(),
                       .capable = capable});
      by_bytes.push_back(ByteHandOffInput{
          .index = inputs[k].index,
          .bytes_per_second = steered[k]->load.bytes_per_second(),
          .capable = capable});
      if (capable) {
        resp.set_steering_only(false);
      } else {
        Refuse(&resp, static_cast<int>(inputs[k].index),
               "worker cannot hand off connections: steering only");
      }
    }
    transfers = LimitHandOffs(metric == v1::REBALANCE_METRIC_BYTES
                                  ? PlanByteHandOffs(by_bytes)
                                  : PlanHandOffs(by_count),
                              limits.max_moves);
  }

  // New connections are steered by the load the hand-offs leave.
  std::vector<double> before;
  for (RebalanceInput& in : inputs) {
    if (in.eligible) before.push_back(in.load);
    for (const HandOffTransfer& t : transfers) {
      const double amount = metric == v1::REBALANCE_METRIC_BYTES
                                ? static_cast<double>(t.bytes_per_second)
                                : t.count;
      if (t.from == in.index) in.load = std::max(0.0, in.load - amount);
      if (t.to == in.index) in.load += amount;
    }
  }
  RebalancePlan plan = PlanRebalance(inputs, RebalanceParams{});
  // By connections under LEAST_CONNECTIONS, new connections need nothing.
  const bool steered_by_count =
      least_connections && metric == v1::REBALANCE_METRIC_CONNECTIONS;
  if (steered_by_count) {
    // The program already sends each new connection to the shard with the
    // fewest: tables skewed toward the cold shards would overshoot them, so
    // the operator's weights stay (and come back if a rebalance by another
    // metric had moved them).
    plan.slots_moved = 0;
    for (size_t k = 0; k < inputs.size(); ++k) {
      plan.slots[k] = inputs[k].baseline_slots;
      if (plan.slots[k] > inputs[k].slots) {
        plan.slots_moved += plan.slots[k] - inputs[k].slots;
      }
    }
  }
  SpillPlan spill;
  if (cpu_policy) {
    // Locality first: every shard stays on its CPU; a hot CPU spills the
    // share of its new connections above its target to the table.
    std::vector<SpillInput> spill_inputs;
    for (size_t k = 0; k < inputs.size(); ++k) {
      spill_inputs.push_back(SpillInput{.index = inputs[k].index,
                                        .cpu = steered[k]->cpu,
                                        .eligible = inputs[k].eligible,
                                        .load = inputs[k].load});
    }
    spill = PlanSpill(spill_inputs, listener.rebalance_spill, SpillParams{});
    plan.imbalance = spill.imbalance;
    plan.even = !spill.spilling();
    std::vector<uint32_t> table_after = baseline;
    if (!spill.table_weights.empty()) {
      std::vector<uint32_t> weights(baseline.size(), 0);
      for (size_t k = 0; k < inputs.size(); ++k) {
        if (inputs[k].index < weights.size()) {
          weights[inputs[k].index] = spill.table_weights[k];
        }
      }
      SteeringTables t = PlanBaselineTables(listener);
      t.table_weights = std::move(weights);
      table_after = TableSlotCounts(t);
    }
    plan.slots_moved = 0;
    for (size_t k = 0; k < inputs.size(); ++k) {
      const uint32_t i = inputs[k].index;
      plan.slots[k] = i < table_after.size() ? table_after[i] : 0;
      if (plan.slots[k] > inputs[k].slots) {
        plan.slots_moved += plan.slots[k] - inputs[k].slots;
      }
    }
    for (const CpuSpillPlan& c : spill.cpus) {
      v1::RebalanceSpill* out = resp.add_spills();
      out->set_cpu(c.cpu);
      for (uint32_t shard : c.shards) out->add_shards(shard);
      out->set_load(c.load);
      out->set_target(c.target);
      out->set_share_before(c.before);
      out->set_share_after(c.after);
    }
  }
  resp.set_imbalance_before(Imbalance(before));
  // Steering moves only new connections: the load now stays until they come.
  resp.set_expected_imbalance_after(plan.imbalance);
  resp.set_slots_moved(plan.slots_moved);

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
  std::vector<uint32_t> planned;
  std::vector<double> planned_load;
  for (const HandOffTransfer& t : transfers) {
    planned.push_back(t.bytes_per_second > 0 ? 0 : t.count);
    planned_load.push_back(t.bytes_per_second > 0
                               ? static_cast<double>(t.bytes_per_second)
                               : t.count);
  }
  ExpectAfter(transfers, planned, planned_load, &resp);
  if (!request.dry_run()) listener.rebalance_refusals += resp.refusals_size();
  if (!request.dry_run()) {
    std::vector<std::string> why;
    for (const v1::RebalanceRefusal& r : resp.refusals()) {
      why.push_back(r.shard() < 0
                        ? r.reason()
                        : absl::StrCat("shard ", r.shard(), ": ", r.reason()));
    }
    std::string joined = absl::StrJoin(why, "; ");
    const bool repeated =
        limits.last_refusals != nullptr && *limits.last_refusals == joined;
    if (limits.last_refusals != nullptr) *limits.last_refusals = joined;
    if (!joined.empty() && !repeated) {
      ctx.Emit(v1::EVENT_TYPE_REBALANCE_REFUSED, listener, -1, 0,
               Prefixed(limits, joined));
    }
  }
  if (request.dry_run()) {
    return SteeringStep{.resp = std::move(resp),
                        .transfers = std::move(transfers)};
  }

  std::map<uint32_t, uint32_t> next;
  std::map<int, uint32_t> next_spill;
  if (cpu_policy) {
    for (const CpuSpillPlan& c : spill.cpus) {
      if (c.after > 0) next_spill[c.cpu] = c.after;
    }
    for (size_t k = 0; k < spill.table_weights.size(); ++k) {
      if (spill.table_weights[k] > 0) {
        next[inputs[k].index] = spill.table_weights[k];
      }
    }
  } else if (!plan.even && !steered_by_count) {
    for (size_t k = 0; k < inputs.size(); ++k) {
      next[inputs[k].index] = plan.slots[k];
    }
  }
  listener.rebalance_slots = next;
  listener.rebalance_spill = next_spill;
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    listener.rebalance_slots = saved;
    listener.rebalance_spill = saved_spill;
    ApplySteering(listener).IgnoreError();
    return s;
  }
  listener.rebalances++;
  listener.rebalance_slots_moved += plan.slots_moved;
  std::vector<std::string> moves;
  for (const v1::RebalanceShard& s : resp.shards()) {
    if (s.slots_after() != s.slots_before()) {
      moves.push_back(absl::StrCat(s.index(), ":", s.slots_before(), "->",
                                   s.slots_after()));
    }
  }
  std::string message = absl::StrFormat(
      "by %s, imbalance %.2f: %u slots moved%s%s", MetricName(metric),
      resp.imbalance_before(), plan.slots_moved, moves.empty() ? "" : " (",
      moves.empty() ? "" : absl::StrCat(absl::StrJoin(moves, " "), ")"));
  if (cpu_policy) {
    const std::string spills = DescribeSpill(resp);
    absl::StrAppend(&message, "; ",
                    spills.empty() ? "no spill (locality kept)" : spills);
  }
  if (steered_by_count) {
    absl::StrAppend(&message,
                    "; least-connections steering: new connections go to "
                    "the shard with the fewest");
  } else if (plan.even) {
    absl::StrAppend(&message, "; even: baseline tables");
  }
  PF_LOG(INFO) << "listener " << name << ": rebalanced " << message;
  ctx.Emit(v1::EVENT_TYPE_REBALANCE_DONE, listener, -1, 0,
           Prefixed(limits, message));
  return SteeringStep{.resp = std::move(resp),
                      .transfers = std::move(transfers)};
}

}  // namespace

void RebalanceListener(FleetContext& ctx, HandOffRouter& router,
                       Listener& listener,
                       const v1::RebalanceListenerRequest& request,
                       RebalanceDone done, const RebalanceLimits& limits) {
  absl::StatusOr<SteeringStep> step = Steer(ctx, listener, request, limits);
  if (!step.ok()) {
    done(step.status());
    return;
  }
  if (request.dry_run() || step->transfers.empty()) {
    done(std::move(step->resp));
    return;
  }
  FleetContext* c = &ctx;
  const std::string name = listener.spec.name();
  const std::string origin = limits.origin;
  auto resp =
      std::make_shared<v1::RebalanceListenerResponse>(std::move(step->resp));
  router.Run(
      listener, step->transfers, kHandOffTimeout,
      [c, name, origin, resp, done](std::vector<HandOffResult> results) {
        std::vector<HandOffTransfer> transfers;
        std::vector<uint32_t> moved;
        std::vector<double> moved_load;
        uint64_t total = 0;
        std::vector<std::string> parts;
        for (const HandOffResult& r : results) {
          const bool by_bytes = r.transfer.bytes_per_second > 0;
          transfers.push_back(r.transfer);
          moved.push_back(r.moved);
          moved_load.push_back(
              by_bytes ? static_cast<double>(r.bytes_per_second) : r.moved);
          total += r.moved;
          parts.push_back(
              by_bytes
                  ? absl::StrFormat(
                        "%u->%u:%u (%s/s)", r.transfer.from, r.transfer.to,
                        r.moved,
                        HumanBytes(static_cast<double>(r.bytes_per_second)))
                  : absl::StrCat(r.transfer.from, "->", r.transfer.to, ":",
                                 r.moved));
          if (by_bytes) {
            if (r.moved > 0) continue;
            Refuse(resp.get(), static_cast<int>(r.transfer.from),
                   !r.answered
                       ? "the worker did not answer in time"
                       : absl::StrCat(
                             "no idle connection with traffic of at most ",
                             HumanBytes(2.0 * static_cast<double>(
                                                  r.transfer.bytes_per_second)),
                             "/s to move to shard ", r.transfer.to, " (",
                             r.busy, " had data in flight)"));
            continue;
          }
          const uint32_t missing =
              r.transfer.count - std::min(r.transfer.count, r.moved);
          if (missing == 0) continue;
          std::string why =
              !r.answered ? "the worker did not answer in time"
                          : absl::StrCat(r.busy,
                                         " connections had data in flight "
                                         "(never moved)");
          if (r.returned > 0 || r.lost > 0) {
            absl::StrAppend(&why, "; ", r.returned,
                            " went back (receiver gone), ", r.lost, " closed");
          }
          if (r.refused > 0) {
            absl::StrAppend(&why, "; ", r.refused,
                            " proxied pairs refused (the receiver cannot "
                            "adopt proxied pairs)");
          }
          if (r.invalid > 0) {
            absl::StrAppend(&why, "; ", r.invalid,
                            " released with wrong sockets (closed)");
          }
          Refuse(resp.get(), static_cast<int>(r.transfer.from),
                 absl::StrCat(missing, " of ", r.transfer.count,
                              " connections to shard ", r.transfer.to,
                              " not moved: ", why));
        }
        resp->set_connections_moved(total);
        ExpectAfter(transfers, moved, moved_load, resp.get());
        c->Emit(v1::EVENT_TYPE_REBALANCE_HANDOFF, name, -1, 0,
                absl::StrCat(origin.empty() ? "" : origin + ": ", "handed off ",
                             total, " connections (", absl::StrJoin(parts, " "),
                             ")"));
        done(*resp);
      });
}

absl::StatusOr<uint32_t> RestoreBaselineSteering(FleetContext& ctx,
                                                 Listener& listener,
                                                 const std::string& why) {
  if (listener.rebalance_slots.empty() && listener.rebalance_spill.empty()) {
    return 0u;
  }
  const auto counts =
      listener.spec.steering().policy() == v1::STEERING_POLICY_CPU
          ? TableSlotCounts
          : SlotCounts;
  const std::vector<uint32_t> now = counts(PlanTables(listener));
  const std::map<uint32_t, uint32_t> saved =
      std::exchange(listener.rebalance_slots, {});
  const std::map<int, uint32_t> saved_spill =
      std::exchange(listener.rebalance_spill, {});
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    listener.rebalance_slots = saved;
    listener.rebalance_spill = saved_spill;
    ApplySteering(listener).IgnoreError();
    return s;
  }
  const std::vector<uint32_t> after = counts(PlanTables(listener));
  uint32_t moved = 0;
  for (size_t i = 0; i < after.size(); ++i) {
    const uint32_t before = i < now.size() ? now[i] : 0;
    if (after[i] > before) moved += after[i] - before;
  }
  listener.rebalances++;
  listener.rebalance_slots_moved += moved;
  const std::string message =
      absl::StrCat(why, ": ", moved, " slots moved; even: baseline tables",
                   saved_spill.empty() ? "" : ", no spill");
  PF_LOG(INFO) << "listener " << listener.spec.name() << ": " << message;
  ctx.Emit(v1::EVENT_TYPE_REBALANCE_DONE, listener, -1, 0, message);
  return moved;
}

}  // namespace portfleet
