#include "agent/sd_notify.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

absl::StatusOr<std::unique_ptr<SdNotifier>> SdNotifier::Open(
    const std::string& notify_socket) {
  sockaddr_un addr{};
  if (notify_socket.empty() || notify_socket.size() >= sizeof(addr.sun_path) ||
      (notify_socket[0] != '/' && notify_socket[0] != '@')) {
    return absl::InvalidArgumentError(
        absl::StrCat("NOTIFY_SOCKET '", notify_socket,
                     "': expected an absolute path or @abstract name"));
  }
  Fd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError("socket(AF_UNIX, SOCK_DGRAM) for sd_notify");
  return std::unique_ptr<SdNotifier>(
      new SdNotifier(std::move(fd), notify_socket));
}

std::unique_ptr<SdNotifier> SdNotifier::FromEnvironment() {
  const char* env = std::getenv("NOTIFY_SOCKET");
  if (env == nullptr || *env == '\0') return nullptr;
  absl::StatusOr<std::unique_ptr<SdNotifier>> n = Open(env);
  if (!n.ok()) {
    PF_LOG(WARNING) << "sd_notify disabled: " << n.status().message();
    return nullptr;
  }
  return std::move(*n);
}

absl::Status SdNotifier::Send(absl::string_view assignments) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, address_.data(), address_.size());
  if (address_[0] == '@') addr.sun_path[0] = '\0';
  socklen_t len =
      static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address_.size() +
                             (address_[0] == '@' ? 0 : 1));
  ssize_t n = ::sendto(socket_.get(), assignments.data(), assignments.size(),
                       MSG_NOSIGNAL | MSG_DONTWAIT,
                       reinterpret_cast<sockaddr*>(&addr), len);
  if (n < 0) return ErrnoError(absl::StrCat("sd_notify to ", address_));
  return absl::OkStatus();
}

std::optional<absl::Duration> SdNotifier::WatchdogInterval() {
  return WatchdogInterval(std::getenv("WATCHDOG_USEC"),
                          std::getenv("WATCHDOG_PID"), ::getpid());
}

std::optional<absl::Duration> SdNotifier::WatchdogInterval(const char* usec,
                                                           const char* pid,
                                                           pid_t self) {
  uint64_t us = 0;
  if (usec == nullptr || !absl::SimpleAtoi(usec, &us) || us == 0) {
    return std::nullopt;
  }
  if (pid != nullptr && *pid != '\0') {
    int64_t p = 0;
    if (!absl::SimpleAtoi(pid, &p) || p != self) return std::nullopt;
  }
  return absl::Microseconds(us) / 2;
}

WatchdogPinger::WatchdogPinger(EventLoop* loop, SdNotifier* notifier,
                               absl::Duration interval)
    : loop_(loop), notifier_(notifier), interval_(interval) {
  timer_ = loop_->AddTimer(absl::ZeroDuration(), [this] { Ping(); });
}

WatchdogPinger::~WatchdogPinger() {
  if (timer_) loop_->CancelTimer(*timer_);
}

void WatchdogPinger::Ping() {
  if (absl::Status s = notifier_->Send("WATCHDOG=1"); !s.ok()) {
    PF_LOG(DEBUG) << s;
  }
  timer_ = loop_->AddTimer(interval_, [this] { Ping(); });
}

}  // namespace portfleet
