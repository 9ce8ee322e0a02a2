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

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create(Clock* clock) {
  Fd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return ErrnoError("epoll_create1");
  Fd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) return ErrnoError("eventfd");
  Fd timer(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!timer) return ErrnoError("timerfd_create");
  std::unique_ptr<EventLoop> loop(new EventLoop(
      std::move(epoll), std::move(wake), std::move(timer), clock));
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

EventLoop::EventLoop(Fd epoll, Fd wake, Fd timer, Clock* clock)
    : clock_(clock),
      epoll_(std::move(epoll)),
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
  absl::Time deadline = clock_->Now() + delay;
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
    absl::Duration left = timers_.begin()->first.first - clock_->Now();
    if (left < absl::Microseconds(1)) left = absl::Microseconds(1);
    spec.it_value = absl::ToTimespec(left);
  }
  ::timerfd_settime(timer_.get(), 0, &spec, nullptr);
}

bool EventLoop::RunDueTimers() {
  bool ran = false;
  absl::Time now = clock_->Now();
  while (!timers_.empty() && timers_.begin()->first.first <= now) {
    auto node = timers_.extract(timers_.begin());
    timer_deadlines_.erase(node.key().second);
    node.mapped()();
    ran = true;
  }
  ArmTimerFd();
  return ran;
}

absl::Time EventLoop::NextTimer() const {
  return timers_.empty() ? absl::InfiniteFuture()
                         : timers_.begin()->first.first;
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

bool EventLoop::RunPosted() {
  std::deque<std::function<void()>> tasks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks.swap(posted_);
  }
  for (auto& task : tasks) task();
  return !tasks.empty();
}

bool EventLoop::RunReadyFds(int timeout_ms) {
  epoll_event events[64];
  int n = ::epoll_wait(epoll_.get(), events, 64, timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return false;
    PF_LOG(ERROR) << "epoll_wait: " << strerror(errno);
    std::abort();  // cannot happen after init
  }
  bool ran = false;
  for (int i = 0; i < n; ++i) {
    int fd = events[i].data.fd;
    auto it = fds_.find(fd);
    if (it == fds_.end()) continue;  // removed by an earlier callback
    // The wake and timer fds are bookkeeping, not work.
    if (fd != wake_.get() && fd != timer_.get()) ran = true;
    std::shared_ptr<FdCallback> cb = it->second;
    (*cb)(events[i].events);
  }
  return ran;
}

bool EventLoop::RunOnce(absl::Duration max_wait) {
  loop_thread_ = std::this_thread::get_id();
  bool ran = RunPosted();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!posted_.empty()) max_wait = absl::ZeroDuration();
  }
  int timeout_ms = max_wait == absl::InfiniteDuration()
                       ? -1
                       : static_cast<int>(absl::ToInt64Milliseconds(
                             absl::Ceil(max_wait, absl::Milliseconds(1))));
  ran |= RunReadyFds(timeout_ms);
  ran |= RunDueTimers();
  return ran;
}

void EventLoop::RunUntilIdle() {
  while (RunOnce(absl::ZeroDuration())) {
  }
}

void EventLoop::AdvanceTo(ManualClock* clock, absl::Time deadline) {
  RunUntilIdle();
  while (NextTimer() <= deadline) {
    absl::Time next = NextTimer();
    if (next > clock->Now()) clock->Advance(next - clock->Now());
    RunUntilIdle();
  }
  if (deadline > clock->Now()) clock->Advance(deadline - clock->Now());
  RunUntilIdle();
}

void EventLoop::Run() {
  loop_thread_ = std::this_thread::get_id();
  for (;;) {
    RunPosted();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_ && posted_.empty()) return;
      if (!posted_.empty()) continue;
    }
    RunReadyFds(-1);
  }
}

}  // namespace portfleet
