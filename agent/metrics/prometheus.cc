// RenderPrometheus: the snapshot as Prometheus text exposition format 0.0.4.
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "agent/metrics/metrics_server.h"
#include "worker/sdk/base/duration_histogram.h"

namespace portfleet {
namespace {

// Label values: backslash, double quote and line feed are escaped.
std::string EscapeLabelValue(absl::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// HELP text: backslash and line feed are escaped.
std::string EscapeHelp(absl::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

using Labels = std::vector<std::pair<absl::string_view, std::string>>;

class Writer {
 public:
  void Family(absl::string_view name, absl::string_view type,
              absl::string_view help) {
    absl::StrAppend(&out_, "# HELP ", name, " ", EscapeHelp(help), "\n",
                    "# TYPE ", name, " ", type, "\n");
  }

  void Sample(absl::string_view name, const Labels& labels,
              absl::string_view value) {
    absl::StrAppend(&out_, name);
    if (!labels.empty()) {
      out_ += '{';
      for (size_t i = 0; i < labels.size(); ++i) {
        if (i > 0) out_ += ',';
        absl::StrAppend(&out_, labels[i].first, "=\"",
                        EscapeLabelValue(labels[i].second), "\"");
      }
      out_ += '}';
    }
    absl::StrAppend(&out_, " ", value, "\n");
  }

  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

// Seconds since the Unix epoch with millisecond precision ("1700000000.250").
std::string UnixSeconds(absl::Time t) {
  int64_t ms = absl::ToUnixMillis(t);
  if (ms < 0) ms = 0;
  return absl::StrFormat("%d.%03d", ms / 1000, ms % 1000);
}

// One per-shard family: HELP/TYPE, then a sample per shard of every listener,
// labelled {listener, shard}.
void ShardFamily(Writer& w, const MetricsSnapshot& snapshot,
                 absl::string_view name, absl::string_view type,
                 absl::string_view help,
                 const std::function<std::string(const ShardStatus&)>& value) {
  w.Family(name, type, help);
  for (const ListenerStatus& listener : snapshot.listeners) {
    for (const ShardStatus& shard : listener.shards) {
      w.Sample(name,
               {{"listener", listener.spec.name()},
                {"shard", absl::StrCat(shard.index)}},
               value(shard));
    }
  }
}

std::string Bool(bool b) { return b ? "1" : "0"; }

// The hand-off pause histogram's largest finite `le`: 2^23 µs (8.4 s).
constexpr uint32_t kPauseBucketsMaxPow2Us = 23;

std::string StateLabel(v1::HealthState state) {
  return v1::HealthState_Name(state).substr(sizeof("HEALTH_STATE_") - 1);
}

std::string ShardHealthLabel(v1::ShardHealth health) {
  return v1::ShardHealth_Name(health).substr(sizeof("SHARD_HEALTH_") - 1);
}

}  // namespace

std::string RenderPrometheus(const MetricsSnapshot& snapshot) {
  const AgentStatus& agent = snapshot.agent;
  Writer w;

  w.Family("portfleet_build_info", "gauge",
           "Always 1; the agent's version is in the version label.");
  w.Sample("portfleet_build_info", {{"version", agent.version}}, "1");

  w.Family("portfleet_up", "gauge",
           "1 when the agent answered this scrape with a snapshot.");
  w.Sample("portfleet_up", {}, "1");

  w.Family("portfleet_serving", "gauge",
           "1 when the agent is ready (health SERVING or DEGRADED), as "
           "/readyz and grpc.health.v1 say.");
  w.Sample("portfleet_serving", {}, Bool(agent.serving));

  w.Family("portfleet_health_state", "gauge",
           "1 for the agent's current health state, 0 for the others.");
  for (int i = v1::HEALTH_STATE_STARTING; i <= v1::HEALTH_STATE_STOPPING; ++i) {
    auto state = static_cast<v1::HealthState>(i);
    w.Sample("portfleet_health_state", {{"state", StateLabel(state)}},
             Bool(agent.health.state == state));
  }

  w.Family("portfleet_listener_serving", "gauge",
           "1 while the listener has a healthy shard in rotation (its "
           "grpc.health.v1 service listener/NAME is SERVING).");
  for (const ListenerHealthStatus& l : agent.health.listeners) {
    w.Sample("portfleet_listener_serving", {{"listener", l.name}},
             Bool(l.state == v1::HEALTH_STATE_SERVING ||
                  l.state == v1::HEALTH_STATE_DEGRADED));
  }
  w.Family("portfleet_listener_healthy_shards", "gauge",
           "Shards of the listener that are healthy and in rotation.");
  for (const ListenerHealthStatus& l : agent.health.listeners) {
    w.Sample("portfleet_listener_healthy_shards", {{"listener", l.name}},
             absl::StrCat(l.healthy_shards));
  }

  w.Family("portfleet_start_time_seconds", "gauge",
           "Start time of the agent since the Unix epoch, in seconds.");
  w.Sample("portfleet_start_time_seconds", {}, UnixSeconds(agent.started));

  w.Family("portfleet_bpf_steering_active", "gauge",
           "1 when the sk_reuseport steering program is attached, 0 when the "
           "kernel's default reuseport hashing is used.");
  w.Sample("portfleet_bpf_steering_active", {},
           Bool(agent.bpf_steering_active));

  w.Family("portfleet_listeners", "gauge", "Number of listeners.");
  w.Sample("portfleet_listeners", {}, absl::StrCat(agent.listeners));

  w.Family("portfleet_listener_shards", "gauge",
           "Number of shards of the listener.");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_shards", {{"listener", listener.spec.name()}},
             absl::StrCat(listener.shards.size()));
  }

  w.Family("portfleet_listener_imbalance_ratio", "gauge",
           "max/mean of the open connections of the listener's ready "
           "shards (1 = even; 0 when idle).");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_imbalance_ratio",
             {{"listener", listener.spec.name()}},
             absl::StrFormat("%.3f", listener.imbalance));
  }
  w.Family("portfleet_listener_rebalances_total", "counter",
           "Rebalances of the listener's steering tables applied.");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_rebalances_total",
             {{"listener", listener.spec.name()}},
             absl::StrCat(listener.rebalances));
  }
  w.Family("portfleet_listener_rebalance_slot_moves_total", "counter",
           "Indirection-table slots the rebalancer moved to another shard.");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_rebalance_slot_moves_total",
             {{"listener", listener.spec.name()}},
             absl::StrCat(listener.rebalance_slots_moved));
  }
  w.Family("portfleet_listener_rebalance_refusals_total", "counter",
           "Parts of rebalances not done (e.g. a worker that cannot hand "
           "off connections, CPU steering).");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_rebalance_refusals_total",
             {{"listener", listener.spec.name()}},
             absl::StrCat(listener.rebalance_refusals));
  }

  w.Family("portfleet_listener_rebalance_handoffs_total", "counter",
           "Established connections the rebalancer handed from one worker "
           "to another.");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_rebalance_handoffs_total",
             {{"listener", listener.spec.name()}},
             absl::StrCat(listener.rebalance_connections_moved));
  }
  w.Family("portfleet_listener_handoff_pause_seconds", "histogram",
           "Pause of each connection the listener's workers adopted in a "
           "hand-off: the time it was served by no worker, from the sender "
           "taking it out of its event loop to the receiver having it in "
           "its own. Counted from the workers' load reports since the agent "
           "started; a replaced worker leaves its counts.");
  for (const ListenerStatus& listener : snapshot.listeners) {
    const DurationHistogram& h = listener.handoff_pauses;
    // le at the powers of two of microseconds: boundaries of the
    // histogram's own buckets, so these counts are exact.
    for (uint32_t k = 0; k <= kPauseBucketsMaxPow2Us; ++k) {
      w.Sample("portfleet_listener_handoff_pause_seconds_bucket",
               {{"listener", listener.spec.name()},
                {"le", absl::StrFormat("%.9g", std::ldexp(1e-6, k))}},
               absl::StrCat(h.CountAtMost(
                   DurationHistogram::LastBucketAtMostPow2Us(k))));
    }
    w.Sample("portfleet_listener_handoff_pause_seconds_bucket",
             {{"listener", listener.spec.name()}, {"le", "+Inf"}},
             absl::StrCat(h.count()));
    w.Sample("portfleet_listener_handoff_pause_seconds_sum",
             {{"listener", listener.spec.name()}},
             absl::StrFormat("%d.%09d", h.sum_ns() / 1'000'000'000u,
                             h.sum_ns() % 1'000'000'000u));
    w.Sample("portfleet_listener_handoff_pause_seconds_count",
             {{"listener", listener.spec.name()}}, absl::StrCat(h.count()));
  }
  w.Family("portfleet_listener_auto_rebalance_steps_total", "counter",
           "Steps of the listener's automatic rebalancing (rebalance mode "
           "auto).");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_auto_rebalance_steps_total",
             {{"listener", listener.spec.name()}},
             absl::StrCat(listener.auto_rebalance_steps));
  }
  w.Family("portfleet_listener_auto_rebalancing", "gauge",
           "1 while an automatic rebalance runs (imbalance went above the "
           "threshold and is not yet at the target).");
  for (const ListenerStatus& listener : snapshot.listeners) {
    w.Sample("portfleet_listener_auto_rebalancing",
             {{"listener", listener.spec.name()}},
             Bool(listener.auto_rebalancing));
  }
  w.Family("portfleet_listener_spill_ratio", "gauge",
           "CPU steering: share of the new connections of the CPU that the "
           "rebalancer sends to the indirection table instead of the CPU's "
           "own shards (0 = locality kept).");
  for (const ListenerStatus& listener : snapshot.listeners) {
    for (const auto& [cpu, share] : listener.spill) {
      w.Sample("portfleet_listener_spill_ratio",
               {{"listener", listener.spec.name()}, {"cpu", absl::StrCat(cpu)}},
               absl::StrFormat("%.4f", share / 256.0));
    }
  }

  ShardFamily(w, snapshot, "portfleet_shard_up", "gauge",
              "1 when the shard's worker is running.",
              [](const ShardStatus& s) {
                return Bool(s.state == v1::SHARD_STATE_RUNNING);
              });
  ShardFamily(w, snapshot, "portfleet_shard_ready", "gauge",
              "1 when the shard's worker said ready on its control channel.",
              [](const ShardStatus& s) { return Bool(s.ready); });
  ShardFamily(w, snapshot, "portfleet_shard_restarts_total", "counter",
              "Restarts of the shard's worker.",
              [](const ShardStatus& s) { return absl::StrCat(s.restarts); });
  ShardFamily(w, snapshot, "portfleet_shard_accept_queue_depth", "gauge",
              "Connections waiting in the shard socket's accept queue.",
              [](const ShardStatus& s) { return absl::StrCat(s.queue_depth); });
  ShardFamily(
      w, snapshot, "portfleet_shard_active_connections", "gauge",
      "Open connections of the shard's worker, from its load reports.",
      [](const ShardStatus& s) { return absl::StrCat(s.active_connections); });
  ShardFamily(
      w, snapshot, "portfleet_shard_accepted_total", "counter",
      "Connections accepted by the shard's worker.",
      [](const ShardStatus& s) { return absl::StrCat(s.accepted_total); });
  ShardFamily(
      w, snapshot, "portfleet_steering_selected_total", "counter",
      "New connections the steering program sent to the shard.",
      [](const ShardStatus& s) { return absl::StrCat(s.counters.selected); });
  ShardFamily(
      w, snapshot, "portfleet_steering_migrated_total", "counter",
      "Queued or half-open connections migrated to the shard.",
      [](const ShardStatus& s) { return absl::StrCat(s.counters.migrated); });
  ShardFamily(
      w, snapshot, "portfleet_steering_fallback_total", "counter",
      "Connections meant for the shard while its socket slot was empty; the "
      "kernel chose another socket.",
      [](const ShardStatus& s) { return absl::StrCat(s.counters.fallback); });
  ShardFamily(w, snapshot, "portfleet_shard_healthy", "gauge",
              "1 when the shard is healthy and in rotation.",
              [](const ShardStatus& s) {
                return Bool(s.health == v1::SHARD_HEALTH_HEALTHY);
              });
  w.Family("portfleet_shard_health", "gauge",
           "1 for the shard's current health (HEALTHY, STARTING, DOWN, "
           "STALLED, EJECTED, MAINTENANCE, DRAINING); the reason is in "
           "ListShards.");
  for (const ListenerStatus& listener : snapshot.listeners) {
    for (const ShardStatus& shard : listener.shards) {
      w.Sample("portfleet_shard_health",
               {{"listener", listener.spec.name()},
                {"shard", absl::StrCat(shard.index)},
                {"health", ShardHealthLabel(shard.health)}},
               "1");
    }
  }
  ShardFamily(w, snapshot, "portfleet_shard_ejections_total", "counter",
              "Times the shard left the steering tables because it stalled.",
              [](const ShardStatus& s) { return absl::StrCat(s.ejections); });
  ShardFamily(
      w, snapshot, "portfleet_shard_replacements_total", "counter",
      "Workers of the shard replaced (stalled past the grace period, or "
      "never ready).",
      [](const ShardStatus& s) { return absl::StrCat(s.replacements); });
  ShardFamily(
      w, snapshot, "portfleet_shard_orphans", "gauge",
      "Processes holding the shard socket outside its worker's "
      "process tree, as last scanned.",
      [](const ShardStatus& s) { return absl::StrCat(s.orphans.size()); });
  ShardFamily(
      w, snapshot, "portfleet_shard_orphans_killed_total", "counter",
      "Processes left over from stopped workers of the shard that "
      "still held its socket and were killed.",
      [](const ShardStatus& s) { return absl::StrCat(s.orphans_killed); });
  ShardFamily(
      w, snapshot, "portfleet_shard_connections", "gauge",
      "Open connections of the shard's worker: its load reports, or "
      "the kernel's count of established connections it holds.",
      [](const ShardStatus& s) { return absl::StrCat(s.load.connections()); });
  ShardFamily(w, snapshot, "portfleet_shard_worker_cpu_ratio", "gauge",
              "CPU time of the shard's worker per second of wall time "
              "(1 = one core busy), over the last second.",
              [](const ShardStatus& s) {
                return absl::StrFormat("%.3f", s.load.cpu());
              });
  ShardFamily(
      w, snapshot, "portfleet_shard_steering_slots", "gauge",
      "Indirection-table slots (of 256) of the shard under HASH "
      "steering.",
      [](const ShardStatus& s) { return absl::StrCat(s.steering_slots); });
  ShardFamily(w, snapshot, "portfleet_shard_rebalance_slot_delta", "gauge",
              "Slots the rebalancer added to (or took from) the shard's "
              "share by the operator's weights.",
              [](const ShardStatus& s) {
                return absl::StrCat(s.rebalance_slot_delta);
              });
  ShardFamily(w, snapshot, "portfleet_shard_cpu", "gauge",
              "CPU the shard's worker is pinned to; -1 when not pinned.",
              [](const ShardStatus& s) { return absl::StrCat(s.cpu); });

  return w.Take();
}

}  // namespace portfleet
