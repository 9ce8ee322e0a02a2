// Connection hand-off between workers, routed through the agent (see
// HandOffRequest in control.proto): the agent asks a hot worker to release
// idle connections and passes each released socket to a cold worker on its
// control channel. Routing through the agent (rather than a socketpair
// between two workers) keeps one channel per worker, lets the agent pick
// and check the receiver when the socket arrives (a worker that died or
// drains in the meantime is skipped: the socket goes back to its sender),
// and counts every move where it decides.
#ifndef PORTFLEET_AGENT_FLEET_HANDOFF_H_
#define PORTFLEET_AGENT_FLEET_HANDOFF_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "agent/fleet/model.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

// One shard, as the hand-off planner sees it.
struct HandOffInput {
  uint32_t index = 0;
  uint64_t connections = 0;
  bool capable = false;  // its worker hands off and adopts connections
};

// Move `count` connections from shard `from` to shard `to`; by bytes
// (`bytes_per_second` > 0), up to `count` connections whose traffic adds up
// to about `bytes_per_second` (see HandOffRequest in control.proto).
struct HandOffTransfer {
  uint32_t from = 0;
  uint32_t to = 0;
  uint32_t count = 0;
  uint64_t bytes_per_second = 0;
};

// Pure: the moves that bring every capable shard as close to the mean of
// all shards as whole connections allow (the hottest keep the remainder),
// largest surplus to largest deficit first. Shards that are not capable
// neither give nor take.
std::vector<HandOffTransfer> PlanHandOffs(
    const std::vector<HandOffInput>& shards);

// One shard, as the hand-off planner by bytes sees it.
struct ByteHandOffInput {
  uint32_t index = 0;
  double bytes_per_second = 0;  // its traffic (ShardLoad.bytes_per_second)
  bool capable = false;
};

// At most this many connections per transfer by bytes: moving traffic
// takes few connections (the busiest), never a shard's crowd of idle ones.
inline constexpr uint32_t kMaxConnectionsPerByteTransfer = 32;

// Pure: the moves of traffic that bring every capable shard as close to the
// mean bytes/s of all shards as the planner can tell, largest surplus to
// largest deficit first; a move of less than `min_fraction` of the mean is
// not worth a hand-off and ends the plan. The worker picks the connections
// (ChooseForHandOff in worker/sdk/handoff_choice.h).
std::vector<HandOffTransfer> PlanByteHandOffs(
    const std::vector<ByteHandOffInput>& shards, double min_fraction = 0.05);

// Pure: `transfers` cut so that their counts add up to at most `max_moves`,
// in their order (largest first, as PlanHandOffs gives them); transfers
// left with nothing are dropped.
std::vector<HandOffTransfer> LimitHandOffs(
    std::vector<HandOffTransfer> transfers, uint32_t max_moves);

// What became of one transfer.
struct HandOffResult {
  HandOffTransfer transfer;
  uint32_t moved = 0;     // adopted by the receiver
  uint32_t returned = 0;  // receiver gone: given back to the sender
  uint32_t lost = 0;      // neither could take it (closed)
  // Proxied pairs the chosen receiver cannot adopt (its hello did not say
  // handoff_pairs): given back to the sender, or closed if it cannot
  // take them either (then counted in `lost` too).
  uint32_t refused = 0;
  // Released with the wrong sockets (count, not TCP, not connected): closed.
  uint32_t invalid = 0;
  uint32_t busy = 0;      // the sender's connections with data in flight
  bool answered = false;  // the sender said it was done
  // The released connections' traffic, as the sender measured it.
  uint64_t bytes_per_second = 0;
};

class HandOffRouter {
 public:
  HandOffRouter(FleetContext* ctx, ListenerMap* listeners)
      : ctx_(ctx), listeners_(listeners) {}
  ~HandOffRouter();
  HandOffRouter(const HandOffRouter&) = delete;
  HandOffRouter& operator=(const HandOffRouter&) = delete;

  using BatchDone = std::function<void(std::vector<HandOffResult>)>;
  // Asks each transfer's sender to release its connections; `done` gets
  // every result once each sender answered, or after `timeout`.
  void Run(Listener& listener, const std::vector<HandOffTransfer>& transfers,
           absl::Duration timeout, BatchDone done);
  // A hand-off message from a worker of `shard` (handoff_connection with
  // its socket, or both of a proxied pair; or handoff_done). The sockets
  // are checked (HandOffSocketCount, CheckHandOffSockets); wrong ones are
  // closed and logged with the listener, shard and pid.
  void OnWorkerMessage(Listener& listener, Shard& shard,
                       const v1::WorkerMessage& message, std::vector<Fd> fds);
  // Hand-offs of listener `name` are in flight.
  bool Busy(const std::string& name) const;

 private:
  // A sender is asked for at most this many connections at a time, and
  // for the next chunk once it answered: the control channels' socket
  // buffers hold a chunk with room to spare (a full channel drops messages).
  static constexpr uint32_t kChunk = 32;
  struct Pending {
    std::string listener;
    uint64_t batch = 0;
    HandOffResult result;
    uint32_t asked = 0;     // connections asked for so far
    uint32_t released = 0;  // connections the sender released so far
  };
  // Asks the sender of `p` for its next chunk; false if it cannot be asked.
  bool AskNext(Listener& listener, uint64_t id, Pending& p);
  // Asks for the next chunk once the receiver has read most of what it was
  // sent (bytes queued on its channel below kMaxQueued), checking every
  // millisecond: a receiver slower than its sender would otherwise fill
  // its channel, and sockets it cannot take go back to the sender.
  void AskWhenDrained(uint64_t id);
  static constexpr int kMaxQueued = 16 * 1024;
  struct Batch {
    std::vector<uint64_t> ids;
    size_t open = 0;
    BatchDone done;
    std::optional<EventLoop::TimerId> timer;
  };
  void Forward(Listener& listener, Pending& p,
               const v1::HandOffConnection& handoff, std::vector<Fd> fds);
  void Finish(uint64_t batch);

  FleetContext* const ctx_;
  ListenerMap* const listeners_;
  uint64_t next_id_ = 1;
  uint64_t next_batch_ = 1;
  std::map<uint64_t, Pending> pending_;
  std::map<uint64_t, Batch> batches_;
  // AskWhenDrained's re-checks, by hand-off id.
  std::map<uint64_t, EventLoop::TimerId> drain_timers_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_HANDOFF_H_
