// systemd's notify protocol (sd_notify(3)), without libsystemd: newline-
// separated KEY=VALUE assignments in one datagram to the AF_UNIX socket
// named by $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace).
// The agent sends READY=1 once it serves, STATUS= lines as its health
// changes, WATCHDOG=1 from its event loop every half $WATCHDOG_USEC, and
// STOPPING=1 when it shuts down.
#ifndef PORTFLEET_AGENT_SD_NOTIFY_H_
#define PORTFLEET_AGENT_SD_NOTIFY_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "agent/event_loop.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

class SdNotifier {
 public:
  // For the socket named by `notify_socket` ("/run/..." or "@abstract").
  static absl::StatusOr<std::unique_ptr<SdNotifier>> Open(
      const std::string& notify_socket);
  // For $NOTIFY_SOCKET; nullptr when it is unset (not started by systemd
  // with Type=notify) or unusable (logged).
  static std::unique_ptr<SdNotifier> FromEnvironment();

  // Sends one datagram of assignments, e.g. "READY=1\nSTATUS=serving".
  absl::Status Send(absl::string_view assignments);

  // Half of $WATCHDOG_USEC, when the watchdog is on for this process
  // ($WATCHDOG_PID unset or ours); nullopt otherwise.
  static std::optional<absl::Duration> WatchdogInterval();
  // The same from explicit values (pure, for tests).
  static std::optional<absl::Duration> WatchdogInterval(const char* usec,
                                                        const char* pid,
                                                        pid_t self);

 private:
  SdNotifier(Fd socket, std::string address)
      : socket_(std::move(socket)), address_(std::move(address)) {}
  Fd socket_;
  std::string address_;
};

// Sends WATCHDOG=1 from the event loop every `interval` until destroyed: a
// wedged loop stops the pings, and systemd (WatchdogSec=) restarts the agent.
class WatchdogPinger {
 public:
  WatchdogPinger(EventLoop* loop, SdNotifier* notifier,
                 absl::Duration interval);
  ~WatchdogPinger();
  WatchdogPinger(const WatchdogPinger&) = delete;
  WatchdogPinger& operator=(const WatchdogPinger&) = delete;

 private:
  void Ping();
  EventLoop* const loop_;
  SdNotifier* const notifier_;
  const absl::Duration interval_;
  std::optional<EventLoop::TimerId> timer_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_SD_NOTIFY_H_
