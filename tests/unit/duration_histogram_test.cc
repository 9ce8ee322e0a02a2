// DurationHistogram (worker/sdk/base/duration_histogram.h): the log-linear
// bucketing of hand-off pauses, its quantiles, merges and differences, and
// its message form (worker/sdk/handoff_pauses.h).
#include "worker/sdk/base/duration_histogram.h"

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/handoff_pauses.h"

namespace portfleet {
namespace {

using H = DurationHistogram;

TEST(DurationHistogramTest, BucketsTileTheLineWithoutGaps) {
  EXPECT_EQ(H::LowerNs(0), 0u);
  for (uint32_t i = 0; i + 1 < H::kBuckets; ++i) {
    ASSERT_LT(H::LowerNs(i), H::UpperNs(i)) << i;
    ASSERT_EQ(H::UpperNs(i), H::LowerNs(i + 1)) << i;
    // Each bound belongs to its own bucket, one past it to the next.
    ASSERT_EQ(H::BucketOf(H::UpperNs(i)), i) << i;
    ASSERT_EQ(H::BucketOf(H::UpperNs(i) + 1), i + 1) << i;
  }
}

TEST(DurationHistogramTest, RelativeWidthIsAtMostAnEighthAboveOneMicrosecond) {
  for (uint32_t i = 8; i < H::kBuckets; ++i) {
    const double width = static_cast<double>(H::UpperNs(i) - H::LowerNs(i));
    ASSERT_LE(width / static_cast<double>(H::LowerNs(i)), 0.125) << i;
  }
}

TEST(DurationHistogramTest, PowersOfTwoMicrosecondsAreBoundaries) {
  for (uint32_t k = 0; k <= 42; ++k) {
    const uint64_t ns = (uint64_t{1000}) << k;
    EXPECT_EQ(H::UpperNs(H::LastBucketAtMostPow2Us(k)), ns) << k;
    EXPECT_EQ(H::BucketOf(ns), H::LastBucketAtMostPow2Us(k)) << k;
  }
  EXPECT_EQ(H::LastBucketAtMostPow2Us(42), H::kBuckets - 1);
}

TEST(DurationHistogramTest, ZeroOneMicrosecondAndHugeValues) {
  EXPECT_EQ(H::BucketOf(0), 0u);
  EXPECT_EQ(H::BucketOf(1), 0u);
  EXPECT_EQ(H::BucketOf(125), 0u);
  EXPECT_EQ(H::BucketOf(126), 1u);
  EXPECT_EQ(H::BucketOf(1000), 7u);  // 1 µs ends bucket 7
  EXPECT_EQ(H::BucketOf(1001), 8u);
  EXPECT_EQ(H::BucketOf(std::numeric_limits<uint64_t>::max()), H::kBuckets - 1);

  H h;
  h.Record(0);
  EXPECT_EQ(h.count(), 1u);
  EXPECT_EQ(h.sum_ns(), 0u);
  EXPECT_DOUBLE_EQ(h.QuantileNs(0.5), 62.5);  // bucket [0, 125]

  H one_us;
  one_us.Record(1000);
  EXPECT_DOUBLE_EQ(one_us.QuantileNs(0.5), 937.5);  // (875, 1000]

  H huge;
  huge.Record(std::numeric_limits<uint64_t>::max());
  huge.Record(std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(huge.count(), 2u);
  EXPECT_EQ(huge.sum_ns(), std::numeric_limits<uint64_t>::max());  // saturates
  EXPECT_EQ(huge.buckets().begin()->first, H::kBuckets - 1);
  EXPECT_GT(huge.QuantileNs(1), 4e15);
}

TEST(DurationHistogramTest, EmptyHasNoQuantiles) {
  H h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.QuantileNs(0.5), 0);
  EXPECT_EQ(h.QuantileNs(0.99), 0);
  EXPECT_EQ(h.CountAtMost(H::kBuckets - 1), 0u);
  EXPECT_TRUE(h.buckets().empty());
}

TEST(DurationHistogramTest, QuantilesAreWithinTheBucketError) {
  // 1..1000 µs, one each: the true median is 500 µs, p99 990 µs.
  H h;
  for (uint64_t us = 1; us <= 1000; ++us) h.Record(us * 1000);
  EXPECT_EQ(h.count(), 1000u);
  EXPECT_EQ(h.sum_ns(), 500500u * 1000);
  EXPECT_NEAR(h.QuantileNs(0.5), 500e3, 500e3 * 0.0625);
  EXPECT_NEAR(h.QuantileNs(0.99), 990e3, 990e3 * 0.0625);
  EXPECT_NEAR(h.QuantileNs(1), 1000e3, 1000e3 * 0.0625);
  // q outside [0, 1] is clamped; q = 0 is the smallest.
  EXPECT_EQ(h.QuantileNs(-3), h.QuantileNs(0));
  EXPECT_EQ(h.QuantileNs(7), h.QuantileNs(1));
  EXPECT_NEAR(h.QuantileNs(0), 1e3, 1e3 * 0.0625);
}

TEST(DurationHistogramTest, QuantilesFollowRanksNotBucketOrderOfArrival) {
  // 99 fast (20 µs) and one slow (5 ms): p50 and p99 are fast, max slow.
  H h;
  h.Record(5'000'000);
  for (int i = 0; i < 99; ++i) h.Record(20'000);
  EXPECT_NEAR(h.QuantileNs(0.5), 20e3, 20e3 * 0.0625);
  EXPECT_NEAR(h.QuantileNs(0.99), 20e3, 20e3 * 0.0625);
  EXPECT_NEAR(h.QuantileNs(1), 5e6, 5e6 * 0.0625);
}

TEST(DurationHistogramTest, CountAtMostIsCumulative) {
  H h;
  h.Record(1000);    // <= 1 µs
  h.Record(1500);    // <= 2 µs
  h.Record(2000);    // <= 2 µs (inclusive bound)
  h.Record(2001);    // <= 4 µs
  h.Record(10'000);  // <= 16 µs
  EXPECT_EQ(h.CountAtMost(H::LastBucketAtMostPow2Us(0)), 1u);
  EXPECT_EQ(h.CountAtMost(H::LastBucketAtMostPow2Us(1)), 3u);
  EXPECT_EQ(h.CountAtMost(H::LastBucketAtMostPow2Us(2)), 4u);
  EXPECT_EQ(h.CountAtMost(H::LastBucketAtMostPow2Us(3)), 4u);
  EXPECT_EQ(h.CountAtMost(H::LastBucketAtMostPow2Us(4)), 5u);
}

TEST(DurationHistogramTest, MergeEqualsRecordingEverything) {
  std::mt19937_64 rng(7);
  std::lognormal_distribution<double> pause(11, 1.5);  // ~60 µs median
  H a, b, all;
  for (int i = 0; i < 5000; ++i) {
    const auto ns = static_cast<uint64_t>(pause(rng));
    (i % 3 == 0 ? a : b).Record(ns);
    all.Record(ns);
  }
  H merged = a;
  merged.Merge(b);
  EXPECT_EQ(merged, all);
  EXPECT_EQ(merged.QuantileNs(0.99), all.QuantileNs(0.99));
  // Merging an empty one changes nothing.
  merged.Merge(H());
  EXPECT_EQ(merged, all);
}

TEST(DurationHistogramTest, SinceIsWhatCameAfterAnEarlierReading) {
  H h;
  h.Record(10'000);
  h.Record(20'000);
  const H earlier = h;
  h.Record(20'000);
  h.Record(300'000);
  H fresh = h.Since(earlier);
  EXPECT_EQ(fresh.count(), 2u);
  EXPECT_EQ(fresh.sum_ns(), 320'000u);
  EXPECT_EQ(fresh.CountAtMost(H::BucketOf(20'000)), 1u);
  // Nothing new: empty; an "earlier" reading that is larger: no negatives.
  EXPECT_EQ(h.Since(h).count(), 0u);
  EXPECT_EQ(earlier.Since(h).count(), 0u);
  EXPECT_EQ(earlier.Since(h).sum_ns(), 0u);
}

TEST(DurationHistogramTest, AddToBucketIgnoresIndexesBeyondTheScheme) {
  H h;
  h.AddToBucket(H::kBuckets, 5);
  h.AddToBucket(3, 0);
  EXPECT_EQ(h.count(), 0u);
  h.AddToBucket(H::kBuckets - 1, 2);
  EXPECT_EQ(h.count(), 2u);
}

TEST(HandOffPausesTest, PauseNeedsAStampNotLaterThanTheAdoption) {
  EXPECT_EQ(HandOffPauseNs(0, 5'000), std::nullopt);  // an older sender
  EXPECT_EQ(HandOffPauseNs(6'000, 5'000), std::nullopt);
  EXPECT_EQ(HandOffPauseNs(5'000, 5'000), 0u);
  EXPECT_EQ(HandOffPauseNs(1'000, 43'000), 42'000u);
  const uint64_t now = MonotonicNowNs();
  EXPECT_GT(now, 0u);
  EXPECT_GE(MonotonicNowNs(), now);
}

TEST(HandOffPausesTest, MessageRoundTripIsSparseAndLossless) {
  H h;
  for (uint64_t ns : {900u, 41'000u, 43'000u, 2'000'000u}) h.Record(ns);
  v1::DurationHistogram m;
  HistogramToProto(h, &m);
  ASSERT_EQ(m.buckets_size(), 3);  // 41 and 43 µs share (40, 44]
  EXPECT_EQ(m.count(), 4u);
  EXPECT_EQ(m.sum_ns(), 2'084'900u);
  EXPECT_EQ(m.buckets(0).index(), 7u);
  EXPECT_EQ(m.buckets(0).upper_ns(), 0u);  // only with upper_bounds
  EXPECT_LT(m.buckets(1).index(), m.buckets(2).index());
  EXPECT_EQ(HistogramFromProto(m), h);

  HistogramToProto(h, &m, /*upper_bounds=*/true);
  EXPECT_EQ(m.buckets(0).upper_ns(), 1000u);
  // A peer's message: an index beyond the scheme and a count that disagrees
  // with the buckets are not trusted.
  m.add_buckets()->set_index(H::kBuckets + 1);
  m.mutable_buckets(3)->set_count(9);
  m.set_count(77);
  EXPECT_EQ(HistogramFromProto(m), h);
}

}  // namespace
}  // namespace portfleet
