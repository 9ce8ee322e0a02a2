// BPF steering driven through the real agent: policies from the spec and the
// API, steering that outlives the agent, pinned-map compatibility, and the
// path without BPF privileges. Each case in its own network namespace; the
// shard that answered is read from the worker's reply.
#include <bpf/bpf.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <atomic>
#include <cerrno>
#include <fstream>
#include <map>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kAddress[] = "127.0.0.1:8080";

std::string Spec(const std::string& steering, int shards = 2) {
  return absl::StrCat(R"pb(listeners {
  name: "web"
  address: "127.0.0.1:8080"
  shards: )pb",
                      shards, R"pb(
  worker { command: "portfleet-worker" args: "--mode=http" }
  drain_timeout_seconds: 5
  steering { )pb",
                      steering, " }\n}\n");
}

std::unique_ptr<v1::FleetService::Stub> Stub(const AgentHarness& agent) {
  auto channel = grpc::CreateChannel("unix://" + agent.api_socket(),
                                     grpc::InsecureChannelCredentials());
  channel->WaitForConnected(std::chrono::system_clock::now() +
                            std::chrono::seconds(10));
  return v1::FleetService::NewStub(channel);
}

std::unique_ptr<grpc::ClientContext> Ctx() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::seconds(30));
  return ctx;
}

bool PinTo(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return ::sched_setaffinity(0, sizeof(set), &set) == 0;
}

void StartAndWait(AgentHarness& agent, const std::string& spec) {
  ASSERT_TRUE(agent.Start(spec).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(agent.WaitLog("ready", 2)) << agent.Log();
}

// The first two CPUs this process may run on (the agent inherits the mask
// and pins shard k to the k-th allowed CPU).
std::vector<int> FirstTwoAllowedCpus() {
  cpu_set_t allowed;
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  return cpus;
}

// "Cpus_allowed_list:" of /proc/PID/status, e.g. "1" or "0-3".
std::string CpusAllowedList(pid_t pid) {
  std::string status = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/status"));
  size_t at = status.find("Cpus_allowed_list:");
  if (at == std::string::npos) return "";
  size_t eol = status.find('\n', at);
  return std::string(absl::StripAsciiWhitespace(
      status.substr(at + 18, eol == std::string::npos ? eol : eol - at - 18)));
}

// Steps:
// 1. Two shards with the CPU policy: shard k is pinned to the k-th CPU the
//    test may use (its affinity mask, not literally CPUs 0 and 1).
// 2. Each worker's real affinity (/proc/PID/status) is that one CPU.
// 3. For each of those CPUs, a client thread pinned to it opens 500
//    connections; every answer comes from the shard pinned there; the
//    program's counters agree.
TEST(AgentSteeringTest, CpuPolicyKeepsConnectionsOnTheClientsCpu) {
  PF_ENTER_NETNS_OR_SKIP();
  const std::vector<int> cpus = FirstTwoAllowedCpus();
  if (cpus.size() < 2) {
    PF_SKIP_OR_FAIL("needs 2 CPUs in the affinity mask");
  }
  AgentHarness agent;
  StartAndWait(agent, Spec("policy: STEERING_POLICY_CPU"));
  ASSERT_THAT(agent.Log(), HasSubstr("BPF steering active"));
  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 2u) << agent.Log();
  for (int shard = 0; shard < 2; ++shard) {
    EXPECT_EQ(CpusAllowedList(workers[shard]), absl::StrCat(cpus[shard]))
        << "shard " << shard << " worker " << workers[shard];
  }
  for (int shard = 0; shard < 2; ++shard) {
    const int cpu = cpus[shard];
    Tally tally;
    std::thread client([&tally, cpu] {
      ASSERT_TRUE(PinTo(cpu));
      for (int i = 0; i < 500; ++i) tally.Add(HttpGet(kAddress));
    });
    client.join();
    EXPECT_EQ(tally.ok, 500) << tally.first_error;
    EXPECT_EQ(tally.by_shard[shard], 500) << "cpu " << cpu;
    EXPECT_EQ(tally.by_pid[workers[shard]], 500) << "cpu " << cpu;
  }
  auto stub = Stub(agent);
  v1::ListShardsRequest req;
  req.set_name("web");
  v1::ListShardsResponse resp;
  ASSERT_TRUE(stub->ListShards(Ctx().get(), req, &resp).ok());
  ASSERT_EQ(resp.shards_size(), 2);
  for (const auto& shard : resp.shards()) {
    // 500 from the test plus the readiness probes.
    EXPECT_GE(shard.counters().selected(), 500u) << shard.index();
    EXPECT_LE(shard.counters().selected(), 540u) << shard.index();
    EXPECT_EQ(shard.cpu(), cpus[shard.index()]);
  }
}

// Steps:
// 1. Two shards, HASH with weights 3:1.
// 2. 4,000 connections from varied source ports.
// 3. Shard 0 answered 75% ± 5 points.
TEST(AgentSteeringTest, HashWeightsThreeToOne) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  StartAndWait(agent, Spec("policy: STEERING_POLICY_HASH weights: [3, 1]"));
  Tally tally;
  for (int i = 0; i < 4000; ++i) tally.Add(HttpGet(kAddress));
  ASSERT_EQ(tally.ok, 4000) << tally.first_error;
  double share = tally.by_shard[0] / 4000.0;
  EXPECT_NEAR(share, 0.75, 0.05);
}

// Steps:
// 1. Two shards, HASH with equal weights.
// 2. SetSteering through the API: weights 1:3 (the way `portfleetctl steer
//    web --weights 1,3` sends it).
// 3. 4,000 connections: shard 1 answered 75% +- 5 points, measured from the
//    client side, not read back from the spec.
TEST(AgentSteeringTest, WeightsSetThroughTheApiAreMeasured) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  StartAndWait(agent, Spec("policy: STEERING_POLICY_HASH"));
  auto stub = Stub(agent);
  v1::SetSteeringRequest req;
  req.set_name("web");
  req.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  req.mutable_steering()->add_weights(1);
  req.mutable_steering()->add_weights(3);
  v1::SetSteeringResponse resp;
  grpc::Status s = stub->SetSteering(Ctx().get(), req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  Tally tally;
  for (int i = 0; i < 4000; ++i) tally.Add(HttpGet(kAddress));
  ASSERT_EQ(tally.ok, 4000) << tally.first_error;
  EXPECT_NEAR(tally.by_shard[1] / 4000.0, 0.75, 0.05);
}

// Steps:
// 1. Two shards, HASH with weights 1:0.
// 2. 500 connections: shard 1 receives none.
// 3. SIGKILL the agent: the workers and the program keep serving, still by
//    the table (shard 1 receives none).
// 4. Start the agent again: it re-adopts the running workers, reuses the
//    pinned maps, and the table still holds.
TEST(AgentSteeringTest, SteeringOutlivesAgentAndPinnedMapsAreReused) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  StartAndWait(agent, Spec("policy: STEERING_POLICY_HASH weights: [1, 0]"));
  Tally before;
  for (int i = 0; i < 500; ++i) before.Add(HttpGet(kAddress));
  EXPECT_EQ(before.ok, 500) << before.first_error;
  EXPECT_EQ(before.by_shard[1], 0);

  std::map<int, pid_t> workers = agent.WorkersByShard();
  agent.process().Signal(SIGKILL);
  agent.process().Wait(absl::Seconds(5));
  Tally orphaned;
  for (int i = 0; i < 500; ++i) orphaned.Add(HttpGet(kAddress));
  EXPECT_EQ(orphaned.ok, 500) << orphaned.first_error;
  EXPECT_EQ(orphaned.by_shard[1], 0);
  EXPECT_EQ(orphaned.by_pid[workers[0]], 500);

  std::atomic<bool> stop{false};
  Tally during;
  std::thread client([&] {
    while (!stop) during.Add(HttpGet(kAddress));
  });
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("re-adopted worker pid", 2)) << agent.Log();
  absl::SleepFor(absl::Milliseconds(200));
  stop = true;
  client.join();
  EXPECT_EQ(during.failed, 0) << during.first_error;
  EXPECT_EQ(agent.WorkersByShard().size(), 0u);  // not our children now
  for (const auto& [shard, pid] : workers) EXPECT_TRUE(ProcessExists(pid));

  Tally after;
  for (int i = 0; i < 500; ++i) after.Add(HttpGet(kAddress));
  EXPECT_EQ(after.ok, 500) << after.first_error;
  EXPECT_EQ(after.by_shard[1], 0);
  EXPECT_THAT(agent.Log(), HasSubstr("BPF steering active"));
}

// Steps:
// 1. A client connects continuously.
// 2. Switch policy and weights through the API 20 times.
// 3. The client saw no failure.
TEST(AgentSteeringTest, PolicyChangesUnderLoadLoseNothing) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  StartAndWait(agent, Spec("policy: STEERING_POLICY_HASH"));
  auto stub = Stub(agent);
  std::atomic<bool> stop{false};
  Tally tally;
  std::thread client([&] {
    while (!stop) tally.Add(HttpGet(kAddress));
  });
  for (int i = 0; i < 20; ++i) {
    v1::SetSteeringRequest req;
    req.set_name("web");
    if (i % 2 == 0) {
      req.mutable_steering()->set_policy(v1::STEERING_POLICY_CPU);
    } else {
      req.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
      req.mutable_steering()->add_weights(1 + i % 3);
      req.mutable_steering()->add_weights(i % 3 == 0 ? 0 : 2);
    }
    v1::SetSteeringResponse resp;
    grpc::Status s = stub->SetSteering(Ctx().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    absl::SleepFor(absl::Milliseconds(50));
  }
  stop = true;
  client.join();
  EXPECT_EQ(tally.failed, 0) << tally.first_error;
  EXPECT_GT(tally.ok, 100);
}

// A pinned map of the wrong shape is reported; the listener does not serve
// (it is retried), the agent does.
TEST(AgentSteeringTest, IncompatiblePinnedMapIsAClearError) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  // A first run leaves its pins behind; then one pin is swapped for a map of
  // the wrong value size.
  StartAndWait(agent, Spec("policy: STEERING_POLICY_HASH"));
  agent.process().Signal(SIGTERM);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(10)).has_value());
  std::string pin = agent.bpffs() + "/web/generations";
  ASSERT_EQ(::unlink(pin.c_str()), 0) << strerror(errno);
  Fd map(bpf_map_create(BPF_MAP_TYPE_ARRAY, "generations", 4, 4, 2, nullptr));
  ASSERT_TRUE(map.valid()) << strerror(errno);
  ASSERT_EQ(bpf_obj_pin(map.get(), pin.c_str()), 0);
  ASSERT_TRUE(agent.Restart().ok());
  ASSERT_TRUE(agent.WaitLog("listener web is not serving: ")) << agent.Log();
  EXPECT_TRUE(agent.process().running());
  EXPECT_THAT(agent.Log(), HasSubstr("generations"));
  EXPECT_THAT(agent.Log(), HasSubstr("value size 4"));
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kRefused);
}

// Steps:
// 1. Start the agent without CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN and
//    CAP_PERFMON (capsh).
// 2. It says once why BPF steering is unavailable and serves with the
//    kernel's reuseport hash.
// 3. A steering request fails with FAILED_PRECONDITION naming the reason.
TEST(AgentSteeringTest, WithoutBpfPrivilegesServesWithPlainReuseport) {
  PF_ENTER_NETNS_OR_SKIP();
  if (::access("/usr/sbin/capsh", X_OK) != 0) {
    PF_SKIP_OR_FAIL("capsh (libcap2-bin) is missing");
  }
  AgentHarness agent;
  std::string spec = agent.dir().WriteFile(
      "fleet.textproto", Spec("policy: STEERING_POLICY_HASH", 2));
  std::string cmd =
      absl::StrCat("exec ", BinaryPath("portfleet-agent"), " --config ", spec,
                   " --api unix://", agent.api_socket(), " --state-dir ",
                   agent.state_dir(), " --bpffs ", agent.bpffs());
  ASSERT_TRUE(
      agent.process()
          .Start({"/usr/sbin/capsh",
                  "--drop=cap_bpf,cap_sys_admin,cap_net_admin,cap_perfmon",
                  "--", "-c", cmd},
                 agent.dir().path() + "/agent.log")
          .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  EXPECT_EQ(CountOccurrences(agent.Log(), "BPF steering unavailable: "), 1)
      << agent.Log();
  EXPECT_THAT(agent.Log(), HasSubstr("kernel's reuseport hash"));
  Tally tally;
  for (int i = 0; i < 200; ++i) tally.Add(HttpGet(kAddress));
  EXPECT_EQ(tally.ok, 200) << tally.first_error;
  EXPECT_EQ(tally.by_shard.size(), 2u);

  auto stub = Stub(agent);
  v1::SetSteeringRequest req;
  req.set_name("web");
  req.mutable_steering()->set_policy(v1::STEERING_POLICY_CPU);
  v1::SetSteeringResponse resp;
  grpc::Status s = stub->SetSteering(Ctx().get(), req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("BPF steering is unavailable"));
}

// Starts the agent under capsh without the capabilities BPF needs.
void StartWithoutBpf(AgentHarness& agent, const std::string& spec_text) {
  std::string spec = agent.dir().WriteFile("fleet.textproto", spec_text);
  std::string cmd =
      absl::StrCat("exec ", BinaryPath("portfleet-agent"), " --config ", spec,
                   " --api unix://", agent.api_socket(), " --state-dir ",
                   agent.state_dir(), " --bpffs ", agent.bpffs());
  ASSERT_TRUE(
      agent.process()
          .Start({"/usr/sbin/capsh",
                  "--drop=cap_bpf,cap_sys_admin,cap_net_admin,cap_perfmon",
                  "--", "-c", cmd},
                 agent.dir().path() + "/agent.log")
          .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_THAT(agent.Log(), HasSubstr("BPF steering unavailable: "));
}

// Steps (once with net.ipv4.tcp_migrate_req=0, once with 1):
// 1. The agent without BPF, 2 shards on the kernel's reuseport hash.
// 2. Stop shard 1's worker; open 60 connections, each sends a request; wait
//    until the unanswered ones are those on shard 1's queue.
// 3. Drain shard 1: the agent shuts its socket down.
// 4. With tcp_migrate_req=1 every queued connection is answered by shard 0;
//    with 0 every one of them is reset (README: "Without BPF ... otherwise
//    connections still queued on it at that instant are reset").
class NoBpfDrainTest : public ::testing::TestWithParam<bool> {};

TEST_P(NoBpfDrainTest, DrainedQueueFollowsTcpMigrateReq) {
  const bool migrate = GetParam();
  PF_ENTER_NETNS_OR_SKIP();
  if (::access("/usr/sbin/capsh", X_OK) != 0) {
    PF_SKIP_OR_FAIL("capsh (libcap2-bin) is missing");
  }
  {
    std::ofstream f("/proc/sys/net/ipv4/tcp_migrate_req");
    f << (migrate ? "1\n" : "0\n");
    ASSERT_TRUE(f.good()) << "cannot set net.ipv4.tcp_migrate_req";
  }
  AgentHarness agent;
  ASSERT_NO_FATAL_FAILURE(
      StartWithoutBpf(agent, Spec("policy: STEERING_POLICY_HASH", 2)));
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 2; },
                      absl::Seconds(10)));
  auto stub = Stub(agent);
  const pid_t stopped = agent.WorkersByShard()[1];
  ASSERT_EQ(::kill(stopped, SIGSTOP), 0);

  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(kAddress);
  ASSERT_TRUE(addr.ok());
  const std::string request =
      "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  std::vector<Fd> conns;
  for (int i = 0; i < 60; ++i) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(fd.get(), addr->get(), addr->length), 0);
    ASSERT_EQ(::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(request.size()));
    conns.push_back(std::move(fd));
  }
  auto readable = [](int fd) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, 0) == 1;
  };
  std::vector<size_t> queued;
  uint32_t depth = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        queued.clear();
        for (size_t i = 0; i < conns.size(); ++i) {
          if (!readable(conns[i].get())) queued.push_back(i);
        }
        v1::ListShardsRequest req;
        req.set_name("web");
        v1::ListShardsResponse resp;
        if (!stub->ListShards(Ctx().get(), req, &resp).ok()) return false;
        for (const auto& sh : resp.shards()) {
          if (sh.index() == 1) depth = sh.queue_depth();
        }
        return !queued.empty() && depth == queued.size();
      },
      absl::Seconds(10)))
      << queued.size() << " unanswered, queue depth " << depth;

  v1::DrainShardRequest drain;
  drain.set_name("web");
  drain.set_index(1);
  v1::DrainShardResponse drained;
  std::thread drainer([&] {
    grpc::Status s = stub->DrainShard(Ctx().get(), drain, &drained);
    EXPECT_TRUE(s.ok()) << s.error_message();
  });
  // The shutdown decides every queued connection's fate at once: migrated
  // (answered by shard 0) or reset. Either way it becomes readable.
  EXPECT_TRUE(WaitFor(
      [&] {
        for (size_t i : queued) {
          if (!readable(conns[i].get())) return false;
        }
        return true;
      },
      absl::Seconds(10)));
  ::kill(stopped, SIGCONT);
  int answered = 0, reset = 0;
  for (size_t i : queued) {
    std::string raw;
    char buf[4096];
    ssize_t n;
    while ((n = ::recv(conns[i].get(), buf, sizeof(buf), MSG_DONTWAIT)) > 0) {
      raw.append(buf, n);
    }
    if (n < 0 && errno == ECONNRESET) reset++;
    if (absl::StartsWith(raw, "HTTP/1.1 200 ") &&
        absl::StrContains(raw, "shard=0 ")) {
      answered++;
    }
  }
  drainer.join();
  std::cout << queued.size() << " queued: " << answered
            << " answered by shard 0, " << reset << " reset\n";
  if (migrate) {
    EXPECT_EQ(answered, static_cast<int>(queued.size()));
    EXPECT_EQ(reset, 0);
  } else {
    EXPECT_EQ(reset, static_cast<int>(queued.size()));
    EXPECT_EQ(answered, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(TcpMigrateReq, NoBpfDrainTest,
                         ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? std::string("Migrated")
                                             : std::string("Reset");
                         });

}  // namespace
}  // namespace portfleet::testing
