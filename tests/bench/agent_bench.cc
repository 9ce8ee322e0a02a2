// portfleet-agent-bench: what the agent itself costs, in a private network
// namespace (needs root / CAP_SYS_ADMIN and CAP_BPF).
//
//   1. Idle overhead with 1, 8 and 64 shards (one listener, HTTP workers,
//      HASH steering): the agent's CPU over --idle-seconds (utime+stime from
//      /proc/PID/stat), its RSS and thread count, and the workers' total
//      CPU and RSS.
//   2. API latency: --calls sequential ListShards calls with 64 shards.
//   3. The steering program's cost per SYN from the kernel's own counters:
//      kernel.bpf_stats_enabled=1 for the length of one load run (then set
//      back to what it was), run_time_ns / run_cnt of this agent's program
//      (found through the map ids of its pinned maps), over --conns
//      connections to the 8-shard listener.
//
// Output: Markdown on stdout. Bounded in time and count; loopback only.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

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

namespace portfleet::testing {
namespace {

std::string Spec(int shards, int port) {
  return absl::StrFormat(
      R"pb(listeners {
             name: "web"
             address: "127.0.0.1:%d"
             shards: %d
             worker { command: "portfleet-worker" args: "--mode=http" }
             steering { policy: STEERING_POLICY_HASH }
           })pb",
      port, shards);
}

// utime + stime of `pid`, jiffies; 0 if gone.
uint64_t Jiffies(pid_t pid) {
  std::string stat = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/stat"));
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return 0;
  std::vector<std::string> f =
      absl::StrSplit(stat.substr(paren + 2), ' ', absl::SkipEmpty());
  // f[0] is field 3 (state); utime is field 14, stime 15.
  uint64_t utime = 0, stime = 0;
  if (f.size() > 13) {
    (void)absl::SimpleAtoi(f[11], &utime);
    (void)absl::SimpleAtoi(f[12], &stime);
  }
  return utime + stime;
}

// A "Name: value" field of /proc/PID/status as a number (kB for VmRSS).
uint64_t StatusField(pid_t pid, const std::string& name) {
  std::istringstream in(
      ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/status")));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + ":", 0) != 0) continue;
    std::vector<std::string> f =
        absl::StrSplit(line.substr(name.size() + 1), absl::ByAnyChar(" \t"),
                       absl::SkipEmpty());
    uint64_t v = 0;
    if (!f.empty()) (void)absl::SimpleAtoi(f[0], &v);
    return v;
  }
  return 0;
}

struct Idle {
  int shards = 0;
  double agent_cpu_pct = 0;
  double agent_rss_mib = 0;
  uint64_t agent_threads = 0;
  double workers_cpu_pct = 0;
  double workers_rss_mib = 0;
};

std::optional<Idle> MeasureIdle(AgentHarness& agent, int shards,
                                absl::Duration idle) {
  std::vector<pid_t> workers = ChildrenOf(agent.pid());
  std::vector<uint64_t> before;
  uint64_t agent_before = Jiffies(agent.pid());
  for (pid_t w : workers) before.push_back(Jiffies(w));
  absl::Time start = absl::Now();
  absl::SleepFor(idle);
  double secs = absl::ToDoubleSeconds(absl::Now() - start);
  const double hz = ::sysconf(_SC_CLK_TCK);
  Idle r;
  r.shards = shards;
  r.agent_cpu_pct = 100.0 * (Jiffies(agent.pid()) - agent_before) / hz / secs;
  r.agent_rss_mib = StatusField(agent.pid(), "VmRSS") / 1024.0;
  r.agent_threads = StatusField(agent.pid(), "Threads");
  uint64_t worker_jiffies = 0;
  uint64_t worker_rss_kb = 0;
  for (size_t i = 0; i < workers.size(); ++i) {
    worker_jiffies += Jiffies(workers[i]) - before[i];
    worker_rss_kb += StatusField(workers[i], "VmRSS");
  }
  r.workers_cpu_pct = 100.0 * worker_jiffies / hz / secs;
  r.workers_rss_mib = worker_rss_kb / 1024.0;
  return r;
}

// Runs a command and returns its stdout ("" on failure).
std::string Capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;) {
    out.append(buf, n);
  }
  ::pclose(p);
  return out;
}

// The first number after `"key":` in `json`, or nullopt.
std::optional<uint64_t> JsonNumber(const std::string& json,
                                   const std::string& key, size_t from = 0) {
  size_t at = json.find("\"" + key + "\":", from);
  if (at == std::string::npos) return std::nullopt;
  at += key.size() + 3;
  while (at < json.size() && json[at] == ' ') ++at;
  size_t end = at;
  while (end < json.size() &&
         std::isdigit(static_cast<unsigned char>(json[end])))
    ++end;
  uint64_t v = 0;
  if (!absl::SimpleAtoi(json.substr(at, end - at), &v)) return std::nullopt;
  return v;
}

// run_time_ns and run_cnt of the sk_reuseport program that uses the map
// pinned at `pinned_map`.
struct ProgStats {
  uint64_t run_time_ns = 0;
  uint64_t run_cnt = 0;
};
std::optional<ProgStats> ProgramStats(const std::string& pinned_map) {
  std::string map = Capture("bpftool -j map show pinned '" + pinned_map + "'");
  std::optional<uint64_t> map_id = JsonNumber(map, "id");
  if (!map_id) return std::nullopt;
  // One JSON object per program; find ours by its map ids.
  std::string progs = Capture("bpftool -j prog show");
  for (size_t at = progs.find("{\"id\":"); at != std::string::npos;
       at = progs.find("{\"id\":", at + 1)) {
    size_t end = progs.find("{\"id\":", at + 1);
    std::string one = progs.substr(
        at, end == std::string::npos ? std::string::npos : end - at);
    if (one.find("\"name\":\"pf_steer\"") == std::string::npos) continue;
    size_t ids = one.find("\"map_ids\":[");
    if (ids == std::string::npos) continue;
    std::string list = one.substr(ids + 11, one.find(']', ids) - ids - 11);
    for (absl::string_view id : absl::StrSplit(list, ',')) {
      uint64_t v = 0;
      if (absl::SimpleAtoi(id, &v) && v == *map_id) {
        return ProgStats{JsonNumber(one, "run_time_ns").value_or(0),
                         JsonNumber(one, "run_cnt").value_or(0)};
      }
    }
  }
  return std::nullopt;
}

// Sets kernel.bpf_stats_enabled for its lifetime, then back as it was.
class BpfStatsOn {
 public:
  BpfStatsOn() {
    old_ = ReadFileOrEmpty(kPath);
    std::ofstream(kPath) << "1\n";
  }
  ~BpfStatsOn() { std::ofstream(kPath) << (old_.empty() ? "0\n" : old_); }

 private:
  static constexpr char kPath[] = "/proc/sys/kernel/bpf_stats_enabled";
  std::string old_;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

int Main(int argc, char** argv) {
  double idle_seconds = 30;
  int calls = 500;
  int conns = 20000;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help") {
      std::cout << "Usage: portfleet-agent-bench [--idle-seconds=30] "
                   "[--calls=500] [--conns=20000]\n"
                   "Agent idle CPU/RSS with 1, 8, 64 shards, ListShards "
                   "latency with 64 shards, steering program ns per SYN.\n"
                   "Run as root from the build directory.\n";
      return 0;
    }
    auto value = [&](const char* name) -> std::optional<std::string> {
      std::string prefix = absl::StrCat(name, "=");
      if (a.rfind(prefix, 0) != 0) return std::nullopt;
      return a.substr(prefix.size());
    };
    if (auto v = value("--idle-seconds");
        v && absl::SimpleAtod(*v, &idle_seconds) && idle_seconds >= 1 &&
        idle_seconds <= 300) {
    } else if (auto v = value("--calls"); v && absl::SimpleAtoi(*v, &calls) &&
                                          calls > 0 && calls <= 100000) {
    } else if (auto v = value("--conns"); v && absl::SimpleAtoi(*v, &conns) &&
                                          conns > 0 && conns <= 1000000) {
    } else {
      std::cerr << "portfleet-agent-bench: bad argument '" << a << "'\n";
      return 2;
    }
  }
  if (absl::Status s = EnterPrivateNetns(); !s.ok()) {
    std::cerr << "portfleet-agent-bench: needs a private network namespace: "
              << s << "\n";
    return 2;
  }
  WidenPortRange();

  std::vector<Idle> idle;
  std::vector<double> list_ms;
  std::optional<ProgStats> before, after;
  int64_t answered = 0;
  for (int shards : {1, 8, 64}) {
    AgentHarness agent;
    const int port = 8200 + shards;
    if (!agent.Start(Spec(shards, port)).ok()) {
      std::cerr << "agent did not start:\n" << agent.Log();
      return 1;
    }
    auto stub = FleetStub(agent.api_socket());
    if (!WaitFor([&] { return ReadyShards(*stub, "web") == shards; },
                 absl::Seconds(60))) {
      std::cerr << shards << " shards not ready\n" << agent.Log();
      return 1;
    }
    absl::SleepFor(absl::Seconds(2));  // start-up settles
    std::optional<Idle> r =
        MeasureIdle(agent, shards, absl::Seconds(idle_seconds));
    if (r) idle.push_back(*r);
    std::cerr << "idle with " << shards << " shards measured\n";
    if (shards == 64) {
      for (int i = 0; i < calls; ++i) {
        absl::Time t = absl::Now();
        std::vector<v1::Shard> got = Shards(*stub, "web");
        list_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - t));
        if (got.size() != 64u) {
          std::cerr << "ListShards returned " << got.size() << " shards\n";
          return 1;
        }
      }
    }
    if (shards == 8) {
      std::string pinned = agent.bpffs() + "/web/config";
      BpfStatsOn stats;
      before = ProgramStats(pinned);
      loadgen::Options o;
      o.target = absl::StrCat("127.0.0.1:", port);
      o.concurrency = 16;
      o.threads = 2;
      o.duration = absl::Seconds(60);
      o.max_connections = conns;
      o.quiet = true;
      absl::StatusOr<loadgen::Result> res = loadgen::Run(o);
      after = ProgramStats(pinned);
      if (res.ok()) answered = res->ok();
    }  // bpf_stats_enabled back as it was
  }

  std::cout << absl::StrFormat(
      "## portfleet-agent-bench, %s\n\n"
      "One listener, `portfleet-worker --mode=http` shards, HASH steering, "
      "idle (no traffic) for %.0f s after start-up. CPU from "
      "/proc/PID/stat utime+stime, RSS and threads from /proc/PID/status.\n\n"
      "| shards | agent CPU %% | agent RSS MiB | agent threads | workers CPU "
      "%% "
      "(all) | workers RSS MiB (all) |\n| ---: | ---: | ---: | ---: | ---: | "
      "---: |\n",
      absl::FormatTime("%Y-%m-%d %H:%M UTC", absl::Now(), absl::UTCTimeZone()),
      idle_seconds);
  for (const Idle& r : idle) {
    std::cout << absl::StrFormat(
        "| %d | %.3f | %.1f | %d | %.3f | %.1f |\n", r.shards, r.agent_cpu_pct,
        r.agent_rss_mib, r.agent_threads, r.workers_cpu_pct, r.workers_rss_mib);
  }
  std::cout << absl::StrFormat(
      "\nListShards with 64 shards (%d sequential calls over the Unix socket): "
      "p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms.\n",
      static_cast<int>(list_ms.size()), Percentile(list_ms, 50),
      Percentile(list_ms, 90), Percentile(list_ms, 99),
      Percentile(list_ms, 100));
  if (before && after && after->run_cnt > before->run_cnt) {
    uint64_t cnt = after->run_cnt - before->run_cnt;
    uint64_t ns = after->run_time_ns - before->run_time_ns;
    std::cout << absl::StrFormat(
        "\nSteering program (8 shards, HASH), kernel.bpf_stats_enabled for "
        "the run only: %d runs for %d answered connections, %.0f ns per run "
        "(run_time_ns / run_cnt).\n",
        cnt, answered, static_cast<double>(ns) / cnt);
  } else {
    std::cout << "\nSteering program cost: not measured (program or bpftool "
                 "not found).\n";
  }
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
