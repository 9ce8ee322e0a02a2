// Worker SDK: TakeListenFd (socket activation), ControlChannel, including
// descriptor passing (SendWithFd / ReceiveWithFd) and Connect() for the
// re-adoption handshake, and AgentLink (hello/ready, drain, re-adoption with
// the peer uid check).
//
// TakeListenFd reads the environment and fd 3 of the calling process, so each
// of its cases runs in a forked child that arranges fd 3 and the environment
// first and reports back over a pipe.
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "portfleet/v1/control.pb.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/agent_link.h"
#include "worker/sdk/base/duration_histogram.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/control_channel.h"
#include "worker/sdk/handoff_pauses.h"
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
  // O_NONBLOCK stays as the manager made it (shared open file description).
  EXPECT_EQ(out, "OK fd=3 nonblock=0 cloexec=1 env_left=000 name=web");
}

TEST(WorkerSdkTakeListenFdTest, ANonBlockingListenerStaysNonBlocking) {
  std::string out = InChild([] {
    int fd = TcpSocket(AF_INET, true);
    if (fd < 0) return std::string("socket setup failed");
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
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
  if (out == "no IPv6 loopback") PF_SKIP_OR_FAIL(out);
  EXPECT_EQ(out, "OK fd=3 nonblock=0 cloexec=1 env_left=000 name=web");
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

// ---------------------------------------------------------------------------
// Descriptor passing

// Open descriptors of this process (the directory's own fd included, the
// same in every call).
int OpenFdCount() {
  int n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (::readdir(dir) != nullptr) ++n;
  ::closedir(dir);
  return n;
}

ino_t Inode(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return 0;
  return st.st_ino;
}

// Sends `bytes` with `fds` attached as SCM_RIGHTS, bypassing ControlChannel.
ssize_t SendRaw(int socket, const std::string& bytes,
                const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  return ::sendmsg(socket, &msg, MSG_NOSIGNAL);
}

TEST(WorkerSdkFdPassingTest, SendWithFdRoundTrip) {
  Pair p = MakePair();
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(tcp.valid());
  v1::WorkerMessage hello = Hello();
  hello.mutable_hello()->set_reconnect(true);
  ASSERT_TRUE(p.worker.SendWithFd(hello, tcp.get()).ok());
  v1::WorkerMessage ready;
  ready.mutable_ready();
  ASSERT_TRUE(p.worker.Send(ready).ok());

  auto got = p.agent.ReceiveWithFd();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  auto& [message, fd] = **got;
  EXPECT_EQ(message.SerializeAsString(), hello.SerializeAsString());
  EXPECT_TRUE(message.hello().reconnect());
  ASSERT_TRUE(fd.valid());
  EXPECT_NE(fd.get(), tcp.get());
  EXPECT_EQ(Inode(fd.get()), Inode(tcp.get()));  // the same socket
  EXPECT_TRUE(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC);

  // The next packet carries no descriptor.
  auto next = p.agent.ReceiveWithFd();
  ASSERT_TRUE(next.ok() && next->has_value()) << next.status();
  EXPECT_TRUE((*next)->first.has_ready());
  EXPECT_FALSE((*next)->second.valid());
  next = p.agent.ReceiveWithFd();
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_FALSE(next->has_value());  // nothing pending
}

TEST(WorkerSdkFdPassingTest, ReceiveWithFdWithoutFd) {
  Pair p = MakePair();
  ASSERT_TRUE(p.worker.Send(Hello()).ok());
  auto got = p.agent.ReceiveWithFd();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->first.hello().socket_inode(), 987654321u);
  EXPECT_FALSE((*got)->second.valid());
}

TEST(WorkerSdkFdPassingTest, ExtraFdsAreClosed) {
  Pair p = MakePair();
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  Fd r(pipe_fds[0]), w(pipe_fds[1]);
  ASSERT_GT(SendRaw(p.worker.fd(), Hello().SerializeAsString(),
                    {tcp.get(), r.get(), w.get()}),
            0);
  int before = OpenFdCount();
  {
    auto got = p.agent.ReceiveWithFd();
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got->has_value());
    EXPECT_EQ(Inode((*got)->second.get()), Inode(tcp.get()));
    EXPECT_EQ(OpenFdCount(), before + 1);  // only the first is kept
  }
  EXPECT_EQ(OpenFdCount(), before);
  // The pipe's write end received with the packet is closed: once ours is
  // closed too, the read end sees end-of-file.
  w.Reset();
  char c;
  EXPECT_EQ(::read(r.get(), &c, 1), 0);
}

TEST(WorkerSdkFdPassingTest, TooManyFdsIsInvalidArgumentAndLeaksNothing) {
  Pair p = MakePair();
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  // Just over the limit (fits the ancillary buffer), and far over it (the
  // kernel truncates the ancillary data: MSG_CTRUNC).
  for (int count : {ControlChannel::kMaxFdsPerPacket + 1,
                    ControlChannel::kMaxFdsPerPacket * 4}) {
    SCOPED_TRACE(count);
    std::vector<int> fds(count, tcp.get());
    ASSERT_GT(SendRaw(p.worker.fd(), Hello().SerializeAsString(), fds), 0);
    ASSERT_TRUE(p.worker.Send(Hello()).ok());
    int before = OpenFdCount();
    auto bad = p.agent.ReceiveWithFd();
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(bad.status().message(), HasSubstr("descriptors"));
    if (count > ControlChannel::kMaxFdsPerPacket + 1) {
      EXPECT_THAT(bad.status().message(), HasSubstr("truncated"));
    }
    EXPECT_EQ(OpenFdCount(), before);
    // The packet was consumed; the next one reads normally.
    auto good = p.agent.ReceiveWithFd();
    ASSERT_TRUE(good.ok()) << good.status();
    ASSERT_TRUE(good->has_value());
    EXPECT_FALSE((*good)->second.valid());
  }
}

TEST(WorkerSdkFdPassingTest, ErrorPathsAndPlainReceiveCloseFds) {
  Pair p = MakePair();
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  // A malformed packet with a descriptor, then a good one with a
  // descriptor read by the plain Receive().
  ASSERT_GT(SendRaw(p.worker.fd(), "\xff\xff\xff\xff\xff", {tcp.get()}), 0);
  ASSERT_TRUE(p.worker.SendWithFd(Hello(), tcp.get()).ok());
  ASSERT_TRUE(p.worker.SendWithFd(Hello(), tcp.get()).ok());
  int before = OpenFdCount();
  auto bad = p.agent.ReceiveWithFd();
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(OpenFdCount(), before);
  auto plain = p.agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(plain.ok() && plain->has_value()) << plain.status();
  EXPECT_EQ(OpenFdCount(), before);
  p.worker.Close();
  // A pending packet is still delivered after the peer closes, then EOF.
  auto last = p.agent.ReceiveWithFd();
  ASSERT_TRUE(last.ok() && last->has_value()) << last.status();
  EXPECT_TRUE((*last)->second.valid());
  auto eof = p.agent.ReceiveWithFd();
  EXPECT_EQ(eof.status().code(), absl::StatusCode::kUnavailable);
}

// Several descriptors in one packet (a proxied pair's two sockets): they
// arrive together, in order; the one-fd API still reads such a packet.
TEST(WorkerSdkFdPassingTest, SendWithFdsRoundTripInOrder) {
  Pair p = MakePair();
  Fd a(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  Fd b(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  Fd r(pipe_fds[0]), w(pipe_fds[1]);
  v1::WorkerMessage m;
  m.mutable_handoff_connection()->set_id(7);
  m.mutable_handoff_connection()->set_upstream_attached(true);
  const int two[] = {a.get(), b.get()};
  ASSERT_TRUE(p.worker.SendWithFds(m, two).ok());
  const int three[] = {b.get(), r.get(), a.get()};
  ASSERT_TRUE(p.worker.SendWithFds(Hello(), three).ok());
  ASSERT_TRUE(p.worker.SendWithFds(Hello(), {}).ok());  // none: Send()
  ASSERT_TRUE(p.worker.SendWithFds(m, two).ok());

  int before = OpenFdCount();
  {
    auto got = p.agent.ReceiveWithFds();
    ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
    EXPECT_TRUE((*got)->first.handoff_connection().upstream_attached());
    std::vector<Fd>& fds = (*got)->second;
    ASSERT_EQ(fds.size(), 2u);
    EXPECT_EQ(Inode(fds[0].get()), Inode(a.get()));
    EXPECT_EQ(Inode(fds[1].get()), Inode(b.get()));
    for (const Fd& fd : fds) {
      EXPECT_TRUE(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC);
    }
    EXPECT_EQ(OpenFdCount(), before + 2);
    auto three_got = p.agent.ReceiveWithFds();
    ASSERT_TRUE(three_got.ok() && three_got->has_value());
    ASSERT_EQ((*three_got)->second.size(), 3u);
    EXPECT_EQ(Inode((*three_got)->second[0].get()), Inode(b.get()));
    EXPECT_EQ(Inode((*three_got)->second[1].get()), Inode(r.get()));
    EXPECT_EQ(Inode((*three_got)->second[2].get()), Inode(a.get()));
    auto none = p.agent.ReceiveWithFds();
    ASSERT_TRUE(none.ok() && none->has_value());
    EXPECT_TRUE((*none)->second.empty());
  }
  EXPECT_EQ(OpenFdCount(), before);
  {
    // The old one-descriptor receive takes the first and closes the second.
    auto old = p.agent.ReceiveWithFd();
    ASSERT_TRUE(old.ok() && old->has_value()) << old.status();
    EXPECT_EQ(Inode((*old)->second.get()), Inode(a.get()));
    EXPECT_EQ(OpenFdCount(), before + 1);
  }
  EXPECT_EQ(OpenFdCount(), before);
  auto empty = p.agent.ReceiveWithFds();
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_FALSE(empty->has_value());
}

TEST(WorkerSdkFdPassingTest, SendWithFdsRejectsBadInput) {
  Pair p = MakePair();
  Fd a(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int negative[] = {a.get(), -1};
  EXPECT_EQ(p.worker.SendWithFds(Hello(), negative).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int> many(ControlChannel::kMaxFdsPerPacket + 1, a.get());
  EXPECT_EQ(p.worker.SendWithFds(Hello(), many).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int> most(ControlChannel::kMaxFdsPerPacket, a.get());
  ASSERT_TRUE(p.worker.SendWithFds(Hello(), most).ok());
  int before = OpenFdCount();
  {
    auto got = p.agent.ReceiveWithFds();
    ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
    EXPECT_EQ((*got)->second.size(),
              static_cast<size_t>(ControlChannel::kMaxFdsPerPacket));
  }
  EXPECT_EQ(OpenFdCount(), before);
  auto got = p.agent.ReceiveWithFds();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->has_value());  // the refused ones sent nothing
}

TEST(WorkerSdkFdPassingTest, SendWithFdRejectsBadFds) {
  Pair p = MakePair();
  EXPECT_EQ(p.worker.SendWithFd(Hello(), -1).code(),
            absl::StatusCode::kInvalidArgument);
  int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ::close(fd);  // now a closed descriptor number
  EXPECT_FALSE(p.worker.SendWithFd(Hello(), fd).ok());
  EXPECT_EQ(p.worker.SendWithFd(v1::WorkerMessage(), 0).code(),
            absl::StatusCode::kInvalidArgument);  // empty message
  auto got = p.agent.ReceiveWithFd();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->has_value());  // nothing was sent
}

// ---------------------------------------------------------------------------
// Connect

// A Unix SOCK_SEQPACKET listener bound to `address` (filesystem path or
// "@abstract").
Fd SeqpacketListener(const std::string& address, int type = SOCK_SEQPACKET,
                     bool listen = true) {
  Fd fd(::socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  socklen_t len = 0;
  if (address[0] == '@') {
    std::memcpy(addr.sun_path + 1, address.data() + 1, address.size() - 1);
    len = offsetof(sockaddr_un, sun_path) + address.size();
  } else {
    std::memcpy(addr.sun_path, address.data(), address.size());
    len = sizeof(addr);
  }
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), len), 0)
      << std::strerror(errno);
  if (listen) {
    EXPECT_EQ(::listen(fd.get(), 8), 0);
  }
  return fd;
}

// Connect, hello with a descriptor before the listener accepts (as the worker
// does), accept, adopt, receive; then the other direction.
void ExpectHandshake(const std::string& address) {
  Fd listener = SeqpacketListener(address);
  absl::StatusOr<ControlChannel> worker = ControlChannel::Connect(address);
  ASSERT_TRUE(worker.ok()) << worker.status();
  EXPECT_FALSE(worker->connecting());
  absl::StatusOr<bool> done = worker->FinishConnect();
  ASSERT_TRUE(done.ok() && *done) << done.status();
  EXPECT_TRUE(::fcntl(worker->fd(), F_GETFL) & O_NONBLOCK);
  EXPECT_TRUE(::fcntl(worker->fd(), F_GETFD) & FD_CLOEXEC);
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(worker->SendWithFd(Hello(), tcp.get()).ok());

  absl::StatusOr<ControlChannel> agent = ControlChannel::Adopt(
      Fd(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC)));
  ASSERT_TRUE(agent.ok()) << agent.status();
  auto got = agent->ReceiveWithFd();
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
  EXPECT_EQ((*got)->first.hello().listener(), "web");
  EXPECT_EQ(Inode((*got)->second.get()), Inode(tcp.get()));

  v1::AgentMessage drain;
  drain.mutable_drain()->set_deadline_ms(5);
  ASSERT_TRUE(agent->Send(drain).ok());
  auto cmd = worker->Receive();
  ASSERT_TRUE(cmd.ok() && cmd->has_value()) << cmd.status();
  EXPECT_EQ((*cmd)->drain().deadline_ms(), 5u);
}

TEST(WorkerSdkConnectTest, ConnectsToAPathAndPassesTheFd) {
  testing::TempDir dir;
  ExpectHandshake(dir.path() + "/control.sock");
}

TEST(WorkerSdkConnectTest, ConnectsToAnAbstractSocket) {
  ExpectHandshake(absl::StrCat("@portfleet-sdk-test-", ::getpid()));
}

TEST(WorkerSdkConnectTest, Errors) {
  testing::TempDir dir;
  EXPECT_EQ(ControlChannel::Connect("").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ControlChannel::Connect(std::string(200, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      ControlChannel::Connect(dir.path() + "/absent.sock").status().code(),
      absl::StatusCode::kNotFound);
  // Bound but not listening: nobody accepts.
  std::string path = dir.path() + "/bound.sock";
  Fd bound = SeqpacketListener(path, SOCK_SEQPACKET, /*listen=*/false);
  std::string stream = dir.path() + "/stream.sock";
  Fd stream_listener = SeqpacketListener(stream, SOCK_STREAM);
  int before = OpenFdCount();
  auto refused = ControlChannel::Connect(path);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable)
      << refused.status();
  // A stream listener is the wrong socket type.
  auto wrong_type = ControlChannel::Connect(stream);
  EXPECT_FALSE(wrong_type.ok());
  EXPECT_EQ(OpenFdCount(), before);  // failed connects leak no socket
}

// ---------------------------------------------------------------------------
// AgentLink

// Dispatches `link` whenever its fd is readable until `done` holds or
// `timeout` passes; messages from the agent go to `messages`.
bool PumpUntil(AgentLink& link, const std::function<bool()>& done,
               absl::Duration timeout,
               std::vector<v1::AgentMessage>* messages = nullptr) {
  absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() >= deadline) return false;
    pollfd p{link.fd(), POLLIN, 0};
    ::poll(&p, 1, 10);
    link.Dispatch([&](const v1::AgentMessage& m) {
      if (messages != nullptr) messages->push_back(m);
    });
  }
  return true;
}

// A listening TCP socket on loopback, standing in for the shard socket.
Fd ShardSocket() { return Fd(TcpSocket(AF_INET, /*listening=*/true)); }

AgentLinkOptions FastOptions(const std::string& agent_socket) {
  AgentLinkOptions options;
  options.agent_socket = agent_socket;
  options.reconnect_interval = absl::Milliseconds(20);
  options.log_interval = absl::Milliseconds(100);
  return options;
}

// The next connection on `listener` within `timeout`, as a channel.
std::optional<ControlChannel> AcceptChannel(int listener,
                                            absl::Duration timeout) {
  pollfd p{listener, POLLIN, 0};
  if (::poll(&p, 1, absl::ToInt64Milliseconds(timeout)) != 1) {
    return std::nullopt;
  }
  absl::StatusOr<ControlChannel> c = ControlChannel::Adopt(
      Fd(::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC)));
  if (!c.ok()) return std::nullopt;
  return std::move(*c);
}

// 1. The link starts on a socketpair channel: hello, ready, a drain
//    message reaches the worker.
// 2. The agent end closes: the link connects to the agent socket and sends
//    hello{reconnect} with the shard socket, then ready.
// 3. The new channel carries messages both ways.
TEST(WorkerSdkAgentLinkTest, HelloReadyDrainAndReconnectWithTheSocket) {
  testing::TempDir dir;
  std::string path = dir.path() + "/control.sock";
  Fd agent_listener = SeqpacketListener(path);
  Fd shard = ShardSocket();
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok()) << pair.status();
  ControlChannel agent = std::move(pair->first);
  auto link = AgentLink::Create({.listener = "web", .shard = 3}, shard,
                                std::move(pair->second), FastOptions(path));
  ASSERT_TRUE(link.ok()) << link.status();
  const int link_fd = (*link)->fd();
  (*link)->SendHello();
  (*link)->SendReady();
  auto hello = agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(hello.ok() && hello->has_value()) << hello.status();
  EXPECT_FALSE((*hello)->hello().reconnect());
  EXPECT_EQ((*hello)->hello().listener(), "web");
  EXPECT_EQ((*hello)->hello().shard(), 3u);
  EXPECT_EQ((*hello)->hello().socket_inode(), Inode(shard.get()));
  auto ready = agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(ready.ok() && ready->has_value() && (*ready)->has_ready());

  v1::AgentMessage drain;
  drain.mutable_drain()->set_deadline_ms(7);
  ASSERT_TRUE(agent.Send(drain).ok());
  std::vector<v1::AgentMessage> got;
  ASSERT_TRUE(PumpUntil(
      **link, [&] { return !got.empty(); }, absl::Seconds(2), &got));
  EXPECT_EQ(got[0].drain().deadline_ms(), 7u);

  agent.Close();  // the agent dies
  ASSERT_TRUE(PumpUntil(
      **link,
      [&] { return (*link)->connected() && (*link)->reconnects() == 1; },
      absl::Seconds(2)));
  EXPECT_EQ((*link)->fd(), link_fd);  // the loop's fd never changes
  std::optional<ControlChannel> adopted =
      AcceptChannel(agent_listener.get(), absl::Seconds(1));
  ASSERT_TRUE(adopted.has_value());
  auto with_fd = adopted->ReceiveWithFd();
  ASSERT_TRUE(with_fd.ok() && with_fd->has_value()) << with_fd.status();
  EXPECT_TRUE((*with_fd)->first.hello().reconnect());
  EXPECT_EQ((*with_fd)->first.hello().pid(), static_cast<uint32_t>(::getpid()));
  ASSERT_TRUE((*with_fd)->second.valid()) << "no socket attached";
  EXPECT_EQ(Inode((*with_fd)->second.get()), Inode(shard.get()));
  ready = adopted->Receive<v1::WorkerMessage>();
  ASSERT_TRUE(ready.ok() && ready->has_value() && (*ready)->has_ready());

  v1::WorkerMessage load;
  load.mutable_load()->set_accepted_total(9);
  (*link)->Send(load);
  auto got_load = adopted->Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got_load.ok() && got_load->has_value());
  EXPECT_EQ((*got_load)->load().accepted_total(), 9u);
  got.clear();
  ASSERT_TRUE(adopted->Send(drain).ok());
  ASSERT_TRUE(PumpUntil(
      **link, [&] { return !got.empty(); }, absl::Seconds(2), &got));
}

// Hand-off pauses through the link: 1. HandOffConnection and HandOffPair
// stamp released_mono_ns (the caller's stamp, or the time of the call);
// 2. AdoptedConnection counts now minus the sender's stamp, and not a
// connection without a stamp or with one later than now; 3. a load report
// sent through the link carries the histogram (none before any adoption).
TEST(WorkerSdkAgentLinkTest, HandOffStampsAndLoadReportsCarryThePauses) {
  Fd shard = ShardSocket();
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok()) << pair.status();
  ControlChannel agent = std::move(pair->first);
  auto link = AgentLink::Create({.listener = "web", .handoff = true}, shard,
                                std::move(pair->second), FastOptions(""));
  ASSERT_TRUE(link.ok()) << link.status();

  const uint64_t before = MonotonicNowNs();
  ASSERT_TRUE((*link)->HandOffConnection(7, shard.get(), "").ok());
  const uint64_t after = MonotonicNowNs();
  auto released = agent.ReceiveWithFds();
  ASSERT_TRUE(released.ok() && released->has_value()) << released.status();
  const uint64_t stamp =
      (*released)->first.handoff_connection().released_mono_ns();
  EXPECT_GE(stamp, before);
  EXPECT_LE(stamp, after);
  ASSERT_TRUE((*link)->HandOffPair(8, shard.get(), shard.get(), 4242).ok());
  released = agent.ReceiveWithFds();
  ASSERT_TRUE(released.ok() && released->has_value()) << released.status();
  EXPECT_EQ((*released)->first.handoff_connection().released_mono_ns(), 4242u);

  v1::WorkerMessage load;
  load.mutable_load()->set_active_connections(1);
  (*link)->Send(load);
  auto got = agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_FALSE((*got)->load().has_handoff_pauses());

  v1::HandOffConnection adopt;
  adopt.set_released_mono_ns(MonotonicNowNs() - 50'000);  // 50 µs ago
  (*link)->AdoptedConnection(adopt);
  adopt.set_released_mono_ns(0);  // an older sender
  (*link)->AdoptedConnection(adopt);
  adopt.set_released_mono_ns(MonotonicNowNs() + 1'000'000'000);  // not a time
  (*link)->AdoptedConnection(adopt);
  ASSERT_EQ((*link)->handoff_pauses().count(), 1u);
  EXPECT_GE((*link)->handoff_pauses().sum_ns(), 50'000u);

  (*link)->Send(load);
  got = agent.Receive<v1::WorkerMessage>();
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->load().active_connections(), 1u);
  const v1::DurationHistogram& pauses = (*got)->load().handoff_pauses();
  EXPECT_EQ(pauses.count(), 1u);
  ASSERT_EQ(pauses.buckets_size(), 1);
  EXPECT_GE(DurationHistogram::UpperNs(pauses.buckets(0).index()), 50'000u);
}

// A peer that does not run as the expected agent uid never receives the
// socket: the link closes each such connection without sending anything and
// keeps trying; the same peer with the expected uid gets it.
TEST(WorkerSdkAgentLinkTest, RefusesAPeerOfAnotherUid) {
  testing::TempDir dir;
  std::string path = dir.path() + "/control.sock";
  Fd agent_listener = SeqpacketListener(path);
  Fd shard = ShardSocket();
  AgentLinkOptions options = FastOptions(path);
  options.agent_uid = ::geteuid() + 1;  // the listener runs as geteuid()
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok());
  auto link = AgentLink::Create({.listener = "web"}, shard,
                                std::move(pair->second), options);
  ASSERT_TRUE(link.ok()) << link.status();
  pair->first.Close();  // the agent dies
  ASSERT_TRUE(PumpUntil(
      **link, [&] { return (*link)->refused_peers() >= 3; }, absl::Seconds(3)));
  EXPECT_FALSE((*link)->connected());
  EXPECT_TRUE((*link)->reconnecting());
  // Count from the squatter's side: connections, but no packet and no fd.
  int connections = 0;
  while (std::optional<ControlChannel> c =
             AcceptChannel(agent_listener.get(), absl::ZeroDuration())) {
    ++connections;
    auto got = c->ReceiveWithFd();
    EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable)
        << "the refused peer received something";
  }
  EXPECT_GE(connections, 3);

  // The control case: the same listener, now the expected uid.
  auto pair2 = ControlChannel::Pair();
  ASSERT_TRUE(pair2.ok());
  options.agent_uid = ::geteuid();
  auto trusting = AgentLink::Create({.listener = "web"}, shard,
                                    std::move(pair2->second), options);
  ASSERT_TRUE(trusting.ok());
  pair2->first.Close();
  ASSERT_TRUE(PumpUntil(
      **trusting, [&] { return (*trusting)->connected(); }, absl::Seconds(2)));
  EXPECT_EQ((*trusting)->refused_peers(), 0u);
}

// After StopReadoption() (the worker drains) the link holds no copy of the
// shard socket and never reconnects.
TEST(WorkerSdkAgentLinkTest, StopReadoptionClosesTheCopyAndStopsReconnecting) {
  testing::TempDir dir;
  std::string path = dir.path() + "/control.sock";
  Fd agent_listener = SeqpacketListener(path);
  Fd shard = ShardSocket();
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok());
  int before = OpenFdCount();
  auto link = AgentLink::Create({.listener = "web"}, shard,
                                std::move(pair->second), FastOptions(path));
  ASSERT_TRUE(link.ok());
  // Its epoll set, its timer and its copy of the shard socket (the worker
  // end of the pair moved into it).
  EXPECT_EQ(OpenFdCount(), before + 3);
  (*link)->StopReadoption();
  EXPECT_EQ(OpenFdCount(), before + 2);  // the copy is gone
  pair->first.Close();
  PumpUntil(
      **link, [] { return false; }, absl::Milliseconds(200));
  EXPECT_FALSE((*link)->connected());
  EXPECT_FALSE((*link)->reconnecting());
  EXPECT_FALSE(AcceptChannel(agent_listener.get(), absl::ZeroDuration()));
}

// Without an agent socket a lost channel is just gone.
TEST(WorkerSdkAgentLinkTest, WithoutAnAgentSocketServesOnAlone) {
  Fd shard = ShardSocket();
  auto pair = ControlChannel::Pair();
  ASSERT_TRUE(pair.ok());
  auto link = AgentLink::Create({.listener = "web"}, shard,
                                std::move(pair->second), AgentLinkOptions{});
  ASSERT_TRUE(link.ok());
  EXPECT_TRUE((*link)->connected());
  pair->first.Close();
  PumpUntil(
      **link, [&] { return !(*link)->connected(); }, absl::Seconds(1));
  EXPECT_FALSE((*link)->connected());
  EXPECT_FALSE((*link)->reconnecting());
  v1::WorkerMessage load;
  load.mutable_load();
  (*link)->Send(load);  // nothing to send to: a no-op
}

TEST(WorkerSdkAgentLinkTest, OptionsFromEnv) {
  std::string out = InChild([] {
    std::string r;
    ::unsetenv("PORTFLEET_AGENT_SOCKET");
    ::unsetenv("PORTFLEET_AGENT_UID");
    auto none = AgentLinkOptionsFromEnv();
    absl::StrAppend(&r, none.ok() && none->agent_socket.empty() &&
                                !none->agent_uid.has_value()
                            ? "none-ok "
                            : "none-bad ");
    ::setenv("PORTFLEET_AGENT_SOCKET", "/run/portfleet/control.sock", 1);
    ::setenv("PORTFLEET_AGENT_UID", "1234", 1);
    auto set = AgentLinkOptionsFromEnv();
    absl::StrAppend(&r, set.ok()
                            ? absl::StrCat(set->agent_socket,
                                           " uid=", set->agent_uid.value_or(0))
                            : set.status().ToString());
    for (const char* bad : {"abc", "-1", "4294967295", "12x", "+5"}) {
      ::setenv("PORTFLEET_AGENT_UID", bad, 1);
      auto s = AgentLinkOptionsFromEnv();
      absl::StrAppend(
          &r, " ", bad, ":",
          s.ok() ? "accepted" : absl::StatusCodeToString(s.status().code()));
    }
    return r;
  });
  EXPECT_EQ(out,
            "none-ok /run/portfleet/control.sock uid=1234 abc:INVALID_ARGUMENT "
            "-1:INVALID_ARGUMENT 4294967295:INVALID_ARGUMENT "
            "12x:INVALID_ARGUMENT +5:INVALID_ARGUMENT");
}

}  // namespace
// Log lines: text (time first), journal (syslog priority, no time: journald
// adds its own) and JSON (one object a line, escaped).
TEST(LogFormatTest, TextJournalAndJsonLines) {
  absl::Time t = absl::FromUnixMillis(1796000000123);  // 2026-11-30T...
  std::string when =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
  EXPECT_EQ(FormatLogLine(LogFormat::kText, LogLevel::kWarning, "agent",
                          "listener web: down", t),
            when + " WARN  agent: listener web: down\n");
  EXPECT_EQ(
      FormatLogLine(LogFormat::kJournal, LogLevel::kError, "agent", "x", t),
      "<3>ERROR agent: x\n");
  EXPECT_EQ(FormatLogLine(LogFormat::kJournal, LogLevel::kInfo, "w", "y", t),
            "<6>INFO  w: y\n");
  EXPECT_EQ(FormatLogLine(LogFormat::kJournal, LogLevel::kWarning, "w", "y", t)
                .substr(0, 3),
            "<4>");
  EXPECT_EQ(FormatLogLine(LogFormat::kJournal, LogLevel::kDebug, "w", "y", t)
                .substr(0, 3),
            "<7>");
  EXPECT_EQ(FormatLogLine(LogFormat::kJson, LogLevel::kInfo, "worker web/2",
                          "say \"hi\"\\ \n\x01", t),
            "{\"time\":\"" + when +
                "\",\"level\":\"info\",\"tag\":\"worker web/2\","
                "\"msg\":\"say \\\"hi\\\"\\\\ \\n\\u0001\"}\n");
  EXPECT_TRUE(ParseLogFormat("JSON").ok());
  EXPECT_FALSE(ParseLogFormat("journal").ok());
}

TEST(LogFormatTest, JournalStreamMatchesOnlyTheFileItNames) {
  portfleet::testing::TempDir dir;
  std::string path = dir.WriteFile("stream", "");
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  struct stat st {};
  ASSERT_EQ(::fstat(fd.get(), &st), 0);
  std::string same = absl::StrCat(st.st_dev, ":", st.st_ino);
  std::string other = absl::StrCat(st.st_dev, ":", st.st_ino + 1);
  EXPECT_TRUE(IsJournalStream(fd.get(), same.c_str()));
  EXPECT_FALSE(IsJournalStream(fd.get(), other.c_str()));
  EXPECT_FALSE(IsJournalStream(fd.get(), nullptr));
  EXPECT_FALSE(IsJournalStream(fd.get(), "junk"));
  EXPECT_FALSE(IsJournalStream(fd.get(), ""));
}

}  // namespace portfleet
