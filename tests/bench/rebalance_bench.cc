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
//   pause     per connection moved, the time it was served by no worker:
//             from the hot worker taking it out of its event loop to the
//             cold worker having it in its own (HandOffConnection.
//             released_mono_ns, measured by the receiving worker). Read
//             from the shards' hand-off pause histograms (ShardLoad) once
//             the receivers' load reports show every moved connection,
//             minus the histograms before the call; median and p99 over
//             the trials' connections merged, and the range of the
//             trials' own p99
//   even      one more request on every connection: max/mean of the
//             connections per answering pid (<= 1.15 expected), and
//             requests that failed (0 expected)
//
// --timeline FILE: one more trial (the first size) with a sampler that reads
// the kernel every few milliseconds: which worker holds each established
// connection (sock_diag + /proc/PID/fd, agent/procfs.h). It writes
// FILE (CSV: ms since the first sample, connections of shards 0-3, and the
// phase: before, scaling, rebalancing, after) for a plot of the load per
// shard over time (tests/bench/rebalance_timeline.gp), and prints when each
// moved connection first appeared in its new worker, counted from the start
// of the call (median, p99, max). The sampler competes for the CPU with the
// hand-off, so the timeline trial's times are not the table's.
//
// Usage: portfleet-rebalance-bench [--connections 1000,10000] [--trials 5]
//                                  [--timeline FILE]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/procfs.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/duration_histogram.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/handoff_pauses.h"

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

// Samples, every few milliseconds until stopped, which worker holds each
// established connection on kPort: the kernel's view, for any worker.
class Timeline {
 public:
  // The connections to follow are the established ones on kPort now (a
  // moved connection keeps its socket, so its inode).
  void Start() {
    if (absl::StatusOr<std::vector<DiagSocket>> d =
            DumpTcpSockets(AF_INET, kTcpEstablishedMask, kPort);
        d.ok()) {
      for (const DiagSocket& s : *d) established_.insert(s.inode);
    }
    t0_ = absl::Now();
    thread_ = std::thread([this] { Run(); });
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  // The shards' pids, by index (the sampler follows them from then on).
  void SetPids(std::vector<pid_t> pids) {
    std::lock_guard<std::mutex> lock(mu_);
    pids_ = std::move(pids);
  }
  void SetPhase(const std::string& phase) {
    std::lock_guard<std::mutex> lock(mu_);
    phase_ = phase;
    if (phase == "rebalancing") call_start_ = absl::Now();
  }
  absl::Status Write(const std::string& path) const {
    std::ofstream out(path);
    out << "ms,shard0,shard1,shard2,shard3,phase\n";
    for (const Row& r : rows_) {
      out << absl::StrFormat("%.1f", r.ms);
      for (int i = 0; i < 4; ++i) out << "," << r.counts[i];
      out << "," << r.phase << "\n";
    }
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
    return absl::OkStatus();
  }
  // When each connection that changed worker was first seen in the new one,
  // in ms after the call started.
  std::vector<double> MoveTimes() const {
    std::vector<double> out;
    for (const auto& [inode, at] : moved_at_) {
      out.push_back(absl::ToDoubleMilliseconds(at - call_start_));
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  size_t samples() const { return rows_.size(); }
  // Median time between two samples while the call ran: the resolution of
  // MoveTimes().
  double MedianIntervalMs(const std::string& phase) const {
    std::vector<double> gaps;
    for (size_t i = 1; i < rows_.size(); ++i) {
      if (rows_[i].phase == phase)
        gaps.push_back(rows_[i].ms - rows_[i - 1].ms);
    }
    if (gaps.empty()) return 0;
    std::sort(gaps.begin(), gaps.end());
    return gaps[gaps.size() / 2];
  }

 private:
  struct Row {
    double ms = 0;
    int counts[4] = {0, 0, 0, 0};
    std::string phase;
  };
  void Run() {
    while (!stop_) {
      std::vector<pid_t> pids;
      std::string phase;
      {
        std::lock_guard<std::mutex> lock(mu_);
        pids = pids_;
        phase = phase_;
      }
      const absl::Time now = absl::Now();
      Row row{.ms = absl::ToDoubleMilliseconds(now - t0_), .phase = phase};
      for (size_t i = 0; i < pids.size() && i < 4; ++i) {
        for (const ProcessSocket& s : SocketsOfProcess(pids[i])) {
          if (established_.count(s.inode) == 0) continue;
          row.counts[i]++;
          auto [it, fresh] = owner_.emplace(s.inode, pids[i]);
          if (!fresh && it->second != pids[i]) {
            it->second = pids[i];
            moved_at_.emplace(s.inode, now);
          }
        }
      }
      rows_.push_back(row);
      absl::SleepFor(absl::Milliseconds(2));
    }
  }

  std::thread thread_;
  std::atomic<bool> stop_{false};
  absl::Time t0_;
  std::set<uint64_t> established_;
  mutable std::mutex mu_;
  std::vector<pid_t> pids_;
  std::string phase_ = "before";
  absl::Time call_start_;
  // The sampler thread's own, read after Stop().
  std::vector<Row> rows_;
  std::map<uint64_t, pid_t> owner_;
  std::map<uint64_t, absl::Time> moved_at_;
};

// The hand-off pauses of every shard of "web", merged.
DurationHistogram MergedPauses(v1::FleetService::Stub& stub) {
  DurationHistogram merged;
  for (const v1::Shard& s : Shards(stub, "web")) {
    merged.Merge(HistogramFromProto(s.load().handoff_pauses().histogram()));
  }
  return merged;
}

struct Trial {
  bool ok = false;
  std::string error;
  absl::Duration call;
  uint64_t moved = 0;
  // Pauses of the connections moved by the call (all receivers).
  DurationHistogram pauses;
  double cpu_us_per_conn = 0;
  double wall_us_per_conn = 0;
  double even = 0;
  int failed = 0;
};

// `timeline`, when set, samples the whole trial (and is stopped before this
// returns).
Trial RunTrial(int connections, Timeline* timeline) {
  Trial t;
  struct StopTimeline {
    Timeline* timeline;
    ~StopTimeline() {
      if (timeline != nullptr) timeline->Stop();
    }
  } stop_timeline{timeline};
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
  if (timeline != nullptr) {
    std::vector<pid_t> old;
    for (const v1::Shard& s : Shards(*stub, "web")) old.push_back(s.pid());
    timeline->SetPids(old);
    timeline->Start();
    absl::SleepFor(absl::Milliseconds(300));
    timeline->SetPhase("scaling");
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
  if (timeline != nullptr) {
    timeline->SetPids(std::vector<pid_t>(pids.begin() + 1, pids.end()));
    absl::SleepFor(absl::Milliseconds(300));
    timeline->SetPhase("rebalancing");
  }
  const DurationHistogram pauses_before = MergedPauses(*stub);
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
  // The receivers report every second; then the pauses are all there.
  if (!WaitFor(
          [&] {
            t.pauses = MergedPauses(*stub).Since(pauses_before);
            return t.pauses.count() >= t.moved;
          },
          absl::Seconds(10))) {
    std::cerr << "pauses of " << t.pauses.count() << " of " << t.moved
              << " moved connections reported\n";
  }
  if (timeline != nullptr) {
    timeline->SetPhase("after");
    absl::SleepFor(absl::Milliseconds(500));
    timeline->Stop();
  }
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
  std::string timeline_path;
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
    } else if (flag == "--timeline") {
      timeline_path = argv[i + 1];
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
               "pause µs p50 | pause µs p99 (trials' range) | pauses counted "
               "| max/mean after (worst) | failed |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (int n : sizes) {
    std::vector<double> call_ms, cpu, wall, even, p99;
    DurationHistogram pauses;
    uint64_t moved_total = 0;
    uint64_t moved = 0;
    int failed = 0, ok = 0;
    for (int k = 0; k < trials; ++k) {
      Trial t = RunTrial(n, nullptr);
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
      pauses.Merge(t.pauses);
      p99.push_back(t.pauses.QuantileNs(0.99) / 1e3);
      moved = t.moved;
      moved_total += t.moved;
      failed += t.failed;
    }
    if (ok == 0) continue;
    auto range = [](const std::vector<double>& v) {
      return absl::StrFormat("%.1f-%.1f", *std::min_element(v.begin(), v.end()),
                             *std::max_element(v.begin(), v.end()));
    };
    std::cout << absl::StrFormat(
        "| %d | %d/%d | %.1f (%s) | %u | %.1f (%s) | %.1f | %.0f | %.0f (%s) "
        "| %u/%u | %.2f | %d |\n",
        n, ok, trials, Median(call_ms), range(call_ms), moved, Median(cpu),
        range(cpu), Median(wall), pauses.QuantileNs(0.5) / 1e3,
        pauses.QuantileNs(0.99) / 1e3, range(p99), pauses.count(), moved_total,
        *std::max_element(even.begin(), even.end()), failed);
  }
  if (!timeline_path.empty() && !sizes.empty()) {
    Timeline timeline;
    Trial t = RunTrial(sizes.front(), &timeline);
    KillOthersInPrivateNetns();
    if (!t.ok) {
      std::cerr << "timeline trial: " << t.error << "\n";
      return 1;
    }
    if (absl::Status s = timeline.Write(timeline_path); !s.ok()) {
      std::cerr << s << "\n";
      return 1;
    }
    std::vector<double> moved = timeline.MoveTimes();
    auto at = [&](double q) {
      return moved.empty()
                 ? 0.0
                 : moved[std::min(moved.size() - 1,
                                  static_cast<size_t>(
                                      q * static_cast<double>(moved.size())))];
    };
    std::cout << absl::StrFormat(
        "\ntimeline (%d connections, %u samples, every %.1f ms during the "
        "call, written to %s): %u "
        "connections moved (the agent says %u); first seen in the new "
        "worker after the call started: median %.1f ms, p99 %.1f ms, max "
        "%.1f ms; call %.1f ms; max/mean after %.2f; failed %d\n",
        sizes.front(), timeline.samples(),
        timeline.MedianIntervalMs("rebalancing"), timeline_path, moved.size(),
        t.moved, at(0.5), at(0.99), moved.empty() ? 0.0 : moved.back(),
        absl::ToDoubleMilliseconds(t.call), t.even, t.failed);
  }
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
