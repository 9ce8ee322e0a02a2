// portfleet-fleet-bench: the real agent and workers against nginx, in one run,
// in a private network namespace (needs root / CAP_SYS_ADMIN, and nginx).
//
// Servers, all started once and idle while another one is measured:
//   nginx (reuseport)  nginx, worker_processes 2, `listen ... reuseport`,
//                      access_log off, `return 200 "ok"`: the reference.
//   portfleet HASH     the agent, 2 http shards, steering HASH.
//   portfleet CPU      the agent, 2 http shards, steering CPU (workers pinned).
//   nginx (shared)     nginx, worker_processes 2, one listening socket shared
//                      by both workers (no reuseport): the shared-listener
//                      baseline.
//
// Load: the loadgen library in-process, 2 threads, one connection per request
// (GET, "Connection: close", every answer checked), at saturation
// (--concurrency in flight) and at a fixed offered rate (--rate, 10k/s).
// With wrk (--wrk, found in PATH by default) two more loads as a
// cross-check: keep-alive (wrk -t2 -c50) and a new connection per request
// (wrk -t2 -c32 -H "Connection: close"); wrk's latency excludes connect.
// Rounds follow BENCHMARKING.md: a warm-up, then --pairs sets in which every
// server runs once per load (order reversed every other set), ~--seconds
// each, after waiting (bounded) for the machine to be idle. Ratios are taken
// within a set against nginx (reuseport); we print their median and range.
// Machine CPU per connection comes from /proc/stat deltas over the round.
//
// Output: Markdown on stdout; with --png FILE and gnuplot in PATH, a latency
// percentile plot.
#include <signal.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

struct Server {
  std::string name;
  std::string address;
};
// Index 0 is the reference every ratio is taken against.
const std::vector<Server>& Servers() {
  static const auto* servers = new std::vector<Server>{
      {"nginx, reuseport (c)", "127.0.0.1:8090"},
      {"portfleet HASH, 2 shards (a)", "127.0.0.1:8081"},
      {"portfleet CPU, 2 shards (b)", "127.0.0.1:8082"},
      {"nginx, one shared listener (d)", "127.0.0.1:8091"},
  };
  return *servers;
}

constexpr char kAgentSpec[] =
    R"pb(listeners {
           name: "hash"
           address: "127.0.0.1:8081"
           shards: 2
           worker { command: "portfleet-worker" args: "--mode=http" }
           steering { policy: STEERING_POLICY_HASH }
         }
         listeners {
           name: "cpu"
           address: "127.0.0.1:8082"
           shards: 2
           worker { command: "portfleet-worker" args: "--mode=http" }
           steering { policy: STEERING_POLICY_CPU }
         })pb";

// ---- /proc/stat ----

struct CpuTimes {
  uint64_t busy = 0;  // user nice system irq softirq steal (jiffies)
  uint64_t total = 0;
};

CpuTimes ReadCpu() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  uint64_t v[8] = {};
  in >> cpu;
  for (uint64_t& x : v) in >> x;
  CpuTimes t;
  // user nice system idle iowait irq softirq steal; guest is inside user.
  t.busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
  t.total = t.busy + v[3] + v[4];
  return t;
}

double BusyFraction(const CpuTimes& a, const CpuTimes& b) {
  return b.total > a.total
             ? static_cast<double>(b.busy - a.busy) / (b.total - a.total)
             : 0;
}

// Waits (up to `limit`) for a 250 ms window in which the machine is less
// than `threshold` busy; returns the busy fraction of the last window.
double WaitIdle(double threshold, absl::Duration limit) {
  absl::Time end = absl::Now() + limit;
  double busy = 1;
  do {
    CpuTimes a = ReadCpu();
    absl::SleepFor(absl::Milliseconds(250));
    busy = BusyFraction(a, ReadCpu());
  } while (busy >= threshold && absl::Now() < end);
  return busy;
}

// utime + stime of `pids` (jiffies); a process that is gone counts 0.
uint64_t ProcessJiffies(const std::vector<pid_t>& pids) {
  uint64_t sum = 0;
  for (pid_t pid : pids) {
    std::string stat = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/stat"));
    size_t paren = stat.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream in(stat.substr(paren + 2));
    std::string field;
    uint64_t utime = 0, stime = 0;
    // After "pid (comm)": state is field 3; utime 14, stime 15.
    for (int i = 3; i <= 15 && in >> field; ++i) {
      if (i == 14 && !absl::SimpleAtoi(field, &utime)) utime = 0;
      if (i == 15 && !absl::SimpleAtoi(field, &stime)) stime = 0;
    }
    sum += utime + stime;
  }
  return sum;
}

// CPU time of this process (the load generator's threads), seconds.
double SelfCpuSeconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// ---- nginx ----

class Nginx {
 public:
  ~Nginx() { Stop(); }
  absl::Status Start(const std::string& binary, const TempDir& dir,
                     const std::string& name, const std::string& address,
                     bool reuseport) {
    std::string prefix = absl::StrCat(dir.path(), "/", name);
    std::string conf = dir.WriteFile(
        name + ".conf", absl::StrCat("worker_processes 2;\n"
                                     "daemon off;\n"
                                     "pid ",
                                     prefix, ".pid;\n", "error_log ", prefix,
                                     ".error.log warn;\n"
                                     "events { worker_connections 4096; }\n"
                                     "http {\n"
                                     "  access_log off;\n"
                                     "  server {\n"
                                     "    listen ",
                                     address, reuseport ? " reuseport" : "",
                                     ";\n"
                                     "    location / { return 200 \"ok\"; }\n"
                                     "  }\n"
                                     "}\n"));
    return process_.Start(
        {binary, "-e", prefix + ".early.log", "-c", conf, "-p", dir.path()},
        prefix + ".log");
  }
  void Stop() {
    if (!process_.running()) return;
    process_.Signal(SIGTERM);  // fast shutdown: master stops its workers
    if (!process_.Wait(absl::Seconds(5))) {
      for (pid_t w : DescendantsOf(process_.pid())) ::kill(w, SIGKILL);
    }
  }
  std::string Log() const { return process_.Log(); }
  // The master and its workers.
  std::vector<pid_t> Pids() const {
    std::vector<pid_t> out = {process_.pid()};
    for (pid_t w : DescendantsOf(process_.pid())) out.push_back(w);
    return out;
  }

 private:
  Subprocess process_;
};

// ---- rounds ----

struct Round {
  double rate = 0;           // answered connections (wrk: requests) per s
  int64_t failures = 0;      // client-side, any kind
  int64_t late_starts = 0;   // fixed rate: starts delayed by max_in_flight
  double cpu_us = 0;         // machine busy CPU per answered connection
  double own_cpu_us = 0;     // client + server processes, per connection
  double server_cpu_us = 0;  // server processes only, per connection
  double busy = 0;           // machine busy fraction during the round
  double background = 0;     // machine busy fraction just before it
  loadgen::Percentiles lat;  // ms, request written -> answer complete
  std::string first_error;
};

Round RunRound(const std::string& target, const std::vector<pid_t>& server,
               int rate, int concurrency, absl::Duration duration) {
  loadgen::Options o;
  o.target = target;
  o.mode = loadgen::Mode::kShort;
  o.protocol = loadgen::Protocol::kHttp;
  o.rate = rate;
  o.concurrency = concurrency;
  o.threads = 2;
  o.duration = duration;
  o.max_connections = 40000 * absl::ToDoubleSeconds(duration) + 1000;
  o.max_in_flight = 1000;
  o.quiet = true;
  Round r;
  r.background = WaitIdle(0.3, absl::Seconds(1));
  CpuTimes a = ReadCpu();
  const uint64_t server_a = ProcessJiffies(server);
  const double self_a = SelfCpuSeconds();
  absl::StatusOr<loadgen::Result> res = loadgen::Run(o);
  const double self_b = SelfCpuSeconds();
  const uint64_t server_b = ProcessJiffies(server);
  CpuTimes b = ReadCpu();
  if (!res.ok()) {
    r.failures = -1;
    r.first_error = std::string(res.status().message());
    return r;
  }
  double secs = absl::ToDoubleSeconds(res->elapsed);
  r.rate = secs > 0 ? res->ok() / secs : 0;
  r.failures = res->failures();
  r.late_starts = res->late_starts;
  const double hz = ::sysconf(_SC_CLK_TCK);
  double busy_secs = (b.busy - a.busy) / hz;
  // No /proc/stat softirq on top: on this kernel the tasks' own times
  // already include the loopback softirq work done in their context (adding
  // it exceeded the machine's total busy time).
  double own_secs = (self_b - self_a) + (server_b - server_a) / hz;
  r.cpu_us = res->ok() > 0 ? busy_secs * 1e6 / res->ok() : 0;
  r.own_cpu_us = res->ok() > 0 ? own_secs * 1e6 / res->ok() : 0;
  r.server_cpu_us =
      res->ok() > 0 ? (server_b - server_a) / hz * 1e6 / res->ok() : 0;
  r.busy = BusyFraction(a, b);
  r.lat = res->latency_ms;
  if (!res->first_errors.empty()) r.first_error = res->first_errors[0];
  return r;
}

// One wrk round: `connections` kept busy for `duration`, keep-alive or a
// new connection per request. Failures are wrk's socket errors plus non-2xx
// answers; client CPU is wrk's (getrusage of waited-for children).
Round RunWrkRound(const std::string& wrk, const std::string& target,
                  const std::vector<pid_t>& server, int connections,
                  bool keep_alive, absl::Duration duration) {
  Round r;
  r.background = WaitIdle(0.3, absl::Seconds(1));
  CpuTimes a = ReadCpu();
  const uint64_t server_a = ProcessJiffies(server);
  rusage ca{};
  ::getrusage(RUSAGE_CHILDREN, &ca);
  std::string cmd = absl::StrFormat(
      "'%s' -t2 -c%d -d%ds --latency %s http://%s/ 2>&1", wrk, connections,
      static_cast<int>(absl::ToInt64Seconds(duration)),
      keep_alive ? "" : "-H 'Connection: close'", target);
  std::string out;
  if (FILE* p = ::popen(cmd.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;) {
      out.append(buf, n);
    }
    ::pclose(p);
  }
  rusage cb{};
  ::getrusage(RUSAGE_CHILDREN, &cb);
  const uint64_t server_b = ProcessJiffies(server);
  CpuTimes b = ReadCpu();
  // "  38978 requests in 2.07s, 4.80MB read"
  auto number_before = [&](const std::string& marker) -> double {
    size_t at = out.find(marker);
    if (at == std::string::npos) return -1;
    size_t start = out.rfind(' ', at - 1);
    double v = -1;
    (void)absl::SimpleAtod(out.substr(start + 1, at - start - 1), &v);
    return v;
  };
  auto number_after = [&](const std::string& marker) -> double {
    size_t at = out.find(marker);
    if (at == std::string::npos) return 0;
    at += marker.size();
    while (at < out.size() && out[at] == ' ') ++at;
    size_t end = out.find_first_not_of("0123456789.", at);
    double v = 0;
    (void)absl::SimpleAtod(out.substr(at, end - at), &v);
    return v;
  };
  double requests = number_before(" requests in ");
  if (requests <= 0) {
    r.failures = -1;
    r.first_error = "wrk: " + out.substr(0, 200);
    return r;
  }
  r.rate = number_after("Requests/sec:");
  for (const char* kind : {"connect ", "read ", "write ", "timeout "}) {
    size_t errors = out.find("Socket errors:");
    if (errors == std::string::npos) break;
    size_t at = out.find(kind, errors);
    if (at != std::string::npos) {
      int64_t v = 0;
      size_t end = out.find_first_of(",\n", at);
      (void)absl::SimpleAtoi(
          out.substr(at + std::strlen(kind), end - at - std::strlen(kind)), &v);
      r.failures += v;
    }
  }
  r.failures += static_cast<int64_t>(number_after("Non-2xx or 3xx responses:"));
  if (r.failures > 0) r.first_error = out;
  // "     99%   19.37ms"
  if (size_t at = out.find(" 99% "); at != std::string::npos) {
    at += 5;
    while (at < out.size() && out[at] == ' ') ++at;
    size_t end = out.find_first_not_of("0123456789.", at);
    double v = 0;
    (void)absl::SimpleAtod(out.substr(at, end - at), &v);
    std::string unit = out.substr(end, 2);
    r.lat.p99 = unit == "us" ? v / 1000 : unit == "ms" ? v : v * 1000;
  }
  const double hz = ::sysconf(_SC_CLK_TCK);
  double client = (cb.ru_utime.tv_sec - ca.ru_utime.tv_sec) +
                  (cb.ru_stime.tv_sec - ca.ru_stime.tv_sec) +
                  ((cb.ru_utime.tv_usec - ca.ru_utime.tv_usec) +
                   (cb.ru_stime.tv_usec - ca.ru_stime.tv_usec)) /
                      1e6;
  r.own_cpu_us = (client + (server_b - server_a) / hz) * 1e6 / requests;
  r.server_cpu_us = (server_b - server_a) / hz * 1e6 / requests;
  r.cpu_us = (b.busy - a.busy) / hz * 1e6 / requests;
  r.busy = BusyFraction(a, b);
  return r;
}

// ---- statistics and output ----

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// "median (min–max)" with `decimals` digits after the point.
std::string MedRange(const std::vector<double>& v, int decimals) {
  if (v.empty()) return "-";
  auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return absl::StrFormat("%.*f (%.*f–%.*f)", decimals, Median(v), decimals, *lo,
                         decimals, *hi);
}

struct Load {
  std::string name;
  int rate;                 // 0 = saturation
  bool wrk = false;         // wrk instead of the loadgen
  bool keep_alive = false;  // wrk: keep-alive rather than a connection each
  int connections = 0;      // wrk -c
};

using Results = std::vector<std::vector<Round>>;  // [server][pair]

template <typename F>
std::vector<double> Values(const std::vector<Round>& rounds, F f) {
  std::vector<double> out;
  for (const Round& r : rounds) out.push_back(f(r));
  return out;
}

template <typename F>
std::vector<double> Ratios(const std::vector<Round>& rounds,
                           const std::vector<Round>& reference, F f) {
  std::vector<double> out;
  for (size_t i = 0; i < rounds.size() && i < reference.size(); ++i) {
    double ref = f(reference[i]);
    if (ref > 0) out.push_back(f(rounds[i]) / ref);
  }
  return out;
}

void PrintTable(const Load& load, const Results& results) {
  const auto rate = [](const Round& r) { return r.rate; };
  const auto own = [](const Round& r) { return r.own_cpu_us; };
  const auto server = [](const Round& r) { return r.server_cpu_us; };
  const auto cpu = [](const Round& r) { return r.cpu_us; };
  const auto p99 = [](const Round& r) { return r.lat.p99; };
  const auto busy = [](const Round& r) { return 100 * r.busy; };
  const auto bg = [](const Round& r) { return 100 * r.background; };
  std::cout << "\n### " << load.name << "\n\n"
            << absl::StrReplaceAll(
                   "| server | conn/s | ratio | CPU µs/conn, client+server | "
                   "ratio | server CPU µs/conn | ratio | machine CPU µs/conn | "
                   "ratio | p99 ms | ratio | failures | machine busy % "
                   "(before) |\n",
                   {{"conn", load.keep_alive ? "req" : "conn"}})
            << "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
               "| ---: | ---: | ---: | ---: |\n";
  const std::vector<Round>& ref = results[0];
  for (size_t s = 0; s < results.size(); ++s) {
    const std::vector<Round>& rounds = results[s];
    int64_t failures = 0;
    for (const Round& r : rounds) failures += r.failures;
    auto ratio = [&](auto f) {
      return s == 0 ? std::string("1") : MedRange(Ratios(rounds, ref, f), 2);
    };
    std::cout << absl::StrFormat(
        "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d | %.0f "
        "(%.0f) |\n",
        Servers()[s].name, MedRange(Values(rounds, rate), 0), ratio(rate),
        MedRange(Values(rounds, own), 1), ratio(own),
        MedRange(Values(rounds, server), 1), ratio(server),
        MedRange(Values(rounds, cpu), 1), ratio(cpu),
        MedRange(Values(rounds, p99), 2), ratio(p99), failures,
        Median(Values(rounds, busy)), Median(Values(rounds, bg)));
  }
  for (size_t s = 0; s < results.size(); ++s) {
    for (const Round& r : results[s]) {
      if (!r.first_error.empty()) {
        std::cout << "\nfirst failure (" << Servers()[s].name
                  << "): " << r.first_error << "\n";
        break;
      }
    }
  }
}

// Median p50/p90/p99/max per server and load, for gnuplot.
void WritePlot(const std::string& png, const std::vector<Load>& loads,
               const std::vector<Results>& all, const std::string& dir) {
  std::string data = dir + "/latency.dat";
  std::ofstream f(data);
  for (size_t l = 0; l < loads.size(); ++l) {
    for (size_t s = 0; s < all[l].size(); ++s) {
      f << "# " << loads[l].name << " / " << Servers()[s].name << "\n";
      const std::vector<Round>& rounds = all[l][s];
      std::vector<std::pair<double, double>> points = {
          {50,
           Median(Values(rounds, [](const Round& r) { return r.lat.p50; }))},
          {90,
           Median(Values(rounds, [](const Round& r) { return r.lat.p90; }))},
          {99,
           Median(Values(rounds, [](const Round& r) { return r.lat.p99; }))},
          {100,
           Median(Values(rounds, [](const Round& r) { return r.lat.max; }))}};
      for (const auto& [pct, ms] : points) {
        // x: "nines" so that 50/90/99/max spread out.
        double x = pct >= 100 ? 3 : -std::log10(1 - pct / 100.0);
        f << absl::StrFormat("%.4f %.4f\n", x, ms);
      }
      f << "\n\n";
    }
  }
  f.close();
  std::string script = dir + "/latency.gp";
  std::ofstream g(script);
  g << "set terminal pngcairo size 1200,500 noenhanced\n"
    << "set output '" << png << "'\n"
    << "set multiplot layout 1," << loads.size() << "\n"
    << "set logscale y\nset grid\n"
    << "set xtics ('p50' " << -std::log10(0.5) << ", 'p90' 1, 'p99' 2, "
    << "'max' 3)\n"
    << "set ylabel 'latency ms (request written -> answer, median of rounds)'"
    << "\nset key top left\n";
  for (size_t l = 0; l < loads.size(); ++l) {
    g << "set title '" << loads[l].name << "'\nplot ";
    for (size_t s = 0; s < all[l].size(); ++s) {
      g << (s ? ", " : "") << "'" << data << "' index " << l * all[l].size() + s
        << " with linespoints title '" << Servers()[s].name << "'";
    }
    g << "\n";
  }
  g << "unset multiplot\n";
  g.close();
  std::string cmd = absl::StrCat("gnuplot '", script, "' 2>&1");
  if (std::system(cmd.c_str()) == 0) {
    std::cout << "\nLatency percentile plot: " << png << "\n";
  } else {
    std::cerr << "gnuplot failed; data in " << data << "\n";
  }
}

std::string FindNginx(const std::string& flag) {
  if (!flag.empty()) return flag;
  for (const char* p : {"/usr/sbin/nginx", "/usr/local/sbin/nginx"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  return "";
}

std::string FindWrk(const std::string& flag) {
  if (flag == "none") return "";
  if (!flag.empty()) return flag;
  for (const char* p : {"/usr/bin/wrk", "/usr/local/bin/wrk"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  return "";
}

bool HaveGnuplot() { return std::system("command -v gnuplot >/dev/null") == 0; }

int Main(int argc, char** argv) {
  int pairs = 5;
  double seconds = 5;
  int concurrency = 32;
  int fixed_rate = 10000;
  std::string nginx_flag, png, wrk_flag;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name, std::string* out) {
      std::string prefix = absl::StrCat(name, "=");
      if (a.rfind(prefix, 0) != 0) return false;
      *out = a.substr(prefix.size());
      return true;
    };
    std::string v;
    if (a == "--help") {
      std::cout
          << "Usage: portfleet-fleet-bench [--pairs=5] [--seconds=5] "
             "[--concurrency=32] [--rate=10000]\n"
             "                            [--nginx=/usr/sbin/nginx] "
             "[--wrk=wrk|none] [--png=FILE]\n"
             "Compares the portfleet agent (2 shards, HASH and CPU) with "
             "nginx (reuseport, and one\nshared listener) in a private "
             "network namespace. Run as root from the build\ndirectory; "
             "tests/bench/run_fleet_bench.sh installs nginx and gnuplot.\n";
      return 0;
    } else if (value("--pairs", &v) && absl::SimpleAtoi(v, &pairs) &&
               pairs > 0 && pairs <= 20) {
    } else if (value("--seconds", &v) && absl::SimpleAtod(v, &seconds) &&
               seconds >= 1 && seconds <= 30) {
    } else if (value("--concurrency", &v) &&
               absl::SimpleAtoi(v, &concurrency) && concurrency > 0 &&
               concurrency <= 1000) {
    } else if (value("--rate", &v) && absl::SimpleAtoi(v, &fixed_rate) &&
               fixed_rate > 0 && fixed_rate <= 100000) {
    } else if (value("--nginx", &nginx_flag) || value("--png", &png) ||
               value("--wrk", &wrk_flag)) {
    } else {
      std::cerr << "portfleet-fleet-bench: bad argument '" << a << "'\n";
      return 2;
    }
  }
  const std::string nginx = FindNginx(nginx_flag);
  if (nginx.empty()) {
    std::cerr << "portfleet-fleet-bench: nginx not found (apt-get install "
                 "nginx-light, or run tests/bench/run_fleet_bench.sh)\n";
    return 2;
  }
  if (absl::Status s = EnterPrivateNetns(); !s.ok()) {
    std::cerr << "portfleet-fleet-bench: needs a private network namespace: "
              << s << "\n";
    return 2;
  }
  WidenPortRange();

  AgentHarness agent;
  if (!agent.Start(kAgentSpec).ok()) {
    std::cerr << "agent did not start:\n" << agent.Log();
    return 1;
  }
  TempDir dir;
  Nginx nginx_reuseport, nginx_shared;
  if (!nginx_reuseport
           .Start(nginx, dir, "reuseport", Servers()[0].address, true)
           .ok() ||
      !nginx_shared.Start(nginx, dir, "shared", Servers()[3].address, false)
           .ok()) {
    std::cerr << "cannot start nginx\n";
    return 1;
  }
  for (const Server& s : Servers()) {
    if (!WaitFor([&] { return HttpGet(s.address).outcome == Outcome::kOk; },
                 absl::Seconds(15))) {
      std::cerr << s.name << " on " << s.address << " not answering\n"
                << agent.Log() << nginx_reuseport.Log() << nginx_shared.Log();
      return 1;
    }
  }
  {
    auto stub = FleetStub(agent.api_socket());
    if (!WaitFor(
            [&] {
              return ReadyShards(*stub, "hash") == 2 &&
                     ReadyShards(*stub, "cpu") == 2;
            },
            absl::Seconds(15))) {
      std::cerr << "portfleet shards not ready\n" << agent.Log();
      return 1;
    }
  }

  std::vector<Load> loads = {
      {absl::StrFormat("Saturation (%d connections in flight, 2 client "
                       "threads)",
                       concurrency),
       0},
      {absl::StrFormat("Fixed offered rate %d conn/s (2 client threads)",
                       fixed_rate),
       fixed_rate},
  };
  const std::string wrk = FindWrk(wrk_flag);
  if (!wrk.empty()) {
    loads.push_back({"wrk cross-check: keep-alive (wrk -t2 -c50)", 0,
                     /*wrk=*/true, /*keep_alive=*/true, 50});
    loads.push_back(
        {"wrk cross-check: new connection per request (wrk -t2 -c32 -H "
         "'Connection: close')",
         0, /*wrk=*/true, /*keep_alive=*/false, 32});
  } else {
    std::cerr << "wrk not found: no wrk rounds\n";
  }
  const absl::Duration duration = absl::Seconds(seconds);
  const size_t n = Servers().size();
  // The processes whose CPU time counts as each server's: nginx's master and
  // workers; the agent and the listener's workers.
  std::vector<std::vector<pid_t>> server_pids(n);
  server_pids[0] = nginx_reuseport.Pids();
  server_pids[3] = nginx_shared.Pids();
  for (size_t s : {1, 2}) server_pids[s].push_back(agent.pid());
  for (pid_t pid : ChildrenOf(agent.pid())) {
    std::optional<std::string> listener = ProcessEnv(pid, "PORTFLEET_LISTENER");
    if (listener == "hash") server_pids[1].push_back(pid);
    if (listener == "cpu") server_pids[2].push_back(pid);
  }
  const absl::Time bench_start = absl::Now();
  // Warm-up: every server, briefly, at saturation.
  for (size_t s = 0; s < n; ++s) {
    RunRound(Servers()[s].address, server_pids[s], 0, concurrency,
             absl::Seconds(1));
  }
  std::vector<Results> all(loads.size(), Results(n));
  for (int p = 0; p < pairs; ++p) {
    for (size_t l = 0; l < loads.size(); ++l) {
      for (size_t k = 0; k < n; ++k) {
        size_t s = p % 2 ? n - 1 - k : k;  // reverse the order every other set
        Round r = loads[l].wrk
                      ? RunWrkRound(wrk, Servers()[s].address, server_pids[s],
                                    loads[l].connections, loads[l].keep_alive,
                                    duration)
                      : RunRound(Servers()[s].address, server_pids[s],
                                 loads[l].rate, concurrency, duration);
        std::cerr << absl::StrFormat(
            "set %d, %s, %s: %.0f conn/s, %.1f µs/conn, p99 %.2f ms, %d "
            "failures, %d late starts, %.1f µs/conn in client+server, "
            "machine busy %.0f%% (before %.0f%%)\n",
            p + 1, loads[l].name, Servers()[s].name, r.rate, r.cpu_us,
            r.lat.p99, r.failures, r.late_starts, r.own_cpu_us, 100 * r.busy,
            100 * r.background);
        all[l][s].push_back(r);
      }
    }
  }
  const absl::Duration took = absl::Now() - bench_start;

  utsname u{};
  ::uname(&u);
  std::string model;
  {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpuinfo, line)) {
      if (line.rfind("model name", 0) == 0) {
        model = line.substr(line.find(':') + 2);
        break;
      }
    }
  }
  std::cout << absl::StrFormat(
      "## portfleet-fleet-bench, %s\n\n"
      "%d CPUs (%s), kernel %s, loopback in a private network namespace; "
      "%d sets x %d servers x %zu loads x %.0f s (%.0f s in all, after a "
      "1 s warm-up per server).\n"
      "**Machine ceiling: about 31k new connections/s** (a bare "
      "connect/accept/close costs ~52 µs of machine CPU here; a tiny HTTP "
      "exchange 70–95 µs).\n"
      "Figures: median (range) over the sets; ratios are taken within a set "
      "against (c) and their median (range) is shown. Machine CPU µs/conn is "
      "busy machine CPU from /proc/stat over the round divided by answered "
      "connections; it includes whatever else runs on this shared machine, "
      "which other tenants kept near 100%% busy, so it is mostly (2 CPUs / "
      "rate). Client+server CPU µs/conn (this process's CPU time from "
      "getrusage plus the server processes' utime+stime from /proc/PID/stat, "
      "which on this kernel include the loopback softirq work done in their "
      "context) is the one to compare. "
      "p99 is from writing the request to the complete answer "
      "(includes the accept-queue wait, not the TCP handshake). (d) is nginx "
      "without reuseport: one listening socket shared by 2 workers.\n",
      absl::FormatTime("%Y-%m-%d %H:%M UTC", absl::Now(), absl::UTCTimeZone()),
      std::thread::hardware_concurrency(), model, u.release, pairs,
      static_cast<int>(n), loads.size(), seconds, absl::ToDoubleSeconds(took));
  for (size_t l = 0; l < loads.size(); ++l) PrintTable(loads[l], all[l]);
  if (!png.empty()) {
    if (HaveGnuplot()) {
      // The loadgen's loads (wrk gives no p50..max of its own here).
      std::vector<Load> plotted;
      std::vector<Results> plotted_results;
      for (size_t l = 0; l < loads.size(); ++l) {
        if (loads[l].wrk) continue;
        plotted.push_back(loads[l]);
        plotted_results.push_back(all[l]);
      }
      WritePlot(png, plotted, plotted_results, dir.path());
    } else {
      std::cerr << "gnuplot not found: no plot\n";
    }
  }
  nginx_reuseport.Stop();
  nginx_shared.Stop();
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
