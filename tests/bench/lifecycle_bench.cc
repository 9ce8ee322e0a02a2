// portfleet-lifecycle-bench: how long lifecycle operations take on the real
// agent, in a private network namespace (needs root / CAP_SYS_ADMIN).
//
//   add shard:  ScaleListener(n+1) call -> call returned; -> the agent lists
//               the new shard ready; -> the first HTTP answer from it.
//   drain idle: DrainShard of a shard with no connections -> call returned
//               (worker told, socket shut down, worker reaped).
//
// Repeated --reps times (default 10) on a listener alternating 1 <-> 2 shards
// (HASH). Prints a Markdown table: median and range. Not a timed test.
#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

constexpr char kAddress[] = "127.0.0.1:8080";
constexpr char kSpec[] =
    R"pb(listeners {
           name: "web"
           address: "127.0.0.1:8080"
           shards: 1
           worker { command: "portfleet-worker" args: "--mode=http" }
           drain_timeout_seconds: 5
           steering { policy: STEERING_POLICY_HASH }
         })pb";

struct Series {
  std::string name;
  std::vector<double> ms;
};

std::string Row(Series& s) {
  if (s.ms.empty()) return absl::StrFormat("| %s | - | - | 0 |", s.name);
  std::sort(s.ms.begin(), s.ms.end());
  size_t n = s.ms.size();
  double median = n % 2 ? s.ms[n / 2] : (s.ms[n / 2 - 1] + s.ms[n / 2]) / 2.0;
  return absl::StrFormat("| %s | %.1f | %.1f – %.1f | %d |", s.name, median,
                         s.ms.front(), s.ms.back(), n);
}

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

int Main(int argc, char** argv) {
  int reps = 10;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help") {
      std::cout << "Usage: portfleet-lifecycle-bench [--reps N]\n"
                   "Times add-shard and drain-idle-shard on the real agent "
                   "in a private network\nnamespace (run as root from the "
                   "build directory). Prints a Markdown table.\n";
      return 0;
    }
    if (arg == "--reps" && i + 1 < argc &&
        absl::SimpleAtoi(argv[i + 1], &reps) && reps > 0 && reps <= 100) {
      ++i;
      continue;
    }
    std::cerr << "portfleet-lifecycle-bench: bad argument '" << arg << "'\n";
    return 2;
  }
  if (absl::Status s = EnterPrivateNetns(); !s.ok()) {
    std::cerr << "portfleet-lifecycle-bench: " << s << "\n";
    return 1;
  }
  AgentHarness agent;
  if (!agent.Start(kSpec).ok() || !agent.WaitServing(kAddress)) {
    std::cerr << "agent did not start:\n" << agent.Log();
    return 1;
  }
  auto stub = FleetStub(agent.api_socket());
  if (!WaitFor([&] { return ReadyShards(*stub, "web") == 1; },
               absl::Seconds(15))) {
    std::cerr << "shard 0 never ready\n" << agent.Log();
    return 1;
  }
  Series call{"add shard: ScaleListener call returns", {}};
  Series ready{"add shard: call → shard listed ready", {}};
  Series answering{"add shard: call → first answer from the new shard", {}};
  Series drain{"drain idle shard: DrainShard call returns (worker reaped)", {}};
  for (int rep = 0; rep < reps; ++rep) {
    absl::SleepFor(absl::Milliseconds(300));  // let the machine settle
    absl::Time t0 = absl::Now();
    grpc::Status up = ScaleTo(*stub, "web", 2);
    absl::Time t1 = absl::Now();
    if (!up.ok()) {
      std::cerr << "scale up: " << up.error_message() << "\n";
      return 1;
    }
    call.ms.push_back(Ms(t1 - t0));
    // Poll both: ready in the listing and an answer from shard 1.
    bool is_ready = false, answered = false;
    absl::Time deadline = t0 + absl::Seconds(10);
    while ((!is_ready || !answered) && absl::Now() < deadline) {
      if (!answered) {
        Reply r = HttpGet(kAddress);
        if (r.outcome == Outcome::kOk && r.shard == 1) {
          answering.ms.push_back(Ms(absl::Now() - t0));
          answered = true;
        }
      }
      if (!is_ready && ReadyShards(*stub, "web") == 2) {
        ready.ms.push_back(Ms(absl::Now() - t0));
        is_ready = true;
      }
    }
    if (!is_ready || !answered) {
      std::cerr << "new shard not serving within 10 s\n" << agent.Log();
      return 1;
    }
    absl::SleepFor(absl::Milliseconds(300));
    absl::Time d0 = absl::Now();
    grpc::Status drained = Drain(*stub, "web", 1);
    if (!drained.ok()) {
      std::cerr << "drain: " << drained.error_message() << "\n";
      return 1;
    }
    drain.ms.push_back(Ms(absl::Now() - d0));
  }
  std::cout << "| operation | median ms | range ms | n |\n"
            << "| --- | ---: | ---: | ---: |\n"
            << Row(call) << "\n"
            << Row(ready) << "\n"
            << Row(answering) << "\n"
            << Row(drain) << "\n";
  std::cout << "\nThe first-answer time includes polling with HTTP GETs that "
               "the HASH table\nsends to shard 1 about half the time "
               "(0.2-0.5 ms each).\n";
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
