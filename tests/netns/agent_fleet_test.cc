// The agent's spine against the real kernel: real portfleet-agent and
// portfleet-worker binaries, each case in its own network namespace,
// outcomes counted from the client side.
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
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

std::string Spec(int shards, const std::string& command = "portfleet-worker",
                 const std::string& extra = "") {
  return absl::StrCat(R"pb(listeners {
  name: "web"
  address: "127.0.0.1:8080"
  shards: )pb",
                      shards, R"pb(
  worker { command: ")pb",
                      command, R"pb(" args: "--mode=http" }
  drain_timeout_seconds: 5
  )pb",
                      extra, "\n}\n");
}

// Steps:
// 1. Start the agent with 4 shards of http workers.
// 2. Open 2,000 sequential connections (one request each).
// 3. All are answered, and every worker answered some.
TEST(AgentFleetTest, FourShardsAnswerEveryConnection) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(4)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 4; },
                      absl::Seconds(10)))
      << agent.Log();
  std::map<int, pid_t> workers = agent.WorkersByShard();

  Tally tally;
  for (int i = 0; i < 2000; ++i) tally.Add(HttpGet(kAddress));
  EXPECT_EQ(tally.ok, 2000) << tally.first_error;
  EXPECT_EQ(tally.failed, 0);
  for (const auto& [shard, pid] : workers) {
    EXPECT_GT(tally.by_pid[pid], 0) << "shard " << shard << " pid " << pid;
    EXPECT_GT(tally.by_shard[shard], 0) << "shard " << shard;
  }
  EXPECT_EQ(tally.by_pid.size(), 4u);
}

// Accepted connections a worker holds: sockets other than fd 3 and 4 and
// other than copies of its listening socket (the worker SDK keeps one to
// hand back on re-adoption).
int HeldConnections(pid_t pid) {
  int held = 0;
  std::string dir = absl::StrCat("/proc/", pid, "/fd");
  std::error_code ec;
  const std::string listening = std::filesystem::read_symlink(dir + "/3", ec);
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::string name = entry.path().filename();
    if (name == "3" || name == "4") continue;
    std::string target = std::filesystem::read_symlink(entry.path(), ec);
    if (!ec && target.rfind("socket:", 0) == 0 && target != listening) held++;
  }
  return held;
}

// SIGKILLs `pid` at a moment it holds no accepted connection: a crashed
// process's own connections are lost with it (the kernel resets them), and
// that is not what this test is about. It is stopped first, so that what
// arrives meanwhile waits in the shard's queue, which must survive.
void KillWhileIdle(pid_t pid) {
  for (int attempt = 0; attempt < 200; ++attempt) {
    ::kill(pid, SIGSTOP);
    absl::SleepFor(absl::Milliseconds(2));
    if (HeldConnections(pid) == 0) {
      ::kill(pid, SIGKILL);
      return;
    }
    ::kill(pid, SIGCONT);
    absl::SleepFor(absl::Milliseconds(3));
  }
  ::kill(pid, SIGKILL);  // never idle: the test reports the reset
}

// Steps:
// 1. Start the agent with 2 shards; a client thread connects continuously.
// 2. Five times: SIGKILL shard 0's worker (between connections, so that what
//    is queued on its socket is what is at stake), wait for its replacement.
// 3. Each replacement serves the same socket inode as the killed worker.
// 4. The client saw no failure; the agent counted 5 restarts.
TEST(AgentFleetTest, KilledWorkerIsReplacedOnSameSocketWithoutFailures) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 2; },
                      absl::Seconds(10)));

  std::atomic<bool> stop{false};
  Tally tally;
  std::thread client([&] {
    ClientOptions options;
    options.timeout = absl::Seconds(10);
    while (!stop.load()) tally.Add(HttpGet(kAddress, options));
  });

  for (int round = 0; round < 5; ++round) {
    pid_t victim = agent.WorkersByShard()[0];
    ASSERT_GT(victim, 0);
    absl::StatusOr<uint64_t> inode = SocketInode(victim, 3);
    ASSERT_TRUE(inode.ok()) << inode.status();
    KillWhileIdle(victim);
    pid_t replacement = 0;
    ASSERT_TRUE(WaitFor(
        [&] {
          auto w = agent.WorkersByShard();
          replacement = w.count(0) ? w[0] : 0;
          return replacement != 0 && replacement != victim;
        },
        absl::Seconds(10)))
        << agent.Log();
    absl::StatusOr<uint64_t> new_inode = SocketInode(replacement, 3);
    ASSERT_TRUE(new_inode.ok()) << new_inode.status();
    EXPECT_EQ(*new_inode, *inode) << "round " << round;
    absl::SleepFor(absl::Milliseconds(300));
  }
  absl::SleepFor(absl::Milliseconds(300));
  stop = true;
  client.join();

  EXPECT_EQ(tally.failed, 0) << tally.first_error;
  EXPECT_GT(tally.ok, 50);
  EXPECT_THAT(agent.Log(), HasSubstr("listener web shard 0: worker pid"));
  EXPECT_THAT(agent.Log(), HasSubstr("killed by signal 9 (SIGKILL)"));
  EXPECT_THAT(agent.Log(), HasSubstr("restarts=5"));
}

// Steps:
// 1. Start the agent with 1 shard (so every connection is on its queue).
// 2. Stop the worker (SIGSTOP) while it holds no connection; open 8
//    connections and send a request on each: the kernel completes their
//    handshakes, and they wait in the shard's accept queue. None is answered
//    while the worker is stopped.
// 3. SIGKILL the stopped worker; the agent starts a replacement on the same
//    socket.
// 4. Every one of the 8 queued connections is answered by the replacement.
TEST(AgentFleetTest, WorkerCrashKeepsItsQueue) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(1)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 1; },
                      absl::Seconds(10)));
  const pid_t victim = agent.WorkersByShard()[0];
  ASSERT_GT(victim, 0);
  ASSERT_TRUE(
      WaitFor([&] { return HeldConnections(victim) == 0; }, absl::Seconds(10)));
  ASSERT_EQ(::kill(victim, SIGSTOP), 0);

  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(kAddress);
  ASSERT_TRUE(addr.ok()) << addr.status();
  constexpr int kQueued = 8;
  std::vector<Fd> queued;
  const std::string request =
      "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  for (int i = 0; i < kQueued; ++i) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(::connect(fd.get(), addr->get(), addr->length), 0)
        << "connection " << i << ": " << strerror(errno);
    ASSERT_EQ(::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(request.size()));
    queued.push_back(std::move(fd));
  }
  // Nothing is answered while the worker is stopped.
  pollfd first{queued[0].get(), POLLIN, 0};
  EXPECT_EQ(::poll(&first, 1, 200), 0) << "answered by a stopped worker";

  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  pid_t replacement = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        auto w = agent.WorkersByShard();
        replacement = w.count(0) ? w[0] : 0;
        return replacement != 0 && replacement != victim;
      },
      absl::Seconds(10)))
      << agent.Log();

  int answered = 0;
  for (int i = 0; i < kQueued; ++i) {
    std::string raw;
    absl::Time deadline = absl::Now() + absl::Seconds(15);
    int fd = queued[i].get();
    for (;;) {
      pollfd p{fd, POLLIN, 0};
      int left =
          static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
      if (left <= 0 || ::poll(&p, 1, left) != 1) break;
      char buf[4096];
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) {
        if (n < 0) absl::StrAppend(&raw, "<recv: ", strerror(errno), ">");
        break;
      }
      raw.append(buf, n);
    }
    bool ok = absl::StartsWith(raw, "HTTP/1.1 200 ") &&
              absl::StrContains(raw, absl::StrCat("pid=", replacement, "\n"));
    EXPECT_TRUE(ok) << "queued connection " << i << " got: " << raw;
    if (ok) answered++;
  }
  EXPECT_EQ(answered, kQueued) << agent.Log();
}

// Steps:
// 1. Start the agent with 3 shards.
// 2. SIGTERM it.
// 3. It exits 0 and none of its workers is left running.
TEST(AgentFleetTest, SigtermStopsAllWorkersAndExitsZero) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(3)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 3; },
                      absl::Seconds(10)));
  std::vector<pid_t> workers = DescendantsOf(agent.pid());
  ASSERT_EQ(workers.size(), 3u);

  agent.process().Signal(SIGTERM);
  std::optional<int> status = agent.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(status.has_value()) << agent.Log();
  EXPECT_TRUE(ExitedWith(*status, 0)) << agent.Log();
  for (pid_t w : workers) EXPECT_FALSE(ProcessExists(w)) << "worker " << w;
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kRefused);
}

// A worker that ignores SIGTERM is killed after the drain timeout.
TEST(AgentFleetTest, StragglerIsKilledAfterDrainTimeout) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  std::string marker = agent.dir().path() + "/trapped";
  std::string script = agent.dir().WriteFile(
      "stubborn.sh", absl::StrCat("#!/bin/sh\ntrap '' TERM\ntouch ", marker,
                                  "\nwhile :; do sleep 1; done\n"));
  ::chmod(script.c_str(), 0755);
  ASSERT_TRUE(agent
                  .Start(absl::StrCat(R"pb(listeners {
                    name: "web" address: "127.0.0.1:8080" shards: 1
                    worker { command: ")pb",
                                      script, R"pb(" }
                    drain_timeout_seconds: 1 })pb"))
                  .ok());
  // The worker ignores SIGTERM once its trap is set.
  ASSERT_TRUE(WaitFor([&] { return ::access(marker.c_str(), F_OK) == 0; },
                      absl::Seconds(10)));
  std::vector<pid_t> stubborn = DescendantsOf(agent.pid());
  ASSERT_FALSE(stubborn.empty());
  agent.process().Signal(SIGTERM);
  std::optional<int> status = agent.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(ExitedWith(*status, 0)) << agent.Log();
  EXPECT_THAT(agent.Log(), HasSubstr("drain timeout reached"));
  // The straggler (the shell and its sleep) did not survive the agent.
  for (pid_t p : stubborn) {
    EXPECT_TRUE(WaitFor([&] { return !ProcessExists(p); }, absl::Seconds(5)))
        << "straggler " << p << " still runs after the agent exited";
  }
}

// Steps:
// 1. Another process holds 127.0.0.1:8080 (without SO_REUSEPORT, then with).
// 2. The agent starts, serves its API, and reports the listener as not
//    serving, naming the address and the holder; the port stays the other
//    process's.
// 3. Once the other process lets go, a retry starts the listener.
TEST(AgentFleetTest, PortTakenByAnotherProcessIsReportedAndRetried) {
  PF_ENTER_NETNS_OR_SKIP();
  for (bool reuseport : {false, true}) {
    SCOPED_TRACE(reuseport ? "other socket has SO_REUSEPORT" : "plain socket");
    Fd other(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int one = 1;
    if (reuseport) {
      ::setsockopt(other.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    }
    SocketAddress addr = *SocketAddress::Parse(kAddress);
    ASSERT_EQ(::bind(other.get(), addr.get(), addr.length), 0);
    ASSERT_EQ(::listen(other.get(), 16), 0);

    AgentHarness agent;
    ASSERT_TRUE(agent.Start(Spec(2)).ok());
    ASSERT_TRUE(agent.WaitLog("listener web is not serving: ")) << agent.Log();
    EXPECT_THAT(agent.Log(),
                HasSubstr("listener web: address 127.0.0.1:8080 is already "
                          "in use by another process: pid "));
    EXPECT_THAT(agent.Log(), HasSubstr("agent_fleet_tes"));  // our comm
    EXPECT_TRUE(agent.process().running());
    other.Reset();
    EXPECT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
    // Logged once every shard started: shard 0 may answer before shard 1 is
    // up.
    EXPECT_TRUE(agent.WaitLog("listener web: serving after ")) << agent.Log();
  }
}

TEST(AgentFleetTest, MissingWorkerBinaryIsReported) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2, "no-such-worker")).ok());
  ASSERT_TRUE(agent.WaitLog("listener web is not serving: ")) << agent.Log();
  EXPECT_THAT(agent.Log(),
              HasSubstr("listener web: worker command 'no-such-worker' not "
                        "found (looked next to the agent binary and in "
                        "PATH)"));
  EXPECT_TRUE(agent.process().running());
  // Nothing half-applied: the port is free; the agent stops cleanly.
  EXPECT_EQ(HttpGet(kAddress).outcome, Outcome::kRefused);
  agent.process().Signal(SIGTERM);
  std::optional<int> status = agent.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
}

TEST(AgentFleetTest, WorkerThatExitsAtOnceIsReportedAndRetried) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(1, "/bin/false")).ok());
  ASSERT_TRUE(agent.WaitLog("exited at once", 2)) << agent.Log();
  EXPECT_TRUE(agent.process().running());
  EXPECT_THAT(agent.Log(), HasSubstr("listener web shard 0: worker pid "));
  EXPECT_THAT(agent.Log(), HasSubstr("exited with status 1 after"));
}

TEST(AgentFleetTest, IPv6ListenerServes) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent
                  .Start(R"pb(listeners {
                    name: "web6" address: "[::1]:8080" shards: 2
                    worker { command: "portfleet-worker" args: "--mode=http" }
                  })pb")
                  .ok());
  ASSERT_TRUE(agent.WaitServing("[::1]:8080")) << agent.Log();
  Reply r = HttpGet("[::1]:8080");
  EXPECT_EQ(r.outcome, Outcome::kOk);
  EXPECT_EQ(r.listener, "web6");
}

// A child running as `uid` connects to the control socket at `path` and
// waits for the agent to close it: 0 when closed within 2 s, 1 when it
// stayed open, 2 when the connect failed, 3 when it could not switch uid.
int ConnectAsAndAwaitClose(const std::string& path, uid_t uid) {
  pid_t child = ::fork();
  if (child == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(uid) != 0 ||
        ::setuid(uid) != 0) {
      _exit(3);
    }
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      _exit(2);
    }
    pollfd p{fd, POLLIN, 0};
    char byte;
    if (::poll(&p, 1, 2000) == 1 && ::recv(fd, &byte, 1, 0) == 0) _exit(0);
    _exit(1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Workers that run as another user, under an agent without CAP_SYS_PTRACE
// (the shipped systemd unit's capability set): the agent can read neither
// their /proc/PID/fd nor environ, and they are not of its uid. Steps:
// 1. Two shards whose workers run as nobody; the agent runs through
//    `setpriv --bounding-set -sys_ptrace`. A client thread connects
//    continuously.
// 2. SIGKILL the agent and start it again the same way.
// 3. The workers reconnect to the control socket (0666 in a 0751
//    directory) and the agent re-adopts them: same pids, same socket
//    inodes, from its record of its workers (<state_dir>/workers).
// 4. A process of a third uid that connects to the control socket is closed
//    at once and logged.
// 5. A stop drains the re-adopted workers: none is left running.
// The client saw no failure throughout.
TEST(AgentFleetTest, WorkersOfAnotherUserAreReadoptedWithoutPtrace) {
  PF_ENTER_NETNS_OR_SKIP();
  if (::geteuid() != 0) PF_SKIP_OR_FAIL("needs root to run workers as nobody");
  AgentHarness agent;
  agent.set_wrapper(
      {"/usr/bin/setpriv", "--bounding-set", "-sys_ptrace", "--"});
  std::string worker = agent.dir().path() + "/portfleet-worker";
  std::filesystem::copy_file(BinaryPath("portfleet-worker"), worker);
  ::chmod(worker.c_str(), 0755);
  ::chmod(agent.dir().path().c_str(), 0755);
  ASSERT_TRUE(agent
                  .Start(absl::StrCat(R"pb(listeners {
                    name: "web" address: "127.0.0.1:8080" shards: 2
                    worker {
                      command: ")pb",
                                      worker, R"pb("
                      args: "--mode=http"
                      user: "nobody"
                    }
                    drain_timeout_seconds: 5
                  })pb"))
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  ASSERT_TRUE(WaitFor([&] { return agent.WorkersByShard().size() == 2; },
                      absl::Seconds(10)));
  const std::map<int, pid_t> workers = agent.WorkersByShard();
  std::map<int, uint64_t> inodes;
  for (const auto& [shard, pid] : workers) {
    absl::StatusOr<uint64_t> inode = SocketInode(pid, 3);
    ASSERT_TRUE(inode.ok()) << inode.status();
    inodes[shard] = *inode;
    EXPECT_THAT(ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/status")),
                HasSubstr("Uid:\t65534\t65534\t65534\t65534"));
  }
  // Bit 19 of the agent's effective set (CAP_SYS_PTRACE) is clear.
  std::string status =
      ReadFileOrEmpty(absl::StrCat("/proc/", agent.pid(), "/status"));
  size_t at = status.find("CapEff:\t");
  ASSERT_NE(at, std::string::npos);
  uint64_t cap_eff = std::stoull(status.substr(at + 8, 16), nullptr, 16);
  EXPECT_EQ(cap_eff & (1ull << 19), 0u) << "agent still has CAP_SYS_PTRACE";
  // The agent's record of its workers, which the next agent trusts.
  ASSERT_TRUE(WaitFor(
      [&] {
        struct stat st;
        return ::stat((agent.state_dir() + "/workers").c_str(), &st) == 0;
      },
      absl::Seconds(5)))
      << agent.Log();

  std::atomic<bool> stop{false};
  Tally tally;
  std::thread client([&] {
    ClientOptions options;
    options.timeout = absl::Seconds(10);
    while (!stop.load()) tally.Add(HttpGet(kAddress, options));
  });
  agent.process().Signal(SIGKILL);
  ASSERT_TRUE(agent.process().Wait(absl::Seconds(5)).has_value());
  ASSERT_TRUE(agent.Restart().ok());
  EXPECT_TRUE(agent.WaitLog("re-adopted worker pid", 2)) << agent.Log();
  EXPECT_TRUE(agent.WaitLog("fleet serving")) << agent.Log();
  for (const auto& [shard, pid] : workers) {
    EXPECT_TRUE(agent.Log().find(absl::StrCat("re-adopted worker pid ", pid)) !=
                std::string::npos)
        << "shard " << shard << " pid " << pid << "\n"
        << agent.Log();
    EXPECT_TRUE(ProcessExists(pid));
    EXPECT_EQ(SocketInode(pid, 3).value_or(0), inodes[shard]);
  }
  EXPECT_EQ(agent.Log().find("already in use"), std::string::npos)
      << agent.Log();

  const std::string control = agent.dir().path() + "/control.sock";
  struct stat st;
  ASSERT_EQ(::stat(control.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0666u);
  EXPECT_EQ(ConnectAsAndAwaitClose(control, 4242), 0);
  EXPECT_TRUE(agent.WaitLog("(uid 4242) closed: neither this agent's uid"))
      << agent.Log();

  absl::SleepFor(absl::Milliseconds(500));
  stop = true;
  client.join();
  EXPECT_EQ(tally.failed, 0) << tally.first_error;
  EXPECT_GT(tally.ok, 0);

  // A stop drains the re-adopted workers.
  agent.process().Signal(SIGTERM);
  EXPECT_TRUE(agent.process().Wait(absl::Seconds(20)).has_value())
      << agent.Log();
  for (const auto& entry : workers) {
    // Not a structured binding: clang 14 cannot capture one in a lambda.
    const pid_t pid = entry.second;
    EXPECT_TRUE(WaitFor([&] { return !ProcessExists(pid); }, absl::Seconds(5)))
        << "worker " << pid << " of shard " << entry.first
        << " left running after the stop\n"
        << agent.Log();
  }
}

// Steps:
// 1. A listener whose workers run as "nobody".
// 2. They serve, and /proc says they run with nobody's uid and gid.
// 3. An unknown user is a start-up error naming the field.
TEST(AgentFleetTest, WorkersRunAsTheConfiguredUser) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  // The build tree may not be readable by nobody (e.g. under /root): run a
  // copy from the test's own 0755 directory.
  std::string worker = agent.dir().path() + "/portfleet-worker";
  std::filesystem::copy_file(BinaryPath("portfleet-worker"), worker);
  ::chmod(worker.c_str(), 0755);
  ASSERT_TRUE(agent
                  .Start(absl::StrCat(R"pb(listeners {
                    name: "web" address: "127.0.0.1:8080" shards: 2
                    worker {
                      command: ")pb",
                                      worker, R"pb("
                      args: "--mode=http"
                      user: "nobody"
                    }
                  })pb"))
                  .ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  std::map<int, pid_t> workers = agent.WorkersByShard();
  ASSERT_EQ(workers.size(), 2u);
  for (const auto& [shard, pid] : workers) {
    std::string status =
        ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/status"));
    EXPECT_THAT(status, HasSubstr("Uid:\t65534\t65534\t65534\t65534"));
    EXPECT_EQ(ProcessEnv(pid, "USER"), "nobody");
  }
  Tally tally;
  for (int i = 0; i < 50; ++i) tally.Add(HttpGet(kAddress));
  EXPECT_EQ(tally.ok, 50) << tally.first_error;

  AgentHarness bad;
  ASSERT_TRUE(bad.Start(R"pb(listeners {
                name: "api" address: "127.0.0.1:9090" shards: 1
                worker { command: "portfleet-worker" user: "no-such-user-x" }
              })pb")
                  .ok());
  ASSERT_TRUE(bad.WaitLog("listener api is not serving: ")) << bad.Log();
  EXPECT_THAT(bad.Log(), HasSubstr("worker.user: no such user "
                                   "'no-such-user-x'"));
}

// Workers parse untrusted traffic: started by a root agent, each runs with
// no capability at all (effective, permitted, inheritable, ambient and
// bounding sets empty) and no_new_privs, also when it runs as root.
TEST(AgentFleetTest, WorkersHaveNoCapabilities) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2)).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  // Both workers exist and have exec'd the worker binary: a child still
  // between fork and exec shows the agent's own capabilities.
  std::map<int, pid_t> workers;
  ASSERT_TRUE(WaitFor(
      [&] {
        workers = agent.WorkersByShard();
        if (workers.size() != 2) return false;
        for (const auto& entry : workers) {
          std::error_code ec;
          std::string exe =
              std::filesystem::read_symlink(
                  absl::StrCat("/proc/", entry.second, "/exe"), ec)
                  .string();
          if (ec || !absl::EndsWith(exe, "/portfleet-worker")) return false;
        }
        return true;
      },
      absl::Seconds(10)))
      << agent.Log();
  for (const auto& [shard, pid] : workers) {
    std::string status =
        ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/status"));
    for (const char* set : {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}) {
      EXPECT_THAT(status, HasSubstr(absl::StrCat(set, ":\t0000000000000000")))
          << "shard " << shard << "\n"
          << status;
    }
    EXPECT_THAT(status, HasSubstr("NoNewPrivs:\t1"));
    EXPECT_THAT(status, HasSubstr("Uid:\t0\t0\t0\t0"));  // still root
  }
  Tally tally;
  for (int i = 0; i < 20; ++i) tally.Add(HttpGet(kAddress));
  EXPECT_EQ(tally.ok, 20) << tally.first_error;
}

// --takeover=auto on a host without a running agent starts normally.
TEST(AgentFleetTest, TakeoverAutoWithoutARunningAgentStartsNormally) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  ASSERT_TRUE(agent.Start(Spec(2), {"--takeover=auto"}).ok());
  ASSERT_TRUE(agent.WaitServing(kAddress)) << agent.Log();
  EXPECT_THAT(agent.Log(), HasSubstr("--takeover=auto: no agent answers on"));
}

// --require-steering: a --bpffs that is not on a bpf filesystem (a hostPath
// on plain sysfs or tmpfs) fails the start with the reason, and no worker
// is left running.
TEST(AgentFleetTest, RequireSteeringFailsTheStartWithoutABpffs) {
  PF_ENTER_NETNS_OR_SKIP();
  AgentHarness agent;
  const std::string not_bpffs = agent.dir().path() + "/plain";
  ASSERT_EQ(::mkdir(not_bpffs.c_str(), 0700), 0);
  ASSERT_TRUE(agent
                  .Start(Spec(2), {"--bpffs", not_bpffs + "/portfleet",
                                   "--require-steering"})
                  .ok());
  std::optional<int> status = agent.process().Wait(absl::Seconds(15));
  ASSERT_TRUE(status.has_value()) << agent.Log();
  EXPECT_EQ(WEXITSTATUS(*status), 1) << agent.Log();
  EXPECT_THAT(agent.Log(),
              HasSubstr("BPF steering unavailable (--require-steering): "
                        "bpffs root " +
                        not_bpffs + "/portfleet: " + not_bpffs +
                        " is not on a bpf filesystem"));
  EXPECT_TRUE(ProcessesInMyNetns().empty());
}

TEST(AgentFleetTest, UsageErrors) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--bogus"},
                                             {"--config"},
                                             {"--takeover=sometimes"},
                                             {"--log-level", "loud"},
                                             {"--check"}}) {
    TempDir dir;
    Subprocess p;
    std::vector<std::string> argv = {BinaryPath("portfleet-agent")};
    argv.insert(argv.end(), args.begin(), args.end());
    ASSERT_TRUE(p.Start(argv, dir.path() + "/log").ok());
    std::optional<int> status = p.Wait(absl::Seconds(10));
    ASSERT_TRUE(status.has_value());
    EXPECT_TRUE(ExitedWith(*status, 2)) << args[0];
    EXPECT_THAT(p.Log(), HasSubstr("Run 'portfleet-agent --help' for usage."));
  }
}

}  // namespace
}  // namespace portfleet::testing
