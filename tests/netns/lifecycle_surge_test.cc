// The DaemonSet's surge upgrade under restartPolicy Always: each "pod" is an
// agent under a small supervisor that restarts it whenever it exits (as a
// container engine does), started like the DaemonSet's container with
// --takeover=auto and --instance-id (the pod UID). The new pod's agent takes
// the sockets over; the old one must never take them back, whatever its
// container does afterwards, and stops cleanly when its pod is deleted.
// Failures are counted from the client side.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kAddress[] = "127.0.0.1:8080";
constexpr char kSpec[] = R"pb(listeners {
                                name: "web"
                                address: "127.0.0.1:8080"
                                shards: 3
                                worker {
                                  command: "portfleet-worker"
                                  args: "--mode=http"
                                }
                                drain_timeout_seconds: 5
                                steering { policy: STEERING_POLICY_HASH }
                              })pb";

// A container with restartPolicy Always: runs `argv`, and whenever it exits
// (any status) starts it again at once, until Delete(). Each run logs to
// <log_prefix>.<run>.log.
class Container {
 public:
  Container(std::vector<std::string> argv, std::string log_prefix)
      : argv_(std::move(argv)), log_prefix_(std::move(log_prefix)) {}
  ~Container() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    process_.Signal(SIGKILL);
    process_.Wait(absl::Seconds(5));
  }

  absl::Status Start() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      absl::Status s = StartLocked();
      if (!s.ok()) return s;
    }
    thread_ = std::thread([this] { Supervise(); });
    return absl::OkStatus();
  }

  // The pod is deleted: no more restarts, SIGTERM, and the exit status
  // (nullopt if it did not exit within `timeout`).
  std::optional<int> Delete(absl::Duration timeout) {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    process_.Signal(SIGTERM);
    return process_.Wait(timeout);
  }

  // The process crashes (SIGKILL); the supervisor restarts it.
  void Crash() {
    std::lock_guard<std::mutex> lock(mu_);
    process_.Signal(SIGKILL);
  }

  int restarts() const { return restarts_; }
  pid_t pid() const { return pid_; }
  // Every run's log, in order.
  std::string Log() const {
    std::string out;
    for (int run = 0; run <= restarts_; ++run) {
      out += ReadFileOrEmpty(absl::StrCat(log_prefix_, ".", run, ".log"));
    }
    return out;
  }
  std::string LastLog() const {
    return ReadFileOrEmpty(
        absl::StrCat(log_prefix_, ".", restarts_.load(), ".log"));
  }

 private:
  absl::Status StartLocked() {
    absl::Status s = process_.Start(
        argv_, absl::StrCat(log_prefix_, ".", restarts_.load(), ".log"));
    pid_ = process_.pid();
    return s;
  }
  void Supervise() {
    while (!stop_) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!stop_ && !process_.running()) {
          ++restarts_;
          if (!StartLocked().ok()) return;
        }
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }

  const std::vector<std::string> argv_;
  const std::string log_prefix_;
  std::mutex mu_;
  Subprocess process_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> restarts_{0};
  std::atomic<pid_t> pid_{-1};
};

// The DaemonSet container's command line for pod `uid` on shared host paths.
std::vector<std::string> PodArgs(const TempDir& host, const std::string& bpffs,
                                 const std::string& uid,
                                 const std::string& after_handover) {
  return {BinaryPath("portfleet-agent"),
          "--config",
          host.path() + "/fleet.textproto",
          "--api",
          "unix://" + host.path() + "/run/api.sock",
          "--state-dir",
          host.path() + "/state",
          "--bpffs",
          bpffs,
          "--metrics",
          "127.0.0.1:0",
          "--takeover=auto",
          "--instance-id=" + uid,
          "--after-handover=" + after_handover};
}

// Test paths shared by the two pods (hostPath volumes); removes the pinned
// maps and kills what is left in the namespace at the end.
struct Host {
  Host() : bpffs(absl::StrCat("/sys/fs/bpf/portfleet-test-", ::getpid())) {
    dir.WriteFile("fleet.textproto", kSpec);
    ::mkdir((dir.path() + "/run").c_str(), 0750);
  }
  ~Host() {
    KillOthersInPrivateNetns();
    std::error_code ec;
    std::filesystem::remove_all(bpffs, ec);
  }
  std::string api() const { return dir.path() + "/run/api.sock"; }
  TempDir dir;
  std::string bpffs;
};

loadgen::Options Load() {
  loadgen::Options o;
  o.target = kAddress;
  o.rate = 300;
  o.duration = absl::Seconds(60);
  o.max_connections = 20000;
  return o;
}

// The API's shards of "web" are the children of `agent`, all ready.
bool ServesWithItsOwnWorkers(pid_t agent, const std::string& api) {
  auto stub = FleetStub(api);
  std::vector<v1::Shard> shards = Shards(*stub, "web");
  std::vector<pid_t> children = ChildrenOf(agent);
  if (shards.size() != 3 || ReadyShards(*stub, "web") != 3) return false;
  for (const v1::Shard& s : shards) {
    if (std::count(children.begin(), children.end(),
                   static_cast<pid_t>(s.pid())) != 1) {
      return false;
    }
  }
  return true;
}

std::map<uint32_t, uint32_t> ShardPids(const std::string& api) {
  auto stub = FleetStub(api);
  std::map<uint32_t, uint32_t> out;
  for (const v1::Shard& s : Shards(*stub, "web")) out[s.index()] = s.pid();
  return out;
}

// Steps:
// 1. Pod A (restartPolicy Always, --takeover=auto, --instance-id=pod-a,
//    --after-handover=idle) serves 3 shards; load at 300 connections/s.
// 2. Pod B (same flags, pod-b) starts: it takes the sockets over and serves
//    the API with its own workers.
// 3. A drains its workers and stays alive, idle: its container is never
//    restarted.
// 4. A's process crashes (SIGKILL) and is restarted with the same flags: it
//    finds pod-a retired and stays idle; B is not asked for its sockets, its
//    workers are the same processes.
// 5. Pod A is deleted (SIGTERM): it exits 0 at once.
// 6. 0 failed connections; B was never restarted and stops cleanly.
TEST(LifecycleSurgeTest, SurgeWithRestartPolicyAlwaysNeverTakesBack) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  Host host;
  Container a(PodArgs(host.dir, host.bpffs, "pod-a", "idle"),
              host.dir.path() + "/pod-a");
  ASSERT_TRUE(a.Start().ok());
  ASSERT_TRUE(
      WaitFor([&] { return ServesWithItsOwnWorkers(a.pid(), host.api()); },
              absl::Seconds(20)))
      << a.Log();

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(Load(), &stop); });
  absl::SleepFor(absl::Milliseconds(300));

  Container b(PodArgs(host.dir, host.bpffs, "pod-b", "idle"),
              host.dir.path() + "/pod-b");
  ASSERT_TRUE(b.Start().ok());
  ASSERT_TRUE(
      WaitFor([&] { return absl::StrContains(b.Log(), "takeover complete"); },
              absl::Seconds(20)))
      << b.Log() << "\n---\n"
      << a.Log();
  ASSERT_TRUE(
      WaitFor([&] { return ServesWithItsOwnWorkers(b.pid(), host.api()); },
              absl::Seconds(10)))
      << b.Log();
  // 3. A drains and idles; its container keeps running.
  ASSERT_TRUE(
      WaitFor([&] { return absl::StrContains(a.Log(), "idle (no API"); },
              absl::Seconds(15)))
      << a.Log();
  EXPECT_TRUE(ChildrenOf(a.pid()).empty());
  EXPECT_EQ(a.restarts(), 0) << a.Log();
  EXPECT_THAT(ReadFileOrEmpty(host.dir.path() + "/state/retired-instances"),
              HasSubstr("pod-a\n"));

  // 4. A crashes and is restarted: retired, idle, no take-back.
  std::map<uint32_t, uint32_t> b_workers = ShardPids(host.api());
  a.Crash();
  ASSERT_TRUE(WaitFor(
      [&] {
        return a.restarts() == 1 &&
               absl::StrContains(a.LastLog(), "retired; staying idle");
      },
      absl::Seconds(10)))
      << a.Log();
  absl::SleepFor(absl::Seconds(2));
  EXPECT_EQ(a.restarts(), 1) << a.Log();
  EXPECT_THAT(a.LastLog(), Not(HasSubstr("takeover: received")));
  EXPECT_THAT(a.LastLog(), Not(HasSubstr("--takeover=auto")));
  EXPECT_THAT(b.Log(), Not(HasSubstr("takeover requested")));
  EXPECT_EQ(ShardPids(host.api()), b_workers);
  EXPECT_TRUE(ServesWithItsOwnWorkers(b.pid(), host.api())) << b.Log();

  // 5. The old pod is deleted.
  std::optional<int> a_status = a.Delete(absl::Seconds(5));
  ASSERT_TRUE(a_status.has_value()) << a.LastLog();
  EXPECT_TRUE(WIFEXITED(*a_status) && WEXITSTATUS(*a_status) == 0) << *a_status;
  EXPECT_THAT(a.LastLog(), HasSubstr("retired agent stops"));

  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 300);
  EXPECT_EQ(b.restarts(), 0) << b.Log();
  EXPECT_EQ(ShardPids(host.api()), b_workers);

  std::optional<int> b_status = b.Delete(absl::Seconds(15));
  ASSERT_TRUE(b_status.has_value()) << b.Log();
  EXPECT_TRUE(WIFEXITED(*b_status) && WEXITSTATUS(*b_status) == 0) << b.Log();
}

// With the default --after-handover=exit the old agent exits 0 after the
// hand-over and its container restarts it: the restarted agent is retired
// and idles; no flapping (one restart of A, none of B), no take-back, no
// failed connection. A handed-over agent that is idle stops at once on
// SIGTERM.
TEST(LifecycleSurgeTest, ExitedOldAgentRestartedByItsContainerStaysRetired) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  Host host;
  Container a(PodArgs(host.dir, host.bpffs, "pod-a", "exit"),
              host.dir.path() + "/pod-a");
  ASSERT_TRUE(a.Start().ok());
  ASSERT_TRUE(
      WaitFor([&] { return ServesWithItsOwnWorkers(a.pid(), host.api()); },
              absl::Seconds(20)))
      << a.Log();
  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async,
                         [&] { return loadgen::Run(Load(), &stop); });
  absl::SleepFor(absl::Milliseconds(300));

  Container b(PodArgs(host.dir, host.bpffs, "pod-b", "exit"),
              host.dir.path() + "/pod-b");
  ASSERT_TRUE(b.Start().ok());
  ASSERT_TRUE(WaitFor(
      [&] {
        return a.restarts() == 1 &&
               absl::StrContains(a.LastLog(), "retired; staying idle");
      },
      absl::Seconds(25)))
      << a.Log() << "\n---\n"
      << b.Log();
  EXPECT_THAT(a.Log(), HasSubstr("handed over; stopped"));
  ASSERT_TRUE(
      WaitFor([&] { return ServesWithItsOwnWorkers(b.pid(), host.api()); },
              absl::Seconds(10)))
      << b.Log();
  std::map<uint32_t, uint32_t> b_workers = ShardPids(host.api());
  absl::SleepFor(absl::Seconds(3));
  EXPECT_EQ(a.restarts(), 1) << a.Log();
  EXPECT_EQ(b.restarts(), 0) << b.Log();
  EXPECT_EQ(CountOccurrences(b.Log(), "takeover requested"), 0) << b.Log();
  EXPECT_EQ(ShardPids(host.api()), b_workers);

  std::optional<int> a_status = a.Delete(absl::Seconds(5));
  ASSERT_TRUE(a_status.has_value());
  EXPECT_TRUE(WIFEXITED(*a_status) && WEXITSTATUS(*a_status) == 0);
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_GT(result->ok(), 300);
  std::optional<int> b_status = b.Delete(absl::Seconds(15));
  ASSERT_TRUE(b_status.has_value());
  EXPECT_TRUE(WIFEXITED(*b_status) && WEXITSTATUS(*b_status) == 0) << b.Log();
}

// A handed-over agent terminated while it still drains its workers exits
// once they are drained, without idling first (--after-handover=idle only
// applies when no stop was asked for). Its workers ignore SIGTERM, so the
// drain lasts until the drain timeout (5 s) and the SIGTERM surely arrives
// during it.
TEST(LifecycleSurgeTest, HandedOverAgentTerminatedWhileDrainingExits) {
  PF_ENTER_NETNS_OR_SKIP();
  Host host;
  host.dir.WriteFile("fleet.textproto", R"pb(listeners {
                                               name: "web"
                                               address: "127.0.0.1:8080"
                                               shards: 1
                                               worker {
                                                 command: "/bin/sh"
                                                 args: "-c"
                                                 args: "trap '' TERM; while :; do sleep 1; done"
                                               }
                                               drain_timeout_seconds: 5
                                             })pb");
  Subprocess a;
  ASSERT_TRUE(a.Start(PodArgs(host.dir, host.bpffs, "pod-a", "idle"),
                      host.dir.path() + "/a.log")
                  .ok());
  ASSERT_TRUE(
      WaitFor([&] { return absl::StrContains(a.Log(), "fleet serving"); },
              absl::Seconds(20)))
      << a.Log();
  Subprocess b;
  ASSERT_TRUE(b.Start(PodArgs(host.dir, host.bpffs, "pod-b", "idle"),
                      host.dir.path() + "/b.log")
                  .ok());
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(a.Log(), "releasing"); },
                      absl::Seconds(20)))
      << a.Log() << "\n---\n"
      << b.Log();
  absl::Time sent = absl::Now();
  a.Signal(SIGTERM);
  std::optional<int> a_status = a.Wait(absl::Seconds(15));
  ASSERT_TRUE(a_status.has_value()) << a.Log();
  EXPECT_TRUE(WIFEXITED(*a_status) && WEXITSTATUS(*a_status) == 0);
  EXPECT_GE(absl::Now() - sent, absl::Seconds(3)) << "drain was not awaited";
  EXPECT_THAT(a.Log(), HasSubstr("stopping once our workers are drained"));
  EXPECT_THAT(a.Log(), Not(HasSubstr("idle (no API")));
  EXPECT_THAT(a.Log(), HasSubstr("handed over; stopped"));
  b.Signal(SIGTERM);
  std::optional<int> b_status = b.Wait(absl::Seconds(20));
  ASSERT_TRUE(b_status.has_value()) << b.Log();
  EXPECT_EQ(WEXITSTATUS(*b_status), 0) << b.Log();
}

}  // namespace
}  // namespace portfleet::testing
