// Table building and the BPF selection decision (bpf/steering_shared.h,
// compiled for the host).
#include <map>
#include <vector>

#include "agent/steering/generation.h"
#include "agent/steering/steering.h"
#include "bpf/steering_shared.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace portfleet {
namespace {

std::map<uint32_t, int> Histogram(const std::vector<uint32_t>& table) {
  std::map<uint32_t, int> h;
  for (uint32_t s : table) ++h[s];
  return h;
}

TEST(BuildIndirectionTable, ThreeToOne) {
  auto table = BuildIndirectionTable({3, 1}, 2, 256);
  ASSERT_TRUE(table.ok()) << table.status();
  ASSERT_EQ(table->size(), 256u);
  auto h = Histogram(*table);
  EXPECT_EQ(h[0], 192);
  EXPECT_EQ(h[1], 64);
}

TEST(BuildIndirectionTable, ZeroWeightGetsNoSlot) {
  auto table = BuildIndirectionTable({1, 0}, 2, 256);
  ASSERT_TRUE(table.ok()) << table.status();
  auto h = Histogram(*table);
  EXPECT_EQ(h[0], 256);
  EXPECT_EQ(h.count(1), 0u);
}

TEST(BuildIndirectionTable, EqualWeightsLargestRemainder) {
  for (const std::vector<uint32_t>& w :
       {std::vector<uint32_t>{}, std::vector<uint32_t>{5, 5, 5}}) {
    auto table = BuildIndirectionTable(w, 3, 256);
    ASSERT_TRUE(table.ok()) << table.status();
    auto h = Histogram(*table);
    EXPECT_EQ(h[0], 86);
    EXPECT_EQ(h[1], 85);
    EXPECT_EQ(h[2], 85);
  }
}

TEST(BuildIndirectionTable, LargestRemainderPicksBiggestFraction) {
  // 256 * {1,2,4}/7 = 36.57, 73.14, 146.29 -> 37, 73, 146.
  auto table = BuildIndirectionTable({1, 2, 4}, 3, 256);
  ASSERT_TRUE(table.ok()) << table.status();
  auto h = Histogram(*table);
  EXPECT_EQ(h[0], 37);
  EXPECT_EQ(h[1], 73);
  EXPECT_EQ(h[2], 146);
}

TEST(BuildIndirectionTable, HugeWeightsDoNotOverflow) {
  auto table = BuildIndirectionTable({0xffffffffu, 0xffffffffu}, 2, 256);
  ASSERT_TRUE(table.ok()) << table.status();
  auto h = Histogram(*table);
  EXPECT_EQ(h[0], 128);
  EXPECT_EQ(h[1], 128);
}

TEST(BuildIndirectionTable, Errors) {
  auto mismatch = BuildIndirectionTable({1, 2, 3}, 2, 256);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(mismatch.status().message().find("3 weights for 2 shards"),
            absl::string_view::npos)
      << mismatch.status();
  auto zero = BuildIndirectionTable({0, 0}, 2, 256);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(zero.status().message().find("all zero"), absl::string_view::npos);
  EXPECT_EQ(BuildIndirectionTable({}, 0, 256).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BuildIndirectionTable({1}, 1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BuildGeneration, Errors) {
  auto too_many = BuildGeneration({.weights = std::vector<uint32_t>(65, 1)});
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_many.status().message().find("at most 64"),
            absl::string_view::npos)
      << too_many.status();
  auto mismatch = BuildGeneration({.weights = {1, 1}, .shard_cpus = {0, 1, 0}});
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  auto no_cpus =
      BuildGeneration({.policy = v1::STEERING_POLICY_CPU, .num_shards = 2});
  EXPECT_EQ(no_cpus.status().code(), absl::StatusCode::kInvalidArgument);
  auto bad_cpu = BuildGeneration(
      {.policy = v1::STEERING_POLICY_CPU, .shard_cpus = {0, 999}});
  EXPECT_EQ(bad_cpu.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_cpu.status().message().find("shard_cpus[1] = 999"),
            absl::string_view::npos)
      << bad_cpu.status();
  EXPECT_EQ(BuildGeneration({}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BuildGeneration({.weights = {0, 0}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SelectShard, NothingConfigured) {
  EXPECT_EQ(pf_select_shard(nullptr, nullptr, 7, 0), PF_NO_SHARD);
  pf_generation empty{};
  EXPECT_EQ(pf_select_shard(&empty, nullptr, 7, 0), PF_NO_SHARD);
}

TEST(SelectShard, HashFollowsTable) {
  auto gen = BuildGeneration({.weights = {3, 1}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  std::map<uint32_t, int> h;
  for (uint32_t hash = 0; hash < 4 * PF_TABLE_SIZE; ++hash) {
    ++h[pf_select_shard(&*gen, nullptr, hash * 0x10001u, hash % 2)];
  }
  EXPECT_EQ(h[0], 4 * 192);
  EXPECT_EQ(h[1], 4 * 64);
  EXPECT_EQ(h.size(), 2u);
}

TEST(SelectShard, CpuPolicy) {
  // Shards 0 and 2 on CPU 0, shard 1 on CPU 1, shard 3 unpinned.
  auto gen = BuildGeneration(
      {.policy = v1::STEERING_POLICY_CPU, .shard_cpus = {0, 1, 0, -1}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  std::map<uint32_t, int> cpu0;
  for (uint32_t hash = 0; hash < 1000; ++hash) {
    EXPECT_EQ(pf_select_shard(&*gen, nullptr, hash, 1), 1u);
    ++cpu0[pf_select_shard(&*gen, nullptr, hash, 0)];
  }
  EXPECT_EQ(cpu0.size(), 2u);
  EXPECT_EQ(cpu0[0], 500);
  EXPECT_EQ(cpu0[2], 500);
  // CPU 5 has no shard: the (equal) indirection table decides.
  EXPECT_EQ(pf_select_shard(&*gen, nullptr, 0, 5), 0u);
  EXPECT_EQ(pf_select_shard(&*gen, nullptr, 255, 5), 3u);
  // Out-of-range CPU ids use the table too.
  EXPECT_EQ(pf_select_shard(&*gen, nullptr, 255, 100000), 3u);
}

TEST(SelectShard, CpuPolicyZeroWeightLeavesCpuList) {
  auto gen = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                              .weights = {1, 0},
                              .shard_cpus = {0, 1}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  for (uint32_t hash = 0; hash < 1000; ++hash) {
    EXPECT_EQ(pf_select_shard(&*gen, nullptr, hash, 0), 0u);
    EXPECT_EQ(pf_select_shard(&*gen, nullptr, hash, 1), 0u);  // via the table
  }
}

// LEAST_CONNECTIONS: one step of the program, counting as it does.
uint32_t SelectAndCount(const pf_generation& gen, const pf_least& least,
                        pf_conns* conns, uint32_t hash) {
  uint32_t shard = pf_select_least(&gen, &least, conns, hash);
  if (shard < PF_MAX_SHARDS) ++conns->count[shard];
  return shard;
}

TEST(SelectLeast, MissingPiecesFallBackToTheTable) {
  SteeringTables t{.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                   .num_shards = 2};
  auto gen = BuildGeneration(t);
  ASSERT_TRUE(gen.ok()) << gen.status();
  EXPECT_EQ(gen->policy, PF_POLICY_LEAST);
  auto least = BuildLeast(t);
  ASSERT_TRUE(least.ok()) << least.status();
  pf_conns conns{};
  EXPECT_EQ(pf_select_least(nullptr, &*least, &conns, 1), PF_NO_SHARD);
  EXPECT_EQ(pf_select_least(&*gen, nullptr, &conns, 1), PF_NO_SHARD);
  EXPECT_EQ(pf_select_least(&*gen, &*least, nullptr, 1), PF_NO_SHARD);
  pf_least zero{};
  EXPECT_EQ(pf_select_least(&*gen, &zero, &conns, 1), PF_NO_SHARD);
  pf_generation bad = *gen;
  bad.num_shards = PF_MAX_SHARDS + 1;
  EXPECT_EQ(pf_select_least(&bad, &*least, &conns, 1), PF_NO_SHARD);
  // The fallback: the policy reads the indirection table.
  EXPECT_EQ(pf_select_shard(&*gen, nullptr, 0, 0), 0u);
  EXPECT_EQ(pf_select_shard(&*gen, nullptr, 255, 0), 1u);
}

TEST(SelectLeast, ABurstSpreadsExactly) {
  SteeringTables t{.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                   .num_shards = 3};
  auto gen = BuildGeneration(t);
  auto least = BuildLeast(t);
  ASSERT_TRUE(gen.ok() && least.ok());
  pf_conns conns{};
  // Hashes that a plain hash would put mostly on one shard.
  for (uint32_t i = 0; i < 300; ++i) {
    SelectAndCount(*gen, *least, &conns, i % 2 == 0 ? 0u : 3u);
  }
  EXPECT_EQ(conns.count[0], 100u);
  EXPECT_EQ(conns.count[1], 100u);
  EXPECT_EQ(conns.count[2], 100u);
}

TEST(SelectLeast, TiesStartWhereTheHashSays) {
  SteeringTables t{.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                   .num_shards = 4};
  auto gen = BuildGeneration(t);
  auto least = BuildLeast(t);
  ASSERT_TRUE(gen.ok() && least.ok());
  pf_conns conns{};
  for (uint32_t hash = 0; hash < 4; ++hash) {
    EXPECT_EQ(pf_select_least(&*gen, &*least, &conns, hash), hash);
    EXPECT_EQ(pf_select_least(&*gen, &*least, &conns, hash + 400),
              (hash + 400) % 4);
  }
}

TEST(SelectLeast, MeasuredCountsFirstThenEvenly) {
  SteeringTables t{.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                   .num_shards = 2};
  auto gen = BuildGeneration(t);
  auto least = BuildLeast(t);
  ASSERT_TRUE(gen.ok() && least.ok());
  pf_conns conns{};
  conns.count[0] = 50;  // a scale-up: shard 1 is new
  std::map<uint32_t, int> got;
  for (uint32_t i = 0; i < 60; ++i) {
    ++got[SelectAndCount(*gen, *least, &conns, i * 2654435761u)];
  }
  EXPECT_EQ(got[1], 55);
  EXPECT_EQ(got[0], 5);
}

TEST(SelectLeast, WeightsAndZeroWeight) {
  SteeringTables t{.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                   .weights = {3, 1, 0}};
  auto gen = BuildGeneration(t);
  auto least = BuildLeast(t);
  ASSERT_TRUE(gen.ok() && least.ok());
  EXPECT_EQ(least->weight[0], 3u);
  EXPECT_EQ(least->weight[2], 0u);
  pf_conns conns{};
  for (uint32_t i = 0; i < 400; ++i) {
    SelectAndCount(*gen, *least, &conns, i * 2654435761u);
  }
  EXPECT_NEAR(static_cast<double>(conns.count[0]), 300, 1);
  EXPECT_NEAR(static_cast<double>(conns.count[1]), 100, 1);
  EXPECT_EQ(conns.count[2], 0u);
}

TEST(BuildLeast, OnlyForItsPolicyAndChecked) {
  auto hash = BuildLeast({.weights = {3, 1}});
  ASSERT_TRUE(hash.ok());
  for (uint32_t w : hash->weight) EXPECT_EQ(w, 0u);
  auto mismatch = BuildLeast({.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                              .weights = {1, 1},
                              .num_shards = 3});
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  auto big = BuildLeast({.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                         .weights = {kMaxLeastWeight + 1, 1}});
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("weights[0]"), absl::string_view::npos)
      << big.status();
  auto none = BuildLeast({.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SelectShard, CorruptTableIsRejected) {
  pf_generation gen{};
  gen.policy = PF_POLICY_HASH;
  gen.table[3] = PF_MAX_SHARDS;
  EXPECT_EQ(pf_select_shard(&gen, nullptr, 3, 0), PF_NO_SHARD);
  gen.policy = 77;
  EXPECT_EQ(pf_select_shard(&gen, nullptr, 4, 0), PF_NO_SHARD);
}

// A hash whose spill bits (the top 8) are `top` and whose low bits are `low`.
uint32_t SpillHash(uint32_t top, uint32_t low) {
  return (top << PF_SPILL_SHIFT) | (low & ((1u << PF_SPILL_SHIFT) - 1));
}

TEST(SelectShard, SpillZeroIsTheCpuPolicyExactly) {
  auto gen = BuildGeneration(
      {.policy = v1::STEERING_POLICY_CPU, .shard_cpus = {0, 1, 0, -1}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  pf_spill zero{};
  for (uint32_t i = 0; i < 100000; ++i) {
    const uint32_t hash = i * 2654435761u;
    for (uint32_t cpu : {0u, 1u, 5u, 100000u}) {
      ASSERT_EQ(pf_select_shard(&*gen, &zero, hash, cpu),
                pf_select_shard(&*gen, nullptr, hash, cpu))
          << "hash " << hash << " cpu " << cpu;
    }
  }
}

TEST(SelectShard, SpillSendsItsShareOfTheCpuToTheTable) {
  // Shard 0 on CPU 0, shard 1 on CPU 1; the table only names shard 1.
  auto gen = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                              .shard_cpus = {0, 1},
                              .table_weights = {0, 1}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  pf_spill spill{};
  spill.share[0] = 64;  // a quarter of CPU 0's new connections
  // Exactly the hashes whose top 8 bits are below the share spill.
  for (uint32_t top = 0; top < 256; ++top) {
    for (uint32_t low : {0u, 1u, 77u, 255u, 0xabcdeu}) {
      const uint32_t want = top < 64 ? 1u : 0u;
      EXPECT_EQ(pf_select_shard(&*gen, &spill, SpillHash(top, low), 0), want)
          << "top " << top << " low " << low;
      // CPU 1 spills nothing: locality kept.
      EXPECT_EQ(pf_select_shard(&*gen, &spill, SpillHash(top, low), 1), 1u);
    }
  }
  // Over well-mixed hashes, the share is the fraction spilled.
  int spilled = 0;
  for (uint32_t i = 0; i < 1 << 16; ++i) {
    spilled += pf_select_shard(&*gen, &spill, i * 2654435761u, 0) == 1u;
  }
  EXPECT_NEAR(spilled / 65536.0, 0.25, 0.01);
  // PF_SPILL_SCALE: everything goes to the table.
  spill.share[0] = PF_SPILL_SCALE;
  for (uint32_t top = 0; top < 256; ++top) {
    EXPECT_EQ(pf_select_shard(&*gen, &spill, SpillHash(top, 3), 0), 1u);
  }
}

TEST(SelectShard, SpillIsIgnoredUnderHash) {
  auto gen = BuildGeneration({.weights = {1, 1}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  pf_spill spill{};
  for (uint16_t& s : spill.share) s = PF_SPILL_SCALE;
  for (uint32_t hash = 0; hash < 1000; ++hash) {
    EXPECT_EQ(pf_select_shard(&*gen, &spill, hash, 0),
              pf_select_shard(&*gen, nullptr, hash, 0));
  }
}

TEST(SelectShard, SpillWithATwoShardCpuKeepsTheSplitOfTheRest) {
  // Shards 0 and 2 on CPU 0 share what does not spill.
  auto gen = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                              .shard_cpus = {0, 1, 0},
                              .table_weights = {0, 1, 0}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  pf_spill spill{};
  spill.share[0] = 128;
  std::map<uint32_t, int> by_shard;
  for (uint32_t i = 0; i < 1 << 16; ++i) {
    ++by_shard[pf_select_shard(&*gen, &spill, i * 2654435761u, 0)];
  }
  EXPECT_NEAR(by_shard[1] / 65536.0, 0.5, 0.01);
  EXPECT_NEAR(by_shard[0] / 65536.0, 0.25, 0.01);
  EXPECT_NEAR(by_shard[2] / 65536.0, 0.25, 0.01);
}

TEST(BuildGeneration, CpuTableWeightsKeepEveryShardOnItsCpu) {
  auto gen = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                              .shard_cpus = {0, 1},
                              .table_weights = {1, 3}});
  ASSERT_TRUE(gen.ok()) << gen.status();
  EXPECT_EQ(gen->cpu[0].count, 1u);
  EXPECT_EQ(gen->cpu[1].count, 1u);
  std::map<uint32_t, int> slots;
  for (uint32_t s : gen->table) ++slots[s];
  EXPECT_EQ(slots[0], 64);
  EXPECT_EQ(slots[1], 192);
  // A zero table weight keeps the shard on its CPU; all zero is refused.
  auto cold_only = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                                    .shard_cpus = {0, 1},
                                    .table_weights = {0, 1}});
  ASSERT_TRUE(cold_only.ok()) << cold_only.status();
  EXPECT_EQ(cold_only->cpu[0].count, 1u);
  EXPECT_EQ(cold_only->cpu_shards[cold_only->cpu[0].first], 0u);
  auto none = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                               .shard_cpus = {0, 1},
                               .table_weights = {0, 0}});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(none.status().message()),
              ::testing::HasSubstr("table_weights"));
  auto wrong_size = BuildGeneration({.policy = v1::STEERING_POLICY_CPU,
                                     .shard_cpus = {0, 1},
                                     .table_weights = {1, 1, 1}});
  EXPECT_EQ(wrong_size.status().code(), absl::StatusCode::kInvalidArgument);
  // Under HASH the weights are the table.
  EXPECT_EQ(BuildGeneration({.weights = {1, 1}, .table_weights = {1, 2}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BuildSpill, SharesPerCpu) {
  auto spill = BuildSpill({.policy = v1::STEERING_POLICY_CPU,
                           .shard_cpus = {0, 1},
                           .cpu_spill = {96, 0}});
  ASSERT_TRUE(spill.ok()) << spill.status();
  EXPECT_EQ(spill->share[0], 96);
  for (int cpu = 1; cpu < PF_MAX_CPUS; ++cpu) EXPECT_EQ(spill->share[cpu], 0);
  auto none = BuildSpill({.weights = {1, 1}});
  ASSERT_TRUE(none.ok()) << none.status();
  for (uint16_t s : none->share) EXPECT_EQ(s, 0);
  // Zeros under HASH are no spill; a share is refused.
  EXPECT_TRUE(BuildSpill({.weights = {1, 1}, .cpu_spill = {0, 0}}).ok());
  EXPECT_EQ(BuildSpill({.weights = {1, 1}, .cpu_spill = {1}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto too_much = BuildSpill({.policy = v1::STEERING_POLICY_CPU,
                              .shard_cpus = {0},
                              .cpu_spill = {PF_SPILL_SCALE + 1}});
  EXPECT_EQ(too_much.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_much.status().message()),
              ::testing::HasSubstr("cpu_spill[0] = 257"));
  EXPECT_EQ(BuildSpill({.policy = v1::STEERING_POLICY_CPU,
                        .shard_cpus = {0},
                        .cpu_spill = std::vector<uint32_t>(PF_MAX_CPUS + 1)})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ValidatePinName, Rules) {
  EXPECT_TRUE(ValidatePinName("web-1_b").ok());
  EXPECT_FALSE(ValidatePinName("web.1").ok());
  EXPECT_FALSE(ValidatePinName("_tmp").ok());
  EXPECT_FALSE(ValidatePinName("").ok());
  EXPECT_FALSE(ValidatePinName("../x").ok());
  EXPECT_FALSE(ValidatePinName(".tmp").ok());
  EXPECT_FALSE(ValidatePinName("a/b").ok());
  EXPECT_FALSE(ValidatePinName(std::string(64, 'a')).ok());
}

}  // namespace
}  // namespace portfleet
