// Real-kernel tests of the steering program and its BPF backend, without the
// agent (kernel selftest style): each case runs in its own process and
// network namespace, creates SO_REUSEPORT listeners on loopback itself, and
// learns which shard got a connection by accepting on the shard sockets.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "agent/steering/steering.h"
#include "bpf/steering_shared.h"
#include "gtest/gtest.h"
#include "tests/testing/netns.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

using ::portfleet::testing::PrivilegedRequired;

struct Group {
  int family = AF_INET;
  uint16_t port = 0;
  std::vector<Fd> shards;
};

sockaddr_storage Loopback(int family, uint16_t port, socklen_t* len) {
  sockaddr_storage ss{};
  if (family == AF_INET) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&ss);
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    *len = sizeof(sockaddr_in);
  } else {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&ss);
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    sin6->sin6_addr = in6addr_loopback;
    *len = sizeof(sockaddr_in6);
  }
  return ss;
}

// n listening SO_REUSEPORT sockets on one loopback port.
Group MakeGroup(int family, int n, int backlog = 1024) {
  Group g;
  g.family = family;
  for (int i = 0; i < n; ++i) {
    Fd fd(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    EXPECT_TRUE(fd.valid()) << std::strerror(errno);
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    socklen_t len;
    sockaddr_storage ss = Loopback(family, g.port, &len);
    EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len), 0)
        << std::strerror(errno);
    EXPECT_EQ(::listen(fd.get(), backlog), 0) << std::strerror(errno);
    if (g.port == 0) {
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len);
      g.port = ntohs(family == AF_INET
                         ? reinterpret_cast<sockaddr_in*>(&ss)->sin_port
                         : reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    }
    g.shards.push_back(std::move(fd));
  }
  return g;
}

// A connected client socket, or an invalid Fd.
Fd Connect(const Group& g) {
  Fd fd(::socket(g.family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  socklen_t len;
  sockaddr_storage ss = Loopback(g.family, g.port, &len);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    return Fd();
  }
  return fd;
}

// Accepts one connection from any shard; returns the shard index or -1.
int AcceptAny(const Group& g, int timeout_ms = 2000) {
  std::vector<pollfd> pfds;
  for (const Fd& s : g.shards) pfds.push_back({s.get(), POLLIN, 0});
  if (::poll(pfds.data(), pfds.size(), timeout_ms) <= 0) return -1;
  for (size_t i = 0; i < g.shards.size(); ++i) {
    if (!g.shards[i].valid()) continue;
    Fd c(::accept4(g.shards[i].get(), nullptr, nullptr,
                   SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (c) return static_cast<int>(i);
  }
  return -1;
}

// Connects `count` times and tallies which shard accepted each connection
// (-1 entries = failures).
std::vector<int> ConnectAndTally(const Group& g, int count) {
  std::vector<int> tally(g.shards.size() + 1, 0);
  for (int i = 0; i < count; ++i) {
    Fd c = Connect(g);
    int shard = c ? AcceptAny(g) : -1;
    ++tally[shard < 0 ? g.shards.size() : shard];
  }
  return tally;
}

class SteeringKernelTest : public ::testing::Test {
 protected:
  // Opens the backend on a private bpffs root; backend_ stays null when the
  // case is skipped (or failed under PORTFLEET_REQUIRE_PRIVILEGED=1).
  void Init() {
    root_ = absl::StrCat("/sys/fs/bpf/portfleet-test-", ::getpid());
    auto backend = OpenBpfSteering(root_);
    if (!backend.ok()) {
      if (PrivilegedRequired()) FAIL() << backend.status();
      GTEST_SKIP() << "BPF steering unavailable: " << backend.status();
    }
    backend_ = std::move(*backend);
  }

  void TearDown() override {
    if (!root_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(root_, ec);
    }
  }

  // Opens `name`, attaches to the group and fills the sockarray.
  std::unique_ptr<ListenerSteering> Open(const Group& g,
                                         const std::string& name = "web") {
    auto l = backend_->OpenListener(name);
    EXPECT_TRUE(l.ok()) << l.status();
    if (!l.ok()) return nullptr;
    EXPECT_TRUE((*l)->AttachTo(g.shards[0].get()).ok());
    for (size_t i = 0; i < g.shards.size(); ++i) {
      absl::Status s = (*l)->SetShardSocket(i, g.shards[i].get());
      EXPECT_TRUE(s.ok()) << s;
    }
    return std::move(*l);
  }

  // Open() with LEAST_CONNECTIONS over all of the group's shards.
  std::unique_ptr<ListenerSteering> OpenLeastConnections(const Group& g) {
    auto steering = Open(g);
    if (steering == nullptr) return nullptr;
    absl::Status s =
        steering->Apply({.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                         .num_shards = static_cast<uint32_t>(g.shards.size())});
    EXPECT_TRUE(s.ok()) << s;
    return s.ok() ? std::move(steering) : nullptr;
  }

  std::string root_;
  std::unique_ptr<SteeringBackend> backend_;
};

void PinToCpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ASSERT_EQ(::sched_setaffinity(0, sizeof(set), &set), 0);
}

TEST_F(SteeringKernelTest, CpuPolicyTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  cpu_set_t allowed;
  ASSERT_EQ(::sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  if (cpus.size() < 2) PF_SKIP_OR_FAIL("needs 2 usable CPUs");
  Group g = MakeGroup(AF_INET, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  // Shard i pinned to cpus[i].
  absl::Status s = steering->Apply(
      {.policy = v1::STEERING_POLICY_CPU, .shard_cpus = {cpus[0], cpus[1]}});
  ASSERT_TRUE(s.ok()) << s;
  for (int i = 0; i < 2; ++i) {
    auto before = steering->ReadCounters();
    ASSERT_TRUE(before.ok()) << before.status();
    std::vector<int> tally;
    std::thread client([&] {
      PinToCpu(cpus[i]);
      tally = ConnectAndTally(g, 500);
    });
    client.join();
    EXPECT_EQ(tally[i], 500) << "client on CPU " << cpus[i];
    EXPECT_EQ(tally[1 - i], 0);
    EXPECT_EQ(tally[2], 0) << "failed connections";
    auto after = steering->ReadCounters();
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_EQ((*after)[i].selected - (*before)[i].selected, 500u);
    EXPECT_EQ((*after)[1 - i].selected, (*before)[1 - i].selected);
    EXPECT_EQ((*after)[i].fallback, 0u);
  }
}

// The first two CPUs of the affinity mask (shard i is pinned to cpus[i]).
std::vector<int> TwoAllowedCpus() {
  cpu_set_t allowed;
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  return cpus;
}

// `count` connections from a thread pinned to `cpu`, tallied by shard.
std::vector<int> TallyFromCpu(const Group& g, int cpu, int count) {
  std::vector<int> tally;
  std::thread client([&] {
    PinToCpu(cpu);
    tally = ConnectAndTally(g, count);
  });
  client.join();
  return tally;
}

// Steps:
// 1. CPU policy, shard i on cpus[i]; the indirection table names shard 1
//    only; cpus[0] spills 128 of 256.
// 2. From cpus[0]: about half of 2000 connections spill to shard 1, the
//    rest stay on shard 0; none fails.
// 3. From cpus[1]: all on shard 1 (no spill there).
// 4. Spill 0 again: everything from cpus[0] on shard 0 (today's behaviour).
TEST_F(SteeringKernelTest, CpuSpillTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  const std::vector<int> cpus = TwoAllowedCpus();
  if (cpus.size() < 2) PF_SKIP_OR_FAIL("needs 2 usable CPUs");
  Group g = MakeGroup(AF_INET, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  SteeringTables tables{.policy = v1::STEERING_POLICY_CPU,
                        .shard_cpus = {cpus[0], cpus[1]},
                        .table_weights = {0, 1}};
  tables.cpu_spill.assign(cpus[0] + 1, 0);
  tables.cpu_spill[cpus[0]] = 128;
  absl::Status s = steering->Apply(tables);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<int> tally = TallyFromCpu(g, cpus[0], 2000);
  EXPECT_EQ(tally[2], 0) << "failed connections";
  EXPECT_GT(tally[1], 850) << "spilled of 2000";
  EXPECT_LT(tally[1], 1150) << "spilled of 2000";
  EXPECT_EQ(tally[0] + tally[1], 2000);
  tally = TallyFromCpu(g, cpus[1], 500);
  EXPECT_EQ(tally[1], 500) << "CPU without spill keeps locality";
  EXPECT_EQ(tally[2], 0);
  auto counters = steering->ReadCounters();
  ASSERT_TRUE(counters.ok()) << counters.status();
  EXPECT_EQ((*counters)[0].fallback + (*counters)[1].fallback, 0u);

  tables.cpu_spill.clear();
  tables.table_weights.clear();
  ASSERT_TRUE(steering->Apply(tables).ok());
  tally = TallyFromCpu(g, cpus[0], 500);
  EXPECT_EQ(tally[0], 500);
  EXPECT_EQ(tally[2], 0);
}

TEST_F(SteeringKernelTest, HashWeightsThreeToOneTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  ASSERT_TRUE(steering->Apply({.weights = {3, 1}}).ok());
  std::vector<int> tally = ConnectAndTally(g, 4000);
  EXPECT_EQ(tally[2], 0) << "failed connections";
  const double share0 = 100.0 * tally[0] / 4000;
  EXPECT_NEAR(share0, 75.0, 5.0) << tally[0] << " / " << tally[1];
  auto counters = steering->ReadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_EQ((*counters)[0].selected, static_cast<uint64_t>(tally[0]));
  EXPECT_EQ((*counters)[1].selected, static_cast<uint64_t>(tally[1]));
}

TEST_F(SteeringKernelTest, HashWeightsOneToZeroTcpV6) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET6, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  ASSERT_TRUE(steering->Apply({.weights = {1, 0}}).ok());
  std::vector<int> tally = ConnectAndTally(g, 1000);
  EXPECT_EQ(tally[0], 1000);
  EXPECT_EQ(tally[1], 0);
  EXPECT_EQ(tally[2], 0);
}

// LEAST_CONNECTIONS: the program adds one per connection it steers, so a
// series of new connections spreads exactly (the kernel's hash would not),
// and the counts the agent writes are where it starts from.
TEST_F(SteeringKernelTest, LeastConnectionsSpreadsExactlyTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 3);
  auto steering = OpenLeastConnections(g);
  ASSERT_NE(steering, nullptr);
  std::vector<int> tally = ConnectAndTally(g, 300);
  EXPECT_EQ(tally[0], 100);
  EXPECT_EQ(tally[1], 100);
  EXPECT_EQ(tally[2], 100);
  EXPECT_EQ(tally[3], 0) << "failed connections";

  // The agent's measurement: shard 0 holds 90, shard 1 none, shard 2 30.
  ASSERT_TRUE(steering->SetConnectionCounts({90, 0, 30}).ok());
  tally = ConnectAndTally(g, 90);
  // 30 to shard 1 (30 each on 1 and 2), then 30 each on 1 and 2 (90 all).
  EXPECT_EQ(tally[0], 0);
  EXPECT_EQ(tally[1], 60);
  EXPECT_EQ(tally[2], 30);
  EXPECT_EQ(tally[3], 0);
  auto counters = steering->ReadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_EQ((*counters)[1].selected, 160u);
  EXPECT_EQ((*counters)[0].fallback + (*counters)[1].fallback +
                (*counters)[2].fallback,
            0u);
}

TEST_F(SteeringKernelTest, LeastConnectionsWeightedTcpV6) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET6, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  ASSERT_TRUE(steering
                  ->Apply({.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS,
                           .weights = {3, 1}})
                  .ok());
  std::vector<int> tally = ConnectAndTally(g, 400);
  EXPECT_NEAR(tally[0], 300, 1);
  EXPECT_NEAR(tally[1], 100, 1);
  EXPECT_EQ(tally[2], 0);
  // Back to HASH: the counts are no longer read.
  ASSERT_TRUE(steering->Apply({.weights = {0, 1}}).ok());
  tally = ConnectAndTally(g, 50);
  EXPECT_EQ(tally[1], 50);
}

TEST_F(SteeringKernelTest, TableSwitchUnderLoadTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 3);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  ASSERT_TRUE(steering->Apply({.num_shards = 3}).ok());
  std::atomic<bool> stop{false}, client_done{false};
  std::atomic<int> ok{0}, failed{0}, accepted{0};
  std::thread acceptor([&] {
    // Until the client has stopped and every connection it made is taken.
    while (!client_done.load() || accepted.load() < ok.load()) {
      if (AcceptAny(g, 50) >= 0) ++accepted;
    }
  });
  std::thread client([&] {
    while (!stop.load()) {
      Fd c = Connect(g);
      if (c) {
        ++ok;
      } else {
        ++failed;
      }
    }
    client_done = true;
  });
  for (int i = 0; i < 20; ++i) {
    SteeringTables t;
    if (i % 2 == 0) {
      t = {.policy = v1::STEERING_POLICY_CPU, .shard_cpus = {0, 1, 1}};
    } else {
      t = {.weights = {static_cast<uint32_t>(i), 1, 0}};
    }
    absl::Status s = steering->Apply(t);
    EXPECT_TRUE(s.ok()) << s;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  stop = true;
  client.join();
  acceptor.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(ok.load(), 100);
  EXPECT_EQ(accepted.load(), ok.load());
  auto none = steering->ReadUnattributedCounters();
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->fallback, 0u);
}

TEST_F(SteeringKernelTest, EmptySlotAndClosedSocketFallBackTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 3);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  ASSERT_TRUE(steering->Apply({.weights = {1, 1, 1}}).ok());
  // Empty slot: shard 1 leaves the sockarray but keeps its table slots.
  ASSERT_TRUE(steering->ClearShardSocket(1).ok());
  std::vector<int> tally = ConnectAndTally(g, 300);
  EXPECT_EQ(tally[3], 0) << "failed connections";
  auto counters = steering->ReadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_GT((*counters)[1].fallback, 0u);
  EXPECT_EQ((*counters)[1].selected, 0u);
  // Closed socket: shard 2 closes (the kernel empties its slot).
  g.shards[2].Reset();
  const uint64_t before = (*counters)[2].fallback;
  tally = ConnectAndTally(g, 300);
  EXPECT_EQ(tally[3], 0) << "failed connections";
  counters = steering->ReadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_GT((*counters)[2].fallback, before);
}

TEST_F(SteeringKernelTest, NoTablesYetFallsBack) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  std::vector<int> tally = ConnectAndTally(g, 100);
  EXPECT_EQ(tally[2], 0);
  auto none = steering->ReadUnattributedCounters();
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->fallback, 100u);
}

void CheckMigration(SteeringKernelTest* t, ListenerSteering* steering,
                    Group& g) {
  ASSERT_TRUE(steering->Apply({.weights = {1, 0}}).ok());
  constexpr int kQueued = 32;
  std::vector<Fd> clients;
  for (int i = 0; i < kQueued; ++i) {
    Fd c = Connect(g);
    ASSERT_TRUE(c.valid()) << std::strerror(errno);
    clients.push_back(std::move(c));
  }
  // Nothing on shard 1 yet.
  Fd none(::accept4(g.shards[1].get(), nullptr, nullptr, SOCK_NONBLOCK));
  ASSERT_FALSE(none.valid());
  auto before = steering->ReadCounters();
  ASSERT_TRUE(before.ok());
  ASSERT_EQ(::shutdown(g.shards[0].get(), SHUT_RDWR), 0);
  int moved = 0;
  for (int i = 0; i < kQueued; ++i) {
    pollfd p{g.shards[1].get(), POLLIN, 0};
    if (::poll(&p, 1, 1000) <= 0) break;
    Fd c(::accept4(g.shards[1].get(), nullptr, nullptr, SOCK_NONBLOCK));
    if (!c) break;
    ++moved;
  }
  EXPECT_EQ(moved, kQueued);
  auto after = steering->ReadCounters();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ((*after)[1].migrated - (*before)[1].migrated,
            static_cast<uint64_t>(kQueued));
}

TEST_F(SteeringKernelTest, ShutdownMigratesQueueTcpV4) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  CheckMigration(this, steering.get(), g);
}

TEST_F(SteeringKernelTest, ShutdownMigratesQueueTcpV6) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET6, 2);
  auto steering = Open(g);
  ASSERT_NE(steering, nullptr);
  CheckMigration(this, steering.get(), g);
}

TEST_F(SteeringKernelTest, PinnedMapsSurviveAndAreReused) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 2);
  {
    auto first = Open(g);
    ASSERT_NE(first, nullptr);
    ASSERT_TRUE(first->Apply({.weights = {0, 1}}).ok());
  }  // the agent's objects are gone; the group keeps the program
  std::vector<int> tally = ConnectAndTally(g, 200);
  EXPECT_EQ(tally[1], 200);
  // A new instance on the pinned maps, attached again, without Apply.
  auto second = backend_->OpenListener("web");
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE((*second)->AttachTo(g.shards[0].get()).ok());
  tally = ConnectAndTally(g, 200);
  EXPECT_EQ(tally[1], 200);
  auto counters = (*second)->ReadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_EQ((*counters)[1].selected, 400u);
  ASSERT_TRUE((*second)->RemovePins().ok());
  EXPECT_FALSE(std::filesystem::exists(root_ + "/web"));
}

// The upgrade path: a pin directory from an agent before the spill map
// (the four maps of unchanged layout, no "spill") is reused as it is.
// Steps:
// 1. An "old" instance pins its maps, applies CPU steering and goes; the
//    "spill" pin is removed, so the directory is what an older agent left.
// 2. While a client connects all the time, a new instance opens the
//    directory (reusing the four maps, creating and pinning "spill"),
//    attaches, and writes spill tables; no connection fails.
// 3. The counters carried on (the maps were reused, not recreated), and
//    the spill works.
TEST_F(SteeringKernelTest, PinsOfAnAgentWithoutSpillAreUpgradedInPlace) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  const std::vector<int> cpus = TwoAllowedCpus();
  if (cpus.size() < 2) PF_SKIP_OR_FAIL("needs 2 usable CPUs");
  Group g = MakeGroup(AF_INET, 2);
  SteeringTables tables{.policy = v1::STEERING_POLICY_CPU,
                        .shard_cpus = {cpus[0], cpus[1]}};
  {
    auto old = Open(g);
    ASSERT_NE(old, nullptr);
    ASSERT_TRUE(old->Apply(tables).ok());
  }
  const std::string spill_pin = root_ + "/web/spill";
  ASSERT_EQ(::unlink(spill_pin.c_str()), 0) << std::strerror(errno);
  // Nor the maps that came after it.
  for (const char* later : {"least", "conns"}) {
    const std::string pin = absl::StrCat(root_, "/web/", later);
    ASSERT_EQ(::unlink(pin.c_str()), 0) << pin << ": " << std::strerror(errno);
  }
  std::vector<int> tally = TallyFromCpu(g, cpus[0], 100);
  EXPECT_EQ(tally[0], 100);

  // Connections all along the upgrade.
  std::atomic<bool> stop{false};
  std::atomic<int> made{0}, failed{0};
  std::thread client([&] {
    PinToCpu(cpus[0]);
    while (!stop) {
      Fd c = Connect(g);
      if (!c) {
        ++failed;
        continue;
      }
      ++made;
    }
  });
  // Accept everything the client makes (so that no queue overflows).
  std::thread acceptor([&] {
    while (!stop) AcceptAny(g, 50);
  });
  while (made < 200) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto upgraded = backend_->OpenListener("web");
  ASSERT_TRUE(upgraded.ok()) << upgraded.status();
  EXPECT_TRUE(std::filesystem::exists(spill_pin));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/web/least"));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/web/conns"));
  ASSERT_TRUE((*upgraded)->AttachTo(g.shards[0].get()).ok());
  tables.table_weights = {0, 1};
  tables.cpu_spill.assign(cpus[0] + 1, 0);
  tables.cpu_spill[cpus[0]] = 128;
  ASSERT_TRUE((*upgraded)->Apply(tables).ok());
  const int at_upgrade = made;
  while (made < at_upgrade + 200) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  stop = true;
  client.join();
  acceptor.join();
  EXPECT_EQ(failed, 0);
  while (AcceptAny(g, 100) >= 0) {
  }

  auto counters = (*upgraded)->ReadCounters();
  ASSERT_TRUE(counters.ok()) << counters.status();
  // The 100 before the upgrade are still counted: the maps were reused.
  EXPECT_GE((*counters)[0].selected, 100u + 200u);
  tally = TallyFromCpu(g, cpus[0], 1000);
  EXPECT_EQ(tally[2], 0);
  EXPECT_GT(tally[1], 400) << "spilled of 1000";
  EXPECT_LT(tally[1], 600) << "spilled of 1000";
  // Reopening again finds all seven maps.
  auto again = backend_->OpenListener("web");
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE((*again)->RemovePins().ok());
  EXPECT_FALSE(std::filesystem::exists(root_ + "/web"));
}

TEST_F(SteeringKernelTest, IncompatiblePinIsFailedPrecondition) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  {
    auto l = backend_->OpenListener("bad");
    ASSERT_TRUE(l.ok()) << l.status();
  }
  const std::string path = root_ + "/bad/generations";
  ASSERT_EQ(::unlink(path.c_str()), 0);
  int fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, "generations", 4, 4, 2, nullptr);
  ASSERT_GE(fd, 0) << std::strerror(-fd);
  Fd map(fd);
  ASSERT_EQ(bpf_obj_pin(map.get(), path.c_str()), 0);
  auto l = backend_->OpenListener("bad");
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string msg(l.status().message());
  EXPECT_NE(msg.find("'generations'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("value size 4"), std::string::npos) << msg;
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  // A missing map is reported the same way.
  ASSERT_EQ(::unlink((root_ + "/bad/counters").c_str()), 0);
  ASSERT_EQ(::unlink(path.c_str()), 0);
  l = backend_->OpenListener("bad");
  EXPECT_EQ(l.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(l.status().message().find("missing"), absl::string_view::npos)
      << l.status();
}

TEST_F(SteeringKernelTest, RejectsNonListeningSocket) {
  PF_ENTER_NETNS_OR_SKIP();
  Init();
  if (!backend_) return;
  auto l = backend_->OpenListener("web");
  ASSERT_TRUE(l.ok()) << l.status();
  Fd udp(::socket(AF_INET, SOCK_DGRAM, 0));
  absl::Status s = (*l)->SetShardSocket(0, udp.get());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  Fd tcp(::socket(AF_INET, SOCK_STREAM, 0));
  s = (*l)->SetShardSocket(0, tcp.get());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("SO_ACCEPTCONN"), absl::string_view::npos) << s;
  EXPECT_EQ((*l)->SetShardSocket(64, tcp.get()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*l)->Apply({.weights = {0, 0}}).code(),
            absl::StatusCode::kInvalidArgument);
}

// Returns EPERM for bpf() and allows everything else, like a container
// runtime's default seccomp profile for a process without CAP_SYS_ADMIN.
bool DenyBpfWithSeccomp() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_bpf, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
  return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         ::syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) == 0;
}

// The agent's capabilities where it is deployed (the DaemonSet, the systemd
// unit): CAP_BPF without CAP_PERFMON or CAP_SYS_ADMIN. The verifier then
// also checks every speculative path (Spectre), and rejects programs that
// load as root: an open-coded 64-step least-connections scan did (ENOMEM,
// "too complex"), which only the deploy tier noticed. Steps: drop both
// capabilities from this test process; the program loads; LEAST_CONNECTIONS
// steers 100 connections 50/50.
TEST_F(SteeringKernelTest, ProgramLoadsWithoutPerfmonOrSysAdmin) {
  PF_ENTER_NETNS_OR_SKIP();
  __user_cap_header_struct header{.version = _LINUX_CAPABILITY_VERSION_3,
                                  .pid = 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  ASSERT_EQ(::syscall(SYS_capget, &header, data), 0) << std::strerror(errno);
  for (int cap : {CAP_SYS_ADMIN, CAP_PERFMON}) {
    data[cap / 32].effective &= ~(1u << (cap % 32));
    data[cap / 32].permitted &= ~(1u << (cap % 32));
    data[cap / 32].inheritable &= ~(1u << (cap % 32));
  }
  ASSERT_EQ(::syscall(SYS_capset, &header, data), 0) << std::strerror(errno);
  Init();
  if (!backend_) return;
  Group g = MakeGroup(AF_INET, 2);
  auto steering = OpenLeastConnections(g);
  ASSERT_NE(steering, nullptr);
  std::vector<int> tally = ConnectAndTally(g, 100);
  EXPECT_EQ(tally[0], 50);
  EXPECT_EQ(tally[1], 50);
  EXPECT_EQ(tally[2], 0);
}

// With CAP_BPF in the effective set but bpf() refused by a seccomp filter,
// the error says so (instead of "needs CAP_BPF"). The filter is installed in
// a child process, which reports the error over a pipe.
TEST_F(SteeringKernelTest, SeccompRefusingBpfIsNamed) {
#if !defined(__x86_64__)
  GTEST_SKIP() << "the test's seccomp filter is written for x86-64";
#endif
  Init();
  if (!backend_) return;
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  Fd read_end(pipe_fds[0]), write_end(pipe_fds[1]);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::string out = "filter not installed";
    if (DenyBpfWithSeccomp()) {
      auto backend = OpenBpfSteering(root_ + "-seccomp");
      out = backend.ok() ? "opened" : std::string(backend.status().message());
    }
    ssize_t unused = ::write(write_end.get(), out.data(), out.size());
    (void)unused;
    ::_exit(0);
  }
  write_end.Reset();
  std::string got;
  char buf[1024];
  for (ssize_t n; (n = ::read(read_end.get(), buf, sizeof(buf))) > 0;) {
    got.append(buf, static_cast<size_t>(n));
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_NE(got.find("CAP_BPF is in the effective set, but a seccomp filter "
                     "refused bpf()"),
            std::string::npos)
      << got;
  EXPECT_EQ(got.find("needs CAP_BPF"), std::string::npos) << got;
}

}  // namespace
}  // namespace portfleet
