// Fd: the one owner of a file descriptor (socket, pidfd, BPF map or program,
// epoll, timerfd, ...). Move-only; closes on destruction.
#ifndef PORTFLEET_WORKER_SDK_BASE_FD_H_
#define PORTFLEET_WORKER_SDK_BASE_FD_H_

#include <unistd.h>

#include <utility>

namespace portfleet {

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Reset(); }

  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& other) noexcept : fd_(other.Release()) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) Reset(other.Release());
    return *this;
  }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing.
  int Release() { return std::exchange(fd_, -1); }

  void Reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_BASE_FD_H_
