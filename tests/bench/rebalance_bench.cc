// portfleet-rebalance-bench: what a one-shot rebalance with connection
// hand-off costs, in a private network namespace, with the real agent and
// workers.
//
// Each trial: a fresh agent with listener "web" (2 shards of the reference
// http worker); N keep-alive connections, each answered once (so the client
// knows its worker); scale to 4; once the workers' load reports show the N
// connections on the 2 old shards, RebalanceListener (connections, moving
// connections). Measured:
//   call      wall time of the call (it returns when the hot workers have
//             released their connections and the agent passed them on)
//   cpu/conn  CPU time of the agent and of the 4 workers during the call
//             (/proc/PID/task/*/schedstat), divided by the connections moved:
//             the machine's cost of one hand-off
//   wall/conn call time / connections moved
//   even      one more request on every connection: max/mean of the
//             connections per answering pid (<= 1.15 expected), and
//             requests that failed (0 expected)
// Usage: portfleet-rebalance-bench [--connections 1000,10000] [--trials 5]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

constexpr int kPort = 8080;

std::string Spec() {
  return absl::StrCat(
      "listeners {\n  name: \"web\"\n  address: \"127.0.0.1:", kPort,
      "\"\n  shards: 2\n"
      "  worker { command: \"portfleet-worker\" args: \"--mode=http\" }\n"
      "  drain_timeout_seconds: 5\n}\n");
}

// One request on a keep-alive connection; the answering pid or -1.
int Ask(int fd) {
  static const std::string kReq = "GET / HTTP/1.1\r\nHost: b\r\n\r\n";
  if (::send(fd, kReq.data(), kReq.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(kReq.size())) {
    return -1;
  }
  std::string in;
  char buf[2048];
  for (;;) {
    loadgen::HttpAnswer a = loadgen::ParseHttpAnswer(in, false);
    if (a.state == loadgen::HttpAnswer::State::kComplete) {
      return a.status == 200 && !a.close ? a.pid : -1;
    }
    if (a.state == loadgen::HttpAnswer::State::kMalformed) return -1;
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return -1;
    in.append(buf, static_cast<size_t>(n));
  }
}

// CPU time of every thread of `pid`, in nanoseconds (schedstat: the first
// field is the time spent on a CPU).
uint64_t CpuNanos(pid_t pid) {
  uint64_t sum = 0;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator(
           absl::StrCat("/proc/", pid, "/task"), ec)) {
    std::ifstream f(task.path() / "schedstat");
    uint64_t ns = 0;
    if (f >> ns) sum += ns;
  }
  return sum;
}

struct Trial {
  bool ok = false;
  std::string error;
  absl::Duration call;
  uint64_t moved = 0;
  double cpu_us_per_conn = 0;
  double wall_us_per_conn = 0;
  double even = 0;
  int failed = 0;
};

Trial RunTrial(int connections) {
  Trial t;
  AgentHarness agent;
  if (absl::Status s = agent.Start(Spec()); !s.ok()) {
    t.error = absl::StrCat("agent: ", s.message());
    return t;
  }
  auto stub = FleetStub(agent.api_socket());
  if (!WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
               absl::Seconds(20))) {
    t.error = "2 shards not ready";
    return t;
  }
  std::vector<Fd> held;
  for (int i = 0; i < connections; ++i) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    timeval tv{.tv_sec = 10, .tv_usec = 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(kPort);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        Ask(fd.get()) < 0) {
      t.error = absl::StrCat("connection ", i, ": ", std::strerror(errno));
      return t;
    }
    held.push_back(std::move(fd));
  }
  if (!ScaleTo(*stub, "web", 4).ok() ||
      !WaitFor([&] { return ReadyShards(*stub, "web") == 4; },
               absl::Seconds(20))) {
    t.error = "scale to 4 failed";
    return t;
  }
  std::vector<pid_t> pids = {agent.pid()};
  if (!WaitFor(
          [&] {
            std::vector<v1::Shard> shards = Shards(*stub, "web");
            uint64_t old = 0;
            for (const v1::Shard& s : shards) {
              if (s.index() < 2) old += s.load().connections();
            }
            return shards.size() == 4 &&
                   old == static_cast<uint64_t>(connections);
          },
          absl::Seconds(20))) {
    t.error = "load reports never showed every connection";
    return t;
  }
  for (const v1::Shard& s : Shards(*stub, "web")) pids.push_back(s.pid());
  uint64_t ns_before = 0;
  for (pid_t p : pids) ns_before += CpuNanos(p);
  v1::RebalanceListenerRequest req;
  req.set_name("web");
  req.set_move_connections(true);
  v1::RebalanceListenerResponse resp;
  const absl::Time start = absl::Now();
  grpc::Status s = stub->RebalanceListener(RpcContext().get(), req, &resp);
  t.call = absl::Now() - start;
  uint64_t ns_after = 0;
  for (pid_t p : pids) ns_after += CpuNanos(p);
  if (!s.ok()) {
    t.error = s.error_message();
    return t;
  }
  t.moved = resp.connections_moved();
  if (t.moved > 0) {
    const double us = static_cast<double>(ns_after - ns_before) / 1e3;
    t.cpu_us_per_conn = us / static_cast<double>(t.moved);
    t.wall_us_per_conn =
        absl::ToDoubleMicroseconds(t.call) / static_cast<double>(t.moved);
  }
  std::map<int, int> by_pid;
  for (Fd& fd : held) {
    int pid = Ask(fd.get());
    if (pid < 0) {
      if (t.failed == 0) {
        std::cerr << "first failed request: " << std::strerror(errno) << "\n";
        for (absl::string_view line : absl::StrSplit(agent.Log(), '\n')) {
          if (absl::StrContains(line, "WARN") ||
              absl::StrContains(line, "ERROR")) {
            std::cerr << "  agent: " << line << "\n";
          }
        }
      }
      ++t.failed;
    } else {
      by_pid[pid]++;
    }
  }
  int max = 0;
  for (const auto& [pid, n] : by_pid) max = std::max(max, n);
  t.even = static_cast<double>(max) * 4 / static_cast<double>(connections);
  t.ok = true;
  return t;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  std::vector<int> sizes = {1000, 10000};
  int trials = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--connections") {
      sizes.clear();
      for (absl::string_view p : absl::StrSplit(argv[i + 1], ',')) {
        int n;
        if (absl::SimpleAtoi(p, &n) && n > 0) sizes.push_back(n);
      }
    } else if (flag == "--trials") {
      if (!absl::SimpleAtoi(argv[i + 1], &trials) || trials < 1) trials = 5;
    }
  }
  if (absl::Status s = EnterPrivateNetns(); !s.ok()) {
    std::cerr << "needs a private network namespace (root): " << s << "\n";
    return 1;
  }
  rlimit nofile{};
  ::getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &nofile);
  std::cout << "| connections | trials ok | call ms (median, range) | "
               "moved | CPU µs/conn (median, range) | wall µs/conn (median) | "
               "max/mean after (worst) | failed |\n"
               "|---|---|---|---|---|---|---|---|\n";
  for (int n : sizes) {
    std::vector<double> call_ms, cpu, wall, even;
    uint64_t moved = 0;
    int failed = 0, ok = 0;
    for (int k = 0; k < trials; ++k) {
      Trial t = RunTrial(n);
      KillOthersInPrivateNetns();
      if (!t.ok) {
        std::cerr << "n=" << n << " trial " << k << ": " << t.error << "\n";
        continue;
      }
      ++ok;
      call_ms.push_back(absl::ToDoubleMilliseconds(t.call));
      cpu.push_back(t.cpu_us_per_conn);
      wall.push_back(t.wall_us_per_conn);
      even.push_back(t.even);
      moved = t.moved;
      failed += t.failed;
    }
    if (ok == 0) continue;
    auto range = [](const std::vector<double>& v) {
      return absl::StrFormat("%.1f-%.1f", *std::min_element(v.begin(), v.end()),
                             *std::max_element(v.begin(), v.end()));
    };
    std::cout << absl::StrFormat(
        "| %d | %d/%d | %.1f (%s) | %u | %.1f (%s) | %.1f | %.2f | %d |\n", n,
        ok, trials, Median(call_ms), range(call_ms), moved, Median(cpu),
        range(cpu), Median(wall), *std::max_element(even.begin(), even.end()),
        failed);
  }
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
