// portfleet-lifecycle-bench: how long lifecycle operations take on the real
// agent, in a private network namespace (needs root / CAP_SYS_ADMIN).
//
//   add shard:  ScaleListener(n+1) call -> call returned; -> the agent lists
//               the new shard ready; -> the first HTTP answer from it.
//   drain idle: DrainShard of a shard with no connections -> call returned
//               (worker told, socket shut down, worker reaped).
//   roll out:   RollOutListener of a 4-shard listener (same worker, every
//               worker replaced), max_surge 1 and 4 alternating -> call
//               returned.
//   re-adopt:   SIGKILL the agent, 300 ms + an offset without an agent,
//               start it again -> the log says "of a previous agent found"
//               (it now waits for their reconnects); -> the log says
//               "re-adopted worker pid" once per shard; -> "API serving";
//               -> every shard listed ready with the pid it had before.
//               Workers retry every 250 ms on a fixed cadence from the kill,
//               so the offset (rep * 250 ms / reps) samples that phase
//               evenly instead of always hitting the same point of it.
//
// Add/drain are repeated --reps times (default 10) on a listener alternating
// 1 <-> 2 shards (HASH); roll-outs --rollout-reps times per max_surge
// (default 6); re-adoption --restart-reps times (default 6). Prints a
// Markdown table: median and range. Not a timed test.
#include <signal.h>

#include <algorithm>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
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
constexpr char kRollAddress[] = "127.0.0.1:8081";
constexpr int kRollShards = 4;
constexpr char kSpec[] =
    R"pb(listeners {
           name: "web"
           address: "127.0.0.1:8080"
           shards: 1
           worker { command: "portfleet-worker" args: "--mode=http" }
           drain_timeout_seconds: 5
           steering { policy: STEERING_POLICY_HASH }
         }
         listeners {
           name: "roll"
           address: "127.0.0.1:8081"
           shards: 4
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

grpc::Status RollOut(v1::FleetService::Stub& stub, uint32_t surge) {
  v1::RollOutListenerRequest req;
  req.set_name("roll");
  req.set_max_surge(surge);
  v1::RollOutListenerResponse resp;
  return stub.RollOutListener(RpcContext(60).get(), req, &resp);
}

// Shard index -> worker pid of the ready, running shards of `name`.
std::map<int, pid_t> ReadyPids(v1::FleetService::Stub& stub,
                               const std::string& name) {
  std::map<int, pid_t> out;
  for (const v1::Shard& s : Shards(stub, name)) {
    if (s.ready() && s.pid() > 0 && s.state() == v1::SHARD_STATE_RUNNING) {
      out[s.index()] = static_cast<pid_t>(s.pid());
    }
  }
  return out;
}

// Polls `pred` every `every` until true or `deadline`; returns the time it
// became true, or nullopt.
std::optional<absl::Time> PollUntil(const std::function<bool()>& pred,
                                    absl::Time deadline, absl::Duration every) {
  while (absl::Now() < deadline) {
    if (pred()) return absl::Now();
    absl::SleepFor(every);
  }
  return std::nullopt;
}

bool ParseCount(const std::string& flag, int argc, char** argv, int* i,
                int* out) {
  if (argv[*i] != flag || *i + 1 >= argc) return false;
  int v;
  if (!absl::SimpleAtoi(argv[*i + 1], &v) || v <= 0 || v > 100) return false;
  *out = v;
  ++*i;
  return true;
}

int Main(int argc, char** argv) {
  int reps = 10;
  int rollout_reps = 6;
  int restart_reps = 6;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help") {
      std::cout << "Usage: portfleet-lifecycle-bench [--reps N] "
                   "[--rollout-reps N] [--restart-reps N]\n"
                   "Times add-shard, drain-idle-shard, a 4-shard roll-out "
                   "(max_surge 1 and 4) and\nre-adoption after an agent "
                   "SIGKILL on the real agent in a private network\n"
                   "namespace (run as root from the build directory). "
                   "Prints a Markdown table.\n";
      return 0;
    }
    if (ParseCount("--reps", argc, argv, &i, &reps) ||
        ParseCount("--rollout-reps", argc, argv, &i, &rollout_reps) ||
        ParseCount("--restart-reps", argc, argv, &i, &restart_reps)) {
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
  if (!WaitFor(
          [&] {
            return ReadyShards(*stub, "web") == 1 &&
                   ReadyShards(*stub, "roll") == kRollShards;
          },
          absl::Seconds(15))) {
    std::cerr << "shards never ready\n" << agent.Log();
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

  // Roll-outs of the 4-shard listener, max_surge 1 and 4 alternating.
  std::map<uint32_t, Series> rollouts = {
      {1, {"roll out 4 shards, max_surge 1: RollOutListener call returns", {}}},
      {4, {"roll out 4 shards, max_surge 4: RollOutListener call returns", {}}},
  };
  for (int rep = 0; rep < rollout_reps; ++rep) {
    for (uint32_t surge : {1u, 4u}) {
      absl::SleepFor(absl::Milliseconds(300));
      std::map<int, pid_t> before = ReadyPids(*stub, "roll");
      absl::Time t0 = absl::Now();
      grpc::Status s = RollOut(*stub, surge);
      absl::Time t1 = absl::Now();
      if (!s.ok()) {
        std::cerr << "roll out (max_surge " << surge
                  << "): " << s.error_message() << "\n"
                  << agent.Log();
        return 1;
      }
      std::map<int, pid_t> after = ReadyPids(*stub, "roll");
      int replaced = 0;
      for (const auto& [index, pid] : after) {
        if (before.count(index) && before[index] != pid) replaced++;
      }
      if (replaced != kRollShards) {
        std::cerr << "roll out (max_surge " << surge << ") replaced "
                  << replaced << " of " << kRollShards << " workers\n";
        return 1;
      }
      rollouts[surge].ms.push_back(Ms(t1 - t0));
    }
  }
  if (HttpGet(kRollAddress).outcome != Outcome::kOk) {
    std::cerr << "listener roll not answering after the roll-outs\n";
    return 1;
  }

  // Re-adoption after an agent SIGKILL: the workers reconnect (every 250 ms)
  // and hand their sockets back; the new agent lists them ready, same pids.
  Series found{
      "re-adopt: restart → log says workers of a previous agent "
      "found",
      {}};
  Series adopted{
      "re-adopt: restart → log says \"re-adopted worker pid\" "
      "for all 5 shards",
      {}};
  Series api{"re-adopt: restart → log says API serving", {}};
  Series listed{"re-adopt: restart → all 5 shards listed ready, same pids", {}};
  const int total_shards = 1 + kRollShards;
  for (int rep = 0; rep < restart_reps; ++rep) {
    absl::SleepFor(absl::Milliseconds(300));
    std::map<std::string, std::map<int, pid_t>> pids = {
        {"web", ReadyPids(*stub, "web")}, {"roll", ReadyPids(*stub, "roll")}};
    if (static_cast<int>(pids["web"].size() + pids["roll"].size()) !=
        total_shards) {
      std::cerr << "expected " << total_shards << " ready shards before the "
                << "restart\n";
      return 1;
    }
    agent.process().Signal(SIGKILL);
    agent.process().Wait(absl::Seconds(5));
    // Serving without an agent; see the header for the offset.
    absl::SleepFor(absl::Milliseconds(300 + rep * 250 / restart_reps));
    absl::Time t0 = absl::Now();
    if (!agent.Restart().ok()) {
      std::cerr << "restart failed\n";
      return 1;
    }
    const absl::Time deadline = t0 + absl::Seconds(15);
    // The log is polled tightly; the gRPC channel is only created once the
    // API serves (a failed first connect would add gRPC's 1 s back-off).
    // The three log lines may come in any order: one poll loop for all.
    std::optional<absl::Time> t_found, t_adopted, t_api;
    while ((!t_found || !t_adopted || !t_api) && absl::Now() < deadline) {
      std::string log = agent.Log();
      absl::Time now = absl::Now();
      if (!t_found &&
          CountOccurrences(log, "worker(s) of a previous agent found") >= 1) {
        t_found = now;
      }
      if (!t_adopted &&
          CountOccurrences(log, "re-adopted worker pid") >= total_shards) {
        t_adopted = now;
      }
      if (!t_api && CountOccurrences(log, "API serving") >= 1) t_api = now;
      absl::SleepFor(absl::Milliseconds(1));
    }
    if (!t_found || !t_adopted || !t_api) {
      std::cerr << "agent did not re-adopt its workers within 15 s\n"
                << agent.Log();
      return 1;
    }
    stub = FleetStub(agent.api_socket());
    std::optional<absl::Time> t_listed = PollUntil(
        [&] {
          return ReadyPids(*stub, "web") == pids["web"] &&
                 ReadyPids(*stub, "roll") == pids["roll"];
        },
        deadline, absl::Milliseconds(1));
    if (!t_listed) {
      std::cerr << "re-adopted shards not listed ready with the same pids\n"
                << agent.Log();
      return 1;
    }
    found.ms.push_back(Ms(*t_found - t0));
    adopted.ms.push_back(Ms(*t_adopted - t0));
    api.ms.push_back(Ms(*t_api - t0));
    listed.ms.push_back(Ms(*t_listed - t0));
  }

  std::cout << "| operation | median ms | range ms | n |\n"
            << "| --- | ---: | ---: | ---: |\n"
            << Row(call) << "\n"
            << Row(ready) << "\n"
            << Row(answering) << "\n"
            << Row(drain) << "\n"
            << Row(rollouts[1]) << "\n"
            << Row(rollouts[4]) << "\n"
            << Row(found) << "\n"
            << Row(adopted) << "\n"
            << Row(api) << "\n"
            << Row(listed) << "\n";
  std::cout
      << "\nThe first-answer time includes polling with HTTP GETs that the "
         "HASH table\nsends to shard 1 about half the time (0.2-0.5 ms "
         "each). Roll-outs replace every\nworker of an idle 4-shard "
         "listener (HASH, drain timeout 5 s); the call returns\nonce the new "
         "workers are ready and the old ones drained. Re-adoption: the\n"
         "restarted agent waits (up to 2 s) for the workers it finds to "
         "reconnect before\nit serves the API; workers retry every 250 ms, "
         "so 0-250 ms of each re-adopt\ntime is that retry phase (sampled "
         "evenly by the rep offset). Times run from\nthe exec of the new "
         "agent.\n";
  return 0;
}

}  // namespace
}  // namespace portfleet::testing

int main(int argc, char** argv) { return portfleet::testing::Main(argc, argv); }
