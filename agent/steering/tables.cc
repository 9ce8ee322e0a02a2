#include <algorithm>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/steering/generation.h"
#include "agent/steering/steering.h"

namespace portfleet {

absl::StatusOr<std::vector<uint32_t>> BuildIndirectionTable(
    const std::vector<uint32_t>& weights, uint32_t num_shards,
    uint32_t table_size) {
  if (num_shards == 0) {
    return absl::InvalidArgumentError("indirection table: no shards");
  }
  if (table_size == 0) {
    return absl::InvalidArgumentError("indirection table: size 0");
  }
  if (!weights.empty() && weights.size() != num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: ", weights.size(), " weights for ", num_shards,
                     " shards; give one per shard or none"));
  }
  std::vector<uint64_t> w(num_shards, 1);
  if (!weights.empty()) w.assign(weights.begin(), weights.end());
  const uint64_t total = std::accumulate(w.begin(), w.end(), uint64_t{0});
  if (total == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: all zero (", absl::StrJoin(weights, ","),
                     "); at least one shard must take new connections"));
  }
  std::vector<uint64_t> quota(num_shards);
  std::vector<uint64_t> remainder(num_shards);
  uint64_t given = 0;
  for (uint32_t i = 0; i < num_shards; ++i) {
    quota[i] = w[i] * table_size / total;
    remainder[i] = w[i] * table_size % total;
    given += quota[i];
  }
  std::vector<uint32_t> order(num_shards);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return remainder[a] > remainder[b];
  });
  for (uint32_t k = 0; given < table_size; ++k, ++given) {
    ++quota[order[k % num_shards]];
  }
  std::vector<uint32_t> table;
  table.reserve(table_size);
  for (uint32_t i = 0; i < num_shards; ++i) {
    table.insert(table.end(), quota[i], i);
  }
  return table;
}

absl::StatusOr<pf_generation> BuildGeneration(const SteeringTables& tables) {
  uint32_t n = tables.num_shards;
  if (n == 0) {
    n = !tables.weights.empty() ? tables.weights.size()
                                : tables.shard_cpus.size();
  }
  if (n == 0) {
    return absl::InvalidArgumentError(
        "steering: no shards (set num_shards, weights or shard_cpus)");
  }
  if (n > PF_MAX_SHARDS) {
    return absl::InvalidArgumentError(absl::StrCat(
        "steering: ", n, " shards, at most ", PF_MAX_SHARDS, " supported"));
  }
  if (!tables.weights.empty() && tables.weights.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: ", tables.weights.size(), " weights for ", n,
                     " shards; give one per shard or none"));
  }
  if (!tables.shard_cpus.empty() && tables.shard_cpus.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard_cpus: ", tables.shard_cpus.size(), " CPUs for ", n,
                     " shards; give one per shard"));
  }
  const bool cpu_policy = tables.policy == v1::STEERING_POLICY_CPU;
  if (!tables.table_weights.empty() && !cpu_policy) {
    return absl::InvalidArgumentError(
        "table_weights: only for the CPU policy (HASH uses weights)");
  }
  const std::vector<uint32_t>& table_weights =
      tables.table_weights.empty() ? tables.weights : tables.table_weights;
  auto table = BuildIndirectionTable(table_weights, n, PF_TABLE_SIZE);
  if (!table.ok()) {
    return tables.table_weights.empty()
               ? table.status()
               : absl::InvalidArgumentError(
                     absl::StrCat("table_weights: ", table.status().message()));
  }

  pf_generation gen;
  std::memset(&gen, 0, sizeof(gen));
  gen.num_shards = n;
  std::copy(table->begin(), table->end(), gen.table);
  switch (tables.policy) {
    case v1::STEERING_POLICY_UNSPECIFIED:
    case v1::STEERING_POLICY_HASH:
      gen.policy = PF_POLICY_HASH;
      break;
    case v1::STEERING_POLICY_LEAST_CONNECTIONS:
      gen.policy = PF_POLICY_LEAST;
      break;
    case v1::STEERING_POLICY_CPU: {
      gen.policy = PF_POLICY_CPU;
      if (tables.shard_cpus.empty()) {
        return absl::InvalidArgumentError(
            "CPU policy: shard_cpus is empty; give each shard's CPU");
      }
      for (uint32_t s = 0; s < n; ++s) {
        const int cpu = tables.shard_cpus[s];
        if (cpu < -1 || cpu >= PF_MAX_CPUS) {
          return absl::InvalidArgumentError(
              absl::StrCat("shard_cpus[", s, "] = ", cpu, ": must be -1 or 0..",
                           PF_MAX_CPUS - 1));
        }
      }
      uint32_t next = 0;
      for (int cpu = 0; cpu < PF_MAX_CPUS; ++cpu) {
        gen.cpu[cpu].first = next;
        for (uint32_t s = 0; s < n; ++s) {
          const bool takes = tables.weights.empty() || tables.weights[s] > 0;
          if (tables.shard_cpus[s] == cpu && takes) {
            gen.cpu_shards[next++] = s;
            ++gen.cpu[cpu].count;
          }
        }
        if (gen.cpu[cpu].count == 0) gen.cpu[cpu].first = 0;
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("steering: unknown policy ", tables.policy));
  }
  return gen;
}

absl::StatusOr<pf_spill> BuildSpill(const SteeringTables& tables) {
  pf_spill spill;
  std::memset(&spill, 0, sizeof(spill));
  if (tables.cpu_spill.size() > PF_MAX_CPUS) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu_spill: ", tables.cpu_spill.size(), " CPUs, at most ",
                     PF_MAX_CPUS));
  }
  for (size_t cpu = 0; cpu < tables.cpu_spill.size(); ++cpu) {
    const uint32_t share = tables.cpu_spill[cpu];
    if (share == 0) continue;
    if (tables.policy != v1::STEERING_POLICY_CPU) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu_spill[", cpu, "] = ", share, ": spill is for the CPU policy"));
    }
    if (share > PF_SPILL_SCALE) {
      return absl::InvalidArgumentError(
          absl::StrCat("cpu_spill[", cpu, "] = ", share, ": at most ",
                       PF_SPILL_SCALE, " (all new connections)"));
    }
    spill.share[cpu] = static_cast<uint16_t>(share);
  }
  return spill;
}

absl::StatusOr<pf_least> BuildLeast(const SteeringTables& tables) {
  pf_least least;
  std::memset(&least, 0, sizeof(least));
  if (tables.policy != v1::STEERING_POLICY_LEAST_CONNECTIONS) return least;
  uint32_t n = tables.num_shards;
  if (n == 0) n = tables.weights.size();
  if (n == 0 || n > PF_MAX_SHARDS) {
    return absl::InvalidArgumentError(absl::StrCat(
        "least connections: ", n, " shards, want 1 to ", PF_MAX_SHARDS));
  }
  if (!tables.weights.empty() && tables.weights.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: ", tables.weights.size(), " weights for ", n,
                     " shards; give one per shard or none"));
  }
  for (uint32_t s = 0; s < n; ++s) {
    const uint32_t w = tables.weights.empty() ? 1 : tables.weights[s];
    // The program multiplies a count by a weight in 64 bits.
    if (w > kMaxLeastWeight) {
      return absl::InvalidArgumentError(absl::StrCat(
          "weights[", s, "] = ", w, ": at most ", kMaxLeastWeight));
    }
    least.weight[s] = w;
  }
  return least;
}

absl::Status ValidatePinName(absl::string_view listener) {
  if (listener.empty() || listener.size() > 63) {
    return absl::InvalidArgumentError(absl::StrCat(
        "listener name \"", listener, "\": must have 1 to 63 characters"));
  }
  if (listener[0] == '_' || listener[0] == '-') {
    return absl::InvalidArgumentError(absl::StrCat(
        "listener name \"", listener, "\": must start with a-z or 0-9"));
  }
  for (char c : listener) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "listener name \"", listener,
          "\": only a-z, 0-9, '-' and '_' are allowed (bpffs forbids '.')"));
    }
  }
  return absl::OkStatus();
}

}  // namespace portfleet
