#include "agent/fleet/model.h"

#include <unistd.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

std::string WorkerSpecDigest(const v1::WorkerSpec& spec) {
  // FNV-1a over the fields with their lengths (stable across processes).
  uint64_t h = 14695981039346656037ull;
  auto mix = [&h](absl::string_view field) {
    for (char c : absl::StrCat(field.size(), ":", field)) {
      h ^= static_cast<unsigned char>(c);
      h *= 1099511628211ull;
    }
  };
  mix(spec.command());
  for (const std::string& a : spec.args()) mix(a);
  mix("--env");
  for (const std::string& e : spec.env()) mix(e);
  mix(spec.user());
  mix(spec.group());
  return absl::StrFormat("%016x", h);
}

absl::StatusOr<ResolvedWorker> ResolveWorker(
    const v1::WorkerSpec& spec, const std::set<std::string>& allowlist) {
  ResolvedWorker out;
  out.spec = spec;
  ASSIGN_OR_RETURN(out.path, ResolveCommand(spec.command()));
  if (!allowlist.empty()) {
    std::error_code ec;
    std::string canonical = std::filesystem::canonical(out.path, ec).string();
    if (ec || allowlist.count(canonical) == 0) {
      return absl::PermissionDeniedError(absl::StrCat(
          "worker command '", spec.command(), "' (", ec ? out.path : canonical,
          ") is not in this agent's worker allowlist"));
    }
  }
  if (!spec.user().empty() || !spec.group().empty()) {
    std::string user =
        spec.user().empty() ? std::to_string(::geteuid()) : spec.user();
    ASSIGN_OR_RETURN(out.credentials, ResolveCredentials(user, spec.group()));
  }
  return out;
}

std::vector<Shard*> Listener::Live() const {
  std::vector<Shard*> out;
  for (const auto& s : shards) {
    if (!s->draining()) out.push_back(s.get());
  }
  return out;
}

Shard* Listener::Find(uint32_t index) const {
  for (const auto& s : shards) {
    if (s->index == index) return s.get();
  }
  return nullptr;
}

std::string Listener::Name(const Shard& shard) const {
  return absl::StrCat("listener ", spec.name(), " shard ", shard.index);
}

void FleetContext::Emit(v1::EventType type, const Listener& listener, int shard,
                        pid_t pid, std::string message) const {
  Emit(type, listener.spec.name(), shard, pid, std::move(message));
}

void FleetContext::Emit(v1::EventType type, const std::string& listener,
                        int shard, pid_t pid, std::string message) const {
  if (!sink) return;
  sink(FleetEvent{.type = type,
                  .time = Now(),
                  .listener = listener,
                  .shard = shard,
                  .pid = pid,
                  .message = std::move(message)});
}

absl::StatusOr<Fd> CreateListenerSocket(const Listener& listener) {
  ShardSocketOptions options{
      .backlog = static_cast<int>(EffectiveBacklog(listener.spec)),
      .defer_accept_seconds =
          static_cast<int>(listener.spec.defer_accept_seconds())};
  return CreateShardSocket(listener.address, options);
}

int PinnedCpu(const v1::Steering& steering, uint32_t index,
              const std::vector<int>& cpus) {
  if (steering.policy() != v1::STEERING_POLICY_CPU || cpus.empty()) return -1;
  return cpus[index % cpus.size()];
}

SteeringTables PlanBaselineTables(const Listener& listener) {
  const v1::Steering& st = listener.spec.steering();
  SteeringTables tables;
  tables.policy = st.policy() == v1::STEERING_POLICY_UNSPECIFIED
                      ? v1::STEERING_POLICY_HASH
                      : st.policy();
  uint32_t n = listener.shards.empty() ? 0 : listener.shards.back()->index + 1;
  tables.num_shards = n;
  tables.weights.assign(n, 0);
  tables.shard_cpus.assign(n, -1);
  // Weights in the spec apply to the live shards in index order.
  int live = 0;
  for (const auto& shard : listener.shards) {
    if (shard->draining() || !shard->in_service) continue;
    uint32_t w = 1;
    if (st.weights_size() > 0) {
      w = live < st.weights_size() ? st.weights(live) : 0;
    }
    live++;
    if (!shard->Steered()) continue;
    tables.weights[shard->index] = w;
    tables.shard_cpus[shard->index] = shard->cpu;
  }
  return tables;
}

SteeringTables PlanTables(const Listener& listener) {
  SteeringTables tables = PlanBaselineTables(listener);
  const uint32_t n = tables.num_shards;
  if (tables.policy == v1::STEERING_POLICY_CPU) {
    // The spill table: the rebalancer's slots of shards that take new
    // connections; none left (e.g. the cold shard was ejected) = baseline.
    std::vector<uint32_t> table(n, 0);
    bool any = false;
    for (const auto& [index, slots] : listener.rebalance_slots) {
      if (index < n && tables.weights[index] > 0 && slots > 0) {
        table[index] = slots;
        any = true;
      }
    }
    if (any) tables.table_weights = std::move(table);
    for (const auto& [cpu, share] : listener.rebalance_spill) {
      if (cpu < 0 || share == 0) continue;
      if (tables.cpu_spill.size() <= static_cast<size_t>(cpu)) {
        tables.cpu_spill.resize(cpu + 1, 0);
      }
      tables.cpu_spill[cpu] = share;
    }
    return tables;
  }
  // The rebalancer's slots, while they cover every steered shard.
  if (!listener.rebalance_slots.empty()) {
    std::vector<uint32_t> slots(n, 0);
    bool covered = true;
    for (const auto& shard : listener.shards) {
      if (!shard->Steered() || tables.weights[shard->index] == 0) continue;
      auto it = listener.rebalance_slots.find(shard->index);
      if (it == listener.rebalance_slots.end() || it->second == 0) {
        covered = false;
        break;
      }
      slots[shard->index] = it->second;
    }
    if (covered) tables.weights = std::move(slots);
  }
  return tables;
}

absl::Status WriteConnectionCounts(const Listener& listener) {
  if (!listener.steering) return absl::OkStatus();
  std::vector<uint64_t> counts(
      listener.shards.empty() ? 0 : listener.shards.back()->index + 1, 0);
  for (const auto& shard : listener.shards) {
    // Connections waiting in its accept queue count too: a shard whose
    // worker died, restarts or is stuck must not look empty.
    counts[shard->index] =
        shard->load.connections() + shard->health.last_depth.value_or(0);
  }
  return listener.steering->SetConnectionCounts(counts);
}

absl::Status ApplySteering(Listener& listener) {
  if (!listener.steering) return absl::OkStatus();
  SteeringTables tables = PlanTables(listener);
  if (tables.policy == v1::STEERING_POLICY_LEAST_CONNECTIONS) {
    // From the counts measured last, not from whatever the map held.
    if (absl::Status s = WriteConnectionCounts(listener); !s.ok()) {
      PF_LOG(WARNING) << "listener " << listener.spec.name()
                      << ": least-connections steering starts from the "
                         "previous counts: "
                      << s.message();
    }
  }
  bool any = false;
  for (uint32_t w : tables.weights) any = any || w > 0;
  if (!any) return absl::OkStatus();  // nothing to steer to (deleting)
  return Annotate(listener.steering->Apply(tables),
                  absl::StrCat("listener ", listener.spec.name(),
                               ": writing steering tables"));
}

}  // namespace portfleet
