// EventHistory: the fleet's events as the API serves them: the last
// `capacity` events kept in a ring (oldest dropped first), and subscribers
// that get every new event. Thread-safe; a subscriber's sink is called under
// the history's lock, so it must not call back into the history.
#ifndef PORTFLEET_AGENT_EVENT_HISTORY_H_
#define PORTFLEET_AGENT_EVENT_HISTORY_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

#include "absl/time/time.h"
#include "agent/controller.h"

namespace portfleet {

class EventHistory {
 public:
  static constexpr size_t kDefaultCapacity = 1000;
  explicit EventHistory(size_t capacity = kDefaultCapacity)
      : capacity_(capacity) {}

  // Keeps `event` and hands it to every subscriber.
  void Publish(const FleetEvent& event);
  // The kept events at or after `since`, oldest first.
  std::vector<FleetEvent> Since(absl::Time since) const;
  // Replays the kept events at or after `since` to `sink` (none for
  // absl::InfiniteFuture()), then calls it for every new event until
  // Unsubscribe; no event is missed or repeated in between.
  uint64_t Subscribe(std::function<void(const FleetEvent&)> sink,
                     absl::Time since);
  void Unsubscribe(uint64_t id);
  size_t subscribers() const;

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::deque<FleetEvent> kept_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::function<void(const FleetEvent&)>> sinks_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_EVENT_HISTORY_H_
