// Takeover (a surge upgrade of the agent): a new agent asks the running one
// for its shard sockets over the control socket, starts its own workers on
// them, and once they are ready the old agent releases the API, drains its
// workers and exits. See TakeoverRequest in proto/portfleet/v1/control.proto.
//
// The two ends are classes that only speak the protocol; what releasing or
// resuming means for the agent comes in as callbacks, so a test can drive
// both over a socketpair in one process.
#ifndef PORTFLEET_AGENT_TAKEOVER_H_
#define PORTFLEET_AGENT_TAKEOVER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "agent/adoption.h"
#include "agent/event_loop.h"
#include "portfleet/v1/control.pb.h"
#include "portfleet/v1/fleet.pb.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {

// One shard socket handed over, with the desired state of its listener.
struct SharedShard {
  v1::Listener listener;
  uint32_t shard;
  int fd;  // not owned
};

// What the new agent receives: the desired state and one Adoptee per shard
// socket (without a control channel: new workers are started on them).
struct TakeoverGrant {
  v1::FleetSpec spec;
  std::vector<Adoptee> sockets;
};

// The receiving side, in the new agent.
class TakeoverReceiver {
 public:
  // Connects to the running agent at `control_path`, asks for its sockets
  // and waits up to `timeout` for all of them.
  static absl::StatusOr<std::unique_ptr<TakeoverReceiver>> Request(
      const std::string& control_path, absl::Duration timeout);
  // Over an already connected channel (tests).
  static absl::StatusOr<std::unique_ptr<TakeoverReceiver>> Request(
      ControlChannel channel, absl::Duration timeout);

  // The sockets and desired state (once; moved out).
  TakeoverGrant TakeGrant() { return std::move(grant_); }

  // On `loop`: polls `ready` every 20 ms; once true sends TakeoverReady.
  // `released(ready_sent)` runs once the old agent closes the connection
  // (it has released the API and control socket), or closed it before we
  // were ready (ready_sent false).
  absl::Status Watch(EventLoop* loop, std::function<bool()> ready,
                     std::function<void(bool ready_sent)> released);

 private:
  explicit TakeoverReceiver(ControlChannel channel)
      : channel_(std::move(channel)) {}
  absl::Status ReceiveGrant(absl::Duration timeout);
  void PollReady();
  void OnReadable();

  ControlChannel channel_;
  TakeoverGrant grant_;
  EventLoop* loop_ = nullptr;
  std::function<bool()> ready_;
  std::function<void(bool)> released_;
  bool ready_sent_ = false;
  std::optional<EventLoop::TimerId> poll_timer_;
};

// The donating side, in the running agent.
class TakeoverDonor {
 public:
  struct Hooks {
    // The shard sockets to hand over (at the time of the request).
    std::function<std::vector<SharedShard>()> sockets;
    // A takeover starts: stop answering the API (NOT_SERVING, UNAVAILABLE).
    std::function<void()> pause;
    // The new agent went away before it was ready: serve the API again.
    std::function<void()> resume;
    // The new agent is ready: release the API, metrics and control socket
    // and drain the workers. Call `release_done` (from any thread) once the
    // API is down: that closes the connection, which tells the new agent to
    // take the API over.
    std::function<void(std::function<void()> release_done)> hand_over;
  };

  TakeoverDonor(EventLoop* loop, Hooks hooks);
  ~TakeoverDonor();

  // A TakeoverRequest arrived (ControlConnection from the control socket;
  // the caller has checked the peer). Refused when one is in progress.
  void OnRequest(ControlConnection request);
  bool in_progress() const { return channel_.has_value() || handed_over_; }
  bool handed_over() const { return handed_over_; }

 private:
  static absl::Status SendSockets(ControlChannel& channel,
                                  const std::vector<SharedShard>& shards);
  void OnReadable();

  EventLoop* const loop_;
  Hooks hooks_;
  std::optional<ControlChannel> channel_;
  bool handed_over_ = false;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_TAKEOVER_H_
