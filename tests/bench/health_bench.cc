// portfleet-health-bench: how fast the agent notices a stuck worker and
// what the clients see, on the real agent in a private network namespace
// (needs root / CAP_SYS_ADMIN).
//
// Per run, on a 2-shard HASH listener (stall window 600 ms by default,
// grace --grace seconds) under --rate new connections/s (each request times
// out after 2 s):
//   SIGSTOP the worker of shard 1 at t0, then
//   ejected:   the agent's SHARD_EJECTED event (its own timestamp) - t0
//   replaced:  the agent's SHARD_REPLACED event - t0 (grace after ejection)
//   serving:   the first HTTP answer from shard 1's new worker - t0 (the
//              replacement started, said ready and went back in the tables)
//   failed:    client connections that failed or took longer than 2 s,
//              from 300 ms before t0 to 300 ms after "serving"
// Repeated --reps times (default 10) on the same agent (each run stops the
// worker the previous run started). Prints a Markdown table: median and
// range. Not a timed test: never run by ctest.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <future>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/netns/health_testing.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

constexpr char kAddress[] = "127.0.0.1:8080";

struct Series {
  std::string name;
  std::vector<double> values;
};

std::string Row(Series& s, const char* unit) {
  if (s.values.empty()) return absl::StrFormat("| %s | - | - | 0 |", s.name);
  std::sort(s.values.begin(), s.values.end());
  size_t n = s.values.size();
  double median =
      n % 2 ? s.values[n / 2] : (s.values[n / 2 - 1] + s.values[n / 2]) / 2.0;
  return absl::StrFormat("| %s (%s) | %.0f | %.0f – %.0f | %d |", s.name, unit,
                         median, s.values.front(), s.values.back(), n);
}

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

struct Run {
  double ejected_ms = -1, replaced_ms = -1, serving_ms = -1;
  int64_t failed = -1, ok = 0;
};

// One run: stop shard 1's worker under load and time what follows.
Run StopAndTime(AgentHarness& agent, v1::FleetService::Stub& stub,
                EventLog& events, int rate) {
  Run run;
  WaitFor(
      [&] {
        return ShardHealth(stub, "web", 0) == v1::SHARD_HEALTH_HEALTHY &&
               ShardHealth(stub, "web", 1) == v1::SHARD_HEALTH_HEALTHY;
      },
      absl::Seconds(15));
  absl::SleepFor(absl::Milliseconds(500));
  pid_t old = agent.WorkersByShard().at(1);
  loadgen::Options o;
  o.target = kAddress;
  o.rate = rate;
  o.duration = absl::Seconds(20);
  o.max_connections = 40000;
  o.connect_timeout = o.request_timeout = absl::Seconds(2);
  o.quiet = true;
  std::atomic<bool> stop{false};
  auto load =
      std::async(std::launch::async, [&] { return loadgen::Run(o, &stop); });
  absl::SleepFor(absl::Milliseconds(300));
  absl::Time t0 = absl::Now();
  ::kill(old, SIGSTOP);
  if (auto t = events.Wait(v1::EVENT_TYPE_SHARD_EJECTED, 1, old, t0,
                           absl::Seconds(5))) {
    run.ejected_ms = Ms(*t - t0);
  }
  if (auto t = events.Wait(v1::EVENT_TYPE_SHARD_REPLACED, 1, old, t0,
                           absl::Seconds(15))) {
    run.replaced_ms = Ms(*t - t0);
  }
  ClientOptions probe;
  probe.timeout = absl::Milliseconds(500);
  bool served = WaitFor(
      [&] {
        Reply r = HttpGet(kAddress, probe);
        return r.outcome == Outcome::kOk && r.shard == 1 && r.pid != old;
      },
      absl::Seconds(15));
  if (served) run.serving_ms = Ms(absl::Now() - t0);
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  if (result.ok()) {
    run.failed = result->failures();
    run.ok = result->ok();
  }
  return run;
}

int Main(int argc, char** argv) {
  int reps = 10, grace = 1, rate = 1000;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    int* target = flag == "--reps"    ? &reps
                  : flag == "--grace" ? &grace
                  : flag == "--rate"  ? &rate
                                      : nullptr;
    if (target == nullptr || !absl::SimpleAtoi(argv[i + 1], target)) {
      std::cerr << "usage: portfleet-health-bench [--reps N] [--grace S] "
                   "[--rate CONN_PER_S]\n";
      return 2;
    }
  }
  if (absl::Status s = EnterPrivateNetns(); !s.ok()) {
    std::cerr << "needs a private network namespace (root): " << s << "\n";
    return 1;
  }
  WidenPortRange();
  AgentHarness agent;
  std::string spec = absl::StrCat(
      R"(listeners { name: "web" address: "127.0.0.1:8080" shards: 2 )",
      R"(worker { command: "portfleet-worker" args: "--mode=http" } )",
      "drain_timeout_seconds: 2 health { stall_grace_seconds: ", grace, " } }");
  if (!agent.Start(spec).ok() || !agent.WaitServing(kAddress)) {
    std::cerr << "agent did not start:\n" << agent.Log() << "\n";
    return 1;
  }
  auto stub = FleetStub(agent.api_socket());
  EventLog events(*stub);
  Series ejected{"SIGSTOP -> ejected", {}};
  Series replaced{"SIGSTOP -> replaced (SIGKILL)", {}};
  Series serving{"SIGSTOP -> replacement serving", {}};
  Series failed{"client failures per run", {}};
  std::string per_run;
  for (int rep = 0; rep < reps; ++rep) {
    Run r = StopAndTime(agent, *stub, events, rate);
    if (r.ejected_ms >= 0) ejected.values.push_back(r.ejected_ms);
    if (r.replaced_ms >= 0) replaced.values.push_back(r.replaced_ms);
    if (r.serving_ms >= 0) serving.values.push_back(r.serving_ms);
    if (r.failed >= 0) failed.values.push_back(static_cast<double>(r.failed));
    absl::StrAppend(
        &per_run, absl::StrFormat("run %d: ejected %.0f ms, replaced %.0f ms, "
                                  "serving %.0f ms, %d ok, %d failed\n",
                                  rep + 1, r.ejected_ms, r.replaced_ms,
                                  r.serving_ms, r.ok, r.failed));
    std::cerr << "run " << rep + 1 << "/" << reps << " done\n";
  }
  std::cout << per_run << "\n";
  std::cout << absl::StrFormat(
      "2 shards HASH, %d new connections/s, stall window 600 ms, grace %d s, "
      "%d runs\n\n",
      rate, grace, reps);
  std::cout << "| measure | median | range | runs |\n|---|---|---|---|\n";
  std::cout << Row(ejected, "ms") << "\n"
            << Row(replaced, "ms") << "\n"
            << Row(serving, "ms") << "\n"
            << Row(failed, "connections") << "\n";
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
