// DrainShard under load against the real agent (BPF steering, private
// network namespace): the queue of a shard whose worker stopped accepting is
// migrated to live shards, and long-lived connections of a draining shard
// are not broken. Failures are counted from the client side.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <future>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;

std::string Spec(const std::string& address, int shards, const char* mode,
                 int drain_timeout) {
  return absl::StrCat(R"pb(listeners { name: "web" address: ")pb", address,
                      R"pb("
                                                                 shards:)pb",
                      shards, R"pb(
        worker { command: "portfleet-worker" args: "--mode=)pb",
                      mode, R"pb(" }
                 drain_timeout_seconds:)pb",
                      drain_timeout, R"pb(
  steering { policy: STEERING_POLICY_HASH }
})pb");
}

// A connected socket that has sent one HTTP request and not read anything.
Fd ConnectAndSend(const SocketAddress& addr) {
  Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Fd();
  if (::connect(fd.get(), addr.get(), addr.length) != 0) return Fd();
  static const char kRequest[] =
      "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  if (::send(fd.get(), kRequest, sizeof(kRequest) - 1, MSG_NOSIGNAL) !=
      static_cast<ssize_t>(sizeof(kRequest) - 1)) {
    return Fd();
  }
  return fd;
}

bool Readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

// Reads to EOF (or `deadline`) and parses the answer.
loadgen::HttpAnswer ReadAnswer(int fd, absl::Time deadline,
                               std::string* error) {
  std::string in;
  char buf[4096];
  for (;;) {
    int left =
        static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (left <= 0) {
      *error = absl::StrCat("timeout after ", in.size(), " bytes");
      break;
    }
    if (!Readable(fd, left)) continue;
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      in.append(buf, n);
      continue;
    }
    if (n == 0) break;
    *error = absl::StrCat("recv: ", strerror(errno));
    break;
  }
  return loadgen::ParseHttpAnswer(in, /*eof=*/error->empty());
}

struct QueueCase {
  const char* name;
  const char* address;
  bool resume;  // SIGCONT the stopped worker once the drain has begun
};

void PrintTo(const QueueCase& c, std::ostream* os) { *os << c.name; }

class LifecycleQueueMigrationTest : public ::testing::TestWithParam<QueueCase> {
};

// Steps:
// 1. Three shards (HASH, drain timeout 2 s); wait until all are ready.
//    Record the agent's fd count. Start a background load (short-lived
//    HTTP, 200/s) that runs through every step.
// 2. SIGSTOP the worker of shard 1: it stops accepting, so connections
//    steered to it wait in its accept queue.
// 3. Open 150 connections, each sends a request and reads nothing yet.
//    After 500 ms the ones with no answer are exactly those queued on
//    shard 1 (the agent's queue_depth for shard 1 agrees). Require >= 15.
// 4. DrainShard(1). Variant "resume": SIGCONT the worker 100 ms later, so it
//    drains and exits by itself. Otherwise it stays stopped and the agent
//    SIGKILLs it at the drain timeout.
// 5. Every one of the 150 connections gets a complete 200 answer; every
//    queued one from a shard other than 1 (the kernel migrated it through
//    the steering program); the `migrated` counters rose by at least the
//    whole queue depth (ours plus the background load's). The drain call
//    succeeds; without "resume" the log reports the SIGKILL.
// 6. The background load had 0 failures (its connections queued on shard 1
//    in step 2 were migrated too). Scale back to 3 shards: the agent holds
//    exactly step 1's fd count and has no zombie children.
TEST_P(LifecycleQueueMigrationTest, EveryQueuedConnectionIsAnsweredElsewhere) {
  const QueueCase& param = GetParam();
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(param.address, 3, "http", 2)).ok());
  ASSERT_TRUE(agent.WaitServing(param.address)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(15)))
      << agent.Log();
  const int fds_before = CountFds(agent.pid());
  const uint64_t migrated_before = SumMigrated(*stub, "web");

  loadgen::Options load;
  load.target = param.address;
  load.rate = 200;
  load.duration = absl::Seconds(30);
  load.max_connections = 10000;
  load.request_timeout = absl::Seconds(8);
  std::atomic<bool> stop{false};
  auto running =
      std::async(std::launch::async, [&] { return loadgen::Run(load, &stop); });

  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 3u);
  const pid_t stopped = workers[1];
  ASSERT_EQ(::kill(stopped, SIGSTOP), 0);
  ASSERT_TRUE(
      WaitFor([&] { return ProcState(stopped) == 'T'; }, absl::Seconds(5)));

  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(param.address);
  ASSERT_TRUE(addr.ok());
  std::vector<Fd> conns;
  for (int i = 0; i < 150; ++i) {
    Fd fd = ConnectAndSend(*addr);
    ASSERT_TRUE(fd) << "connection " << i << ": " << strerror(errno);
    conns.push_back(std::move(fd));
  }
  // Wait until the running shards have answered all of theirs: then the
  // unanswered ones are those in shard 1's queue (whose depth, with the
  // background load's, is at least as large).
  std::vector<bool> queued(conns.size());
  int num_queued = 0;
  uint32_t depth = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        num_queued = 0;
        for (size_t i = 0; i < conns.size(); ++i) {
          queued[i] = !Readable(conns[i].get(), 0);
          num_queued += queued[i];
        }
        for (const v1::Shard& s : Shards(*stub, "web")) {
          if (s.index() == 1) depth = s.queue_depth();
        }
        return depth >= static_cast<uint32_t>(num_queued);
      },
      absl::Seconds(10)))
      << num_queued << " unanswered, shard 1 queue depth " << depth;
  std::cout << "queued on shard 1: " << num_queued
            << " of ours; kernel queue depth " << depth << "\n";
  EXPECT_GE(depth, static_cast<uint32_t>(num_queued));  // + background load
  ASSERT_GE(num_queued, 15);

  absl::Time drain_start = absl::Now();
  auto drain =
      std::async(std::launch::async, [&] { return Drain(*stub, "web", 1); });
  if (param.resume) {
    absl::SleepFor(absl::Milliseconds(100));
    ::kill(stopped, SIGCONT);
  }

  absl::Time deadline = absl::Now() + absl::Seconds(5);
  int answered_elsewhere = 0;
  for (size_t i = 0; i < conns.size(); ++i) {
    std::string error;
    loadgen::HttpAnswer a = ReadAnswer(conns[i].get(), deadline, &error);
    ASSERT_TRUE(error.empty()) << "connection " << i << ": " << error;
    ASSERT_EQ(a.state, loadgen::HttpAnswer::State::kComplete)
        << "connection " << i;
    EXPECT_EQ(a.status, 200);
    EXPECT_GE(a.shard, 0);
    if (queued[i]) {
      EXPECT_NE(a.shard, 1) << "queued connection " << i;
      EXPECT_NE(a.pid, stopped);
      answered_elsewhere += a.shard != 1;
    }
  }
  EXPECT_EQ(answered_elsewhere, num_queued);
  grpc::Status drained = drain.get();
  absl::Duration drain_took = absl::Now() - drain_start;
  std::cout << "drain took " << drain_took << "\n";
  ASSERT_TRUE(drained.ok()) << drained.error_message();
  uint64_t migrated = SumMigrated(*stub, "web") - migrated_before;
  std::cout << "migrated counter: +" << migrated << "\n";
  // All of the queue, ours and the background load's, went through the
  // program's migrate path.
  EXPECT_GE(migrated, static_cast<uint64_t>(depth));
  if (!param.resume) {
    EXPECT_THAT(agent.Log(), HasSubstr("after the drain timeout; SIGKILL"));
    EXPECT_GE(drain_took, absl::Milliseconds(1500));
  }
  EXPECT_TRUE(
      WaitFor([&] { return !ProcessExists(stopped); }, absl::Seconds(3)));

  // Let the load run on the 2 remaining shards a little (nothing is
  // asserted on how much it does there).
  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  absl::StatusOr<loadgen::Result> result = running.get();
  ASSERT_TRUE(result.ok()) << result.status();
  std::cout << "load: " << result->Summary() << "\n";
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(result->by_shard.count(1), 0u);  // stopped from the start

  // Back to three shards: the agent must hold exactly as many fds as with
  // the three shards of step 1.
  conns.clear();
  ASSERT_TRUE(ScaleTo(*stub, "web", 3).ok());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 3; },
                      absl::Seconds(10)));
  EXPECT_TRUE(WaitFor([&] { return CountFds(agent.pid()) == fds_before; },
                      absl::Seconds(5)))
      << "agent fds: before " << fds_before << ", after "
      << CountFds(agent.pid());
  EXPECT_TRUE(ZombieChildren(agent.pid()).empty());
}

INSTANTIATE_TEST_SUITE_P(
    Addresses, LifecycleQueueMigrationTest,
    ::testing::Values(QueueCase{"IPv4Killed", "127.0.0.1:8080", false},
                      QueueCase{"IPv6Killed", "[::1]:8080", false},
                      QueueCase{"IPv4Resumed", "127.0.0.1:8080", true},
                      QueueCase{"IPv6Resumed", "[::1]:8080", true}),
    [](const ::testing::TestParamInfo<QueueCase>& info) {
      return std::string(info.param.name);
    });

// Steps:
// 1. Two shards of echo workers (HASH, drain timeout 10 s). Record the
//    agent's fd count.
// 2. Loadgen in long mode: 200 echo connections, one 60-byte exchange per
//    connection every 100 ms, for 5 s; then it closes every connection
//    itself.
// 3. At 1.5 s, with all 200 connected (shard 1's worker holds >= 40 of
//    them), DrainShard(1).
// 4. Asserted, and why: the drain promises that connections already
//    accepted are finished, not cut, until the drain timeout. So every
//    exchange on every connection succeeds while the drain runs (>= 3.5 s
//    of it), no connection is closed or reset by the server (0 failures,
//    0 reconnects, exactly 200 connections opened); and once the clients
//    close, the draining worker finds itself idle and exits on its own: the
//    drain call returns well before the 10 s timeout and no SIGKILL is
//    logged.
// 5. Scale back to 2 shards: the agent holds exactly step 1's fd count and
//    has no zombie children.
TEST(LifecycleLongLivedTest, DrainKeepsLongLivedConnectionsUntilClientsClose) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec("127.0.0.1:9000", 2, "echo", 10)).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(15)))
      << agent.Log();
  const int fds_before = CountFds(agent.pid());
  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 2u);
  const pid_t draining = workers[1];
  const int worker_fds_idle = CountFds(draining);

  loadgen::Options load;
  load.target = "127.0.0.1:9000";
  load.protocol = loadgen::Protocol::kEcho;
  load.mode = loadgen::Mode::kLong;
  load.connections = 200;
  load.interval = absl::Milliseconds(100);
  load.duration = absl::Seconds(5);
  load.max_connections = 200;  // a reconnect would be a failure anyway
  load.request_timeout = absl::Seconds(2);
  absl::Time start = absl::Now();
  auto running =
      std::async(std::launch::async, [&] { return loadgen::Run(load); });

  // Wait until shard 1's worker holds its share of the 200 connections.
  int held = 0;
  EXPECT_TRUE(WaitFor(
      [&] {
        held = CountFds(draining) - worker_fds_idle;
        return held >= 40;
      },
      absl::Seconds(4)))
      << "held " << held;
  std::cout << "connections held by the draining worker: " << held << "\n";
  absl::Time drain_start = absl::Now();
  grpc::Status drained = Drain(*stub, "web", 1);
  absl::Time drain_end = absl::Now();
  absl::Duration drain_took = drain_end - drain_start;
  ASSERT_TRUE(drained.ok()) << drained.error_message();

  absl::StatusOr<loadgen::Result> result = running.get();
  ASSERT_TRUE(result.ok()) << result.status();
  std::cout << "load: " << result->Summary() << "\n"
            << "drain took " << drain_took << " (load ended "
            << (absl::Now() - start) << " after it began)\n";
  EXPECT_EQ(result->failures(), 0) << result->Summary();
  EXPECT_EQ(result->reconnects, 0);
  EXPECT_EQ(result->connections_opened, 200);
  // Exchanges happened (at least one per connection on average; how many is
  // throughput, which belongs to the benchmarks, not here).
  EXPECT_GE(result->ok(), 200);
  // The drain ended before its 10 s timeout (no SIGKILL, below) but not
  // before the clients began to close at the end of the load: it waited
  // for them.
  EXPECT_LT(drain_took, absl::Seconds(10));
  EXPECT_GE(drain_end, start + load.duration);
  EXPECT_THAT(agent.Log(), ::testing::Not(HasSubstr("SIGKILL")));
  EXPECT_TRUE(
      WaitFor([&] { return !ProcessExists(draining); }, absl::Seconds(2)));
  ASSERT_TRUE(ScaleTo(*stub, "web", 2).ok());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  EXPECT_TRUE(WaitFor([&] { return CountFds(agent.pid()) == fds_before; },
                      absl::Seconds(5)))
      << "agent fds: before " << fds_before << ", after "
      << CountFds(agent.pid());
  EXPECT_TRUE(ZombieChildren(agent.pid()).empty());
}

// Steps:
// 1. Two listeners: "web" (2 shards, the one deleted) and "api" (1 shard,
//    which must not notice). Record the agent's fd count.
// 2. Short-lived load on web (200/s) and api (100/s).
// 3. Once web has answered connections, DeleteListener(web).
// 4. After the delete, web refuses (nothing listens), its workers are gone.
//    No answer to web was cut short, timed out or wrong; api's load saw no
//    failure at all. The agent holds fewer fds than before (web's sockets
//    and channels are closed) and has no zombie children.
// Known limit (README, "delete listener"): a deleted listener has no live
// shard to migrate its queues to, and its sockets keep receiving SYNs (the
// kernel's fallback choice) until they close, so the connections that reach
// an accept queue after its worker stopped accepting are reset. Resets are
// printed, not asserted to be 0; making delete reset-free needs the program
// to drop a deleting listener's SYNs and the worker to empty its queue
// before it stops.
TEST(LifecycleDeleteTest, DeleteAListenerUnderLoad) {
  PF_ENTER_NETNS_OR_SKIP();
  WidenPortRange();
  AgentHarness agent;
  ASSERT_TRUE(
      agent
          .Start(Spec("127.0.0.1:8080", 2, "http", 5) +
                 absl::StrReplaceAll(Spec("127.0.0.1:8081", 1, "http", 5),
                                     {{"\"web\"", "\"api\""}}))
          .ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor(
      [&] {
        return ReadyShards(*stub, "web") == 2 && ReadyShards(*stub, "api") == 1;
      },
      absl::Seconds(15)))
      << agent.Log();
  std::vector<pid_t> web_pids;
  for (const v1::Shard& s : Shards(*stub, "web")) web_pids.push_back(s.pid());
  const int fds_before = CountFds(agent.pid());

  loadgen::Options web_load;
  web_load.target = "127.0.0.1:8080";
  web_load.rate = 200;
  web_load.duration = absl::Seconds(20);
  web_load.max_connections = 4000;
  loadgen::Options api_load = web_load;
  api_load.target = "127.0.0.1:8081";
  api_load.rate = 100;
  std::atomic<bool> stop{false};
  auto web_run = std::async(std::launch::async,
                            [&] { return loadgen::Run(web_load, &stop); });
  auto api_run = std::async(std::launch::async,
                            [&] { return loadgen::Run(api_load, &stop); });
  // Wait until web really carries load (the program counted selections).
  ASSERT_TRUE(WaitFor(
      [&] {
        uint64_t selected = 0;
        for (const v1::Shard& s : Shards(*stub, "web")) {
          selected += s.counters().selected();
        }
        return selected >= 50;
      },
      absl::Seconds(10)));

  v1::DeleteListenerRequest del;
  del.set_name("web");
  v1::DeleteListenerResponse deleted;
  grpc::Status s = stub->DeleteListener(RpcContext().get(), del, &deleted);
  ASSERT_TRUE(s.ok()) << s.error_message();
  for (pid_t pid : web_pids) {
    EXPECT_TRUE(WaitFor([&] { return !ProcessExists(pid); }, absl::Seconds(10)))
        << "web worker " << pid << " still runs";
  }
  // Keep the load on until web has refused a few connections after the
  // delete.
  ASSERT_TRUE(WaitFor(
      [&] {
        Reply r = HttpGet("127.0.0.1:8080");
        return r.outcome == Outcome::kRefused;
      },
      absl::Seconds(5)));
  stop = true;
  absl::StatusOr<loadgen::Result> web = web_run.get();
  absl::StatusOr<loadgen::Result> api = api_run.get();
  ASSERT_TRUE(web.ok()) << web.status();
  ASSERT_TRUE(api.ok()) << api.status();
  std::cout << "web: " << web->Summary() << "\napi: " << api->Summary() << "\n";
  EXPECT_GT(web->ok(), 0);
  std::cout << "web connections reset by the delete: "
            << web->outcomes[static_cast<int>(loadgen::Outcome::kReset)]
            << "\n";
  for (loadgen::Outcome o :
       {loadgen::Outcome::kShort, loadgen::Outcome::kTimeout,
        loadgen::Outcome::kWrong, loadgen::Outcome::kError}) {
    EXPECT_EQ(web->outcomes[static_cast<int>(o)], 0)
        << loadgen::OutcomeName(o) << ": " << web->Summary();
  }
  EXPECT_EQ(web->late_starts, 0) << web->Summary();
  EXPECT_EQ(api->failures(), 0) << api->Summary();
  EXPECT_TRUE(Shards(*stub, "web").empty());
  EXPECT_TRUE(WaitFor([&] { return CountFds(agent.pid()) < fds_before; },
                      absl::Seconds(5)))
      << "agent fds: before " << fds_before << ", after "
      << CountFds(agent.pid());
  EXPECT_TRUE(ZombieChildren(agent.pid()).empty());
}

}  // namespace
}  // namespace portfleet::testing
