// HealthBoard: the one source of truth for the agent's health. The event
// loop publishes an AgentHealth after every observation round (and when the
// agent starts serving or stops); gRPC health, /readyz, GetStatus and
// /metrics read it from any thread. The loop also beats a heartbeat here:
// /healthz fails when the beat is late (a wedged loop).
#ifndef PORTFLEET_AGENT_HEALTH_BOARD_H_
#define PORTFLEET_AGENT_HEALTH_BOARD_H_

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "agent/controller.h"
#include "agent/fleet/health_monitor.h"

namespace portfleet {

// Where the agent is in its life; the fleet's health matters only while it
// serves.
// kHandingOver: a takeover is in progress (this agent donates its sockets);
// not ready, like kStopping, and back to kServing if it is aborted.
enum class AgentPhase { kStarting, kServing, kHandingOver, kStopping };

// The agent's health from its phase and its listeners' health (pure):
// STARTING/STOPPING follow the phase; serving, it is NOT_SERVING if a
// listener has no healthy shard, STARTING while a listener's shards start,
// DEGRADED if a listener lacks some, else SERVING.
AgentHealth ComputeAgentHealth(AgentPhase phase,
                               const std::vector<ListenerHealthView>& views);

// "SERVING", "DEGRADED: web: shard 1 EJECTED: ..." (one line, for logs and
// sd_notify STATUS=).
std::string DescribeHealth(const AgentHealth& health);

class HealthBoard {
 public:
  // Stores `health`; returns true (and calls the change callback, on the
  // caller's thread) when it differs from the previous one.
  bool Publish(const AgentHealth& health);
  AgentHealth Current() const;
  void OnChange(std::function<void(const AgentHealth&)> callback);

  // Heartbeat of the event loop (monotonic time).
  void Beat(absl::Time now);
  // OK while the last beat is at most `max_age` old.
  absl::Status Live(absl::Time now, absl::Duration max_age) const;

 private:
  mutable std::mutex mu_;
  AgentHealth health_;  // guarded by mu_
  bool published_ = false;
  std::function<void(const AgentHealth&)> on_change_;
  std::atomic<int64_t> last_beat_ns_{0};
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_HEALTH_BOARD_H_
