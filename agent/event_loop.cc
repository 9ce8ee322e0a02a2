#include "agent/event_loop.h"

#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <future>

#include "absl/time/clock.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create() {
  Fd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return ErrnoError("epoll_create1");
  Fd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) return ErrnoError("eventfd");
  Fd timer(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!timer) return ErrnoError("timerfd_create");
  std::unique_ptr<EventLoop> loop(
      new EventLoop(std::move(epoll), std::move(wake), std::move(timer)));
  RETURN_IF_ERROR(loop->AddFd(loop->wake_.get(), [l = loop.get()](uint32_t) {
    uint64_t n;
    while (::read(l->wake_.get(), &n, sizeof(n)) > 0) {
    }
  }));
  RETURN_IF_ERROR(loop->AddFd(loop->timer_.get(), [l = loop.get()](uint32_t) {
    uint64_t n;
    while (::read(l->timer_.get(), &n, sizeof(n)) > 0) {
    }
    l->RunDueTimers();
  }));
  return loop;
}

EventLoop::EventLoop(Fd epoll, Fd wake, Fd timer)
    : epoll_(std::move(epoll)),
      wake_(std::move(wake)),
      timer_(std::move(timer)),
      loop_thread_(std::this_thread::get_id()) {}

EventLoop::~EventLoop() = default;

absl::Status EventLoop::AddFd(int fd, FdCallback callback, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return ErrnoError(absl::StrCat("epoll_ctl(ADD, fd ", fd, ")"));
  }
  fds_[fd] = std::make_shared<FdCallback>(std::move(callback));
  return absl::OkStatus();
}

void EventLoop::RemoveFd(int fd) {
  if (fds_.erase(fd) > 0) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  }
}

EventLoop::TimerId EventLoop::AddTimer(absl::Duration delay,
                                       std::function<void()> callback) {
  TimerId id = next_timer_++;
  absl::Time deadline = absl::Now() + delay;
  timers_[{deadline, id}] = std::move(callback);
  timer_deadlines_[id] = deadline;
  ArmTimerFd();
  return id;
}

void EventLoop::CancelTimer(TimerId id) {
  auto it = timer_deadlines_.find(id);
  if (it == timer_deadlines_.end()) return;
  timers_.erase({it->second, id});
  timer_deadlines_.erase(it);
  ArmTimerFd();
}

void EventLoop::ArmTimerFd() {
  itimerspec spec{};
  if (!timers_.empty()) {
    absl::Duration left = timers_.begin()->first.first - absl::Now();
    if (left < absl::Microseconds(1)) left = absl::Microseconds(1);
    spec.it_value = absl::ToTimespec(left);
  }
  ::timerfd_settime(timer_.get(), 0, &spec, nullptr);
}

void EventLoop::RunDueTimers() {
  absl::Time now = absl::Now();
  while (!timers_.empty() && timers_.begin()->first.first <= now) {
    auto node = timers_.extract(timers_.begin());
    timer_deadlines_.erase(node.key().second);
    node.mapped()();
  }
  ArmTimerFd();
}

void EventLoop::Wake() {
  uint64_t one = 1;
  ssize_t unused = ::write(wake_.get(), &one, sizeof(one));
  (void)unused;
}

void EventLoop::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    posted_.push_back(std::move(task));
  }
  Wake();
}

void EventLoop::RunSync(std::function<void()> task) {
  std::promise<void> done;
  Post([&] {
    task();
    done.set_value();
  });
  done.get_future().wait();
}

void EventLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  Wake();
}

bool EventLoop::InLoopThread() const {
  return std::this_thread::get_id() == loop_thread_;
}

void EventLoop::Run() {
  loop_thread_ = std::this_thread::get_id();
  epoll_event events[64];
  for (;;) {
    std::deque<std::function<void()>> tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks.swap(posted_);
    }
    for (auto& task : tasks) task();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_ && posted_.empty()) return;
      if (!posted_.empty()) continue;
    }
    int n = ::epoll_wait(epoll_.get(), events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      PF_LOG(ERROR) << "epoll_wait: " << strerror(errno);
      std::abort();  // cannot happen after init
    }
    for (int i = 0; i < n; ++i) {
      auto it = fds_.find(events[i].data.fd);
      if (it == fds_.end()) continue;  // removed by an earlier callback
      std::shared_ptr<FdCallback> cb = it->second;
      (*cb)(events[i].events);
    }
  }
}

}  // namespace portfleet
