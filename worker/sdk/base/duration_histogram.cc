#include "worker/sdk/base/duration_histogram.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

namespace portfleet {
namespace {

// The first unit count past the last bucket.
constexpr uint64_t kEndUnits = uint64_t{1} << 45;

uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b
             ? std::numeric_limits<uint64_t>::max()
             : a + b;
}

// Bucket bounds in units: [LowerUnits, UpperUnits) holds the unit numbers
// (ns - 1) / kUnitNs of the bucket.
uint64_t LowerUnits(uint32_t index) {
  if (index < DurationHistogram::kSubBuckets) return index;
  const uint32_t e = index / DurationHistogram::kSubBuckets + 2;
  const uint64_t s = index % DurationHistogram::kSubBuckets;
  return (8 + s) << (e - 3);
}

uint64_t UpperUnits(uint32_t index) {
  if (index < DurationHistogram::kSubBuckets) return index + 1;
  const uint32_t e = index / DurationHistogram::kSubBuckets + 2;
  const uint64_t s = index % DurationHistogram::kSubBuckets;
  return (9 + s) << (e - 3);
}

}  // namespace

uint32_t DurationHistogram::BucketOf(uint64_t ns) {
  // Unit number u: (ns - 1) / 125, so that a bucket's upper bound is
  // inclusive (a Prometheus `le`); 0 goes with (0, 125].
  uint64_t u = ns == 0 ? 0 : (ns - 1) / kUnitNs;
  u = std::min(u, kEndUnits - 1);
  if (u < kSubBuckets) return static_cast<uint32_t>(u);
  const uint32_t e = static_cast<uint32_t>(std::bit_width(u)) - 1;  // >= 3
  const uint32_t s = static_cast<uint32_t>((u >> (e - 3)) & 7);
  return kSubBuckets * (e - 2) + s;
}

uint64_t DurationHistogram::LowerNs(uint32_t index) {
  return LowerUnits(std::min(index, kBuckets - 1)) * kUnitNs;
}

uint64_t DurationHistogram::UpperNs(uint32_t index) {
  return UpperUnits(std::min(index, kBuckets - 1)) * kUnitNs;
}

void DurationHistogram::Record(uint64_t ns) {
  ++buckets_[BucketOf(ns)];
  ++count_;
  sum_ns_ = SaturatingAdd(sum_ns_, ns);
}

void DurationHistogram::AddToBucket(uint32_t index, uint64_t count) {
  if (index >= kBuckets || count == 0) return;
  buckets_[index] = SaturatingAdd(buckets_[index], count);
  count_ = SaturatingAdd(count_, count);
}

void DurationHistogram::Merge(const DurationHistogram& other) {
  for (const auto& [index, count] : other.buckets_) AddToBucket(index, count);
  AddSum(other.sum_ns_);
}

DurationHistogram DurationHistogram::Since(
    const DurationHistogram& earlier) const {
  DurationHistogram out;
  for (const auto& [index, count] : buckets_) {
    auto it = earlier.buckets_.find(index);
    const uint64_t before = it == earlier.buckets_.end() ? 0 : it->second;
    if (count > before) out.AddToBucket(index, count - before);
  }
  if (sum_ns_ > earlier.sum_ns_) out.AddSum(sum_ns_ - earlier.sum_ns_);
  return out;
}

uint64_t DurationHistogram::CountAtMost(uint32_t last) const {
  uint64_t n = 0;
  for (const auto& [index, count] : buckets_) {
    if (index > last) break;
    n = SaturatingAdd(n, count);
  }
  return n;
}

double DurationHistogram::QuantileNs(double q) const {
  if (count_ == 0) return 0;
  if (!(q >= 0)) q = 0;  // also NaN
  q = std::min(q, 1.0);
  const double wanted = std::ceil(q * static_cast<double>(count_));
  const uint64_t rank =
      std::max<uint64_t>(1, std::min(count_, static_cast<uint64_t>(wanted)));
  uint64_t seen = 0;
  for (const auto& [index, count] : buckets_) {
    seen = SaturatingAdd(seen, count);
    if (seen >= rank) {
      return (static_cast<double>(LowerNs(index)) +
              static_cast<double>(UpperNs(index))) /
             2;
    }
  }
  return static_cast<double>(UpperNs(buckets_.rbegin()->first));
}

}  // namespace portfleet
