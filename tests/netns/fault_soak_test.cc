// A randomized, seeded fault soak (issue 9): under continuous load, a random
// sequence of scale, drain, steer, rollout, worker SIGKILL and SIGSTOP, agent
// SIGKILL and restart, a full state disk, and a takeover by a second agent
// (--takeover, as a surge upgrade does); after every step the
// invariants are checked:
//   - no client connection failed (a SIGKILLed worker may lose the few
//     connections it had accepted; that step allows 3);
//   - the agent holds as many fds as the last time it ran that many shards
//     (no leak across cycles) and has no zombie child;
//   - the API's view is what exists: every shard's pid is alive and holds a
//     socket with the shard's inode, and no other worker serves;
//   - the state file says what the API says.
// Bounded: PORTFLEET_SOAK_SECONDS (default 60) and at most 200 steps. The
// seed is printed and taken from PORTFLEET_SOAK_SEED when set, so a failure
// can be replayed.
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <future>
#include <iostream>
#include <map>
#include <random>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/api/state_store.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

constexpr char kAddress[] = "127.0.0.1:8080";

std::string Spec() {
  return "listeners {\n  name: \"web\"\n  address: \"127.0.0.1:8080\"\n"
         "  shards: 2\n"
         "  worker { command: \"portfleet-worker\" args: \"--mode=http\" }\n"
         "  drain_timeout_seconds: 3\n}\n";
}

uint64_t SeedFromEnv() {
  const char* s = std::getenv("PORTFLEET_SOAK_SEED");
  uint64_t seed = 0;
  if (s != nullptr && absl::SimpleAtoi(s, &seed)) return seed;
  return static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
}

absl::Duration SoakDuration() {
  const char* s = std::getenv("PORTFLEET_SOAK_SECONDS");
  int seconds = 60;
  if (s != nullptr && !absl::SimpleAtoi(s, &seconds)) seconds = 60;
  return absl::Seconds(seconds);
}

// Socket inodes a process holds.
std::set<uint64_t> SocketInodesOf(pid_t pid) {
  std::set<uint64_t> out;
  for (int fd = 0; fd < 1024; ++fd) {
    absl::StatusOr<uint64_t> inode = SocketInode(pid, fd);
    if (inode.ok()) out.insert(*inode);
  }
  return out;
}

bool IsWorker(pid_t pid) {
  std::string cmd = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/cmdline"));
  return absl::StrContains(cmd, "portfleet-worker");
}

class Soak {
 public:
  explicit Soak(uint64_t seed) : rng_(seed) {}

  void Run(AgentHarness& agent, absl::Duration duration) {
    agent_ = &agent;
    stub_ = FleetStub(agent.api_socket());
    ASSERT_TRUE(Converged()) << agent.Log();
    absl::Time end = absl::Now() + duration;
    for (int step = 0; step < 200 && absl::Now() < end; ++step) {
      RunStep(step);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }

 private:
  enum class Action {
    kScale,
    kDrain,
    kSteer,
    kRollout,
    kKillWorker,
    kStopWorker,
    kRestartAgent,
    kFullDisk,
    kTakeover,
  };

  void RunStep(int step) {
    Action action = static_cast<Action>(rng_() % 9);
    loadgen::Options o;
    o.target = kAddress;
    o.rate = 200;
    o.duration = absl::Seconds(60);
    o.request_timeout = absl::Seconds(5);
    std::atomic<bool> stop{false};
    auto load =
        std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
    absl::SleepFor(absl::Milliseconds(100));
    int allowed_failures = 0;
    absl::Time started = absl::Now();
    std::string what = Do(action, &allowed_failures);
    SCOPED_TRACE(absl::StrCat("step ", step, ": ", what));
    bool converged = Converged();
    absl::Duration took = absl::Now() - started;
    absl::SleepFor(absl::Milliseconds(100));
    stop = true;
    absl::StatusOr<loadgen::Result> result = load.get();
    ASSERT_TRUE(result.ok()) << result.status();
    std::cout << "soak step " << step << ": " << what << " (converged in "
              << absl::Trunc(took, absl::Milliseconds(1)) << ") -> "
              << result->Summary() << "\n";
    ASSERT_TRUE(converged) << agent_->Log();
    ASSERT_LE(result->failures(), allowed_failures) << result->Summary() << "\n"
                                                    << agent_->Log();
    CheckInvariants();
  }

  std::string Do(Action action, int* allowed_failures) {
    std::vector<v1::Shard> shards = Shards(*stub_, "web");
    switch (action) {
      case Action::kScale: {
        uint32_t n = 1 + rng_() % 4;
        grpc::Status s = ScaleTo(*stub_, "web", n);
        return absl::StrCat("scale to ", n, " (", s.error_message(), ")");
      }
      case Action::kDrain: {
        if (shards.size() < 2) return "drain skipped (one shard)";
        uint32_t index = shards[rng_() % shards.size()].index();
        grpc::Status s = Drain(*stub_, "web", index);
        return absl::StrCat("drain shard ", index, " (", s.error_message(),
                            ")");
      }
      case Action::kSteer: {
        v1::SetSteeringRequest req;
        req.set_name("web");
        bool cpu = rng_() % 2 == 0;
        req.mutable_steering()->set_policy(cpu ? v1::STEERING_POLICY_CPU
                                               : v1::STEERING_POLICY_HASH);
        if (!cpu && rng_() % 2 == 0) {
          for (size_t i = 0; i < shards.size(); ++i) {
            req.mutable_steering()->add_weights(1 + rng_() % 3);
          }
        }
        v1::SetSteeringResponse resp;
        grpc::Status s = stub_->SetSteering(RpcContext().get(), req, &resp);
        return absl::StrCat("steer ", cpu ? "cpu" : "hash", " (",
                            s.error_message(), ")");
      }
      case Action::kRollout: {
        v1::RollOutListenerRequest req;
        req.set_name("web");
        req.mutable_worker()->add_args("--mode=http");
        req.mutable_worker()->add_args(
            absl::StrCat("--drain-timeout=", 2 + rng_() % 3, "s"));
        v1::RollOutListenerResponse resp;
        grpc::Status s =
            stub_->RollOutListener(RpcContext(60).get(), req, &resp);
        return absl::StrCat("rollout (", s.error_message(), ")");
      }
      case Action::kKillWorker: {
        if (shards.empty() || shards[0].pid() <= 0) return "kill skipped";
        pid_t pid = shards[rng_() % shards.size()].pid();
        ::kill(pid, SIGKILL);
        *allowed_failures = 3;  // what it had accepted
        return absl::StrCat("SIGKILL worker ", pid);
      }
      case Action::kStopWorker: {
        if (shards.size() < 2 || shards[0].pid() <= 0) return "stop skipped";
        pid_t pid = shards[rng_() % shards.size()].pid();
        ::kill(pid, SIGSTOP);
        absl::SleepFor(absl::Milliseconds(300));
        ::kill(pid, SIGCONT);
        return absl::StrCat("SIGSTOP/SIGCONT worker ", pid, " for 300ms");
      }
      case Action::kRestartAgent: {
        agent_->process().Signal(SIGKILL);
        agent_->process().Wait(absl::Seconds(5));
        EXPECT_TRUE(agent_->Restart().ok());
        stub_ = FleetStub(agent_->api_socket());
        fds_by_shards_.clear();  // a new process: new baselines
        return "SIGKILL and restart the agent";
      }
      case Action::kFullDisk: {
        std::string filler = agent_->state_dir() + "/filler";
        {
          std::ofstream f(filler);
          std::string block(4096, 'x');
          while (f.write(block.data(), block.size())) {
          }
        }
        grpc::Status s = ScaleTo(*stub_, "web", 1 + rng_() % 4);
        ::unlink(filler.c_str());
        EXPECT_TRUE(s.ok() ||
                    s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                    s.error_code() == grpc::StatusCode::FAILED_PRECONDITION)
            << s.error_message();
        return absl::StrCat("scale on a full disk (", s.error_message(), ")");
      }
      case Action::kTakeover: {
        absl::Status s = agent_->Takeover();
        EXPECT_TRUE(s.ok()) << s;
        stub_ = FleetStub(agent_->api_socket());
        fds_by_shards_.clear();  // a new process: new baselines
        return "takeover by a second agent";
      }
    }
    return "?";
  }

  // Every shard runs, is ready and no other worker process is left.
  bool Converged() {
    return WaitFor(
        [&] {
          std::vector<v1::Shard> shards = Shards(*stub_, "web");
          if (shards.empty()) return false;
          std::set<pid_t> serving;
          for (const v1::Shard& s : shards) {
            // A worker killed a moment ago may still be listed until the
            // agent has seen it die: wait for that too.
            if (s.state() != v1::SHARD_STATE_RUNNING || !s.ready() ||
                s.pid() <= 0 || !ProcessExists(s.pid())) {
              return false;
            }
            serving.insert(s.pid());
          }
          for (pid_t pid : ProcessesInMyNetns()) {
            if (IsWorker(pid) && serving.count(pid) == 0) return false;
          }
          return true;
        },
        absl::Seconds(30));
  }

  void CheckInvariants() {
    std::vector<v1::Shard> shards = Shards(*stub_, "web");
    // The API's view is what exists.
    for (const v1::Shard& s : shards) {
      EXPECT_TRUE(ProcessExists(s.pid())) << "shard " << s.index();
      EXPECT_EQ(SocketInodesOf(s.pid()).count(s.socket_inode()), 1u)
          << "shard " << s.index() << " pid " << s.pid()
          << " does not hold socket inode " << s.socket_inode();
    }
    // The state file says what the API says.
    absl::StatusOr<std::optional<v1::FleetSpec>> state =
        LoadFleetState(agent_->state_dir());
    ASSERT_TRUE(state.ok() && state->has_value()) << state.status();
    v1::GetListenerRequest req;
    req.set_name("web");
    v1::GetListenerResponse resp;
    ASSERT_TRUE(stub_->GetListener(RpcContext().get(), req, &resp).ok());
    ASSERT_EQ((*state)->listeners_size(), 1);
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equivalent(
        (*state)->listeners(0), resp.listener().spec()))
        << (*state)->listeners(0).DebugString() << "\nAPI:\n"
        << resp.listener().spec().DebugString();
    // No leak across cycles, no zombie.
    EXPECT_TRUE(ZombieChildren(agent_->pid()).empty());
    int fds = CountFds(agent_->pid());
    const auto inserted = fds_by_shards_.emplace(shards.size(), fds);
    if (!inserted.second) {
      const int earlier = inserted.first->second;
      EXPECT_TRUE(WaitFor([&] { return CountFds(agent_->pid()) == earlier; },
                          absl::Seconds(5)))
          << "agent fds with " << shards.size()
          << " shards: " << CountFds(agent_->pid()) << ", earlier " << earlier;
    }
  }

  std::mt19937_64 rng_;
  AgentHarness* agent_ = nullptr;
  std::unique_ptr<v1::FleetService::Stub> stub_;
  std::map<size_t, int> fds_by_shards_;
};

TEST(FaultSoakTest, RandomFaultsUnderLoadKeepEveryInvariant) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  // A private mount namespace: the state dir is a small tmpfs that the
  // full-disk step fills.
  ASSERT_EQ(::unshare(CLONE_NEWNS), 0) << strerror(errno);
  ASSERT_EQ(::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr), 0);
  uint64_t seed = SeedFromEnv();
  std::cout << "soak seed " << seed << " (replay: PORTFLEET_SOAK_SEED=" << seed
            << ")\n";
  SCOPED_TRACE(absl::StrCat("PORTFLEET_SOAK_SEED=", seed));
  AgentHarness agent;
  ::mkdir(agent.state_dir().c_str(), 0700);
  ASSERT_EQ(::mount("tmpfs", agent.state_dir().c_str(), "tmpfs", 0,
                    "size=1m,mode=0700"),
            0);
  ASSERT_TRUE(agent.Start(Spec()).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  Soak soak(seed);
  soak.Run(agent, SoakDuration());
  agent.process().Signal(SIGTERM);
  agent.process().Wait(absl::Seconds(15));
  ::umount2(agent.state_dir().c_str(), MNT_DETACH);
}

}  // namespace
}  // namespace portfleet::testing
