// Hand-off of idle proxied pairs under the real agent, each case in its own
// network namespace. The test runs the upstream (an epoll echo server that
// counts the connections it accepts) and the clients; which worker holds a
// client's connection is read from the kernel: the proxy-side socket of the
// client's port (/proc/net/tcp) and the worker whose /proc/PID/fd holds it.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "ctl/ctl.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr int kPort = 8080;
const char kAddress[] = "127.0.0.1:8080";

// ---------------------------------------------------------------------------
// The upstream: echoes every byte back, with backpressure (it stops reading
// a connection while 256 KiB of its echo wait to be written).

class EchoUpstream {
 public:
  EchoUpstream() {
    listener_ =
        Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(
        ::bind(listener_.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)),
        0);
    EXPECT_EQ(::listen(listener_.get(), 1024), 0);
    socklen_t len = sizeof(sin);
    ::getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&sin), &len);
    port_ = ntohs(sin.sin_port);
    epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
    Watch(listener_.get(), EPOLLIN);
    thread_ = std::thread([this] { Loop(); });
  }
  ~EchoUpstream() {
    stop_ = true;
    thread_.join();
  }
  int port() const { return port_; }
  // Connections accepted since the start.
  int accepted() const { return accepted_; }

 private:
  static constexpr size_t kMaxPending = 256 * 1024;
  struct Conn {
    Fd fd;
    std::string out;
    size_t offset = 0;
    uint32_t interest = 0;
    size_t pending() const { return out.size() - offset; }
  };

  void Watch(int fd, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev);
  }

  void Loop() {
    epoll_event events[64];
    char buf[64 * 1024];
    while (!stop_) {
      int n = ::epoll_wait(epoll_.get(), events, 64, 50);
      for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        if (fd == listener_.get()) {
          for (;;) {
            int c = ::accept4(listener_.get(), nullptr, nullptr,
                              SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (c < 0) break;
            ++accepted_;
            auto conn = std::make_unique<Conn>();
            conn->fd = Fd(c);
            conn->interest = EPOLLIN;
            Watch(c, EPOLLIN);
            conns_[c] = std::move(conn);
          }
          continue;
        }
        auto it = conns_.find(fd);
        if (it == conns_.end()) continue;
        Conn& c = *it->second;
        bool gone = false;
        while (!gone && c.pending() < kMaxPending) {
          ssize_t r = ::recv(fd, buf, sizeof(buf), 0);
          if (r > 0) {
            c.out.append(buf, static_cast<size_t>(r));
          } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
            gone = true;
          } else if (errno == EAGAIN) {
            break;
          }
        }
        while (!gone && c.pending() > 0) {
          ssize_t w =
              ::send(fd, c.out.data() + c.offset, c.pending(), MSG_NOSIGNAL);
          if (w > 0) {
            c.offset += static_cast<size_t>(w);
          } else if (errno == EAGAIN) {
            break;
          } else if (errno != EINTR) {
            gone = true;
          }
        }
        if (gone) {
          conns_.erase(it);  // closing takes it out of the epoll set
          continue;
        }
        if (c.pending() == 0) {
          c.out.clear();
          c.offset = 0;
        }
        uint32_t want = (c.pending() < kMaxPending ? EPOLLIN : 0u) |
                        (c.pending() > 0 ? EPOLLOUT : 0u);
        if (want != c.interest) {
          epoll_event ev{};
          ev.events = want;
          ev.data.fd = fd;
          ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev);
          c.interest = want;
        }
      }
    }
  }

  Fd listener_;
  Fd epoll_;
  int port_ = 0;
  std::atomic<int> accepted_{0};
  std::atomic<bool> stop_{false};
  std::map<int, std::unique_ptr<Conn>> conns_;  // the loop thread's
  std::thread thread_;
};

// ---------------------------------------------------------------------------
// Clients: long-lived connections through the proxy.

// Seeded bytes, different for every connection and round.
std::string Chunk(uint64_t seed, size_t n) {
  std::string out(n, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[i] = static_cast<char>(x);
  }
  return out;
}

class Client {
 public:
  bool Open() {
    fd_ = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    timeval tv{.tv_sec = 10, .tv_usec = 0};
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(kPort);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      return false;
    }
    socklen_t len = sizeof(a);
    ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    return true;
  }
  int port() const { return port_; }
  int fd() const { return fd_.get(); }
  // Sends one chunk and reads its echo: "" when every byte came back
  // intact, else what went wrong.
  std::string RoundTrip(uint64_t seed, size_t size = 512) {
    const std::string out = Chunk(seed, size);
    if (::send(fd_.get(), out.data(), out.size(), MSG_NOSIGNAL) !=
        static_cast<ssize_t>(out.size())) {
      return absl::StrCat("send: ", std::strerror(errno));
    }
    return ReadBack(out);
  }
  // Reads exactly `expected` and compares.
  std::string ReadBack(const std::string& expected) {
    std::string in(expected.size(), '\0');
    size_t got = 0;
    while (got < in.size()) {
      ssize_t n = ::recv(fd_.get(), in.data() + got, in.size() - got, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) return "closed by the proxy";
      if (n < 0) return absl::StrCat("recv: ", std::strerror(errno));
      got += static_cast<size_t>(n);
    }
    return in == expected ? "" : "echo differs from what was sent";
  }

 private:
  Fd fd_;
  int port_ = 0;
};

// Every client does a round trip every 200 ms on a thread of its own.
class Checker {
 public:
  explicit Checker(std::vector<Client>* clients) : clients_(clients) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Checker() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int64_t rounds() const { return rounds_; }
  int64_t failures() const { return failures_; }
  std::string first_error() {
    std::lock_guard<std::mutex> lock(mu_);
    return first_error_;
  }

 private:
  void Loop() {
    uint64_t seed = 1000;
    while (!stop_) {
      const absl::Time round = absl::Now();
      for (size_t i = 0; i < clients_->size() && !stop_; ++i) {
        std::string error = (*clients_)[i].RoundTrip(++seed);
        if (error.empty()) {
          ++rounds_;
        } else if (failures_++ == 0) {
          std::lock_guard<std::mutex> lock(mu_);
          first_error_ = absl::StrCat("client ", i, ": ", error);
        }
      }
      absl::SleepFor(round + absl::Milliseconds(200) - absl::Now());
    }
  }

  std::vector<Client>* clients_;
  std::mutex mu_;
  std::string first_error_;
  std::atomic<int64_t> rounds_{0};
  std::atomic<int64_t> failures_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// ---------------------------------------------------------------------------
// The kernel's view.

// Inode of the proxy-side socket of each client connection, by the
// client's port: /proc/net/tcp rows with local port kPort.
std::map<int, uint64_t> ProxySideInodes() {
  std::map<int, uint64_t> out;
  std::string text = ReadFileOrEmpty("/proc/net/tcp");
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    std::vector<absl::string_view> f =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() < 10 || f[0] == "sl") continue;
    auto port = [](absl::string_view addr) {
      uint32_t p = 0;
      size_t colon = addr.find(':');
      if (colon == absl::string_view::npos ||
          !absl::SimpleHexAtoi(addr.substr(colon + 1), &p)) {
        return -1;
      }
      return static_cast<int>(p);
    };
    uint64_t inode = 0;
    if (port(f[1]) != kPort || !absl::SimpleAtoi(f[9], &inode) || inode == 0) {
      continue;
    }
    out[port(f[2])] = inode;
  }
  return out;
}

// Socket inodes held by `pid`.
std::vector<uint64_t> SocketInodes(pid_t pid) {
  std::vector<uint64_t> out;
  const std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    char target[128];
    ssize_t n = ::readlink(absl::StrCat(dir, "/", e->d_name).c_str(), target,
                           sizeof(target) - 1);
    if (n <= 0) continue;
    absl::string_view t(target, static_cast<size_t>(n));
    uint64_t inode = 0;
    if (absl::ConsumePrefix(&t, "socket:[") && absl::ConsumeSuffix(&t, "]") &&
        absl::SimpleAtoi(t, &inode)) {
      out.push_back(inode);
    }
  }
  ::closedir(d);
  return out;
}

int OpenFds(pid_t pid) {
  int n = 0;
  const std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return -1;
  while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
  ::closedir(d);
  return n;
}

// The worker pid holding each client's connection (0: none of `pids`).
std::vector<pid_t> Holders(const std::vector<Client>& clients,
                           const std::vector<pid_t>& pids) {
  std::map<uint64_t, pid_t> owner;
  for (pid_t pid : pids) {
    for (uint64_t inode : SocketInodes(pid)) owner[inode] = pid;
  }
  const std::map<int, uint64_t> inodes = ProxySideInodes();
  std::vector<pid_t> out;
  for (const Client& c : clients) {
    auto i = inodes.find(c.port());
    pid_t pid = 0;
    if (i != inodes.end()) {
      auto o = owner.find(i->second);
      if (o != owner.end()) pid = o->second;
    }
    out.push_back(pid);
  }
  return out;
}

std::map<pid_t, int> CountByPid(const std::vector<pid_t>& holders,
                                const std::vector<pid_t>& pids) {
  std::map<pid_t, int> out;
  for (pid_t pid : pids) out[pid] = 0;
  for (pid_t pid : holders) out[pid]++;
  return out;
}

double MaxOverMean(const std::map<pid_t, int>& by_pid) {
  int total = 0, max = 0, n = 0;
  for (const auto& [pid, count] : by_pid) {
    if (pid == 0) continue;
    total += count;
    max = std::max(max, count);
    ++n;
  }
  return total == 0 ? 0 : static_cast<double>(max) * n / total;
}

struct CtlResult {
  int code;
  std::string out;
  std::string err;
};

class ProxyHandOffTest : public ::testing::Test {
 protected:
  // After PF_ENTER_NETNS_OR_SKIP: the upstream listens in the test's
  // namespace.
  void Start(int shards) {
    WidenPortRange();
    upstream_ = std::make_unique<EchoUpstream>();
    const std::string spec = absl::StrCat(
        "listeners {\n  name: \"front\"\n  address: \"", kAddress,
        "\"\n  shards: ", shards,
        "\n  worker { command: \"portfleet-worker\" args: \"--mode=proxy\" "
        "args: \"--upstream=127.0.0.1:",
        upstream_->port(), "\" }\n  drain_timeout_seconds: 5\n}\n");
    ASSERT_TRUE(agent_.Start(spec).ok()) << agent_.Log();
    stub_ = FleetStub(agent_.api_socket());
    ASSERT_TRUE(AllReady(shards)) << agent_.Log();
  }
  bool AllReady(int shards) {
    return WaitFor([&] { return ReadyShards(*stub_, "front") == shards; },
                   absl::Seconds(20));
  }
  CtlResult Ctl(std::vector<std::string> args) {
    std::ostringstream out, err;
    ctl::CtlEnv env;
    env.out = &out;
    env.err = &err;
    args.insert(args.begin(), {"--server", "unix://" + agent_.api_socket()});
    int code = ctl::Run(env, args);
    return {code, out.str(), err.str()};
  }
  std::vector<uint64_t> AgentConnections() {
    std::vector<uint64_t> out;
    for (const v1::Shard& s : Shards(*stub_, "front")) {
      out.push_back(s.load().connections());
    }
    return out;
  }
  std::vector<pid_t> WorkerPids() {
    std::vector<pid_t> out;
    for (const v1::Shard& s : Shards(*stub_, "front")) {
      out.push_back(static_cast<pid_t>(s.pid()));
    }
    return out;
  }
  // Waits until the agent's counts (the workers' reports, every second)
  // equal `want`, shard by shard.
  bool AgentCounts(const std::vector<uint64_t>& want) {
    return WaitFor([&] { return AgentConnections() == want; },
                   absl::Seconds(10));
  }
  uint64_t Sum(const std::vector<uint64_t>& v) {
    uint64_t s = 0;
    for (uint64_t x : v) s += x;
    return s;
  }

  AgentHarness agent_;
  std::unique_ptr<EchoUpstream> upstream_;
  std::unique_ptr<v1::FleetService::Stub> stub_;
};

// The scale-up skew of a proxy listener, one shot. Steps:
// 1. An echo upstream; "front" with 2 proxy shards; 200 long-lived client
//    connections through it, each doing a 512-byte round trip every
//    200 ms from then on (every echoed byte compared).
// 2. Scale to 4; the new shards hold nothing (the agent's counts).
// 3. Measure each worker's open descriptors.
// 4. `rebalance front`: not steering only; about 100 pairs handed off.
// 5. From the kernel (who holds each client's proxy-side socket): max/mean
//    over the 4 workers <= 1.15.
// 6. A few more seconds of round trips: 0 failed (no reset, no close, no
//    byte changed); the upstream accepted exactly 200 connections in all
//    (the same upstream connections went on); every worker holds exactly
//    its baseline descriptors plus 2 per pair (nothing leaked, on the
//    sending or the adopting side), and the agent as many as before.
// 7. The new shards' hand-off pauses (ShardLoad, from their load reports)
//    count exactly the pairs they hold, with a median above 0: a pair's
//    release is stamped and its adoption measured.
TEST_F(ProxyHandOffTest, ScaleUpRebalanceMovesIdlePairsWithoutNewUpstreams) {
  PF_ENTER_NETNS_OR_SKIP();
  constexpr int kClients = 200;
  Start(2);
  std::vector<Client> clients(kClients);
  for (int i = 0; i < kClients; ++i) {
    ASSERT_TRUE(clients[i].Open()) << std::strerror(errno);
    ASSERT_EQ(clients[i].RoundTrip(i), "") << "client " << i;
  }
  ASSERT_TRUE(WaitFor([&] { return upstream_->accepted() == kClients; },
                      absl::Seconds(5)));
  Checker checker(&clients);
  ASSERT_TRUE(WaitFor(
      [&] {
        std::vector<uint64_t> c = AgentConnections();
        return c.size() == 2 && Sum(c) == kClients;
      },
      absl::Seconds(10)))
      << ::testing::PrintToString(AgentConnections());

  // Step 2.
  ASSERT_TRUE(ScaleTo(*stub_, "front", 4).ok());
  ASSERT_TRUE(AllReady(4)) << agent_.Log();
  ASSERT_TRUE(WaitFor(
      [&] {
        std::vector<uint64_t> c = AgentConnections();
        return c.size() == 4 && c[0] + c[1] == kClients && c[2] + c[3] == 0;
      },
      absl::Seconds(10)))
      << ::testing::PrintToString(AgentConnections());
  const std::vector<pid_t> pids = WorkerPids();
  ASSERT_EQ(pids.size(), 4u);
  std::map<pid_t, int> before = CountByPid(Holders(clients, pids), pids);
  EXPECT_EQ(before[pids[0]] + before[pids[1]], kClients)
      << ::testing::PrintToString(before);

  // Step 3: a worker without pairs holds its baseline descriptors.
  const int base = OpenFds(pids[2]);
  ASSERT_GT(base, 0);
  EXPECT_EQ(OpenFds(pids[3]), base);
  const int agent_fds = OpenFds(agent_.pid());

  // Step 4.
  const absl::Time t0 = absl::Now();
  CtlResult done = Ctl({"rebalance", "front", "-o", "json"});
  ASSERT_EQ(done.code, 0) << done.err;
  EXPECT_THAT(done.out, Not(HasSubstr("\"steeringOnly\": true")));
  EXPECT_THAT(done.out, Not(HasSubstr("cannot hand off")));
  EXPECT_THAT(done.out, HasSubstr("\"connectionsMoved\""));

  // Step 5.
  std::map<pid_t, int> after;
  const bool even = WaitFor(
      [&] {
        after = CountByPid(Holders(clients, pids), pids);
        return after[0] == 0 && MaxOverMean(after) <= 1.15;
      },
      absl::Seconds(5));
  std::cerr << "even after " << absl::Now() - t0 << ": "
            << ::testing::PrintToString(after) << "\n"
            << done.out << "\n";
  EXPECT_TRUE(even) << ::testing::PrintToString(after) << "\n" << done.out;

  // Step 6.
  absl::SleepFor(absl::Seconds(2));
  checker.Stop();
  EXPECT_EQ(checker.failures(), 0) << checker.first_error();
  EXPECT_GT(checker.rounds(), 3 * kClients);
  for (int i = 0; i < kClients; ++i) {
    EXPECT_EQ(clients[i].RoundTrip(1000000 + i, 4096), "") << "client " << i;
  }
  EXPECT_EQ(upstream_->accepted(), kClients)
      << "the proxy opened new upstream connections";
  after = CountByPid(Holders(clients, pids), pids);
  for (pid_t pid : pids) {
    EXPECT_EQ(OpenFds(pid), base + 2 * after[pid]) << "worker pid " << pid;
  }
  EXPECT_TRUE(WaitFor([&] { return OpenFds(agent_.pid()) <= agent_fds; },
                      absl::Seconds(5)))
      << "agent descriptors: " << OpenFds(agent_.pid()) << ", before "
      << agent_fds;
  EXPECT_THAT(agent_.Log(), Not(HasSubstr("refused")));

  // Step 7.
  const uint64_t held = after[pids[2]] + after[pids[3]];
  uint64_t adopted = 0;
  EXPECT_TRUE(WaitFor(
      [&] {
        adopted = 0;
        for (const v1::Shard& s : Shards(*stub_, "front")) {
          if (s.index() >= 2) adopted += s.load().handoff_pauses().adopted();
        }
        return adopted == held;
      },
      absl::Seconds(5)))
      << adopted << " pauses counted, " << held << " pairs adopted";
  for (const v1::Shard& s : Shards(*stub_, "front")) {
    if (s.index() < 2) continue;
    EXPECT_GT(s.load().handoff_pauses().p50_us(), 0) << "shard " << s.index();
  }
}

// A pair with data in flight is never moved. Steps:
// 1. Small TCP buffers in the namespace; "front" with 1 proxy shard; 2 idle
//    clients (one round trip each) and 6 busy ones: each sends until its
//    socket takes no more without reading its echo, so the proxy holds
//    bytes it cannot write (both ways).
// 2. Scale to 2 and `rebalance front`: 4 pairs should move, only the 2
//    idle ones can; the result says the others had data in flight.
// 3. From the kernel: the 6 busy pairs are still on the first worker, the
//    2 idle ones on the second.
// 4. The busy clients read their whole echo, byte for byte; every client
//    does one more round trip; the upstream accepted 8 connections.
TEST_F(ProxyHandOffTest, PairsWithDataInFlightAreNotMoved) {
  PF_ENTER_NETNS_OR_SKIP();
  // Small socket buffers in this namespace (the sysctls are per netns): the
  // busy pairs block after a few hundred KiB rather than tens of MiB, which
  // the clients would then have to read back.
  for (const char* sysctl :
       {"/proc/sys/net/ipv4/tcp_rmem", "/proc/sys/net/ipv4/tcp_wmem"}) {
    std::ofstream(sysctl) << "4096 65536 262144\n";
  }
  Start(1);
  constexpr int kIdle = 2;
  constexpr int kBusy = 6;
  std::vector<Client> clients(kIdle + kBusy);
  for (int i = 0; i < kIdle + kBusy; ++i) {
    ASSERT_TRUE(clients[i].Open()) << std::strerror(errno);
    ASSERT_EQ(clients[i].RoundTrip(i), "");
  }
  // Step 1: stuff the busy ones (non-blocking sends until EAGAIN, twice,
  // so that every buffer on the way fills).
  std::vector<std::string> sent(kIdle + kBusy);
  for (int i = kIdle; i < kIdle + kBusy; ++i) {
    const int fd = clients[i].fd();
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  }
  for (int pass = 0; pass < 3; ++pass) {
    for (int i = kIdle; i < kIdle + kBusy; ++i) {
      for (;;) {
        std::string more = Chunk(7000 + sent[i].size() + i, 64 * 1024);
        ssize_t w =
            ::send(clients[i].fd(), more.data(), more.size(), MSG_NOSIGNAL);
        if (w <= 0) break;
        sent[i].append(more.data(), static_cast<size_t>(w));
        if (sent[i].size() > (64u << 20)) break;
      }
    }
    absl::SleepFor(absl::Milliseconds(300));
  }
  for (int i = kIdle; i < kIdle + kBusy; ++i) {
    ASSERT_GT(sent[i].size(), 256u * 1024) << "client " << i;
  }
  ASSERT_TRUE(AgentCounts({kIdle + kBusy}))
      << ::testing::PrintToString(AgentConnections());

  // Step 2.
  ASSERT_TRUE(ScaleTo(*stub_, "front", 2).ok());
  ASSERT_TRUE(AllReady(2)) << agent_.Log();
  ASSERT_TRUE(AgentCounts({kIdle + kBusy, 0}))
      << ::testing::PrintToString(AgentConnections());
  const std::vector<pid_t> pids = WorkerPids();
  ASSERT_EQ(pids.size(), 2u);
  CtlResult done = Ctl({"rebalance", "front"});
  ASSERT_EQ(done.code, 0) << done.err;
  EXPECT_THAT(done.out, HasSubstr("2 of 4 connections to shard 1 not moved: "
                                  "6 connections had data in flight"));
  EXPECT_THAT(done.out, HasSubstr("2 connections moved"));

  // Step 3.
  std::vector<pid_t> holders;
  ASSERT_TRUE(WaitFor(
      [&] {
        holders = Holders(clients, pids);
        return std::count(holders.begin(), holders.end(), pids[1]) == kIdle;
      },
      absl::Seconds(5)))
      << ::testing::PrintToString(holders);
  for (int i = 0; i < kIdle; ++i) EXPECT_EQ(holders[i], pids[1]) << i;
  for (int i = kIdle; i < kIdle + kBusy; ++i) {
    EXPECT_EQ(holders[i], pids[0]) << i;
  }

  // Step 4.
  for (int i = kIdle; i < kIdle + kBusy; ++i) {
    const int fd = clients[i].fd();
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    EXPECT_EQ(clients[i].ReadBack(sent[i]), "") << "client " << i;
  }
  for (int i = 0; i < kIdle + kBusy; ++i) {
    EXPECT_EQ(clients[i].RoundTrip(500 + i), "") << "client " << i;
  }
  EXPECT_EQ(upstream_->accepted(), kIdle + kBusy);
}

}  // namespace
}  // namespace portfleet::testing
