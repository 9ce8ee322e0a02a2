// StopDecider: what a stop request means for the workers. A stop drains
// them (the agent's contract since the start); a restart by the service
// manager (`systemctl restart`, asked through a RestartProbe) or an explicit
// step-aside request leaves them serving on their sockets for the next agent
// to re-adopt, the end state of an agent crash reached cleanly.
//
// The probe runs on its own thread, so that the event loop (watchdog pings,
// a second signal) keeps going; its answer, or its absence after `timeout`,
// is acted on on the loop. Any doubt (an error, no answer in time) is a
// stop: draining is never wrong, only slower. A second stop request keeps its
// meaning, "kill the workers now", whatever the first one turned into.
#ifndef PORTFLEET_AGENT_STOP_DECIDER_H_
#define PORTFLEET_AGENT_STOP_DECIDER_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "agent/event_loop.h"
#include "agent/restart_probe.h"

namespace portfleet {

class StopDecider {
 public:
  // Each is called on the loop, at most once, with the line to log.
  struct Actions {
    // Drain every worker, then exit (a stop).
    std::function<void(const std::string& why)> drain;
    // Leave the workers serving for the next agent, then exit (a restart).
    std::function<void(const std::string& why)> step_aside;
    // Kill every worker now (a repeated stop request).
    std::function<void(const std::string& why)> kill_now;
  };
  enum class State { kRunning, kProbing, kDraining, kSteppingAside };

  // `probe` may be null: every stop request drains. `timeout` bounds the
  // wait for its answer.
  StopDecider(EventLoop* loop, std::unique_ptr<RestartProbe> probe,
              absl::Duration timeout, Actions actions);
  // Waits for a probe still running (it answers within about `timeout`).
  ~StopDecider();
  StopDecider(const StopDecider&) = delete;
  StopDecider& operator=(const StopDecider&) = delete;

  // On the loop: a stop request (SIGTERM, SIGINT), `count` 1 for the first.
  // The first asks the probe; later ones kill the workers now.
  void OnStop(const std::string& why, int count);
  // On the loop: step aside without asking (SIGUSR2, for an operator who
  // restarts the agent outside systemd). Ignored once stopping.
  void OnStepAside(const std::string& why);

  State state() const { return state_; }

 private:
  void OnVerdict(const std::string& why,
                 const absl::StatusOr<RestartVerdict>& verdict);
  void OnTimeout(const std::string& why);
  void Drain(const std::string& why);

  EventLoop* const loop_;
  std::unique_ptr<RestartProbe> probe_;
  const absl::Duration timeout_;
  Actions actions_;
  State state_ = State::kRunning;
  std::thread thread_;
  std::optional<EventLoop::TimerId> timer_;
  // Posted answers check it: none reaches a destroyed decider.
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_STOP_DECIDER_H_
