// ControlSocketServer: the agent's control socket while it serves. Workers
// of a previous agent that reconnect late (their shard was replaced) are told
// to drain; a new agent's TakeoverRequest goes to the takeover handler when
// it comes from the agent's own uid. See adoption.h for the start-up side
// (collecting reconnects before the fleet starts).
//
// Connections are accepted without blocking the event loop: each waits on
// the loop for its first packet, at most `first_packet_timeout`, and at most
// `max_pending` wait at a time (more are closed at once). An accept error
// such as EMFILE pauses accepting for `accept_retry` instead of spinning.
#ifndef PORTFLEET_AGENT_CONTROL_SOCKET_H_
#define PORTFLEET_AGENT_CONTROL_SOCKET_H_

#include <sys/types.h>

#include <functional>
#include <map>
#include <optional>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "agent/adoption.h"
#include "agent/event_loop.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

struct ControlSocketOptions {
  absl::Duration first_packet_timeout = absl::Seconds(2);
  size_t max_pending = 64;
  absl::Duration accept_retry = absl::Milliseconds(100);
  // Which peers (SO_PEERCRED pid and uid) are read at all; the others are
  // closed at once, so that they hold no pending slot. Unset: everyone.
  std::function<bool(pid_t, uid_t)> admit;
};

class ControlSocketServer {
 public:
  using TakeoverHandler = std::function<void(ControlConnection)>;

  // `listen_fd` is the bound, listening control socket (ListenControlSocket).
  ControlSocketServer(EventLoop* loop, Fd listen_fd, TakeoverHandler handler,
                      ControlSocketOptions options = {});
  ~ControlSocketServer();
  ControlSocketServer(const ControlSocketServer&) = delete;
  ControlSocketServer& operator=(const ControlSocketServer&) = delete;

  absl::Status Start();
  int fd() const { return listen_fd_.get(); }

 private:
  struct Pending {
    Fd conn;
    pid_t pid = 0;
    uid_t uid = 0;
    EventLoop::TimerId timer = 0;
  };
  void OnAcceptable();
  void OnFirstPacket(int fd);
  void Drop(int fd);
  void Dispatch(ControlConnection c);

  EventLoop* const loop_;
  Fd listen_fd_;
  TakeoverHandler handler_;
  const ControlSocketOptions options_;
  bool watching_ = false;
  std::optional<EventLoop::TimerId> retry_timer_;
  std::map<int, Pending> pending_;
  LogRateLimiter complaints_;  // lines caused by connecting peers
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_CONTROL_SOCKET_H_
