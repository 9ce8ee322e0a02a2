// The real FleetController: runs each API call on the agent's event loop.
//
// Mutations of one listener run one after another (a queue per listener
// name); mutations of different listeners and every read proceed meanwhile,
// and no thread waits for a mutation. The desired state is persisted before
// a change is applied (the fleet calls the commit hook once it has checked
// the request and before it touches anything): a state that cannot be
// saved refuses the change. A change that fails later is undone by the
// fleet, and the state as it then is is saved again.
#ifndef PORTFLEET_AGENT_FLEET_CONTROLLER_H_
#define PORTFLEET_AGENT_FLEET_CONTROLLER_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "agent/controller.h"
#include "agent/event_history.h"
#include "agent/event_loop.h"
#include "agent/fleet/fleet.h"
#include "agent/health_board.h"

namespace portfleet {

class LoopFleetController : public FleetController {
 public:
  // `persist` saves the desired state (temp file, fsync, rename); it runs on
  // the loop thread.
  using Persist = std::function<absl::Status(const v1::FleetSpec&)>;
  // `board` (not owned, may be null) is where GetStatus reads the health.
  LoopFleetController(EventLoop* loop, Fleet* fleet, Persist persist,
                      std::string version, const HealthBoard* board = nullptr);
  ~LoopFleetController() override;

  // After Close every call fails with Unavailable (agent shutting down), and
  // mutations still queued are dropped with it.
  void Close();
  void Reopen() { closed_ = false; }

  // Hands an event to every subscriber (any thread).
  void Publish(const FleetEvent& event);

  absl::StatusOr<std::vector<ListenerStatus>> ListListeners() override;
  absl::StatusOr<ListenerStatus> GetListener(const std::string& name) override;
  AgentStatus GetStatus() override;
  void CreateListener(const v1::Listener& spec, MutationCall call) override;
  void UpdateListener(const v1::Listener& spec, MutationCall call) override;
  void DeleteListener(const std::string& name, MutationCall call) override;
  void ScaleListener(const std::string& name, uint32_t shards,
                     MutationCall call) override;
  void AdoptListener(const std::string& name, pid_t pid,
                     std::shared_ptr<std::vector<uint32_t>> indexes,
                     MutationCall call) override;
  void DrainShard(const std::string& name, uint32_t index,
                  MutationCall call) override;
  void SetSteering(const std::string& name, const v1::Steering& steering,
                   MutationCall call) override;
  void RollOut(const std::string& name, const RollOutOptions& options,
               MutationCall call) override;
  absl::StatusOr<std::vector<v1::RollOut>> ListRollOuts(
      const std::string& name) override;
  absl::StatusOr<v1::RollOut> PauseRollOut(const std::string& name,
                                           bool paused) override;
  void SetShardMaintenance(const std::string& name, uint32_t index,
                           bool maintenance, MutationCall call) override;
  absl::StatusOr<v1::RebalanceListenerResponse> RebalanceListener(
      const v1::RebalanceListenerRequest& request) override;
  uint64_t Subscribe(std::function<void(const FleetEvent&)> sink,
                     absl::Time since) override;
  std::vector<FleetEvent> Events(absl::Time since) override;
  void Unsubscribe(uint64_t id) override;

 private:
  // A change on the loop: returns an immediate error, or OK and later calls
  // the Done it was given.
  using Op = std::function<absl::Status(Done)>;
  struct Pending {
    MutationCall call;
    Op op;
  };
  // Queues `op` behind the other mutations of listener `key`.
  void Mutate(const std::string& key, MutationCall call, Op op);
  // Queues a rollout (or an undo rollout) of listener `name`.
  void StartRollOut(const std::string& name, const RollOutOptions& options,
                    MutationCall call);
  // `op` as a dry run: stopped at its commit, answered with the plan.
  Op DryRun(const std::string& key, std::function<void(v1::ListenerPlan)> plan,
            Op op);
  void StartNext(const std::string& key);  // loop thread
  void Finished(const std::string& key, absl::Status status);
  absl::Status Commit(const v1::FleetSpec& intended);  // loop thread

  EventLoop* loop_;
  Fleet* fleet_;
  Persist persist_;
  std::string version_;
  const HealthBoard* board_;
  absl::Time started_;
  std::atomic<bool> closed_{false};
  std::mutex queue_mu_;
  std::map<std::string, std::deque<Pending>> queues_;  // front = running
  // What the state file holds (loop thread).
  std::optional<v1::FleetSpec> persisted_;
  // A dry run is in progress; Commit keeps what it would save (loop thread).
  bool dry_run_ = false;
  std::optional<v1::FleetSpec> dry_run_intended_;
  EventHistory events_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_CONTROLLER_H_
