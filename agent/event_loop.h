// EventLoop: the agent's single control thread. Everything that changes fleet
// state runs here: fd readiness callbacks (pidfds, control channels,
// signalfd), timers, and closures posted from other threads (gRPC handlers).
//
// Timers read the injected Clock. The agent runs Run() on the real clock; a
// unit test injects a ManualClock and drives the loop itself with RunOnce()
// and AdvanceTo(), so restart backoffs and drain timeouts take no real time.
#ifndef PORTFLEET_AGENT_EVENT_LOOP_H_
#define PORTFLEET_AGENT_EVENT_LOOP_H_

#include <sys/epoll.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/time.h"

namespace portfleet {

class EventLoop {
 public:
  using FdCallback = std::function<void(uint32_t epoll_events)>;
  using TimerId = uint64_t;

  // `clock` (not owned) must outlive the loop.
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create(
      Clock* clock = RealClock());
  ~EventLoop();

  // Watches `fd` (not owned) for `events` (EPOLLIN by default) until
  // RemoveFd. The callback runs on the loop thread.
  absl::Status AddFd(int fd, FdCallback callback, uint32_t events = EPOLLIN);
  void RemoveFd(int fd);

  // Runs `callback` once after `delay` on the loop thread.
  TimerId AddTimer(absl::Duration delay, std::function<void()> callback);
  void CancelTimer(TimerId id);

  // Thread-safe: runs `task` on the loop thread soon.
  void Post(std::function<void()> task);
  // Thread-safe: runs `task` on the loop thread and waits for it. Must not be
  // called from the loop thread.
  void RunSync(std::function<void()> task);

  // Runs until Stop(). Returns after the iteration that saw Stop().
  void Run();
  void Stop();  // thread-safe
  bool InLoopThread() const;

  // One iteration: posted tasks, then fds ready within `max_wait`, then due
  // timers. Returns true if any callback ran.
  bool RunOnce(absl::Duration max_wait);
  // Runs iterations with no waiting until none runs a callback.
  void RunUntilIdle();
  // For a ManualClock: moves it forward to `deadline` timer by timer,
  // running each due timer (and whatever it makes ready) in order.
  void AdvanceTo(ManualClock* clock, absl::Time deadline);
  // Deadline of the earliest timer; InfiniteFuture when there is none.
  absl::Time NextTimer() const;
  const Clock* clock() const { return clock_; }
  absl::Time Now() const { return clock_->Now(); }

 private:
  EventLoop(Fd epoll, Fd wake, Fd timer, Clock* clock);
  void Wake();
  bool RunDueTimers();
  void ArmTimerFd();
  bool RunPosted();
  bool RunReadyFds(int timeout_ms);

  Clock* clock_;
  Fd epoll_;
  Fd wake_;   // eventfd
  Fd timer_;  // timerfd for the earliest timer
  std::map<int, std::shared_ptr<FdCallback>> fds_;
  // (deadline, id) -> callback
  std::map<std::pair<absl::Time, TimerId>, std::function<void()>> timers_;
  std::map<TimerId, absl::Time> timer_deadlines_;
  TimerId next_timer_ = 1;
  std::mutex mu_;
  std::deque<std::function<void()>> posted_;  // guarded by mu_
  bool stop_ = false;                         // guarded by mu_
  std::thread::id loop_thread_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_EVENT_LOOP_H_
