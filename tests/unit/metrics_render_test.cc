// RenderPrometheus: exact text for a small snapshot, and label escaping.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "agent/metrics/metrics_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace portfleet {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

ListenerStatus Listener(const std::string& name) {
  ListenerStatus l;
  l.spec.set_name(name);
  l.spec.set_address("127.0.0.1:8080");
  return l;
}

TEST(RenderPrometheusTest, GoldenSmallSnapshot) {
  MetricsSnapshot s;
  s.agent.version = "0.1.0";
  s.agent.started = absl::FromUnixMillis(1700000000250);
  s.agent.bpf_steering_active = true;
  s.agent.listeners = 1;
  s.agent.serving = false;
  s.agent.health.state = v1::HEALTH_STATE_NOT_SERVING;
  s.agent.health.listeners = {{.name = "web",
                               .state = v1::HEALTH_STATE_DEGRADED,
                               .reason = "shard 1 DOWN",
                               .healthy_shards = 1,
                               .shards = 2}};
  ListenerStatus web = Listener("web");
  ShardStatus a;
  a.index = 0;
  a.state = v1::SHARD_STATE_RUNNING;
  a.pid = 100;
  a.cpu = 2;
  a.restarts = 1;
  a.ready = true;
  a.queue_depth = 3;
  a.active_connections = 7;
  a.accepted_total = 1000;
  a.counters = {.selected = 990, .migrated = 4, .fallback = 6};
  a.health = v1::SHARD_HEALTH_HEALTHY;
  a.ejections = 2;
  ShardStatus b;
  b.index = 1;
  b.state = v1::SHARD_STATE_BACKOFF;
  b.health = v1::SHARD_HEALTH_DOWN;
  b.replacements = 1;
  b.orphans.push_back({.pid = 77, .command = "nc", .leftover = false});
  b.orphans_killed = 2;
  web.shards = {a, b};
  s.listeners = {web};

  const std::string want =
      R"(# HELP portfleet_build_info Always 1; the agent's version is in the version label.
# TYPE portfleet_build_info gauge
portfleet_build_info{version="0.1.0"} 1
# HELP portfleet_up 1 when the agent answered this scrape with a snapshot.
# TYPE portfleet_up gauge
portfleet_up 1
# HELP portfleet_serving 1 when the agent is ready (health SERVING or DEGRADED), as /readyz and grpc.health.v1 say.
# TYPE portfleet_serving gauge
portfleet_serving 0
# HELP portfleet_health_state 1 for the agent's current health state, 0 for the others.
# TYPE portfleet_health_state gauge
portfleet_health_state{state="STARTING"} 0
portfleet_health_state{state="SERVING"} 0
portfleet_health_state{state="DEGRADED"} 0
portfleet_health_state{state="NOT_SERVING"} 1
portfleet_health_state{state="STOPPING"} 0
# HELP portfleet_listener_serving 1 while the listener has a healthy shard in rotation (its grpc.health.v1 service listener/NAME is SERVING).
# TYPE portfleet_listener_serving gauge
portfleet_listener_serving{listener="web"} 1
# HELP portfleet_listener_healthy_shards Shards of the listener that are healthy and in rotation.
# TYPE portfleet_listener_healthy_shards gauge
portfleet_listener_healthy_shards{listener="web"} 1
# HELP portfleet_start_time_seconds Start time of the agent since the Unix epoch, in seconds.
# TYPE portfleet_start_time_seconds gauge
portfleet_start_time_seconds 1700000000.250
# HELP portfleet_bpf_steering_active 1 when the sk_reuseport steering program is attached, 0 when the kernel's default reuseport hashing is used.
# TYPE portfleet_bpf_steering_active gauge
portfleet_bpf_steering_active 1
# HELP portfleet_listeners Number of listeners.
# TYPE portfleet_listeners gauge
portfleet_listeners 1
# HELP portfleet_listener_shards Number of shards of the listener.
# TYPE portfleet_listener_shards gauge
portfleet_listener_shards{listener="web"} 2
# HELP portfleet_listener_imbalance_ratio max/mean of the open connections of the listener's ready shards (1 = even; 0 when idle).
# TYPE portfleet_listener_imbalance_ratio gauge
portfleet_listener_imbalance_ratio{listener="web"} 0.000
# HELP portfleet_listener_rebalances_total Rebalances of the listener's steering tables applied.
# TYPE portfleet_listener_rebalances_total counter
portfleet_listener_rebalances_total{listener="web"} 0
# HELP portfleet_listener_rebalance_slot_moves_total Indirection-table slots the rebalancer moved to another shard.
# TYPE portfleet_listener_rebalance_slot_moves_total counter
portfleet_listener_rebalance_slot_moves_total{listener="web"} 0
# HELP portfleet_listener_rebalance_refusals_total Parts of rebalances not done (e.g. a worker that cannot hand off connections, CPU steering).
# TYPE portfleet_listener_rebalance_refusals_total counter
portfleet_listener_rebalance_refusals_total{listener="web"} 0
# HELP portfleet_listener_rebalance_handoffs_total Established connections the rebalancer handed from one worker to another.
# TYPE portfleet_listener_rebalance_handoffs_total counter
portfleet_listener_rebalance_handoffs_total{listener="web"} 0
# HELP portfleet_listener_handoff_pause_seconds Pause of each connection the listener's workers adopted in a hand-off: the time it was served by no worker, from the sender taking it out of its event loop to the receiver having it in its own. Counted from the workers' load reports since the agent started; a replaced worker leaves its counts.
# TYPE portfleet_listener_handoff_pause_seconds histogram
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="1e-06"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="2e-06"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="4e-06"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="8e-06"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="1.6e-05"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="3.2e-05"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="6.4e-05"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.000128"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.000256"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.000512"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.001024"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.002048"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.004096"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.008192"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.016384"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.032768"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.065536"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.131072"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.262144"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="0.524288"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="1.048576"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="2.097152"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="4.194304"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="8.388608"} 0
portfleet_listener_handoff_pause_seconds_bucket{listener="web",le="+Inf"} 0
portfleet_listener_handoff_pause_seconds_sum{listener="web"} 0.000000000
portfleet_listener_handoff_pause_seconds_count{listener="web"} 0
# HELP portfleet_listener_auto_rebalance_steps_total Steps of the listener's automatic rebalancing (rebalance mode auto).
# TYPE portfleet_listener_auto_rebalance_steps_total counter
portfleet_listener_auto_rebalance_steps_total{listener="web"} 0
# HELP portfleet_listener_auto_rebalancing 1 while an automatic rebalance runs (imbalance went above the threshold and is not yet at the target).
# TYPE portfleet_listener_auto_rebalancing gauge
portfleet_listener_auto_rebalancing{listener="web"} 0
# HELP portfleet_listener_spill_ratio CPU steering: share of the new connections of the CPU that the rebalancer sends to the indirection table instead of the CPU's own shards (0 = locality kept).
# TYPE portfleet_listener_spill_ratio gauge
# HELP portfleet_shard_up 1 when the shard's worker is running.
# TYPE portfleet_shard_up gauge
portfleet_shard_up{listener="web",shard="0"} 1
portfleet_shard_up{listener="web",shard="1"} 0
# HELP portfleet_shard_ready 1 when the shard's worker said ready on its control channel.
# TYPE portfleet_shard_ready gauge
portfleet_shard_ready{listener="web",shard="0"} 1
portfleet_shard_ready{listener="web",shard="1"} 0
# HELP portfleet_shard_restarts_total Restarts of the shard's worker.
# TYPE portfleet_shard_restarts_total counter
portfleet_shard_restarts_total{listener="web",shard="0"} 1
portfleet_shard_restarts_total{listener="web",shard="1"} 0
# HELP portfleet_shard_accept_queue_depth Connections waiting in the shard socket's accept queue.
# TYPE portfleet_shard_accept_queue_depth gauge
portfleet_shard_accept_queue_depth{listener="web",shard="0"} 3
portfleet_shard_accept_queue_depth{listener="web",shard="1"} 0
# HELP portfleet_shard_active_connections Open connections of the shard's worker, from its load reports.
# TYPE portfleet_shard_active_connections gauge
portfleet_shard_active_connections{listener="web",shard="0"} 7
portfleet_shard_active_connections{listener="web",shard="1"} 0
# HELP portfleet_shard_accepted_total Connections accepted by the shard's worker.
# TYPE portfleet_shard_accepted_total counter
portfleet_shard_accepted_total{listener="web",shard="0"} 1000
portfleet_shard_accepted_total{listener="web",shard="1"} 0
# HELP portfleet_steering_selected_total New connections the steering program sent to the shard.
# TYPE portfleet_steering_selected_total counter
portfleet_steering_selected_total{listener="web",shard="0"} 990
portfleet_steering_selected_total{listener="web",shard="1"} 0
# HELP portfleet_steering_migrated_total Queued or half-open connections migrated to the shard.
# TYPE portfleet_steering_migrated_total counter
portfleet_steering_migrated_total{listener="web",shard="0"} 4
portfleet_steering_migrated_total{listener="web",shard="1"} 0
# HELP portfleet_steering_fallback_total Connections meant for the shard while its socket slot was empty; the kernel chose another socket.
# TYPE portfleet_steering_fallback_total counter
portfleet_steering_fallback_total{listener="web",shard="0"} 6
portfleet_steering_fallback_total{listener="web",shard="1"} 0
# HELP portfleet_shard_healthy 1 when the shard is healthy and in rotation.
# TYPE portfleet_shard_healthy gauge
portfleet_shard_healthy{listener="web",shard="0"} 1
portfleet_shard_healthy{listener="web",shard="1"} 0
# HELP portfleet_shard_health 1 for the shard's current health (HEALTHY, STARTING, DOWN, STALLED, EJECTED, MAINTENANCE, DRAINING); the reason is in ListShards.
# TYPE portfleet_shard_health gauge
portfleet_shard_health{listener="web",shard="0",health="HEALTHY"} 1
portfleet_shard_health{listener="web",shard="1",health="DOWN"} 1
# HELP portfleet_shard_ejections_total Times the shard left the steering tables because it stalled.
# TYPE portfleet_shard_ejections_total counter
portfleet_shard_ejections_total{listener="web",shard="0"} 2
portfleet_shard_ejections_total{listener="web",shard="1"} 0
# HELP portfleet_shard_replacements_total Workers of the shard replaced (stalled past the grace period, or never ready).
# TYPE portfleet_shard_replacements_total counter
portfleet_shard_replacements_total{listener="web",shard="0"} 0
portfleet_shard_replacements_total{listener="web",shard="1"} 1
# HELP portfleet_shard_orphans Processes holding the shard socket outside its worker's process tree, as last scanned.
# TYPE portfleet_shard_orphans gauge
portfleet_shard_orphans{listener="web",shard="0"} 0
portfleet_shard_orphans{listener="web",shard="1"} 1
# HELP portfleet_shard_orphans_killed_total Processes left over from stopped workers of the shard that still held its socket and were killed.
# TYPE portfleet_shard_orphans_killed_total counter
portfleet_shard_orphans_killed_total{listener="web",shard="0"} 0
portfleet_shard_orphans_killed_total{listener="web",shard="1"} 2
# HELP portfleet_shard_connections Open connections of the shard's worker: its load reports, or the kernel's count of established connections it holds.
# TYPE portfleet_shard_connections gauge
portfleet_shard_connections{listener="web",shard="0"} 0
portfleet_shard_connections{listener="web",shard="1"} 0
# HELP portfleet_shard_worker_cpu_ratio CPU time of the shard's worker per second of wall time (1 = one core busy), over the last second.
# TYPE portfleet_shard_worker_cpu_ratio gauge
portfleet_shard_worker_cpu_ratio{listener="web",shard="0"} 0.000
portfleet_shard_worker_cpu_ratio{listener="web",shard="1"} 0.000
# HELP portfleet_shard_steering_slots Indirection-table slots (of 256) of the shard under HASH steering.
# TYPE portfleet_shard_steering_slots gauge
portfleet_shard_steering_slots{listener="web",shard="0"} 0
portfleet_shard_steering_slots{listener="web",shard="1"} 0
# HELP portfleet_shard_rebalance_slot_delta Slots the rebalancer added to (or took from) the shard's share by the operator's weights.
# TYPE portfleet_shard_rebalance_slot_delta gauge
portfleet_shard_rebalance_slot_delta{listener="web",shard="0"} 0
portfleet_shard_rebalance_slot_delta{listener="web",shard="1"} 0
# HELP portfleet_shard_cpu CPU the shard's worker is pinned to; -1 when not pinned.
# TYPE portfleet_shard_cpu gauge
portfleet_shard_cpu{listener="web",shard="0"} 2
portfleet_shard_cpu{listener="web",shard="1"} -1
)";
  EXPECT_EQ(RenderPrometheus(s), want);
}

TEST(RenderPrometheusTest, EmptySnapshotKeepsEveryFamily) {
  MetricsSnapshot s;
  s.agent.version = "v";
  std::string text = RenderPrometheus(s);
  for (const char* family :
       {"portfleet_build_info", "portfleet_up", "portfleet_bpf_steering_active",
        "portfleet_listeners", "portfleet_shard_up", "portfleet_shard_ready",
        "portfleet_shard_restarts_total", "portfleet_shard_accept_queue_depth",
        "portfleet_shard_active_connections", "portfleet_shard_accepted_total",
        "portfleet_steering_selected_total",
        "portfleet_steering_migrated_total",
        "portfleet_steering_fallback_total", "portfleet_shard_cpu",
        "portfleet_listener_handoff_pause_seconds"}) {
    EXPECT_THAT(text, HasSubstr(std::string("# TYPE ") + family + " "))
        << family;
  }
  EXPECT_THAT(text, HasSubstr("portfleet_listeners 0\n"));
  EXPECT_THAT(text, HasSubstr("portfleet_start_time_seconds 0.000\n"));
  EXPECT_THAT(text, Not(HasSubstr("shard=")));
  EXPECT_EQ(text.back(), '\n');
}

TEST(RenderPrometheusTest, EscapesLabelValues) {
  MetricsSnapshot s;
  s.agent.version = "1.0 \"beta\"\\dev\nnext";
  // Listener names are DNS labels once validated; the renderer must still be
  // safe for whatever it is given.
  ListenerStatus l = Listener("we\"b\\x\ny");
  l.shards.push_back(ShardStatus{});
  s.listeners = {l};
  std::string text = RenderPrometheus(s);
  EXPECT_THAT(text,
              HasSubstr("portfleet_build_info{version=\"1.0 \\\"beta\\\"\\\\"
                        "dev\\nnext\"} 1\n"));
  EXPECT_THAT(text,
              HasSubstr("portfleet_shard_up{listener=\"we\\\"b\\\\x\\ny\","
                        "shard=\"0\"} 0\n"));
  // No raw line feed inside any sample: every line is a comment or a sample
  // that ends in a value.
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    ASSERT_NE(end, std::string::npos);
    std::string line = text.substr(start, end - start);
    EXPECT_TRUE(line.rfind("# ", 0) == 0 || line.rfind("portfleet_", 0) == 0)
        << line;
    start = end + 1;
  }
}

TEST(RenderPrometheusTest, LargeCountersAreExact) {
  MetricsSnapshot s;
  ListenerStatus l = Listener("big");
  ShardStatus shard;
  shard.index = 63;
  shard.accepted_total = 18446744073709551615ull;
  l.shards.push_back(shard);
  s.listeners = {l};
  EXPECT_THAT(RenderPrometheus(s),
              HasSubstr("portfleet_shard_accepted_total{listener=\"big\","
                        "shard=\"63\"} 18446744073709551615\n"));
}

TEST(RenderPrometheusTest, SpillPerCpu) {
  MetricsSnapshot s;
  ListenerStatus l = Listener("web");
  l.spill = {{0, 128}, {1, 0}};
  s.listeners = {l};
  std::string text = RenderPrometheus(s);
  EXPECT_THAT(text, HasSubstr("portfleet_listener_spill_ratio{listener=\"web\","
                              "cpu=\"0\"} 0.5000\n"));
  EXPECT_THAT(text, HasSubstr("portfleet_listener_spill_ratio{listener=\"web\","
                              "cpu=\"1\"} 0.0000\n"));
}

TEST(RenderPrometheusTest,
     HandOffPausesAreAHistogramAtPowersOfTwoMicroseconds) {
  MetricsSnapshot s;
  ListenerStatus l = Listener("web");
  for (uint64_t ns :
       std::vector<uint64_t>{900, 1000, 1500, 30'000, 30'000, 20'000'000'000}) {
    l.handoff_pauses.Record(ns);
  }
  s.listeners = {l};
  const std::string text = RenderPrometheus(s);
  EXPECT_THAT(text, HasSubstr("# TYPE portfleet_listener_handoff_pause_seconds "
                              "histogram\n"));
  // Cumulative, `le` inclusive: 1 µs holds 900 ns and 1000 ns.
  for (const char* line : {
           "_bucket{listener=\"web\",le=\"1e-06\"} 2\n",
           "_bucket{listener=\"web\",le=\"2e-06\"} 3\n",
           "_bucket{listener=\"web\",le=\"1.6e-05\"} 3\n",
           "_bucket{listener=\"web\",le=\"3.2e-05\"} 5\n",
           "_bucket{listener=\"web\",le=\"8.388608\"} 5\n",
           "_bucket{listener=\"web\",le=\"+Inf\"} 6\n",
           "_sum{listener=\"web\"} 20.000063400\n",
           "_count{listener=\"web\"} 6\n",
       }) {
    EXPECT_THAT(
        text,
        HasSubstr(std::string("portfleet_listener_handoff_pause_seconds") +
                  line));
  }
  // One bucket per power of two from 1 µs to 2^23 µs, then +Inf.
  size_t buckets = 0;
  for (size_t at = 0;
       (at = text.find("_pause_seconds_bucket{", at)) != std::string::npos;
       ++at) {
    ++buckets;
  }
  EXPECT_EQ(buckets, 25u);
}

}  // namespace
}  // namespace portfleet
