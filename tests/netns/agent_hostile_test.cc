// Hostile local users and awkward moments (issue 9): a low descriptor limit
// with a flood of API or control-socket connections, idle connections that
// would block the agent, junk on a worker's control channel, sockets and
// directories another user controls, and SIGTERM while a scale-up or a
// rollout is in flight. Each case in its own network namespace.
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kAddress[] = "127.0.0.1:8080";
constexpr char kMetrics[] = "127.0.0.1:9464";

std::string Spec(int shards, const std::string& command = "portfleet-worker",
                 const std::string& args = "args: \"--mode=http\"") {
  return absl::StrCat("listeners {\n  name: \"web\"\n  address: \"", kAddress,
                      "\"\n  shards: ", shards, "\n  worker { command: \"",
                      command, "\" ", args,
                      " }\n  drain_timeout_seconds: 5\n}\n");
}

// The status code of GET `path` on the metrics port (0 = no answer).
int HttpStatus(const std::string& path, std::string* body = nullptr) {
  SocketAddress addr = *SocketAddress::Parse(kMetrics);
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  timeval tv{2, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (::connect(fd.get(), addr.get(), addr.length) != 0) return 0;
  std::string req = absl::StrCat("GET ", path, " HTTP/1.1\r\n\r\n");
  ::send(fd.get(), req.data(), req.size(), MSG_NOSIGNAL);
  std::string raw;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd.get(), buf, sizeof(buf), 0)) > 0) raw.append(buf, n);
  int code = 0;
  if (raw.size() > 12 && !absl::SimpleAtoi(raw.substr(9, 3), &code)) code = 0;
  if (body != nullptr && raw.find("\r\n\r\n") != std::string::npos) {
    *body = raw.substr(raw.find("\r\n\r\n") + 4);
  }
  return code;
}

// Connects to a unix socket of `type`; the connection stays open.
Fd ConnectUnix(const std::string& path, int type) {
  Fd fd(::socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    return Fd();
  }
  return fd;
}

bool StatusAnswers(v1::FleetService::Stub& stub, int seconds = 2) {
  v1::GetStatusRequest req;
  v1::GetStatusResponse resp;
  return stub.GetStatus(RpcContext(seconds).get(), req, &resp).ok();
}

// Steps (item 3):
// 1. The agent runs with a hard limit of 128 descriptors.
// 2. 200 connections to the API socket are held for 3 s, then closed.
// 3. From then on the agent is never "dead but healthy" for longer than its
//    API probe needs: either the API answers again, or /healthz fails (503,
//    or no answer), so that the kubelet or systemd restarts it. The data
//    path serves throughout.
TEST(AgentHostileTest, ApiFloodUnderALowDescriptorLimitIsNeverHidden) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  agent.set_wrapper({"/usr/bin/prlimit", "--nofile=128:128", "--"});
  ASSERT_TRUE(agent.Start(Spec(1), {"--metrics", kMetrics}).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  std::vector<Fd> flood;
  for (int i = 0; i < 200; ++i) {
    Fd fd = ConnectUnix(agent.api_socket(), SOCK_STREAM);
    if (fd) flood.push_back(std::move(fd));
  }
  absl::SleepFor(absl::Seconds(3));
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kOk);
  flood.clear();
  auto stub = FleetStub(agent.api_socket());
  absl::Time dead_and_healthy_since = absl::InfiniteFuture();
  absl::Time give_up = absl::Now() + absl::Seconds(40);
  bool settled = false;
  while (absl::Now() < give_up && !settled) {
    bool api = StatusAnswers(*stub);
    int healthz = HttpStatus("/healthz");
    // A liveness probe that gets no answer (0) fails as surely as a 503.
    if (api || healthz != 200) {
      settled = true;
      break;
    }
    if (dead_and_healthy_since == absl::InfiniteFuture()) {
      dead_and_healthy_since = absl::Now();
    }
    ASSERT_LT(absl::Now() - dead_and_healthy_since, absl::Seconds(25))
        << "the API does not answer but /healthz says " << healthz << "\n"
        << agent.Log();
    absl::SleepFor(absl::Milliseconds(500));
  }
  EXPECT_TRUE(settled) << agent.Log();
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kOk);
}

// Steps (item 4): 50 idle connections to the control socket do not slow the
// agent down: status calls answer as fast as without them.
TEST(AgentHostileTest, IdleControlConnectionsDoNotBlockTheAgent) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(1)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  std::vector<Fd> idle;
  for (int i = 0; i < 50; ++i) {
    Fd fd = ConnectUnix(agent.dir().path() + "/control.sock", SOCK_SEQPACKET);
    ASSERT_TRUE(fd.valid());
    idle.push_back(std::move(fd));
  }
  auto stub = FleetStub(agent.api_socket());
  absl::Time start = absl::Now();
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(StatusAnswers(*stub));
  // 440c57c: each idle connection held the loop for 200 ms (10 s here).
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  // The idle ones are closed after their first-message timeout.
  EXPECT_TRUE(WaitFor(
      [&] {
        char c;
        return ::recv(idle.back().get(), &c, 1, MSG_DONTWAIT) == 0;
      },
      absl::Seconds(10)));
}

// Steps (item 4): with 128 descriptors, 300 connections to the control
// socket (EMFILE in accept) do not turn into a busy loop or a flood of log
// lines, and the agent keeps answering.
TEST(AgentHostileTest, ControlSocketFloodUnderALowLimitStaysQuiet) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  agent.set_wrapper({"/usr/bin/prlimit", "--nofile=128:128", "--"});
  ASSERT_TRUE(agent.Start(Spec(1)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  std::vector<Fd> flood;
  for (int i = 0; i < 300; ++i) {
    Fd fd = ConnectUnix(agent.dir().path() + "/control.sock", SOCK_SEQPACKET);
    if (fd) flood.push_back(std::move(fd));
  }
  absl::SleepFor(absl::Seconds(3));
  flood.clear();
  auto stub = FleetStub(agent.api_socket());
  EXPECT_TRUE(WaitFor([&] { return StatusAnswers(*stub); }, absl::Seconds(10)));
  int lines = CountOccurrences(agent.Log(), "control socket");
  EXPECT_LT(lines, 100) << "control socket log lines: " << lines;
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kOk);
}

// Steps (item 11): a worker that sends junk on its control channel as fast
// as it can gets a handful of log lines, not millions.
TEST(AgentHostileTest, JunkOnAControlChannelIsRateLimitedInTheLog) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  std::string script = agent.dir().WriteFile(
      "junk.sh",
      absl::StrCat("#!/bin/sh\n"
                   "end=$(($(date +%s) + 3))\n"
                   "while [ $(date +%s) -lt $end ]; do\n"
                   "  printf '\\377\\377junk' >&4\n"
                   "done\n"
                   "exec ",
                   BinaryPath("portfleet-worker"), " --mode=http\n"));
  ::chmod(script.c_str(), 0755);
  ASSERT_TRUE(agent.Start(Spec(1, script, "")).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress, absl::Seconds(20))) << agent.Log();
  int lines = CountOccurrences(agent.Log(), "; ignored");
  EXPECT_GT(lines, 0) << agent.Log();
  // A burst of 5 per 10 s (then one line that counts the suppressed ones).
  EXPECT_LE(lines, 6) << "lines about junk: " << lines;
}

// Steps (item 2): the agent refuses socket and state directories that others
// can write to, saying how to fix it.
TEST(AgentHostileTest, DirectoriesOthersCanWriteAreRefused) {
  PF_ENTER_NETNS_OR_SKIP();
  TempDir open;
  ASSERT_EQ(::chmod(open.path().c_str(), 01777), 0);
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(Spec(1), {"--api", absl::StrCat("unix://", open.path(),
                                                         "/api.sock")})
                  .ok());
  std::optional<int> status = agent.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(status.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << *status;
  EXPECT_THAT(agent.Log(),
              HasSubstr(absl::StrCat("socket directory ", open.path(),
                                     " is writable by every user (mode "
                                     "1777)")));
  EXPECT_THAT(agent.Log(), HasSubstr("chmod go-w"));
}

// Steps (item 2): a process of another user listening on the control socket
// path (it could bind there before the directory was locked down) is not
// trusted by --takeover: the new agent refuses to take sockets or a spec
// from it and nothing it says is run.
TEST(AgentHostileTest, TakeoverRefusesAnAgentOfAnotherUser) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  const std::string control = agent.dir().path() + "/control.sock";
  // A child as nobody listens on the control socket path.
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::chmod(agent.dir().path().c_str(), 0777), 0);
  pid_t child = ::fork();
  if (child == 0) {
    ::close(ready[0]);
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(3);
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", control.c_str());
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        ::listen(fd, 8) != 0) {
      ::_exit(4);
    }
    ::write(ready[1], "x", 1);
    ::sleep(30);
    ::_exit(0);
  }
  ::close(ready[1]);
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ::close(ready[0]);
  // Lock the directory down again: only the socket inside is the attacker's.
  ASSERT_EQ(::chmod(agent.dir().path().c_str(), 0700), 0);
  ASSERT_TRUE(agent.Start(Spec(1), {"--takeover"}).ok());
  std::optional<int> status = agent.process().Wait(absl::Seconds(15));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ASSERT_TRUE(status.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << *status;
  EXPECT_THAT(agent.Log(), HasSubstr("runs as uid 65534, not as this agent's "
                                     "uid 0: refusing to take sockets"));
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kRefused);
}

// Steps (item 6): a scale-up waits for a new third-party worker that ignores
// SIGTERM; SIGTERM to the agent then ends everything within the drain
// timeout (SIGKILL for the straggler) and the agent exits 0.
TEST(AgentHostileTest, SigtermDuringAScaleUpFinishes) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  std::string script = agent.dir().WriteFile(
      "mixed.sh", absl::StrCat("#!/bin/sh\n"
                               "if [ \"$PORTFLEET_SHARD\" = 0 ]; then exec ",
                               BinaryPath("portfleet-worker"),
                               " --mode=http; fi\n"
                               "trap '' TERM\nsleep 60\n"));
  ::chmod(script.c_str(), 0755);
  ASSERT_TRUE(agent.Start(Spec(1, script, "")).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  auto scale =
      std::async(std::launch::async, [&] { return ScaleTo(*stub, "web", 2); });
  ASSERT_TRUE(agent.WaitLog("listener web shard 1: worker pid")) << agent.Log();
  absl::Time sent = absl::Now();
  agent.process().Signal(SIGTERM);
  std::optional<int> status = agent.process().Wait(absl::Seconds(20));
  ASSERT_TRUE(status.has_value()) << agent.Log();
  EXPECT_LT(absl::Now() - sent, absl::Seconds(12));
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
  scale.wait();
  EXPECT_TRUE(
      WaitFor([] { return ProcessesInMyNetns().empty(); }, absl::Seconds(5)));
}

// Steps (item 12): SIGTERM while a rollout waits for a new worker: no worker
// is started after the signal (no rollback), and the agent exits 0.
TEST(AgentHostileTest, SigtermDuringARolloutStartsNothingNew) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2)).ok());
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(WaitFor([&] { return ReadyShards(*stub, "web") == 2; },
                      absl::Seconds(10)));
  std::string slow = agent.dir().WriteFile(
      "slow.sh", absl::StrCat("#!/bin/sh\nsleep 3\nexec ",
                              BinaryPath("portfleet-worker"), " \"$@\"\n"));
  ::chmod(slow.c_str(), 0755);
  auto roll = std::async(std::launch::async, [&] {
    v1::RollOutListenerRequest req;
    req.set_name("web");
    req.mutable_worker()->set_command(slow);
    v1::RollOutListenerResponse resp;
    return stub->RollOutListener(RpcContext(30).get(), req, &resp);
  });
  ASSERT_TRUE(agent.WaitLog("started beside pid")) << agent.Log();
  agent.process().Signal(SIGTERM);
  std::optional<int> status = agent.process().Wait(absl::Seconds(20));
  ASSERT_TRUE(status.has_value()) << agent.Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
  std::string log = agent.Log();
  std::string after = log.substr(log.find("received SIGTERM"));
  EXPECT_THAT(after, ::testing::Not(HasSubstr("started beside pid")));
  EXPECT_THAT(after, ::testing::Not(HasSubstr("rolling back")));
  roll.wait();
}

// Steps (Low: API access equals running programs): with --worker-allowlist
// the agent runs only the listed programs; anything else is refused with
// PERMISSION_DENIED through the API and nothing is started.
TEST(AgentHostileTest, WorkerAllowlistRefusesOtherPrograms) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  std::string allowlist = agent.dir().WriteFile(
      "allowed", absl::StrCat("# workers this agent may run\n",
                              BinaryPath("portfleet-worker"), "\n"));
  ASSERT_TRUE(agent.Start(Spec(1), {"--worker-allowlist", allowlist}).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  v1::CreateListenerRequest req;
  req.mutable_listener()->set_name("evil");
  req.mutable_listener()->set_address("127.0.0.1:8081");
  req.mutable_listener()->set_shards(1);
  req.mutable_listener()->mutable_worker()->set_command("/bin/sh");
  req.mutable_listener()->mutable_worker()->add_args("-c");
  req.mutable_listener()->mutable_worker()->add_args("touch /tmp/pwned");
  v1::CreateListenerResponse resp;
  grpc::Status s = stub->CreateListener(RpcContext().get(), req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED)
      << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("not in this agent's worker "
                                           "allowlist"));
  EXPECT_EQ(Shards(*stub, "evil").size(), 0u);
  // The listed program is allowed.
  req.mutable_listener()->mutable_worker()->set_command("portfleet-worker");
  req.mutable_listener()->mutable_worker()->clear_args();
  s = stub->CreateListener(RpcContext().get(), req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
}

// Steps (item 7): listener "slow" drains a shard whose worker ignores
// SIGTERM (drain timeout 3600 s), and four more mutations of "slow" queue
// behind it with 1 s client deadlines. Meanwhile reads answer promptly, a
// mutation of the other listener completes, and its new shard serves. The
// cancelled calls do not keep the API busy: afterwards reads still answer.
TEST(AgentHostileTest, ASlowDrainBlocksNeitherReadsNorOtherListeners) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  std::string stubborn = agent.dir().WriteFile(
      "stubborn.sh", "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 1; done\n");
  ::chmod(stubborn.c_str(), 0755);
  std::string spec = absl::StrCat(
      Spec(1),
      "listeners {\n  name: \"slow\"\n  address: \"127.0.0.1:8081\"\n"
      "  shards: 2\n  worker { command: \"",
      stubborn, "\" }\n  drain_timeout_seconds: 3600\n}\n");
  ASSERT_TRUE(agent.Start(spec).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  auto stub = FleetStub(agent.api_socket());
  ASSERT_TRUE(agent.WaitLog("listener slow shard 1: worker pid"))
      << agent.Log();

  // The drain cannot finish for an hour; the client gives up after 2 s.
  auto drain = std::async(std::launch::async, [&] {
    v1::DrainShardRequest req;
    req.set_name("slow");
    req.set_index(1);
    v1::DrainShardResponse resp;
    return stub->DrainShard(RpcContext(2).get(), req, &resp);
  });
  ASSERT_TRUE(agent.WaitLog("listener slow shard 1: draining")) << agent.Log();
  std::vector<std::future<grpc::Status>> queued;
  for (int i = 0; i < 4; ++i) {
    queued.push_back(std::async(std::launch::async, [&, i] {
      v1::ScaleListenerRequest req;
      req.set_name("slow");
      req.set_shards(3 + i);
      v1::ScaleListenerResponse resp;
      return stub->ScaleListener(RpcContext(1).get(), req, &resp);
    }));
  }
  // Reads answer while all of that waits.
  for (int i = 0; i < 5; ++i) {
    absl::Time start = absl::Now();
    EXPECT_TRUE(StatusAnswers(*stub, 2)) << "read " << i;
    v1::ListListenersRequest req;
    v1::ListListenersResponse resp;
    EXPECT_TRUE(stub->ListListeners(RpcContext(2).get(), req, &resp).ok());
    EXPECT_LT(absl::Now() - start, absl::Seconds(2)) << "read " << i;
  }
  // Another listener's mutation is not queued behind "slow".
  grpc::Status scaled;
  {
    v1::ScaleListenerRequest req;
    req.set_name("web");
    req.set_shards(2);
    v1::ScaleListenerResponse resp;
    scaled = stub->ScaleListener(RpcContext(10).get(), req, &resp);
  }
  EXPECT_TRUE(scaled.ok()) << scaled.error_message() << "\n" << agent.Log();
  std::set<int> pids;
  for (int i = 0; i < 200 && pids.size() < 2; ++i) {
    Reply r = HttpGet(kAddress);
    ASSERT_EQ(r.outcome, Outcome::kOk) << i;
    pids.insert(r.pid);
  }
  EXPECT_EQ(pids.size(), 2u) << "the new shard of web never answered";
  // The clients of "slow" gave up; their calls ended with the deadline.
  EXPECT_EQ(drain.get().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  for (auto& q : queued) {
    EXPECT_EQ(q.get().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(StatusAnswers(*stub, 2)) << i;
  // "slow" still has its draining shard; nothing queued behind it ran.
  std::vector<v1::Shard> slow = Shards(*stub, "slow");
  EXPECT_EQ(slow.size(), 2u);
}

}  // namespace
}  // namespace portfleet::testing
