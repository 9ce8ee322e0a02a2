// Pre-fork servers as workers: each worker is a process tree (a parent and
// the children that accept on fd 3). Through the real agent, in private
// network namespaces, counted from the client side: a rollout leaves no
// process of the old version answering, the agent's stop leaves nothing
// running, crashes of the parent or of a child lose no request, and a
// process left holding a shard socket is found (and killed when it is left
// over from a stopped worker). The same with gunicorn from Debian.
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <future>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

constexpr char kAddress[] = "127.0.0.1:8080";
constexpr char kGunicorn[] = "/usr/bin/gunicorn";

std::string PreforkScript() {
  return absl::StrCat(PORTFLEET_SOURCE_DIR, "/tests/workers/prefork_worker.py");
}

// A listener of `shards` shards whose workers run `command` `args`.
std::string Spec(int shards, const std::string& command,
                 const std::vector<std::string>& args, int drain_seconds) {
  std::string worker = absl::StrCat("command: \"", command, "\"");
  for (const std::string& a : args)
    absl::StrAppend(&worker, " args: \"", a, "\"");
  return absl::StrCat("listeners {\n  name: \"web\"\n  address: \"", kAddress,
                      "\"\n  shards: ", shards, "\n  worker { ", worker,
                      " }\n  drain_timeout_seconds: ", drain_seconds,
                      "\n  steering { policy: STEERING_POLICY_HASH }\n}\n");
}

std::vector<std::string> PreforkArgs(const std::string& version,
                                     const std::string& parent_on_term,
                                     const std::string& child_on_term) {
  return {PreforkScript(),
          "--children=2",
          "--parent-on-term=" + parent_on_term,
          "--term-delay=30",
          "--child-on-term=" + child_on_term,
          "--linger=30",
          "--version=" + version};
}

std::vector<std::string> GunicornArgs(const std::string& version) {
  return {absl::StrCat("--chdir=", PORTFLEET_SOURCE_DIR,
                       "/deploy/examples/gunicorn"),
          "--workers=2", "--graceful-timeout=2",
          // Only to tell versions apart (gunicorn's env for the app).
          "--env=APP_VERSION=" + version, "app:app"};
}

// Every process in this test's namespace but the agent.
std::set<pid_t> WorkerProcesses(pid_t agent) {
  std::set<pid_t> out;
  for (pid_t p : ProcessesInMyNetns()) {
    if (p != agent) out.insert(p);
  }
  return out;
}

// `n` new connections; the pids that answered, and failures.
Tally Probe(int n) {
  Tally t;
  for (int i = 0; i < n; ++i) t.Add(HttpGet(kAddress));
  return t;
}

int AnswersFrom(const Tally& t, const std::set<pid_t>& pids) {
  int n = 0;
  for (const auto& [pid, count] : t.by_pid) {
    if (pids.count(pid) > 0) n += count;
  }
  return n;
}

bool AnyAlive(const std::set<pid_t>& pids) {
  return std::any_of(pids.begin(), pids.end(),
                     [](pid_t p) { return ProcessExists(p); });
}

loadgen::Options Load(absl::Duration duration) {
  loadgen::Options o;
  o.target = kAddress;
  o.rate = 100;
  o.duration = duration;
  o.max_connections = 6000;
  o.quiet = true;
  return o;
}

grpc::Status RollOut(v1::FleetService::Stub& stub,
                     const std::vector<std::string>& args) {
  v1::RollOutListenerRequest req;
  req.set_name("web");
  for (const auto& a : args) req.mutable_worker()->add_args(a);
  req.set_max_surge(2);
  v1::RollOutListenerResponse resp;
  return stub.RollOutListener(RpcContext(60).get(), req, &resp);
}

// Stops the agent with SIGTERM; returns its wait status.
std::optional<int> StopAgent(AgentHarness& agent) {
  agent.process().Signal(SIGTERM);
  return agent.process().Wait(absl::Seconds(30));
}

struct Started {
  std::unique_ptr<v1::FleetService::Stub> stub;
};

// Starts the agent with `spec` and waits until every shard is ready (for a
// worker without a control channel: seen accepting, or up 2 s).
void StartAndAwaitReady(AgentHarness& agent, const std::string& spec,
                        int shards, Started* out) {
  ASSERT_TRUE(agent.Start(spec).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  out->stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*out->stub, "web") == shards; },
                      absl::Seconds(15)))
      << agent.Log();
}

// Steps:
// 1. Two shards of a pre-fork worker whose parent exits at once on SIGTERM
//    and whose children keep serving for 30 s (they do not check), drain
//    timeout 2 s; load at 100 connections/s.
// 2. Roll out a new version.
// 3. As soon as the rollout returns, while the old children still run, 20
//    new connections are all answered by the new version (the old socket
//    was shut down: children that ignore SIGTERM get nothing new, so the
//    drain timeout's SIGKILL finds no connection in hand).
// 4. Within the drain timeout (plus margin) every process of the old version
//    is gone; 20 new connections are all answered by the new version; the
//    load saw no failure.
// 5. SIGTERM the agent: it exits 0 and no process is left in the namespace.
TEST(PreforkNetnsTest, RolloutAndStopKillTheWholeTreeWhenTheParentLeavesFirst) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  Started s;
  StartAndAwaitReady(
      agent, Spec(2, "/usr/bin/python3", PreforkArgs("1", "exit", "linger"), 2),
      2, &s);
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 6; },
                      absl::Seconds(5)));
  std::set<pid_t> old_tree = WorkerProcesses(agent.pid());

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load(absl::Seconds(30)), &stop);
  });
  absl::SleepFor(absl::Milliseconds(300));
  grpc::Status r = RollOut(*s.stub, PreforkArgs("2", "exit", "linger"));
  ASSERT_TRUE(r.ok()) << r.error_message() << "\n" << agent.Log();
  ASSERT_TRUE(AnyAlive(old_tree)) << "the old children should still linger";
  Tally early = Probe(20);
  EXPECT_EQ(early.failed, 0) << early.first_error;
  EXPECT_EQ(AnswersFrom(early, old_tree), 0)
      << "the old version still took new connections after the rollout\n"
      << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return !AnyAlive(old_tree); }, absl::Seconds(5)))
      << "old processes still alive after the drain timeout\n"
      << agent.Log();
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  Tally t = Probe(20);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(AnswersFrom(t, old_tree), 0);

  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << agent.Log();
  std::vector<pid_t> left = ProcessesInMyNetns();
  EXPECT_TRUE(left.empty()) << left.size() << " process(es) outlived the agent";
}

// Steps:
// 1. Two shards of a pre-fork worker whose parent takes 30 s on SIGTERM and
//    whose children keep serving for 30 s; drain timeout 2 s.
// 2. Roll out: the old trees are SIGKILLed at the drain timeout, none of
//    their processes is left, 20 new connections reach the new version.
// 3. SIGTERM the agent: exit 0 after the drain timeout, nothing left.
TEST(PreforkNetnsTest, SlowParentIsKilledWithItsChildren) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  Started s;
  StartAndAwaitReady(
      agent, Spec(2, "/usr/bin/python3", PreforkArgs("1", "wait", "linger"), 2),
      2, &s);
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 6; },
                      absl::Seconds(5)));
  std::set<pid_t> old_tree = WorkerProcesses(agent.pid());
  grpc::Status r = RollOut(*s.stub, PreforkArgs("2", "wait", "linger"));
  ASSERT_TRUE(r.ok()) << r.error_message() << "\n" << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return !AnyAlive(old_tree); }, absl::Seconds(5)))
      << agent.Log();
  Tally t = Probe(20);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(AnswersFrom(t, old_tree), 0);
  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << agent.Log();
  EXPECT_TRUE(ProcessesInMyNetns().empty());
}

// Steps:
// 1. One shard of a pre-fork worker (children finish their connection and
//    exit on SIGTERM); load at 100 connections/s.
// 2. SIGKILL one child: the parent forks another; SIGKILL the parent: the
//    agent restarts the worker, and the dead parent's children are stopped
//    (SIGTERM to the group).
// 3. The load saw no failure; the dead parent's children are gone; every
//    process in the namespace is the agent or the new worker's tree.
TEST(PreforkNetnsTest, ParentOrChildCrashLosesNoRequestAndLeavesNoOrphan) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  Started s;
  StartAndAwaitReady(
      agent, Spec(1, "/usr/bin/python3", PreforkArgs("1", "wait", "exit"), 2),
      1, &s);
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 3; },
                      absl::Seconds(5)));
  pid_t parent = agent.WorkersByShard().at(0);
  std::vector<pid_t> children = ChildrenOf(parent);
  ASSERT_EQ(children.size(), 2u);

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load(absl::Seconds(30)), &stop);
  });
  absl::SleepFor(absl::Milliseconds(500));
  ::kill(children[0], SIGKILL);
  EXPECT_TRUE(WaitFor([&] { return ChildrenOf(parent).size() == 2; },
                      absl::Seconds(5)));
  absl::SleepFor(absl::Milliseconds(300));
  std::vector<pid_t> orphaned = ChildrenOf(parent);
  ::kill(parent, SIGKILL);
  EXPECT_TRUE(WaitFor(
      [&] {
        auto w = agent.WorkersByShard();
        return w.count(0) > 0 && w.at(0) != parent;
      },
      absl::Seconds(5)))
      << agent.Log();
  EXPECT_TRUE(WaitFor(
      [&] {
        return std::none_of(orphaned.begin(), orphaned.end(),
                            [](pid_t p) { return ProcessExists(p); });
      },
      absl::Seconds(5)))
      << "the dead parent's children are still running\n"
      << agent.Log();
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  pid_t new_parent = agent.WorkersByShard().at(0);
  std::set<pid_t> tree = {new_parent};
  for (pid_t c : DescendantsOf(new_parent)) tree.insert(c);
  EXPECT_EQ(WorkerProcesses(agent.pid()), tree);
  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(ProcessesInMyNetns().empty());
}

// Steps:
// 1. One shard whose worker starts a process that leaves its process group
//    (setsid) and keeps fd 3: while its parent lives it is part of the
//    worker's tree, not an orphan.
// 2. The test takes a copy of the shard socket (pidfd_getfd): it is
//    reported in ListShards (not a leftover) and left alone; once it closes
//    the copy, the report goes away.
// 3. SIGKILL the worker: the escaped process now holds the shard socket
//    with no supervisor; the scan finds it as a leftover of this shard's
//    stopped worker and kills it (ListShards counts it, the log says so).
// 4. SIGTERM the agent: nothing left.
TEST(PreforkNetnsTest, OrphansOnTheShardSocketAreFoundKilledOrReported) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  Started s;
  // The worker: a shell that starts, in a new session, a copy of itself
  // that keeps fd 3 (the shard socket) and sleeps; then serves with the
  // pre-fork worker.
  std::string script = absl::StrCat("setsid sleep 600 & exec /usr/bin/python3 ",
                                    PreforkScript(), " --children=1");
  StartAndAwaitReady(agent, Spec(1, "/bin/sh", {"-c", script}, 2), 1, &s);
  pid_t parent = agent.WorkersByShard().at(0);
  // The escaped process: its own session and group, still a child of the
  // worker: part of the worker's tree, not an orphan.
  pid_t escaped = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        for (pid_t p : WorkerProcesses(agent.pid())) {
          if (absl::StrContains(
                  ReadFileOrEmpty(absl::StrCat("/proc/", p, "/cmdline")),
                  "sleep")) {
            escaped = p;
          }
        }
        return escaped != 0;
      },
      absl::Seconds(5)));
  absl::SleepFor(absl::Milliseconds(1500));  // a scan or more
  std::vector<v1::Shard> shards = Shards(*s.stub, "web");
  ASSERT_EQ(shards.size(), 1u);
  EXPECT_EQ(shards[0].orphans_size(), 0) << shards[0].DebugString();

  // A stranger takes a copy of the shard socket (as a process that was
  // handed it would): reported, and left alone.
  pid_t worker = agent.WorkersByShard().at(0);
  Fd worker_pidfd(static_cast<int>(::syscall(SYS_pidfd_open, worker, 0)));
  ASSERT_TRUE(worker_pidfd);
  Fd copy(
      static_cast<int>(::syscall(SYS_pidfd_getfd, worker_pidfd.get(), 3, 0)));
  ASSERT_TRUE(copy) << strerror(errno);
  EXPECT_TRUE(WaitFor(
      [&] {
        auto sh = Shards(*s.stub, "web");
        return !sh.empty() && sh[0].orphans_size() == 1 &&
               sh[0].orphans(0).pid() == ::getpid() &&
               !sh[0].orphans(0).leftover();
      },
      absl::Seconds(5)))
      << agent.Log();
  copy.Reset();
  EXPECT_TRUE(WaitFor(
      [&] {
        auto sh = Shards(*s.stub, "web");
        return !sh.empty() && sh[0].orphans_size() == 0;
      },
      absl::Seconds(5)));

  // The worker dies: the escaped process is now left over from a stopped
  // worker of this shard, serving with no supervisor: killed.
  ::kill(parent, SIGKILL);
  EXPECT_TRUE(
      WaitFor([&] { return !ProcessExists(escaped); }, absl::Seconds(5)))
      << agent.Log();
  EXPECT_TRUE(WaitFor(
      [&] {
        auto sh = Shards(*s.stub, "web");
        return !sh.empty() && sh[0].orphans_killed() >= 1;
      },
      absl::Seconds(5)));
  EXPECT_TRUE(absl::StrContains(agent.Log(), "left over from a stopped worker"))
      << agent.Log();
  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(ProcessesInMyNetns().empty());
}

// Steps (a pre-fork worker whose parent exits at once on SIGTERM and whose
// children keep serving 30 s; drain timeout 2 s), under load at 100
// connections/s throughout:
// 1. Two shards; scale to 3, then to 1: the drained shards' trees are gone
//    by the drain deadline.
// 2. SIGKILL the agent (the workers keep serving), start it again: they
//    cannot reconnect (no control channel), so new workers start on new
//    sockets and the old trees are drained, parents and children alike.
// 3. The load saw no failure; no old process is left; 20 new connections
//    are answered by the new trees; SIGTERM the agent: nothing left.
TEST(PreforkNetnsTest, ScaleAndAgentRestartLeaveNoOldTree) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  Started s;
  StartAndAwaitReady(
      agent, Spec(2, "/usr/bin/python3", PreforkArgs("1", "exit", "linger"), 2),
      2, &s);
  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load(absl::Seconds(60)), &stop);
  });
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_TRUE(ScaleTo(*s.stub, "web", 3).ok()) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 9; },
                      absl::Seconds(5)));
  std::set<pid_t> before_scale_down = WorkerProcesses(agent.pid());
  ASSERT_TRUE(ScaleTo(*s.stub, "web", 1).ok()) << agent.Log();
  std::set<pid_t> kept = {agent.WorkersByShard().at(0)};
  for (pid_t c : DescendantsOf(*kept.begin())) kept.insert(c);
  std::set<pid_t> drained;
  for (pid_t p : before_scale_down) {
    if (kept.count(p) == 0) drained.insert(p);
  }
  EXPECT_EQ(drained.size(), 6u);
  EXPECT_TRUE(WaitFor([&] { return !AnyAlive(drained); }, absl::Seconds(5)))
      << agent.Log();

  std::set<pid_t> old_tree = WorkerProcesses(agent.pid());
  agent.process().Signal(SIGKILL);
  agent.process().Wait(absl::Seconds(5));
  ASSERT_TRUE(agent.Restart().ok());
  s.stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*s.stub, "web") == 1; },
                      absl::Seconds(15)))
      << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return !AnyAlive(old_tree); }, absl::Seconds(8)))
      << agent.Log();
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  Tally t = Probe(20);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(AnswersFrom(t, old_tree), 0);

  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << agent.Log();
  EXPECT_TRUE(ProcessesInMyNetns().empty());
}

// Steps (gunicorn from Debian, two workers per shard, --graceful-timeout=2,
// drain timeout 4 s), under load at 100 connections/s throughout:
// 1. Two shards become ready (no control channel: seen accepting).
// 2. Scale to 3 shards, then back to 2.
// 3. Roll out a new version: every old gunicorn process is gone, the new
//    version answers 20 new connections.
// 4. SIGKILL one gunicorn worker (its master forks another), then one
//    master (the agent starts a new one; the old master's workers stop).
// 5. The load saw no failure; SIGTERM the agent: exit 0, nothing left.
TEST(GunicornNetnsTest, ServeScaleRolloutCrashAndStop) {
  PF_ENTER_NETNS_OR_SKIP();
  ASSERT_EQ(::access(kGunicorn, X_OK), 0)
      << kGunicorn << " missing: run deploy/install-deps.sh";
  WidenPortRange();
  AgentHarness agent;
  Started s;
  StartAndAwaitReady(agent, Spec(2, kGunicorn, GunicornArgs("1"), 4), 2, &s);
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 6; },
                      absl::Seconds(10)));

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load(absl::Seconds(60)), &stop);
  });
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_TRUE(ScaleTo(*s.stub, "web", 3).ok()) << agent.Log();
  EXPECT_EQ(ReadyShards(*s.stub, "web"), 3);
  ASSERT_TRUE(ScaleTo(*s.stub, "web", 2).ok()) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 6; },
                      absl::Seconds(10)))
      << agent.Log();

  std::set<pid_t> old_tree = WorkerProcesses(agent.pid());
  grpc::Status r = RollOut(*s.stub, GunicornArgs("2"));
  ASSERT_TRUE(r.ok()) << r.error_message() << "\n" << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return !AnyAlive(old_tree); }, absl::Seconds(8)))
      << agent.Log();
  Tally t = Probe(20);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(AnswersFrom(t, old_tree), 0);

  pid_t master = agent.WorkersByShard().at(0);
  std::vector<pid_t> workers = ChildrenOf(master);
  ASSERT_EQ(workers.size(), 2u);
  ::kill(workers[0], SIGKILL);
  EXPECT_TRUE(WaitFor(
      [&] {
        auto c = ChildrenOf(master);
        return c.size() == 2 &&
               std::find(c.begin(), c.end(), workers[0]) == c.end();
      },
      absl::Seconds(10)));
  std::vector<pid_t> orphaned = ChildrenOf(master);
  ::kill(master, SIGKILL);
  EXPECT_TRUE(WaitFor(
      [&] {
        auto w = agent.WorkersByShard();
        return w.count(0) > 0 && w.at(0) != master &&
               ReadyShards(*s.stub, "web") == 2;
      },
      absl::Seconds(10)))
      << agent.Log();
  EXPECT_TRUE(WaitFor(
      [&] {
        return std::none_of(orphaned.begin(), orphaned.end(),
                            [](pid_t p) { return ProcessExists(p); });
      },
      absl::Seconds(8)))
      << agent.Log();
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();

  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << agent.Log();
  std::vector<pid_t> left = ProcessesInMyNetns();
  EXPECT_TRUE(left.empty()) << left.size() << " process(es) outlived the agent";
}

// Steps:
// 1. Two gunicorn shards; load at 100 connections/s.
// 2. SIGKILL the agent (gunicorn keeps serving), start it again: gunicorn
//    cannot reconnect (no control channel), so new workers start on new
//    sockets and the old trees are drained, masters and workers alike.
// 3. The load saw no failure; no old process is left after the drain
//    timeout; SIGTERM the agent: nothing left.
TEST(GunicornNetnsTest, AgentRestartReplacesTheWholeOldTrees) {
  PF_ENTER_NETNS_OR_SKIP();
  ASSERT_EQ(::access(kGunicorn, X_OK), 0)
      << kGunicorn << " missing: run deploy/install-deps.sh";
  WidenPortRange();
  AgentHarness agent;
  Started s;
  StartAndAwaitReady(agent, Spec(2, kGunicorn, GunicornArgs("1"), 4), 2, &s);
  ASSERT_TRUE(WaitFor([&] { return WorkerProcesses(agent.pid()).size() == 6; },
                      absl::Seconds(10)));
  std::set<pid_t> old_tree = WorkerProcesses(agent.pid());

  std::atomic<bool> stop{false};
  auto load = std::async(std::launch::async, [&] {
    return loadgen::Run(Load(absl::Seconds(40)), &stop);
  });
  absl::SleepFor(absl::Milliseconds(300));
  agent.process().Signal(SIGKILL);
  agent.process().Wait(absl::Seconds(5));
  ASSERT_TRUE(agent.Restart().ok());
  s.stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*s.stub, "web") == 2; },
                      absl::Seconds(15)))
      << agent.Log();
  EXPECT_TRUE(WaitFor([&] { return !AnyAlive(old_tree); }, absl::Seconds(10)))
      << agent.Log();
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  absl::StatusOr<loadgen::Result> result = load.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  Tally t = Probe(20);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(AnswersFrom(t, old_tree), 0);

  std::optional<int> st = StopAgent(agent);
  ASSERT_TRUE(st.has_value()) << agent.Log();
  EXPECT_TRUE(ProcessesInMyNetns().empty());
}

}  // namespace
}  // namespace portfleet::testing
