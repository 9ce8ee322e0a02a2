#include "agent/event_history.h"

#include <utility>

namespace portfleet {

void EventHistory::Publish(const FleetEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  if (capacity_ > 0) {
    if (kept_.size() >= capacity_) kept_.pop_front();
    kept_.push_back(event);
  }
  for (auto& [id, sink] : sinks_) sink(event);
}

std::vector<FleetEvent> EventHistory::Since(absl::Time since) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<FleetEvent> out;
  for (const FleetEvent& e : kept_) {
    if (e.time >= since) out.push_back(e);
  }
  return out;
}

uint64_t EventHistory::Subscribe(std::function<void(const FleetEvent&)> sink,
                                 absl::Time since) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const FleetEvent& e : kept_) {
    if (e.time >= since) sink(e);
  }
  uint64_t id = next_id_++;
  sinks_[id] = std::move(sink);
  return id;
}

void EventHistory::Unsubscribe(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  sinks_.erase(id);
}

size_t EventHistory::subscribers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sinks_.size();
}

}  // namespace portfleet
