// Helpers shared by the lifecycle tests and the lifecycle benchmark: a gRPC
// stub on the agent's API socket, shard listings, the migrated counter, and
// the leak checks (fds, zombies). Header-only on purpose: every user already
// links portfleet_api and portfleet_testing.
#ifndef PORTFLEET_TESTS_LOADGEN_FLEET_TESTING_H_
#define PORTFLEET_TESTS_LOADGEN_FLEET_TESTING_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/process.h"

namespace portfleet::testing {

inline std::unique_ptr<v1::FleetService::Stub> FleetStub(
    const std::string& api_socket) {
  auto channel = grpc::CreateChannel("unix://" + api_socket,
                                     grpc::InsecureChannelCredentials());
  channel->WaitForConnected(std::chrono::system_clock::now() +
                            std::chrono::seconds(10));
  return v1::FleetService::NewStub(channel);
}

inline std::unique_ptr<grpc::ClientContext> RpcContext(int seconds = 30) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::seconds(seconds));
  return ctx;
}

inline grpc::Status ScaleTo(v1::FleetService::Stub& stub,
                            const std::string& name, uint32_t shards) {
  v1::ScaleListenerRequest req;
  req.set_name(name);
  req.set_shards(shards);
  v1::ScaleListenerResponse resp;
  return stub.ScaleListener(RpcContext().get(), req, &resp);
}

inline grpc::Status Drain(v1::FleetService::Stub& stub, const std::string& name,
                          uint32_t index) {
  v1::DrainShardRequest req;
  req.set_name(name);
  req.set_index(index);
  v1::DrainShardResponse resp;
  return stub.DrainShard(RpcContext().get(), req, &resp);
}

inline std::vector<v1::Shard> Shards(v1::FleetService::Stub& stub,
                                     const std::string& name) {
  v1::ListShardsRequest req;
  req.set_name(name);
  v1::ListShardsResponse resp;
  if (!stub.ListShards(RpcContext().get(), req, &resp).ok()) return {};
  return {resp.shards().begin(), resp.shards().end()};
}

// Sum of the steering program's `migrated` counter over the listed shards.
// Counters live per shard slot in a map that outlives the shards, so a slot
// that is reused keeps counting from where it was.
inline uint64_t SumMigrated(v1::FleetService::Stub& stub,
                            const std::string& name) {
  uint64_t sum = 0;
  for (const v1::Shard& s : Shards(stub, name)) sum += s.counters().migrated();
  return sum;
}

// Number of shards that are running, ready and have a worker.
inline int ReadyShards(v1::FleetService::Stub& stub, const std::string& name) {
  int n = 0;
  for (const v1::Shard& s : Shards(stub, name)) {
    if (s.ready() && s.pid() > 0 && s.state() == v1::SHARD_STATE_RUNNING) n++;
  }
  return n;
}

// Single-letter state from /proc/PID/stat ('Z' = zombie), or 0.
inline char ProcState(pid_t pid) {
  std::string stat = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/stat"));
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return 0;
  return stat[paren + 2];
}

// Children of `pid` that are zombies (exited, not reaped).
inline std::vector<pid_t> ZombieChildren(pid_t pid) {
  std::vector<pid_t> out;
  for (pid_t child : ChildrenOf(pid)) {
    if (ProcState(child) == 'Z') out.push_back(child);
  }
  return out;
}

// Raises the namespace's ephemeral port range so that a fast short-lived
// load does not run out of source ports (the sysctl is per namespace).
inline void WidenPortRange() {
  std::ofstream("/proc/sys/net/ipv4/ip_local_port_range") << "1024 65000\n";
}

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_LOADGEN_FLEET_TESTING_H_
