#include "agent/signals.h"

#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstring>

#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

absl::StatusOr<std::unique_ptr<SignalHandler>> SignalHandler::Block() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  sigaddset(&signals, SIGUSR2);
  if (::sigprocmask(SIG_BLOCK, &signals, nullptr) != 0) {
    return ErrnoError("sigprocmask");
  }
  Fd fd(::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!fd) return ErrnoError("signalfd");
  return std::unique_ptr<SignalHandler>(new SignalHandler(std::move(fd)));
}

SignalHandler::~SignalHandler() {
  if (loop_ != nullptr) loop_->RemoveFd(fd_.get());
}

absl::Status SignalHandler::Watch(EventLoop* loop,
                                  std::function<void(int, int)> on_stop,
                                  std::function<void()> on_reload,
                                  std::function<void()> on_step_aside) {
  loop_ = loop;
  on_stop_ = std::move(on_stop);
  on_reload_ = std::move(on_reload);
  on_step_aside_ = std::move(on_step_aside);
  return loop_->AddFd(fd_.get(), [this](uint32_t) { OnReadable(); });
}

void SignalHandler::OnReadable() {
  signalfd_siginfo info;
  while (::read(fd_.get(), &info, sizeof(info)) == sizeof(info)) {
    int sig = static_cast<int>(info.ssi_signo);
    if (sig == SIGHUP && on_reload_) {
      on_reload_();
      continue;
    }
    if (sig == SIGHUP) {
      PF_LOG(INFO) << "SIGHUP ignored: use portfleetctl apply to change the "
                      "fleet";
      continue;
    }
    if (sig == SIGUSR2) {
      if (on_step_aside_) {
        on_step_aside_();
      } else {
        PF_LOG(INFO) << "SIGUSR2 ignored: nothing to leave to another agent";
      }
      continue;
    }
    on_stop_(sig, ++stops_);
  }
}

}  // namespace portfleet
