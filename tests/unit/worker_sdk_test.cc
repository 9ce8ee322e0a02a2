// Worker SDK: TakeListenFd (socket activation) and ControlChannel.
//
// TakeListenFd reads the environment and fd 3 of the calling process, so each
// of its cases runs in a forked child that arranges fd 3 and the environment
// first and reports back over a pipe.
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/control_channel.h"
#include "worker/sdk/listen_fds.h"

namespace portfleet {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

// Runs `fn` in a forked child; returns what it returned (or a description of
// how the child died).
std::string InChild(const std::function<std::string()>& fn) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return "pipe failed";
  pid_t pid = ::fork();
  if (pid == 0) {
    // Keep the pipe out of the way of fd 3.
    int w = ::fcntl(p[1], F_DUPFD_CLOEXEC, 100);
    ::close(p[0]);
    ::close(p[1]);
    std::string out = fn();
    for (size_t off = 0; off < out.size();) {
      ssize_t n = ::write(w, out.data() + off, out.size() - off);
      if (n <= 0) break;
      off += n;
    }
    ::_exit(0);
  }
  ::close(p[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(p[0], buf, sizeof(buf))) > 0;) out.append(buf, n);
  ::close(p[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::StrCat("child died with wait status ", status, ": ", out);
  }
  return out;
}

// Moves `fd` to fd 3 (in the child).
void PlaceAt3(int fd) {
  if (fd == 3) return;
  ::dup2(fd, 3);
  ::close(fd);
}

// Sets the activation environment for this process (in the child).
void SetActivationEnv(const char* fds = "1", bool with_pid = true) {
  ::setenv("LISTEN_FDS", fds, 1);
  if (with_pid) {
    ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
  } else {
    ::unsetenv("LISTEN_PID");
  }
  ::setenv("LISTEN_FDNAMES", "web", 1);
}

// Calls TakeListenFd and renders the outcome: "OK ..." or the status.
std::string Take() {
  absl::StatusOr<Fd> fd = TakeListenFd();
  if (!fd.ok()) return fd.status().ToString();
  int fl = ::fcntl(fd->get(), F_GETFL);
  int fdfl = ::fcntl(fd->get(), F_GETFD);
  return absl::StrCat(
      "OK fd=", fd->get(), " nonblock=", (fl & O_NONBLOCK) ? 1 : 0,
      " cloexec=", (fdfl & FD_CLOEXEC) ? 1 : 0,
      " env_left=", std::getenv("LISTEN_FDS") ? 1 : 0,
      std::getenv("LISTEN_PID") ? 1 : 0, std::getenv("LISTEN_FDNAMES") ? 1 : 0,
      " name=", ListenFdName());
}

int TcpSocket(int family, bool listening) {
  int fd = ::socket(family, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_storage ss{};
  socklen_t len;
  if (family == AF_INET) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&ss);
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof(*sin);
  } else {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&ss);
    sin6->sin6_family = AF_INET6;
    sin6->sin6_addr = in6addr_loopback;
    len = sizeof(*sin6);
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    ::close(fd);
    return -1;
  }
  if (listening && ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

TEST(WorkerSdkTakeListenFdTest, ListeningTcpV4IsTaken) {
  std::string out = InChild([] {
    int fd = TcpSocket(AF_INET, true);
    if (fd < 0) return std::string("socket setup failed");
    PlaceAt3(fd);
    SetActivationEnv();
    return Take();
  });
  EXPECT_EQ(out, "OK fd=3 nonblock=1 cloexec=1 env_left=000 name=web");
}

TEST(WorkerSdkTakeListenFdTest, ListeningTcpV6WithoutListenPidIsTaken) {
  std::string out = InChild([] {
    int fd = TcpSocket(AF_INET6, true);
    if (fd < 0) return std::string("no IPv6 loopback");
    PlaceAt3(fd);
    SetActivationEnv("1", /*with_pid=*/false);
    return Take();
  });
  if (out == "no IPv6 loopback") GTEST_SKIP() << out;
  EXPECT_EQ(out, "OK fd=3 nonblock=1 cloexec=1 env_left=000 name=web");
}

TEST(WorkerSdkTakeListenFdTest, MissingListenFds) {
  std::string out = InChild([] {
    ::unsetenv("LISTEN_FDS");
    return Take();
  });
  EXPECT_THAT(out, StartsWith("FAILED_PRECONDITION: LISTEN_FDS is not set: "
                              "portfleet-worker must be started by "
                              "portfleet-agent or another socket-activation "
                              "manager (systemd)"));
}

TEST(WorkerSdkTakeListenFdTest, ListenPidOfAnotherProcess) {
  std::string out = InChild([] {
    PlaceAt3(TcpSocket(AF_INET, true));
    SetActivationEnv();
    ::setenv("LISTEN_PID", "1", 1);
    std::string result = Take();
    // Nothing was consumed.
    if (std::getenv("LISTEN_FDS") == nullptr) result += " (env removed!)";
    return result;
  });
  EXPECT_THAT(out, StartsWith("FAILED_PRECONDITION: LISTEN_PID=1 is not this "
                              "process"));
  EXPECT_THAT(out, Not(HasSubstr("env removed")));
}

TEST(WorkerSdkTakeListenFdTest, MalformedListenVariables) {
  EXPECT_THAT(InChild([] {
                SetActivationEnv("two");
                return Take();
              }),
              StartsWith("INVALID_ARGUMENT: LISTEN_FDS='two'"));
  EXPECT_THAT(InChild([] {
                SetActivationEnv("2");
                return Take();
              }),
              StartsWith("INVALID_ARGUMENT: LISTEN_FDS=2: want exactly one"));
  EXPECT_THAT(InChild([] {
                SetActivationEnv("0");
                return Take();
              }),
              StartsWith("INVALID_ARGUMENT: LISTEN_FDS=0"));
  EXPECT_THAT(InChild([] {
                SetActivationEnv();
                ::setenv("LISTEN_PID", "self", 1);
                return Take();
              }),
              StartsWith("INVALID_ARGUMENT: LISTEN_PID='self'"));
}

TEST(WorkerSdkTakeListenFdTest, Fd3NotOpen) {
  std::string out = InChild([] {
    ::close(3);
    SetActivationEnv();
    return Take();
  });
  EXPECT_THAT(out, StartsWith("FAILED_PRECONDITION: fd 3 is not open"));
}

TEST(WorkerSdkTakeListenFdTest, Fd3NotASocket) {
  std::string out = InChild([] {
    PlaceAt3(::open("/dev/null", O_RDONLY));
    SetActivationEnv();
    return Take();
  });
  EXPECT_THAT(out, StartsWith("FAILED_PRECONDITION: fd 3 is not a socket"));
}

TEST(WorkerSdkTakeListenFdTest, Fd3IsUdp) {
  std::string out = InChild([] {
    PlaceAt3(::socket(AF_INET, SOCK_DGRAM, 0));
    SetActivationEnv();
    return Take();
  });
  EXPECT_EQ(out, "FAILED_PRECONDITION: fd 3 is a UDP socket; want TCP");
}

TEST(WorkerSdkTakeListenFdTest, Fd3IsUnixStream) {
  std::string out = InChild([] {
    int sv[2];
    ::socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    PlaceAt3(sv[0]);
    SetActivationEnv();
    return Take();
  });
  EXPECT_THAT(out,
              StartsWith("FAILED_PRECONDITION: fd 3 is a Unix-domain socket"));
}

TEST(WorkerSdkTakeListenFdTest, Fd3IsTcpButNotListening) {
  std::string out = InChild([] {
    PlaceAt3(TcpSocket(AF_INET, false));
    SetActivationEnv();
    return Take();
  });
  EXPECT_THAT(
      out, StartsWith("FAILED_PRECONDITION: fd 3 is not a listening socket"));
}

// ---------------------------------------------------------------------------
// ControlChannel

struct Pair {
  ControlChannel agent;
  ControlChannel worker;
};

Pair MakePair() {
  absl::StatusOr<std::pair<ControlChannel, ControlChannel>> p =
      ControlChannel::Pair();
  EXPECT_TRUE(p.ok()) << p.status();
  return Pair{std::move(p->first), std::move(p->second)};
}

v1::WorkerMessage Hello() {
  v1::WorkerMessage m;
  v1::WorkerHello* h = m.mutable_hello();
  h->set_pid(1234);
  h->set_listener("web");
  h->set_shard(3);
  h->set_version("0.1.0");
  h->set_socket_inode(987654321);
  return m;
}

TEST(WorkerSdkControlChannelTest, RoundTripBothDirections) {
  Pair p = MakePair();
  ASSERT_TRUE(p.worker.Send(Hello()).ok());
  v1::WorkerMessage ready;
  ready.mutable_ready();
  ASSERT_TRUE(p.worker.Send(ready).ok());

  auto got = p.agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->SerializeAsString(), Hello().SerializeAsString());
  got = p.agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_TRUE((*got)->has_ready());
  got = p.agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->has_value());  // nothing pending

  v1::AgentMessage drain;
  drain.mutable_drain()->set_deadline_ms(1500);
  ASSERT_TRUE(p.agent.Send(drain).ok());
  absl::StatusOr<std::optional<v1::AgentMessage>> cmd = p.worker.Receive();
  ASSERT_TRUE(cmd.ok()) << cmd.status();
  ASSERT_TRUE(cmd->has_value());
  EXPECT_EQ((*cmd)->drain().deadline_ms(), 1500u);
}

TEST(WorkerSdkControlChannelTest, MalformedPacketIsInvalidArgumentAndSkipped) {
  Pair p = MakePair();
  const char junk[] = "\xff\xff\xff\xff\xff";
  ASSERT_EQ(::send(p.agent.fd(), junk, 5, 0), 5);
  v1::AgentMessage drain;
  drain.mutable_drain()->set_deadline_ms(7);
  ASSERT_TRUE(p.agent.Send(drain).ok());

  auto bad = p.worker.Receive();
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("malformed control packet"));
  auto good = p.worker.Receive();
  ASSERT_TRUE(good.ok()) << good.status();
  ASSERT_TRUE(good->has_value());
  EXPECT_EQ((*good)->drain().deadline_ms(), 7u);
}

TEST(WorkerSdkControlChannelTest, OversizedPacketIsInvalidArgument) {
  Pair p = MakePair();
  int size = 1 << 20;
  ::setsockopt(p.agent.fd(), SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
  std::string big(ControlChannel::kMaxMessageSize + 100, 'x');
  ASSERT_EQ(::send(p.agent.fd(), big.data(), big.size(), 0),
            static_cast<ssize_t>(big.size()));
  auto got = p.worker.Receive();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(got.status().message(), HasSubstr("exceeds"));
  got = p.worker.Receive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->has_value());
}

TEST(WorkerSdkControlChannelTest, SendRefusesEmptyAndOversizedMessages) {
  Pair p = MakePair();
  EXPECT_EQ(p.agent.Send(v1::AgentMessage()).code(),
            absl::StatusCode::kInvalidArgument);
  v1::WorkerMessage big = Hello();
  big.mutable_hello()->set_listener(
      std::string(ControlChannel::kMaxMessageSize, 'a'));
  absl::Status s = p.worker.Send(big);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("limit"));
}

TEST(WorkerSdkControlChannelTest, PeerGoneIsUnavailable) {
  Pair p = MakePair();
  v1::AgentMessage drain;
  drain.mutable_drain();
  drain.mutable_drain()->set_deadline_ms(1);
  ASSERT_TRUE(p.agent.Send(drain).ok());
  p.agent.Close();
  // Pending messages are still delivered, then end-of-file.
  auto got = p.worker.Receive();
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
  got = p.worker.Receive();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(p.worker.Send(Hello()).code(), absl::StatusCode::kUnavailable);
}

TEST(WorkerSdkControlChannelTest, FullBufferIsResourceExhausted) {
  Pair p = MakePair();
  absl::Status s;
  for (int i = 0; i < 100000 && s.ok(); ++i) s = p.worker.Send(Hello());
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
}

TEST(WorkerSdkControlChannelTest, FromEnv) {
  ::unsetenv(ControlChannel::kEnvVar);
  auto none = ControlChannel::FromEnv();
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());

  ::setenv(ControlChannel::kEnvVar, "four", 1);
  EXPECT_EQ(ControlChannel::FromEnv().status().code(),
            absl::StatusCode::kInvalidArgument);

  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  Fd a(sv[0]), b(sv[1]);
  ::setenv(ControlChannel::kEnvVar, std::to_string(a.get()).c_str(), 1);
  auto wrong = ControlChannel::FromEnv();
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(wrong.status().message(), HasSubstr("SOCK_SEQPACKET"));

  Pair p = MakePair();
  Fd worker_end = p.worker.Release();
  ::setenv(ControlChannel::kEnvVar, std::to_string(worker_end.get()).c_str(),
           1);
  auto ok = ControlChannel::FromEnv();
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_TRUE(ok->has_value());
  worker_end.Release();  // now owned by the channel
  EXPECT_EQ(std::getenv(ControlChannel::kEnvVar), nullptr);
  ASSERT_TRUE((*ok)->Send(Hello()).ok());
  auto got = p.agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got.ok() && got->has_value());
}

TEST(WorkerSdkControlChannelTest, AdoptRejectsTcp) {
  Fd tcp(::socket(AF_INET, SOCK_STREAM, 0));
  auto c = ControlChannel::Adopt(std::move(tcp));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace portfleet
