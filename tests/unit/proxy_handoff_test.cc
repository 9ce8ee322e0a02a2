// Hand-off of proxied pairs, without a worker: when a pair counts as idle
// (ProxyPairIdle), and the checks of the sockets that travel with a
// hand-off (CheckHandOffSockets).
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "portfleet/v1/control.pb.h"
#include "worker/proxy.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/handoff_sockets.h"

namespace portfleet::worker {
namespace {

using ::testing::HasSubstr;

TEST(ProxyPairIdleTest, OnlyAConnectedPairWithNothingInFlightIsIdle) {
  const ProxyDirectionState quiet;
  EXPECT_TRUE(ProxyPairIdle(/*connecting=*/false, quiet, quiet));
  EXPECT_FALSE(ProxyPairIdle(/*connecting=*/true, quiet, quiet));
  // Bytes read and not yet written, either way.
  EXPECT_FALSE(ProxyPairIdle(false, {.pending = 1}, quiet));
  EXPECT_FALSE(ProxyPairIdle(false, quiet, {.pending = 16384}));
  // A side that sent its FIN or hung up (half-closed, closing).
  EXPECT_FALSE(ProxyPairIdle(false, {.src_finished = true}, quiet));
  EXPECT_FALSE(ProxyPairIdle(false, quiet, {.src_finished = true}));
  // A FIN passed on (half-closed the other way).
  EXPECT_FALSE(ProxyPairIdle(false, {.dst_shut = true}, quiet));
  EXPECT_FALSE(ProxyPairIdle(false, quiet, {.dst_shut = true}));
}

// A loopback TCP connection: the client end and the accepted end.
struct Conn {
  Fd listener;
  Fd client;
  Fd server;
};

Conn Connected() {
  Conn c;
  c.listener = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(
      ::bind(c.listener.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)),
      0);
  EXPECT_EQ(::listen(c.listener.get(), 4), 0);
  socklen_t len = sizeof(sin);
  ::getsockname(c.listener.get(), reinterpret_cast<sockaddr*>(&sin), &len);
  c.client = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(
      ::connect(c.client.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)),
      0);
  c.server = Fd(::accept4(c.listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  EXPECT_TRUE(c.server.valid());
  return c;
}

Fd Dup(const Fd& fd) { return Fd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0)); }

std::vector<Fd> Fds(Fd a, Fd b = Fd()) {
  std::vector<Fd> out;
  out.push_back(std::move(a));
  if (b.valid()) out.push_back(std::move(b));
  return out;
}

TEST(HandOffSocketsTest, CountFollowsUpstreamAttached) {
  v1::HandOffConnection m;
  EXPECT_EQ(HandOffSocketCount(m), 1u);
  m.set_upstream_attached(true);
  EXPECT_EQ(HandOffSocketCount(m), 2u);
}

TEST(HandOffSocketsTest, ConnectedTcpSocketsPass) {
  Conn a = Connected();
  Conn b = Connected();
  EXPECT_TRUE(CheckHandOffSockets(Fds(Dup(a.server)), 1).ok());
  absl::Status s = CheckHandOffSockets(Fds(Dup(a.server), Dup(b.client)), 2);
  EXPECT_TRUE(s.ok()) << s;
}

TEST(HandOffSocketsTest, WrongCountIsInvalidArgument) {
  Conn a = Connected();
  absl::Status s = CheckHandOffSockets(Fds(Dup(a.server)), 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("1 sockets attached, expected 2"));
  EXPECT_THAT(s.message(), HasSubstr("proxied pair"));
  s = CheckHandOffSockets(Fds(Dup(a.server), Dup(a.client)), 1);
  EXPECT_THAT(s.message(), HasSubstr("2 sockets attached, expected 1"));
  s = CheckHandOffSockets({}, 1);
  EXPECT_THAT(s.message(), HasSubstr("0 sockets attached"));
}

TEST(HandOffSocketsTest, NonSocketsAndUnconnectedSocketsAreNamed) {
  Conn a = Connected();
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  Fd r(p[0]), w(p[1]);
  absl::Status s = CheckHandOffSockets(Fds(Dup(a.server), std::move(r)), 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("socket 2 of 2 (the upstream): not a "
                                     "socket"));
  s = CheckHandOffSockets(
      Fds(Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)), Dup(a.client)),
      2);
  EXPECT_THAT(s.message(), HasSubstr("socket 1 of 2 (the client): not "
                                     "connected"));
  s = CheckHandOffSockets(Fds(Dup(a.listener)), 1);
  EXPECT_THAT(s.message(), HasSubstr("a listening socket"));
  int sp[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
  Fd u0(sp[0]), u1(sp[1]);
  s = CheckHandOffSockets(Fds(std::move(u0)), 1);
  EXPECT_THAT(s.message(), HasSubstr("not a TCP socket"));
  s = CheckHandOffSockets(
      Fds(Fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0))), 1);
  EXPECT_THAT(s.message(), HasSubstr("not a TCP socket"));
}

}  // namespace
}  // namespace portfleet::worker
