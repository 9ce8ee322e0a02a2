// Rollout: a rolling upgrade of one listener's workers, as a state machine.
//
//   kRolling      up to max_surge shards at a time: the new worker starts on
//                 the shard's socket beside the old one, becomes ready, then
//                 the old one drains (RollShard). Every shard done -> kDone.
//   kRollingBack  a new worker failed: once the shards in flight settle, the
//                 shards already rolled are rolled back to the previous
//                 program one by one, then -> kDone with the error.
//   kDone         `done` has been called.
//
// Abort (shutdown, listener deleted) goes to kDone at once without starting
// any worker; candidates in flight are stopped by whoever aborted. Nothing
// refuses a connection in any state: a shard's old worker serves until its
// successor is ready.
//
// By hand (the API): Pause stops kRolling from starting more shards (those
// in flight finish), Resume goes on, Undo goes to kRollingBack as a failed
// worker does. The rollout's record (v1::RollOut) says where it is; when it
// ends, the record goes to the front of the listener's rollout_history.
#ifndef PORTFLEET_AGENT_FLEET_ROLLOUT_H_
#define PORTFLEET_AGENT_FLEET_ROLLOUT_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "agent/fleet/model.h"
#include "agent/fleet/supervisor.h"

namespace portfleet {

class Rollout : public std::enable_shared_from_this<Rollout> {
 public:
  enum class Phase { kRolling, kRollingBack, kDone };

  // Rolls every live shard of `listener` to `target`, `max_surge` (>= 1) at
  // a time. On success the listener's program becomes `target`.
  Rollout(FleetContext* ctx, Supervisor* supervisor, Listener& listener,
          ResolvedWorker target, uint32_t max_surge, Done done);

  void Start();
  // Stops here: `done` gets `why`; nothing is rolled back or started.
  void Abort(absl::Status why);
  Phase phase() const { return phase_; }
  void Pause();
  void Resume();
  // Rolls the shards already rolled back; `done` gets Aborted.
  void Undo();
  // Marks the record as an undo (set before Start).
  void set_undo(bool undo) { record_.set_undo(undo); }
  // Where it is now.
  v1::RollOut Record() const;

  // Rolling upgrade of one shard: starts `program` on the shard's socket,
  // waits for it to be ready, then makes it the shard's worker and retires
  // the old one. `done` gets an error (the old worker keeps serving) if the
  // new one does not become ready.
  static void RollShard(FleetContext* ctx, Supervisor* supervisor,
                        Listener& listener, Shard& shard,
                        const ResolvedWorker& program, Done done);

 private:
  void Pump();
  void OnShardDone(uint32_t index, absl::Status status);
  void RollBackNext();
  void Finish(absl::Status status, v1::RollOutState state);

  FleetContext* const ctx_;
  Supervisor* const supervisor_;
  Listener& listener_;
  const ResolvedWorker target_;
  const ResolvedWorker previous_;
  const uint32_t max_surge_;
  Done done_;
  Phase phase_ = Phase::kRolling;
  std::vector<uint32_t> order_;  // shard indexes to roll
  size_t next_ = 0;
  size_t in_flight_ = 0;
  std::vector<uint32_t> rolled_;  // done, in order
  absl::Status error_;
  bool paused_ = false;
  v1::RollOut record_;  // id, specs, times; state and counts by Record()
};

// Finished rollouts kept per listener.
inline constexpr size_t kRollOutHistory = 10;

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_ROLLOUT_H_
