#include "worker/sdk/handoff_pauses.h"

#include <ctime>

namespace portfleet {

uint64_t MonotonicNowNs() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u +
         static_cast<uint64_t>(ts.tv_nsec);
}

std::optional<uint64_t> HandOffPauseNs(uint64_t released_mono_ns,
                                       uint64_t adopted_mono_ns) {
  if (released_mono_ns == 0 || adopted_mono_ns < released_mono_ns) {
    return std::nullopt;
  }
  return adopted_mono_ns - released_mono_ns;
}

void HistogramToProto(const DurationHistogram& histogram,
                      v1::DurationHistogram* out, bool upper_bounds) {
  out->Clear();
  for (const auto& [index, count] : histogram.buckets()) {
    v1::DurationBucket* b = out->add_buckets();
    b->set_index(index);
    b->set_count(count);
    if (upper_bounds) b->set_upper_ns(DurationHistogram::UpperNs(index));
  }
  out->set_count(histogram.count());
  out->set_sum_ns(histogram.sum_ns());
}

DurationHistogram HistogramFromProto(const v1::DurationHistogram& message) {
  DurationHistogram h;
  for (const v1::DurationBucket& b : message.buckets()) {
    h.AddToBucket(b.index(), b.count());
  }
  h.AddSum(message.sum_ns());
  return h;
}

}  // namespace portfleet
