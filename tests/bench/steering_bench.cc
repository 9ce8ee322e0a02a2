// portfleet-steering-bench: new connections per second through a reuseport
// group with plain kernel hashing vs the steering program in HASH, CPU and
// LEAST_CONNECTIONS policy, in one run, in a private network namespace.
//
// Each round: N shard sockets on a fresh loopback port, one accepting thread
// per shard (pinned to a CPU), 2 client threads; one connection per request
// (1-byte request, 1-byte answer, checked), client closes with RST so no
// TIME_WAIT piles up. Rounds alternate plain, hash, cpu, least per pair; the
// ratios are taken within a pair (BENCHMARKING.md).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/steering/steering.h"
#include "tests/testing/netns.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

enum class Mode { kPlain, kHash, kCpu, kLeast };
const char* ModeName(Mode m) {
  switch (m) {
    case Mode::kPlain:
      return "plain reuseport";
    case Mode::kHash:
      return "program, HASH";
    case Mode::kCpu:
      return "program, CPU";
    case Mode::kLeast:
      return "program, LEAST_CONNECTIONS";
  }
  return "?";
}

void PinToCpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ::sched_setaffinity(0, sizeof(set), &set);
}

struct RoundResult {
  uint64_t ok = 0;
  uint64_t failed = 0;
  double rate = 0;
};

sockaddr_in Loopback(uint16_t port) {
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_port = htons(port);
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return sin;
}

RoundResult RunRound(SteeringBackend* backend, Mode mode, int shards, int ncpus,
                     int round, absl::Duration duration) {
  std::vector<Fd> socks;
  uint16_t port = 0;
  for (int i = 0; i < shards; ++i) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    sockaddr_in sin = Loopback(port);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) ||
        ::listen(fd.get(), 4096)) {
      std::perror("bind/listen");
      std::exit(1);
    }
    socklen_t len = sizeof(sin);
    ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&sin), &len);
    port = ntohs(sin.sin_port);
    socks.push_back(std::move(fd));
  }
  std::unique_ptr<ListenerSteering> steering;
  if (mode != Mode::kPlain) {
    auto l = backend->OpenListener(absl::StrCat("bench", round));
    if (!l.ok()) {
      std::cerr << l.status() << "\n";
      std::exit(1);
    }
    steering = std::move(*l);
    absl::Status s = steering->AttachTo(socks[0].get());
    for (int i = 0; s.ok() && i < shards; ++i) {
      s = steering->SetShardSocket(i, socks[i].get());
    }
    SteeringTables t;
    if (mode == Mode::kCpu) {
      t.policy = v1::STEERING_POLICY_CPU;
      for (int i = 0; i < shards; ++i) t.shard_cpus.push_back(i % ncpus);
    } else {
      t.num_shards = shards;
      if (mode == Mode::kLeast) {
        t.policy = v1::STEERING_POLICY_LEAST_CONNECTIONS;
      }
    }
    if (s.ok()) s = steering->Apply(t);
    if (!s.ok()) {
      std::cerr << s << "\n";
      std::exit(1);
    }
  }
  std::atomic<bool> stop{false};
  std::vector<std::thread> servers;
  for (int i = 0; i < shards; ++i) {
    servers.emplace_back([&, i] {
      PinToCpu(i % ncpus);
      pollfd p{socks[i].get(), POLLIN, 0};
      while (!stop.load(std::memory_order_relaxed)) {
        if (::poll(&p, 1, 50) <= 0) continue;
        while (true) {
          Fd c(::accept4(socks[i].get(), nullptr, nullptr, SOCK_CLOEXEC));
          if (!c) break;
          char b;
          if (::read(c.get(), &b, 1) == 1) (void)!::write(c.get(), "y", 1);
        }
      }
    });
  }
  std::atomic<uint64_t> ok{0}, failed{0};
  const absl::Time start = absl::Now();
  const absl::Time end = start + duration;
  std::vector<std::thread> clients;
  for (int t = 0; t < 2; ++t) {
    clients.emplace_back([&] {
      uint64_t my_ok = 0, my_failed = 0;
      const sockaddr_in sin = Loopback(port);
      for (uint64_t n = 0; n < 10'000'000; ++n) {
        if ((n & 63) == 0 && absl::Now() >= end) break;
        Fd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        char b = 0;
        bool good = ::connect(c.get(), reinterpret_cast<const sockaddr*>(&sin),
                              sizeof(sin)) == 0 &&
                    ::write(c.get(), "x", 1) == 1 &&
                    ::read(c.get(), &b, 1) == 1 && b == 'y';
        linger lg{1, 0};
        ::setsockopt(c.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        good ? ++my_ok : ++my_failed;
      }
      ok += my_ok;
      failed += my_failed;
    });
  }
  for (auto& t : clients) t.join();
  const double secs = absl::ToDoubleSeconds(absl::Now() - start);
  stop = true;
  for (auto& t : servers) t.join();
  if (steering) (void)steering->RemovePins();
  return {ok.load(), failed.load(), ok.load() / secs};
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int Main(int argc, char** argv) {
  int pairs = 3;
  double seconds = 3;
  int shards = 2;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--pairs=", 0) == 0) pairs = std::atoi(a.c_str() + 8);
    if (a.rfind("--seconds=", 0) == 0) seconds = std::atof(a.c_str() + 10);
    if (a.rfind("--shards=", 0) == 0) shards = std::atoi(a.c_str() + 9);
  }
  absl::Status s = testing::EnterPrivateNetns();
  if (!s.ok()) {
    std::cerr << "needs a private network namespace: " << s << "\n";
    return 2;
  }
  std::ofstream("/proc/sys/net/ipv4/ip_local_port_range") << "1024 65000";
  const std::string root =
      absl::StrCat("/sys/fs/bpf/portfleet-bench-", ::getpid());
  auto backend = OpenBpfSteering(root);
  if (!backend.ok()) {
    std::cerr << "BPF steering unavailable: " << backend.status() << "\n";
    return 2;
  }
  const int ncpus = std::max(1u, std::thread::hardware_concurrency());
  const absl::Duration dur = absl::Seconds(seconds);
  const Mode modes[] = {Mode::kPlain, Mode::kHash, Mode::kCpu, Mode::kLeast};
  constexpr int kModes = 4;
  int round = 0;
  RunRound(backend->get(), Mode::kPlain, shards, ncpus, round++,
           absl::Seconds(1));  // warm-up
  std::vector<std::vector<RoundResult>> results(kModes);
  for (int p = 0; p < pairs; ++p) {
    for (int m = 0; m < kModes; ++m) {
      absl::SleepFor(absl::Milliseconds(300));
      results[m].push_back(
          RunRound(backend->get(), modes[m], shards, ncpus, round++, dur));
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(root, ec);

  std::cout << absl::StrFormat(
      "\n%d shards, %d client threads, %d CPUs, %d pairs x %.0f s, "
      "loopback in a private netns (ceiling here ~31k conn/s)\n\n",
      shards, 2, ncpus, pairs, seconds);
  std::cout << "| mode | conn/s per round | failures | median ratio vs plain "
               "| ratio range |\n|---|---|---|---|---|\n";
  for (int m = 0; m < kModes; ++m) {
    std::string rates;
    uint64_t failures = 0;
    std::vector<double> ratios;
    for (int p = 0; p < pairs; ++p) {
      absl::StrAppend(&rates, p ? ", " : "",
                      absl::StrFormat("%.0f", results[m][p].rate));
      failures += results[m][p].failed;
      ratios.push_back(results[m][p].rate / results[0][p].rate);
    }
    std::cout << absl::StrFormat(
        "| %s | %s | %d | %.3f | %.3f-%.3f |\n", ModeName(modes[m]), rates,
        failures, Median(ratios),
        *std::min_element(ratios.begin(), ratios.end()),
        *std::max_element(ratios.begin(), ratios.end()));
  }
  return 0;
}

}  // namespace
}  // namespace portfleet

int main(int argc, char** argv) { return portfleet::Main(argc, argv); }
