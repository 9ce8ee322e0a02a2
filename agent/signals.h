// SignalHandler: the agent's SIGTERM, SIGINT, SIGHUP and SIGUSR2, read from a
// signalfd on the event loop instead of in a handler. Block() must run before
// any thread starts (gRPC starts threads), so that every thread inherits the
// blocked mask and the signals reach only the signalfd.
#ifndef PORTFLEET_AGENT_SIGNALS_H_
#define PORTFLEET_AGENT_SIGNALS_H_

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent/event_loop.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

class SignalHandler {
 public:
  // Blocks SIGTERM, SIGINT, SIGHUP and SIGUSR2 in the calling thread and
  // opens the signalfd for them.
  static absl::StatusOr<std::unique_ptr<SignalHandler>> Block();
  ~SignalHandler();
  SignalHandler(const SignalHandler&) = delete;
  SignalHandler& operator=(const SignalHandler&) = delete;

  // On `loop`: every SIGTERM or SIGINT calls `on_stop(signal, count)`, count
  // 1 for the first; SIGHUP calls `on_reload` and SIGUSR2 `on_step_aside`
  // (leave the workers to the next agent and exit), each without a callback
  // logged and ignored.
  absl::Status Watch(EventLoop* loop,
                     std::function<void(int signal, int count)> on_stop,
                     std::function<void()> on_reload = nullptr,
                     std::function<void()> on_step_aside = nullptr);

 private:
  explicit SignalHandler(Fd fd) : fd_(std::move(fd)) {}
  void OnReadable();

  Fd fd_;
  EventLoop* loop_ = nullptr;
  std::function<void(int, int)> on_stop_;
  std::function<void()> on_reload_;
  std::function<void()> on_step_aside_;
  int stops_ = 0;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_SIGNALS_H_
