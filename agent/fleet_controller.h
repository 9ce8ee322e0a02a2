// The real FleetController: runs each API call on the agent's event loop,
// persists the desired state before a mutation returns success, and fans
// fleet events out to subscribers.
#ifndef PORTFLEET_AGENT_FLEET_CONTROLLER_H_
#define PORTFLEET_AGENT_FLEET_CONTROLLER_H_

#include <atomic>
#include <functional>
#include <map>
#include <mutex>

#include "agent/controller.h"
#include "agent/event_loop.h"
#include "agent/fleet/fleet.h"

namespace portfleet {

class LoopFleetController : public FleetController {
 public:
  // `persist` saves the desired state (temp file, fsync, rename); it runs on
  // the loop thread after every successful mutation, before the reply.
  using Persist = std::function<absl::Status(const v1::FleetSpec&)>;
  LoopFleetController(EventLoop* loop, Fleet* fleet, Persist persist,
                      std::string version);

  // After Close every call fails with Unavailable (agent shutting down).
  void Close() { closed_ = true; }
  void Reopen() { closed_ = false; }

  // Hands an event to every subscriber (any thread).
  void Publish(const FleetEvent& event);

  absl::StatusOr<std::vector<ListenerStatus>> ListListeners() override;
  absl::StatusOr<ListenerStatus> GetListener(const std::string& name) override;
  absl::Status CreateListener(const v1::Listener& spec) override;
  absl::Status UpdateListener(const v1::Listener& spec) override;
  absl::Status DeleteListener(const std::string& name) override;
  absl::Status ScaleListener(const std::string& name, uint32_t shards) override;
  absl::Status DrainShard(const std::string& name, uint32_t index) override;
  absl::Status SetSteering(const std::string& name,
                           const v1::Steering& steering) override;
  absl::Status RollOut(const std::string& name, const v1::WorkerSpec& worker,
                       uint32_t max_surge) override;
  AgentStatus GetStatus() override;
  uint64_t Subscribe(std::function<void(const FleetEvent&)> sink) override;
  void Unsubscribe(uint64_t id) override;

 private:
  // Runs `op` on the loop; `op` returns an immediate status or OK and later
  // calls the Done it was given. Persists after success.
  absl::Status Mutate(const std::function<absl::Status(Done)>& op);

  EventLoop* loop_;
  Fleet* fleet_;
  Persist persist_;
  std::string version_;
  absl::Time started_;
  std::atomic<bool> closed_{false};
  std::mutex mu_;  // serialises mutations end to end
  std::mutex subscribers_mu_;
  uint64_t next_subscriber_ = 1;
  std::map<uint64_t, std::function<void(const FleetEvent&)>> subscribers_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_CONTROLLER_H_
