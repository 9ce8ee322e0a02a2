// The real portfleet-worker binary on a real listening socket, each case in
// a fresh network namespace. The test plays the agent: it creates and
// listens the socket, then starts the worker with the socket as fd 3
// (LISTEN_FDS=1, LISTEN_PID set in the child after fork) and, for the
// control-channel cases, one end of a seqpacket socketpair as fd 4. For
// re-adoption it also plays the restarted agent: a seqpacket listener at
// $PORTFLEET_AGENT_SOCKET that the worker reconnects to.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "portfleet/v1/control.pb.h"
#include "tests/testing/client.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {
namespace {

using testing::BinaryPath;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::Optional;
using testing::Outcome;
using testing::OutcomeName;
using testing::ReadFileOrEmpty;
using testing::TempDir;

// ---------------------------------------------------------------------------
// Helpers

// A listening TCP socket on 127.0.0.1 with a kernel-chosen port.
struct Listener {
  Fd fd;
  int port = 0;
  std::string address() const { return absl::StrCat("127.0.0.1:", port); }
};

// Options the agent may set on a shard socket (agent/sockets.h).
struct ListenOptions {
  bool nodelay = false;  // TCP_NODELAY, inherited by accepted sockets
  int defer_accept = 0;  // TCP_DEFER_ACCEPT seconds
  std::string name() const {
    return absl::StrCat(nodelay ? "nodelay" : "plain", "/defer=", defer_accept);
  }
};

Listener ListenLoopback(const ListenOptions& options = {}) {
  Listener l;
  l.fd = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  if (options.nodelay) {
    EXPECT_EQ(
        ::setsockopt(l.fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)),
        0);
  }
  if (options.defer_accept > 0) {
    EXPECT_EQ(::setsockopt(l.fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT,
                           &options.defer_accept, sizeof(int)),
              0);
  }
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(l.fd.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)),
            0);
  EXPECT_EQ(::listen(l.fd.get(), 128), 0);
  socklen_t len = sizeof(sin);
  ::getsockname(l.fd.get(), reinterpret_cast<sockaddr*>(&sin), &len);
  l.port = ntohs(sin.sin_port);
  return l;
}

struct StartOptions {
  std::vector<std::string> args = {"--mode=http"};
  std::vector<std::string> env =
      {};                      // "K=V", added to this process's environment
  int fd3 = -1;                // passed as fd 3 with LISTEN_FDS=1
  int control_fd = -1;         // passed as fd 4 with PORTFLEET_CONTROL_FD=4
  bool activation_env = true;  // set LISTEN_FDS / LISTEN_PID
};

// portfleet-worker as a child process, output in a log file; SIGKILLed and
// reaped on destruction if still running.
class WorkerProcess {
 public:
  ~WorkerProcess() {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      int st;
      ::waitpid(pid_, &st, 0);
    }
  }

  void Start(const StartOptions& options) {
    log_path_ = absl::StrCat(dir_.path(), "/worker.log");
    int log = ::open(log_path_.c_str(),
                     O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ASSERT_GE(log, 0);
    std::vector<std::string> argv = {BinaryPath("portfleet-worker")};
    argv.insert(argv.end(), options.args.begin(), options.args.end());
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      if (!absl::StartsWith(*e, "LISTEN_") &&
          !absl::StartsWith(*e, "PORTFLEET_")) {
        env.emplace_back(*e);
      }
    }
    if (options.activation_env) env.push_back("LISTEN_FDS=1");
    if (options.control_fd >= 0) env.push_back("PORTFLEET_CONTROL_FD=4");
    env.insert(env.end(), options.env.begin(), options.env.end());
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    std::vector<char*> cenv;
    for (auto& e : env) cenv.push_back(e.data());
    char listen_pid[64] = "LISTEN_PID=";
    if (options.activation_env) cenv.push_back(listen_pid);
    cenv.push_back(nullptr);

    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Only async-signal-safe calls from here on.
      std::snprintf(listen_pid, sizeof(listen_pid), "LISTEN_PID=%d",
                    static_cast<int>(::getpid()));
      // Out of the way first, so that the dup2s below cannot clobber them.
      int fd3 = options.fd3 >= 0 ? ::fcntl(options.fd3, F_DUPFD, 100) : -1;
      int fd4 = options.control_fd >= 0
                    ? ::fcntl(options.control_fd, F_DUPFD, 100)
                    : -1;
      ::dup2(log, 1);
      ::dup2(log, 2);
      if (fd3 >= 0) ::dup2(fd3, 3);
      if (fd4 >= 0) ::dup2(fd4, 4);
      ::execve(cargv[0], cargv.data(), cenv.data());
      ::_exit(127);
    }
    ::close(log);
    pid_ = pid;
  }

  pid_t pid() const { return pid_; }
  void Signal(int sig) { ::kill(pid_, sig); }
  bool running() { return !Wait(absl::ZeroDuration()).has_value(); }

  // The wait status, or nullopt if still running after `timeout`.
  std::optional<int> Wait(absl::Duration timeout) {
    absl::Time deadline = absl::Now() + timeout;
    while (!status_) {
      int st = 0;
      pid_t r = ::waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        status_ = st;
        break;
      }
      if (absl::Now() >= deadline) break;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return status_;
  }

  // Exit code, or -1 (killed by a signal) / -2 (still running).
  int ExitCode(absl::Duration timeout) {
    std::optional<int> st = Wait(timeout);
    if (!st) return -2;
    return WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
  }

  std::string Log() const { return ReadFileOrEmpty(log_path_); }

 private:
  TempDir dir_;
  std::string log_path_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// A blocking client connection with a receive timeout.
Fd Connect(int port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  timeval tv{5, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sin.sin_port = htons(port);
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)),
            0)
      << std::strerror(errno);
  return fd;
}

void SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    ASSERT_GT(n, 0) << std::strerror(errno);
    data.remove_prefix(n);
  }
}

// Reads one complete response (head + Content-Length body) from `fd`, using
// and updating `buffer` for bytes read beyond it. "" on EOF/timeout first.
std::string ReadResponse(int fd, std::string* buffer) {
  for (;;) {
    size_t head_end = buffer->find("\r\n\r\n");
    if (head_end != std::string::npos) {
      std::string head = buffer->substr(0, head_end);
      size_t cl = head.find("Content-Length: ");
      size_t length = 0;
      if (cl != std::string::npos) {
        size_t eol = head.find("\r\n", cl);
        (void)absl::SimpleAtoi(head.substr(cl + 16, eol - cl - 16), &length);
      }
      if (buffer->size() >= head_end + 4 + length) {
        std::string response = buffer->substr(0, head_end + 4 + length);
        buffer->erase(0, head_end + 4 + length);
        return response;
      }
    }
    char buf[16384];
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return "";
    buffer->append(buf, n);
  }
}

// True if the peer closes `fd` (EOF) within `timeout` with no more data.
bool ReadsEof(int fd, absl::Duration timeout) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, absl::ToInt64Milliseconds(timeout)) != 1) return false;
  char c;
  return ::recv(fd, &c, 1, MSG_DONTWAIT) == 0;
}

int Count(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos;
       pos = haystack.find(needle, pos + needle.size())) {
    ++n;
  }
  return n;
}

constexpr char kGet[] = "GET / HTTP/1.1\r\nHost: test\r\n\r\n";
constexpr char kGetClose[] =
    "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

// Receives the next WorkerMessage within `timeout`; nullopt on timeout.
std::optional<v1::WorkerMessage> NextMessage(ControlChannel& agent,
                                             absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    auto got = agent.Receive<v1::WorkerMessage>();
    if (!got.ok()) {
      ADD_FAILURE() << got.status();
      return std::nullopt;
    }
    if (got->has_value()) return std::move(**got);
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return std::nullopt;
    pollfd p{agent.fd(), POLLIN, 0};
    ::poll(&p, 1, absl::ToInt64Milliseconds(left) + 1);
  }
}

// ---------------------------------------------------------------------------
// Serving

TEST(WorkerNetnsTest, HttpAnswersWithItsIdentity) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.env = {"PORTFLEET_LISTENER=web", "PORTFLEET_SHARD=2",
                   "LISTEN_FDNAMES=ignored"},
           .fd3 = l.fd.get()});
  for (int i = 0; i < 5; ++i) {
    testing::Reply r = testing::HttpGet(l.address());
    ASSERT_EQ(r.outcome, Outcome::kOk)
        << OutcomeName(r.outcome) << ": " << r.error << "\n"
        << w.Log();
    EXPECT_EQ(r.listener, "web");
    EXPECT_EQ(r.shard, 2);
    EXPECT_EQ(r.pid, w.pid());
    EXPECT_THAT(r.raw, HasSubstr("Content-Type: text/plain\r\n"));
    EXPECT_THAT(r.raw, HasSubstr("Connection: close\r\n"));
  }
  w.Signal(SIGTERM);
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  EXPECT_THAT(w.Log(), HasSubstr("worker web/2"));
  EXPECT_THAT(w.Log(), HasSubstr("serving http on 127.0.0.1:"));
}

TEST(WorkerNetnsTest, ListenerNameFallsBackToListenFdNames) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.env = {"LISTEN_FDNAMES=api"}, .fd3 = l.fd.get()});
  testing::Reply r = testing::HttpGet(l.address());
  ASSERT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
  EXPECT_EQ(r.listener, "api");
  EXPECT_EQ(r.shard, 0);
}

TEST(WorkerNetnsTest, KeepAliveAndPipeliningOnOneConnection) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.env = {"PORTFLEET_LISTENER=web"}, .fd3 = l.fd.get()});
  Fd c = Connect(l.port);
  std::string buffer;
  // Sequential keep-alive requests.
  for (int i = 0; i < 3; ++i) {
    SendAll(c.get(), kGet);
    std::string response = ReadResponse(c.get(), &buffer);
    ASSERT_THAT(response, HasSubstr("HTTP/1.1 200 OK\r\n")) << w.Log();
    EXPECT_THAT(response, Not(HasSubstr("Connection: close")));
    EXPECT_THAT(response, HasSubstr(absl::StrCat("pid=", w.pid(), "\n")));
  }
  // Pipelined: a body to discard, two GETs, the last one closing, and a
  // request after it that must not be answered.
  SendAll(c.get(), absl::StrCat("POST /upload HTTP/1.1\r\nHost: test\r\n"
                                "Content-Length: 5\r\n\r\nhello",
                                kGet, kGetClose, kGet));
  std::vector<std::string> responses;
  for (int i = 0; i < 3; ++i) {
    std::string response = ReadResponse(c.get(), &buffer);
    ASSERT_FALSE(response.empty()) << "answer " << i << "\n" << w.Log();
    responses.push_back(response);
  }
  for (const std::string& r : responses) {
    EXPECT_THAT(r, HasSubstr("HTTP/1.1 200 OK\r\n"));
    EXPECT_THAT(r, HasSubstr("portfleet listener=web shard=0 pid="));
  }
  EXPECT_THAT(responses[1], Not(HasSubstr("Connection: close")));
  EXPECT_THAT(responses[2], HasSubstr("Connection: close\r\n"));
  // Closed after the third answer: nothing more, then a clean EOF (not the
  // receive timeout, not a reset).
  EXPECT_EQ(buffer, "");
  EXPECT_TRUE(ReadsEof(c.get(), absl::Seconds(10))) << w.Log();
}

TEST(WorkerNetnsTest, MalformedRequestGets400AndClose) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.fd3 = l.fd.get()});
  Fd c = Connect(l.port);
  SendAll(c.get(), "HELLO THERE\r\n\r\n");
  std::string buffer;
  std::string response = ReadResponse(c.get(), &buffer);
  EXPECT_THAT(response, HasSubstr("HTTP/1.1 400 Bad Request\r\n"));
  EXPECT_THAT(response, HasSubstr("Connection: close\r\n"));
  EXPECT_TRUE(ReadsEof(c.get(), absl::Seconds(3)));
}

TEST(WorkerNetnsTest, EchoModeEchoes) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.args = {"--mode", "echo"}, .fd3 = l.fd.get()});
  testing::Reply r = testing::EchoOnce(l.address(), "hello, portfleet\n");
  EXPECT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
  std::string big;
  for (int i = 0; big.size() < 256 * 1024; ++i) absl::StrAppend(&big, i, ",");
  r = testing::EchoOnce(l.address(), big);
  EXPECT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
  w.Signal(SIGTERM);
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
}

// ---------------------------------------------------------------------------
// The new-connection path (issue 14): the worker reads right after accept,
// closes a "Connection: close" exchange without waiting for the client's FIN
// when nothing of the client's is left unread, and skips TCP_NODELAY per
// connection when the listener carries it. None of that may cost a slow
// client, a request in pieces or a body, on any listener the agent makes.

// The port of the peer of a connected socket.
int PeerPort(int fd) {
  sockaddr_in sin{};
  socklen_t len = sizeof(sin);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&sin), &len) != 0) {
    return -1;
  }
  return ntohs(sin.sin_port);
}

int LocalPort(int fd) {
  sockaddr_in sin{};
  socklen_t len = sizeof(sin);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sin), &len);
  return ntohs(sin.sin_port);
}

// TCP_NODELAY of the socket that `pid` holds for the client connection
// `client` (found by its peer port and copied with pidfd_getfd); -1 if none.
int WorkerSideNodelay(pid_t pid, int client) {
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return -1;
  const int want = LocalPort(client);
  for (int target = 0; target < 1024; ++target) {
    Fd copy(
        static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), target, 0)));
    if (!copy || PeerPort(copy.get()) != want) continue;
    int nodelay = -1;
    socklen_t len = sizeof(nodelay);
    ::getsockopt(copy.get(), IPPROTO_TCP, TCP_NODELAY, &nodelay, &len);
    return nodelay;
  }
  return -1;
}

// Reads everything until EOF (or a 5 s timeout / error): the bytes, and
// whether it ended in EOF rather than an error (a reset).
std::pair<std::string, bool> ReadToEof(int fd) {
  std::string all;
  char buf[16384];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0) return {all, true};
    if (n < 0) return {all, false};
    all.append(buf, n);
  }
}

TEST(WorkerNetnsTest, NewConnectionPathOnEveryListenerVariant) {
  PF_ENTER_NETNS_OR_SKIP();
  for (ListenOptions options :
       {ListenOptions{}, ListenOptions{.nodelay = true},
        ListenOptions{.defer_accept = 1},
        ListenOptions{.nodelay = true, .defer_accept = 1}}) {
    SCOPED_TRACE(options.name());
    Listener l = ListenLoopback(options);
    WorkerProcess w;
    w.Start({.env = {"PORTFLEET_LISTENER=web"}, .fd3 = l.fd.get()});
    for (int i = 0; i < 20; ++i) {
      testing::Reply r = testing::HttpGet(l.address());
      ASSERT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
      EXPECT_EQ(r.pid, w.pid());
    }
    // A slow client: nothing for 300 ms after connect, then its request.
    {
      Fd c = Connect(l.port);
      absl::SleepFor(absl::Milliseconds(300));
      SendAll(c.get(), kGetClose);
      auto [all, eof] = ReadToEof(c.get());
      EXPECT_THAT(all, HasSubstr("HTTP/1.1 200 OK\r\n")) << w.Log();
      EXPECT_TRUE(eof);
    }
    // A request in pieces; the worker's connection has TCP_NODELAY whether
    // the listener carried it or the worker set it.
    {
      Fd c = Connect(l.port);
      SendAll(c.get(), "GET / HTTP/1.1\r\nHo");
      absl::SleepFor(absl::Milliseconds(100));
      EXPECT_EQ(WorkerSideNodelay(w.pid(), c.get()), 1) << w.Log();
      SendAll(c.get(), "st: a\r\nConnection: cl");
      absl::SleepFor(absl::Milliseconds(50));
      SendAll(c.get(), "ose\r\n\r\n");
      auto [all, eof] = ReadToEof(c.get());
      EXPECT_EQ(Count(all, "HTTP/1.1 200 OK\r\n"), 1) << all;
      EXPECT_TRUE(eof);
    }
    // A body in two pieces, then close.
    {
      Fd c = Connect(l.port);
      SendAll(c.get(),
              "POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
              "Content-Length: 10\r\n\r\n01234");
      absl::SleepFor(absl::Milliseconds(50));
      SendAll(c.get(), "56789");
      auto [all, eof] = ReadToEof(c.get());
      EXPECT_EQ(Count(all, "HTTP/1.1 200 OK\r\n"), 1) << all;
      EXPECT_TRUE(eof);
    }
    // Input after a "Connection: close" request (which the client must not
    // send, RFC 9112 9.6): the answer still arrives whole and the
    // connection ends with a FIN, not a reset that could destroy it.
    {
      Fd c = Connect(l.port);
      SendAll(c.get(), absl::StrCat(kGetClose, std::string(200 * 1024, 'x')));
      auto [all, eof] = ReadToEof(c.get());
      EXPECT_EQ(Count(all, "HTTP/1.1 200 OK\r\n"), 1) << all;
      EXPECT_TRUE(eof) << "reset instead of end-of-file";
    }
    w.Signal(SIGTERM);
    EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  }
}

// Issue 9 (Low): the shard socket's open file description is shared by the
// agent and by every worker on the socket, e.g. a blocking third-party
// worker rolled onto it. portfleet-worker must leave it blocking, and its
// epoll loop must not hang in accept() when the other process wins a
// connection.
// 1. A blocking socket; the worker serves it, and so does a blocking
//    acceptor thread here (the third-party worker), which answers with its
//    own body and counts accept() errors.
// 2. 300 connections: every one is answered by one of the two; the
//    acceptor never saw EAGAIN; the socket is still blocking.
// 3. With the acceptor blocked in accept() and no new connection coming,
//    a keep-alive connection that the worker holds is still answered at
//    once (a worker stuck in a blocking accept() would never answer).
TEST(WorkerNetnsTest, SharesABlockingSocketWithABlockingAcceptor) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback({.nodelay = true});
  ASSERT_EQ(::fcntl(l.fd.get(), F_GETFL) & O_NONBLOCK, 0);
  WorkerProcess w;
  w.Start({.env = {"PORTFLEET_LISTENER=web"}, .fd3 = l.fd.get()});
  // A keep-alive connection to the worker (the acceptor is not there yet).
  Fd keep = Connect(l.port);
  std::string keep_buffer;
  SendAll(keep.get(), kGet);
  ASSERT_THAT(ReadResponse(keep.get(), &keep_buffer),
              HasSubstr("portfleet listener=web"))
      << w.Log();

  std::atomic<int> third_party_answers{0};
  std::atomic<int> third_party_errors{0};
  std::atomic<bool> stop{false};
  std::thread acceptor([&] {
    while (!stop) {
      int fd = ::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno != EINTR) ++third_party_errors;
        if (errno == EAGAIN) absl::SleepFor(absl::Milliseconds(1));
        continue;
      }
      char buf[4096];
      (void)::recv(fd, buf, sizeof(buf), 0);
      constexpr char kAnswer[] =
          "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n"
          "Connection: close\r\n\r\nthird-party\n";
      (void)::send(fd, kAnswer, sizeof(kAnswer) - 1, MSG_NOSIGNAL);
      ::close(fd);
      ++third_party_answers;
    }
  });
  int by_worker = 0;
  int by_third_party = 0;
  for (int i = 0; i < 300; ++i) {
    Fd c = Connect(l.port);
    SendAll(c.get(), kGetClose);
    auto [all, eof] = ReadToEof(c.get());
    if (absl::StrContains(all, "portfleet listener=web")) {
      ++by_worker;
    } else if (absl::StrContains(all, "third-party")) {
      ++by_third_party;
    } else {
      ADD_FAILURE() << "connection " << i << " unanswered: '" << all << "'";
    }
  }
  EXPECT_EQ(by_worker + by_third_party, 300);
  EXPECT_GT(by_third_party, 0);
  EXPECT_EQ(third_party_errors.load(), 0)
      << "the blocking acceptor's accept() failed (EAGAIN: O_NONBLOCK set)";
  EXPECT_EQ(::fcntl(l.fd.get(), F_GETFL) & O_NONBLOCK, 0);

  // No connection arrives now; the acceptor waits in accept().
  absl::Time start = absl::Now();
  SendAll(keep.get(), kGet);
  EXPECT_THAT(ReadResponse(keep.get(), &keep_buffer),
              HasSubstr("portfleet listener=web"))
      << w.Log();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));

  stop = true;
  ::shutdown(l.fd.get(), SHUT_RD);  // wakes a blocked accept() (EINVAL)
  acceptor.join();
  // The shut-down socket makes the worker drain, as the agent's drain does.
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  EXPECT_THAT(w.Log(), HasSubstr("listening socket shut down"));
}

// ---------------------------------------------------------------------------
// Drain

// 1. A client makes a request on a keep-alive connection and leaves it idle.
// 2. Another client has a request half sent (in flight).
// 3. SIGTERM: the idle connection is closed at once, the worker waits.
// 4. The slow client finishes its request: it is answered with
//    "Connection: close" and the connection closed; the worker exits 0.
TEST(WorkerNetnsTest, SigtermFinishesTheRequestInFlightAndExitsZero) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.args = {"--mode=http", "--drain-timeout=20s"},
           .env = {"PORTFLEET_LISTENER=web"},
           .fd3 = l.fd.get()});
  Fd idle = Connect(l.port);
  std::string idle_buffer;
  SendAll(idle.get(), kGet);
  ASSERT_THAT(ReadResponse(idle.get(), &idle_buffer), HasSubstr("200 OK"))
      << w.Log();
  Fd slow = Connect(l.port);
  std::string slow_buffer;
  SendAll(slow.get(), kGet);  // proves the worker accepted this connection
  ASSERT_THAT(ReadResponse(slow.get(), &slow_buffer), HasSubstr("200 OK"));
  SendAll(slow.get(), "GET /slow HTTP/1.1\r\nHost: test\r\n");

  w.Signal(SIGTERM);
  EXPECT_TRUE(ReadsEof(idle.get(), absl::Seconds(3)))
      << "idle keep-alive connection not closed on drain\n"
      << w.Log();
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_TRUE(w.running()) << "worker exited with a request in flight\n"
                           << w.Log();

  SendAll(slow.get(), "\r\n");
  std::string response = ReadResponse(slow.get(), &slow_buffer);
  EXPECT_THAT(response, HasSubstr("HTTP/1.1 200 OK\r\n")) << w.Log();
  EXPECT_THAT(response, HasSubstr("Connection: close\r\n"));
  EXPECT_THAT(response, HasSubstr("portfleet listener=web"));
  EXPECT_TRUE(ReadsEof(slow.get(), absl::Seconds(3)));
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  EXPECT_THAT(w.Log(), HasSubstr("SIGTERM: draining"));
}

TEST(WorkerNetnsTest, SecondSigtermClosesRemainingConnections) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start({.args = {"--mode=echo"}, .fd3 = l.fd.get()});
  testing::Reply r = testing::EchoOnce(l.address(), "x");
  ASSERT_EQ(r.outcome, Outcome::kOk) << r.error;
  Fd c = Connect(l.port);
  SendAll(c.get(), "ping");
  char buf[4];
  ASSERT_EQ(::recv(c.get(), buf, 4, MSG_WAITALL), 4);
  w.Signal(SIGTERM);
  absl::SleepFor(absl::Milliseconds(200));
  ASSERT_TRUE(w.running()) << "echo connection not waited for\n" << w.Log();
  absl::Time start = absl::Now();
  w.Signal(SIGTERM);
  EXPECT_EQ(w.ExitCode(absl::Seconds(3)), 0) << w.Log();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_THAT(w.Log(), HasSubstr("second SIGTERM"));
}

TEST(WorkerNetnsTest, DrainTimeoutClosesRemainingConnections) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  WorkerProcess w;
  w.Start(
      {.args = {"--mode=http", "--drain-timeout=500ms"}, .fd3 = l.fd.get()});
  Fd c = Connect(l.port);
  std::string buffer;
  SendAll(c.get(), kGet);
  ASSERT_THAT(ReadResponse(c.get(), &buffer), HasSubstr("200 OK"));
  SendAll(c.get(), "GET / HTTP/1.1\r\n");  // never finished
  absl::Time start = absl::Now();
  w.Signal(SIGINT);
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(400));
  EXPECT_THAT(w.Log(), HasSubstr("drain deadline reached"));
}

// ---------------------------------------------------------------------------
// Control channel

// 1. Start the worker with a control channel on fd 4.
// 2. It says hello (pid, listener, shard, version, inode of its socket), then
//    ready, then reports load every second.
// 3. AgentDrain: it finishes, says drained and exits 0.
TEST(WorkerNetnsTest, ControlChannelHelloReadyLoadDrain) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok()) << pair.status();
  ControlChannel agent = std::move(pair->first);
  ControlChannel worker_end = std::move(pair->second);
  WorkerProcess w;
  w.Start({.env = {"PORTFLEET_LISTENER=web", "PORTFLEET_SHARD=1"},
           .fd3 = l.fd.get(),
           .control_fd = worker_end.fd()});
  worker_end.Close();

  std::optional<v1::WorkerMessage> m = NextMessage(agent, absl::Seconds(5));
  ASSERT_TRUE(m.has_value()) << w.Log();
  ASSERT_TRUE(m->has_hello()) << m->DebugString();
  struct stat st {};
  ASSERT_EQ(::fstat(l.fd.get(), &st), 0);
  EXPECT_EQ(m->hello().pid(), static_cast<uint32_t>(w.pid()));
  EXPECT_EQ(m->hello().listener(), "web");
  EXPECT_EQ(m->hello().shard(), 1u);
  EXPECT_EQ(m->hello().version(), "0.1.0");
  EXPECT_EQ(m->hello().socket_inode(), st.st_ino);
  m = NextMessage(agent, absl::Seconds(5));
  ASSERT_TRUE(m.has_value() && m->has_ready());

  testing::Reply r = testing::HttpGet(l.address());
  ASSERT_EQ(r.outcome, Outcome::kOk) << r.error;
  // A load report that counts the request arrives within ~1 s.
  std::optional<v1::WorkerLoad> load;
  absl::Time deadline = absl::Now() + absl::Seconds(4);
  while (absl::Now() < deadline) {
    m = NextMessage(agent, deadline - absl::Now());
    if (!m) break;
    ASSERT_TRUE(m->has_load()) << m->DebugString();
    if (m->load().accepted_total() >= 1) {
      load = m->load();
      break;
    }
  }
  ASSERT_TRUE(load.has_value()) << w.Log();
  EXPECT_GT(load->bytes_in_total(), 0u);
  EXPECT_GT(load->bytes_out_total(), 0u);

  v1::AgentMessage drain;
  drain.mutable_drain()->set_deadline_ms(3000);
  ASSERT_TRUE(agent.Send(drain).ok());
  bool drained = false;
  while ((m = NextMessage(agent, absl::Seconds(5)))) {
    if (m->has_drained()) {
      drained = true;
      break;
    }
  }
  EXPECT_TRUE(drained) << w.Log();
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
}

TEST(WorkerNetnsTest, KeepsServingWhenTheAgentGoesAway) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok()) << pair.status();
  ControlChannel agent = std::move(pair->first);
  WorkerProcess w;
  w.Start({.fd3 = l.fd.get(), .control_fd = pair->second.fd()});
  pair->second.Close();
  ASSERT_TRUE(NextMessage(agent, absl::Seconds(5)).has_value()) << w.Log();
  agent.Close();  // the agent dies
  // The worker notices (at its next load report) and says it serves on.
  ASSERT_TRUE(testing::WaitFor(
      [&] { return absl::StrContains(w.Log(), "serving on without"); },
      absl::Seconds(15)))
      << w.Log();
  ASSERT_TRUE(w.running()) << w.Log();
  testing::Reply r = testing::HttpGet(l.address());
  EXPECT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
  w.Signal(SIGTERM);
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
}

// ---------------------------------------------------------------------------
// Re-adoption: reconnecting to $PORTFLEET_AGENT_SOCKET

// The agent's control socket: a Unix SOCK_SEQPACKET listener at `path`.
Fd AgentSocketListener(const std::string& path) {
  Fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  EXPECT_LT(path.size(), sizeof(addr.sun_path));
  std::memcpy(addr.sun_path, path.data(), path.size());
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
            0)
      << path << ": " << std::strerror(errno);
  EXPECT_EQ(::listen(fd.get(), 8), 0);
  return fd;
}

// The next connection to `listener` within `timeout`, adopted as a control
// channel; nullopt if none comes.
std::optional<ControlChannel> AcceptAgentConnection(int listener,
                                                    absl::Duration timeout) {
  pollfd p{listener, POLLIN, 0};
  if (::poll(&p, 1, absl::ToInt64Milliseconds(timeout)) != 1) {
    return std::nullopt;
  }
  Fd fd(::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
  if (!fd) {
    ADD_FAILURE() << "accept: " << std::strerror(errno);
    return std::nullopt;
  }
  absl::StatusOr<ControlChannel> channel = ControlChannel::Adopt(std::move(fd));
  if (!channel.ok()) {
    ADD_FAILURE() << channel.status();
    return std::nullopt;
  }
  return std::move(*channel);
}

// NextMessage() with the descriptor attached to the packet.
std::optional<std::pair<v1::WorkerMessage, Fd>> NextMessageWithFd(
    ControlChannel& agent, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    auto got = agent.ReceiveWithFd();
    if (!got.ok()) {
      ADD_FAILURE() << got.status();
      return std::nullopt;
    }
    if (got->has_value()) return std::move(**got);
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return std::nullopt;
    pollfd p{agent.fd(), POLLIN, 0};
    ::poll(&p, 1, absl::ToInt64Milliseconds(left) + 1);
  }
}

ino_t Inode(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return st.st_ino;
}

// Expects the hello of a reconnect on `channel` (listening socket attached)
// and then ready.
void ExpectReconnectHello(ControlChannel& channel, const WorkerProcess& w,
                          ino_t socket_inode) {
  auto hello = NextMessageWithFd(channel, absl::Seconds(2));
  ASSERT_TRUE(hello.has_value()) << w.Log();
  auto& [message, fd] = *hello;
  ASSERT_TRUE(message.has_hello()) << message.DebugString();
  EXPECT_TRUE(message.hello().reconnect());
  EXPECT_EQ(message.hello().pid(), static_cast<uint32_t>(w.pid()));
  EXPECT_EQ(message.hello().listener(), "web");
  EXPECT_EQ(message.hello().shard(), 1u);
  EXPECT_EQ(message.hello().version(), "0.1.0");
  EXPECT_EQ(message.hello().socket_inode(), socket_inode);
  ASSERT_TRUE(fd.valid()) << "no socket attached to the hello";
  EXPECT_EQ(Inode(fd.get()), socket_inode);
  int listening = 0;
  socklen_t len = sizeof(listening);
  ASSERT_EQ(::getsockopt(fd.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len),
            0);
  EXPECT_EQ(listening, 1);
  std::optional<v1::WorkerMessage> ready =
      NextMessage(channel, absl::Seconds(2));
  ASSERT_TRUE(ready.has_value()) << w.Log();
  EXPECT_TRUE(ready->has_ready()) << ready->DebugString();
}

// Starts `w` on `l` with a control channel (the agent's end is returned) and
// PORTFLEET_AGENT_SOCKET=`agent_socket` to reconnect to; `options` gives the
// arguments and any more environment.
std::optional<ControlChannel> StartWithAgentSocket(
    WorkerProcess& w, const Listener& l, const std::string& agent_socket,
    StartOptions options = {
        .env = {"PORTFLEET_LISTENER=web", "PORTFLEET_SHARD=1"}}) {
  auto pair = ControlChannel::Pair();
  if (!pair.ok()) {
    ADD_FAILURE() << pair.status();
    return std::nullopt;
  }
  options.env.push_back(absl::StrCat("PORTFLEET_AGENT_SOCKET=", agent_socket));
  options.fd3 = l.fd.get();
  options.control_fd = pair->second.fd();
  w.Start(options);
  pair->second.Close();
  return std::move(pair->first);
}

// 1. The worker runs with a control channel and PORTFLEET_AGENT_SOCKET.
// 2. The agent dies (its end of the channel closes): within 2 s the worker
//    connects to the agent socket and sends hello{reconnect} with its
//    listening socket attached, then ready; it serves throughout.
// 3. The new agent dies too: the cycle repeats.
// 4. Load reports flow on the new channel; AgentDrain there makes it exit 0.
TEST(WorkerNetnsTest, ReconnectsToTheAgentSocketWithItsListeningSocket) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  const ino_t inode = Inode(l.fd.get());
  TempDir dir;
  std::string path = absl::StrCat(dir.path(), "/control.sock");
  Fd agent_socket = AgentSocketListener(path);
  WorkerProcess w;
  std::optional<ControlChannel> linked = StartWithAgentSocket(w, l, path);
  ASSERT_TRUE(linked.has_value());
  ControlChannel agent = std::move(*linked);
  std::optional<v1::WorkerMessage> m = NextMessage(agent, absl::Seconds(5));
  ASSERT_TRUE(m.has_value() && m->has_hello()) << w.Log();
  EXPECT_FALSE(m->hello().reconnect());
  m = NextMessage(agent, absl::Seconds(5));
  ASSERT_TRUE(m.has_value() && m->has_ready()) << w.Log();

  for (int cycle = 1; cycle <= 2; ++cycle) {
    SCOPED_TRACE(absl::StrCat("cycle ", cycle));
    agent.Close();  // the agent dies
    absl::Time lost = absl::Now();
    std::optional<ControlChannel> adopted =
        AcceptAgentConnection(agent_socket.get(), absl::Seconds(2));
    ASSERT_TRUE(adopted.has_value()) << "no reconnect within 2s\n" << w.Log();
    EXPECT_LT(absl::Now() - lost, absl::Seconds(2));
    ExpectReconnectHello(*adopted, w, inode);
    agent = std::move(*adopted);
    testing::Reply r = testing::HttpGet(l.address());
    ASSERT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
    EXPECT_EQ(r.pid, w.pid());
  }

  // Load reports on the new channel count the requests served.
  std::optional<v1::WorkerLoad> load;
  absl::Time deadline = absl::Now() + absl::Seconds(4);
  while (absl::Now() < deadline && !load) {
    m = NextMessage(agent, deadline - absl::Now());
    if (!m) break;
    ASSERT_TRUE(m->has_load()) << m->DebugString();
    if (m->load().accepted_total() >= 2) load = m->load();
  }
  ASSERT_TRUE(load.has_value()) << w.Log();

  v1::AgentMessage drain;
  drain.mutable_drain()->set_deadline_ms(3000);
  ASSERT_TRUE(agent.Send(drain).ok());
  bool drained = false;
  while ((m = NextMessage(agent, absl::Seconds(5)))) {
    if (m->has_drained()) {
      drained = true;
      break;
    }
  }
  EXPECT_TRUE(drained) << w.Log();
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  EXPECT_EQ(Count(w.Log(), "reconnected to the agent at"), 2) << w.Log();
  // Draining closed the channel's listener copy: no third reconnect.
  pollfd p{agent_socket.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0);
}

// The agent socket does not exist for 1 s after the agent dies: the worker
// keeps serving, retries every 250 ms (logging the first failure only), and
// reconnects once the socket appears.
TEST(WorkerNetnsTest, RetriesUntilTheAgentSocketAppears) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  const ino_t inode = Inode(l.fd.get());
  TempDir dir;
  std::string path = absl::StrCat(dir.path(), "/control.sock");
  WorkerProcess w;
  std::optional<ControlChannel> linked = StartWithAgentSocket(w, l, path);
  ASSERT_TRUE(linked.has_value());
  ControlChannel agent = std::move(*linked);
  ASSERT_TRUE(NextMessage(agent, absl::Seconds(5)).has_value()) << w.Log();
  agent.Close();  // the agent dies; its successor is not up yet

  absl::Time until = absl::Now() + absl::Seconds(1);
  int served = 0;
  while (absl::Now() < until) {
    testing::Reply r = testing::HttpGet(l.address());
    ASSERT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
    ++served;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_GE(served, 5);
  ASSERT_TRUE(w.running()) << w.Log();

  Fd agent_socket = AgentSocketListener(path);
  std::optional<ControlChannel> adopted =
      AcceptAgentConnection(agent_socket.get(), absl::Seconds(2));
  ASSERT_TRUE(adopted.has_value()) << "no reconnect within 2s\n" << w.Log();
  ExpectReconnectHello(*adopted, w, inode);
  testing::Reply r = testing::HttpGet(l.address());
  EXPECT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();

  std::string log = w.Log();
  EXPECT_EQ(Count(log, "cannot reconnect to the agent"), 1) << log;
  EXPECT_EQ(Count(log, "reconnected to the agent at"), 1) << log;
  w.Signal(SIGTERM);
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
}

// An agent that accepts each reconnect and drops it at once (as one that
// does not want this worker may): the worker keeps serving and retries at
// its reconnect interval (250 ms), not in a tight loop. Over 2 s that is
// about 8 connections (at most 12 allowed); the old behaviour made ~450.
TEST(WorkerNetnsTest, ReconnectsDroppedAtOnceAreRetriedAtTheInterval) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  TempDir dir;
  std::string path = absl::StrCat(dir.path(), "/control.sock");
  WorkerProcess w;
  std::optional<ControlChannel> linked = StartWithAgentSocket(w, l, path);
  ASSERT_TRUE(linked.has_value());
  ControlChannel agent = std::move(*linked);
  ASSERT_TRUE(NextMessage(agent, absl::Seconds(5)).has_value()) << w.Log();
  Fd agent_socket = AgentSocketListener(path);
  agent.Close();

  int connections = 0;
  absl::Time until = absl::Now() + absl::Seconds(2);
  while (absl::Now() < until) {
    std::optional<ControlChannel> c =
        AcceptAgentConnection(agent_socket.get(), until - absl::Now());
    if (!c.has_value()) break;
    ++connections;
    c->Close();  // dropped at once
  }
  EXPECT_GE(connections, 2) << w.Log();
  EXPECT_LE(connections, 12) << w.Log();
  testing::Reply r = testing::HttpGet(l.address());
  EXPECT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
  ASSERT_TRUE(w.running()) << w.Log();
  w.Signal(SIGTERM);
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
}

// A draining worker has given up its listening socket: when the agent goes
// away then, it finishes the drain without reconnecting.
TEST(WorkerNetnsTest, DoesNotReconnectWhileDraining) {
  PF_ENTER_NETNS_OR_SKIP();
  Listener l = ListenLoopback();
  TempDir dir;
  std::string path = absl::StrCat(dir.path(), "/control.sock");
  Fd agent_socket = AgentSocketListener(path);
  WorkerProcess w;
  std::optional<ControlChannel> linked = StartWithAgentSocket(
      w, l, path, {.args = {"--mode=http", "--drain-timeout=20s"}});
  ASSERT_TRUE(linked.has_value());
  ControlChannel agent = std::move(*linked);
  ASSERT_TRUE(NextMessage(agent, absl::Seconds(5)).has_value()) << w.Log();
  // A request in flight keeps the drain going.
  Fd slow = Connect(l.port);
  std::string buffer;
  SendAll(slow.get(), kGet);
  ASSERT_THAT(ReadResponse(slow.get(), &buffer), HasSubstr("200 OK"));
  SendAll(slow.get(), "GET /slow HTTP/1.1\r\nHost: test\r\n");

  w.Signal(SIGTERM);
  absl::SleepFor(absl::Milliseconds(200));
  agent.Close();
  EXPECT_FALSE(AcceptAgentConnection(agent_socket.get(), absl::Seconds(1)))
      << w.Log();
  ASSERT_TRUE(w.running()) << w.Log();
  SendAll(slow.get(), "\r\n");
  EXPECT_THAT(ReadResponse(slow.get(), &buffer),
              HasSubstr("Connection: close\r\n"))
      << w.Log();
  slow.Reset();  // rather than wait out the worker's linger
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
  EXPECT_THAT(w.Log(), Not(HasSubstr("reconnect")));
}

// A seqpacket listener at `address` whose SO_PEERCRED says `uid`: a child
// that runs as `uid` listens on it and hands it back over a socketpair (the
// kernel records the credentials of the process that called listen()).
Fd AgentSocketListenerAsUid(const std::string& address, uid_t uid) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    ADD_FAILURE() << "socketpair: " << std::strerror(errno);
    return Fd();
  }
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0) {
      ::_exit(1);
    }
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    // "@name": an abstract address, which any uid may bind.
    std::memcpy(addr.sun_path + 1, address.data() + 1, address.size() - 1);
    socklen_t len = offsetof(sockaddr_un, sun_path) + address.size();
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        ::listen(fd, 8) != 0) {
      ::_exit(2);
    }
    ControlChannel back{Fd(sv[1])};
    v1::WorkerMessage note;
    note.mutable_ready();
    ::_exit(back.SendWithFd(note, fd).ok() ? 0 : 3);
  }
  ::close(sv[1]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "listener child failed: " << status;
  ControlChannel from_child{Fd(sv[0])};
  auto got = from_child.ReceiveWithFd();
  if (!got.ok() || !got->has_value()) {
    ADD_FAILURE() << "no listener from the child: " << got.status();
    return Fd();
  }
  return std::move((*got)->second);
}

// Issue 9 (item 2), the worker's half: a process of another uid that
// listens at $PORTFLEET_AGENT_SOCKET never gets the listening socket.
// 1. A listener at the agent socket address, listened as uid 65534.
// 2. The worker (root, no PORTFLEET_AGENT_UID: trusts uid 0 or its own)
//    loses its agent: it connects to that listener every 250 ms, refuses
//    the peer and keeps serving; it logs the refusal once.
// 3. Counted from the squatter's side: connections, no packet, no fd.
// 4. Control case: a worker told PORTFLEET_AGENT_UID=65534 hands it over.
TEST(WorkerNetnsTest, HandsItsSocketOnlyToThePeerOfTheAgentUid) {
  PF_ENTER_NETNS_OR_SKIP();
  constexpr uid_t kNobody = 65534;
  Listener l = ListenLoopback();
  const std::string address = absl::StrCat("@portfleet-test-", ::getpid());
  Fd squatter = AgentSocketListenerAsUid(address, kNobody);
  ASSERT_TRUE(squatter.valid());
  for (bool trusted : {false, true}) {
    SCOPED_TRACE(trusted ? "PORTFLEET_AGENT_UID=65534" : "default uids");
    auto pair = ControlChannel::Pair();
    ASSERT_TRUE(pair.ok()) << pair.status();
    ControlChannel agent = std::move(pair->first);
    StartOptions options{
        .env = {"PORTFLEET_LISTENER=web", "PORTFLEET_SHARD=1",
                absl::StrCat("PORTFLEET_AGENT_SOCKET=", address)},
        .fd3 = l.fd.get(),
        .control_fd = pair->second.fd()};
    if (trusted) options.env.push_back("PORTFLEET_AGENT_UID=65534");
    WorkerProcess w;
    w.Start(options);
    pair->second.Close();
    ASSERT_TRUE(NextMessage(agent, absl::Seconds(5)).has_value()) << w.Log();
    agent.Close();  // the agent dies

    if (trusted) {
      std::optional<ControlChannel> adopted =
          AcceptAgentConnection(squatter.get(), absl::Seconds(2));
      ASSERT_TRUE(adopted.has_value()) << w.Log();
      ExpectReconnectHello(*adopted, w, Inode(l.fd.get()));
    } else {
      int connections = 0;
      absl::Time until = absl::Now() + absl::Seconds(1);
      while (absl::Now() < until) {
        testing::Reply r = testing::HttpGet(l.address());
        ASSERT_EQ(r.outcome, Outcome::kOk) << r.error << "\n" << w.Log();
        std::optional<ControlChannel> c =
            AcceptAgentConnection(squatter.get(), absl::Milliseconds(100));
        if (!c) continue;
        ++connections;
        // The worker closed it without a word: end-of-file, no descriptor.
        pollfd p{c->fd(), POLLIN, 0};
        ASSERT_EQ(::poll(&p, 1, 2000), 1);
        auto got = c->ReceiveWithFd();
        EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable)
            << "the squatter received a packet";
      }
      EXPECT_GE(connections, 2) << w.Log();
      ASSERT_TRUE(w.running()) << w.Log();
      std::string log = w.Log();
      EXPECT_EQ(Count(log, "refusing to hand the listening socket"), 1) << log;
      EXPECT_THAT(log, HasSubstr("it runs as uid 65534"));
      EXPECT_THAT(log, Not(HasSubstr("reconnected to the agent")));
    }
    w.Signal(SIGTERM);
    EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 0) << w.Log();
    // Connections the worker made after the last accept above.
    while (AcceptAgentConnection(squatter.get(), absl::ZeroDuration())) {
    }
  }
}

// ---------------------------------------------------------------------------
// Start-up errors

TEST(WorkerNetnsTest, RefusesToStartWithoutListenFds) {
  PF_ENTER_NETNS_OR_SKIP();
  WorkerProcess w;
  w.Start({.activation_env = false});
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 2);
  EXPECT_THAT(w.Log(), HasSubstr("LISTEN_FDS is not set: portfleet-worker "
                                 "must be started by portfleet-agent"));
}

TEST(WorkerNetnsTest, RefusesAUdpSocket) {
  PF_ENTER_NETNS_OR_SKIP();
  Fd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  WorkerProcess w;
  w.Start({.fd3 = udp.get()});
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 2);
  EXPECT_THAT(w.Log(), HasSubstr("fd 3 is a UDP socket; want TCP"));
}

TEST(WorkerNetnsTest, RefusesANonListeningTcpSocket) {
  PF_ENTER_NETNS_OR_SKIP();
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  WorkerProcess w;
  w.Start({.fd3 = tcp.get()});
  EXPECT_EQ(w.ExitCode(absl::Seconds(5)), 2);
  EXPECT_THAT(w.Log(), HasSubstr("fd 3 is not a listening socket"));
}

TEST(WorkerNetnsTest, HelpAndUsageErrors) {
  PF_ENTER_NETNS_OR_SKIP();
  WorkerProcess help;
  help.Start({.args = {"--help"}, .activation_env = false});
  EXPECT_EQ(help.ExitCode(absl::Seconds(5)), 0);
  EXPECT_THAT(help.Log(), HasSubstr("LISTEN_FDS"));
  EXPECT_THAT(help.Log(), HasSubstr("PORTFLEET_CONTROL_FD"));
  WorkerProcess bad;
  bad.Start({.args = {"--mode=http", "--frobnicate"}});
  EXPECT_EQ(bad.ExitCode(absl::Seconds(5)), 2);
  EXPECT_THAT(bad.Log(), HasSubstr("unknown flag '--frobnicate'"));
}

}  // namespace
}  // namespace portfleet
