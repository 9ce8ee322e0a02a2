// DurationHistogram: durations (in nanoseconds) counted in log-linear
// buckets, precise enough for medians and tails at microsecond scale: 8
// buckets per power of two (each at most 12.5% of its lower bound wide),
// aligned so that every power of two of microseconds is a bucket boundary.
// The connection hand-off pauses (control.proto, WorkerLoad.handoff_pauses)
// are counted in it by the worker SDK and merged by the agent; the bucket
// index is the wire format (DurationHistogram in control.proto).
//
// Bucket i covers the durations d (ns) with lower(i) < d <= upper(i), in
// units of 125 ns (1/8 µs):
//   i < 8:   (i, i + 1] units (bucket 0 also holds 0);
//   i >= 8:  with e = i / 8 + 2 and s = i % 8,
//            ((8 + s) << (e - 3), (9 + s) << (e - 3)] units.
// So bucket 8 * (k + 1) - 1 ends at 2^k µs. Durations beyond the last
// bucket (about 51 days) are counted in it.
//
// Pure and small: no clock, no I/O. Not thread-safe.
#ifndef PORTFLEET_WORKER_SDK_BASE_DURATION_HISTOGRAM_H_
#define PORTFLEET_WORKER_SDK_BASE_DURATION_HISTOGRAM_H_

#include <cstdint>
#include <map>

namespace portfleet {

class DurationHistogram {
 public:
  static constexpr uint64_t kUnitNs = 125;
  static constexpr uint32_t kSubBuckets = 8;
  // Buckets 0 .. kBuckets - 1; the last ends at 2^45 units (~51 days).
  static constexpr uint32_t kBuckets = 344;

  // The bucket that counts `ns`.
  static uint32_t BucketOf(uint64_t ns);
  // Bounds of bucket `index` (< kBuckets) in ns: lower (exclusive, except 0
  // for bucket 0) and upper (inclusive).
  static uint64_t LowerNs(uint32_t index);
  static uint64_t UpperNs(uint32_t index);
  // The last bucket whose upper bound is 2^k µs (k <= 42): counting
  // the buckets up to it gives a Prometheus bucket le = 2^k µs.
  static uint32_t LastBucketAtMostPow2Us(uint32_t k) {
    return kSubBuckets * (k + 1) - 1;
  }

  // Counts one duration.
  void Record(uint64_t ns);
  // Adds `count` durations to bucket `index` (< kBuckets, else ignored) with
  // their total `sum_ns` left to the caller (AddSum): rebuilding a histogram
  // from its buckets.
  void AddToBucket(uint32_t index, uint64_t count);
  void AddSum(uint64_t sum_ns) { sum_ns_ += sum_ns; }
  // Adds every count of `other`.
  void Merge(const DurationHistogram& other);
  // What this histogram holds beyond `earlier` (the same counter read
  // before): per bucket, this minus earlier, at least 0; sum likewise.
  DurationHistogram Since(const DurationHistogram& earlier) const;

  // Durations counted, and their sum (ns, saturating).
  uint64_t count() const { return count_; }
  uint64_t sum_ns() const { return sum_ns_; }
  // Non-empty buckets: index -> count, ascending.
  const std::map<uint32_t, uint64_t>& buckets() const { return buckets_; }
  // Durations counted in buckets 0 .. `last` (cumulative, as in a
  // Prometheus bucket).
  uint64_t CountAtMost(uint32_t last) const;

  // The q-quantile (0 <= q <= 1; clamped) in ns: the midpoint of the bucket
  // that holds the ceil(q * count)-th smallest duration (at least the 1st),
  // so within 6.25% of it. 0 when empty.
  double QuantileNs(double q) const;

  bool operator==(const DurationHistogram& other) const {
    return count_ == other.count_ && sum_ns_ == other.sum_ns_ &&
           buckets_ == other.buckets_;
  }

 private:
  std::map<uint32_t, uint64_t> buckets_;
  uint64_t count_ = 0;
  uint64_t sum_ns_ = 0;
};

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_BASE_DURATION_HISTOGRAM_H_
