// Shard socket options (agent/sockets.h) on real sockets in a private
// network namespace: what accepted connections inherit, and
// TCP_DEFER_ACCEPT at creation and on a listening socket.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/sockets.h"
#include "gtest/gtest.h"
#include "tests/testing/netns.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

int IntOption(int fd, int level, int option) {
  int value = -1;
  socklen_t len = sizeof(value);
  EXPECT_EQ(::getsockopt(fd, level, option, &value, &len), 0)
      << std::strerror(errno);
  return value;
}

int Port(int fd) {
  sockaddr_in sin{};
  socklen_t len = sizeof(sin);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sin), &len);
  return ntohs(sin.sin_port);
}

Fd ConnectTo(int port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sin.sin_port = htons(port);
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)),
            0)
      << std::strerror(errno);
  return fd;
}

absl::StatusOr<Fd> Shard(int port, const ShardSocketOptions& options) {
  absl::StatusOr<SocketAddress> address =
      SocketAddress::Parse(absl::StrCat("127.0.0.1:", port));
  if (!address.ok()) return address.status();
  return CreateShardSocket(*address, options);
}

// A connection accepted from a shard socket has TCP_NODELAY from the
// listener (portfleet-worker relies on that to skip its setsockopt), and
// only when the listener has it.
TEST(AgentSocketsTest, AcceptedConnectionsInheritTcpNodelay) {
  PF_ENTER_NETNS_OR_SKIP();
  for (bool nodelay : {true, false}) {
    SCOPED_TRACE(nodelay ? "tcp_nodelay" : "no tcp_nodelay");
    absl::StatusOr<Fd> shard = Shard(8301, {.tcp_nodelay = nodelay});
    ASSERT_TRUE(shard.ok()) << shard.status();
    EXPECT_EQ(IntOption(shard->get(), IPPROTO_TCP, TCP_NODELAY) != 0, nodelay);
    Fd client = ConnectTo(Port(shard->get()));
    Fd accepted(::accept4(shard->get(), nullptr, nullptr, SOCK_CLOEXEC));
    ASSERT_TRUE(accepted.valid()) << std::strerror(errno);
    EXPECT_EQ(IntOption(accepted.get(), IPPROTO_TCP, TCP_NODELAY) != 0,
              nodelay);
  }
}

// TCP_DEFER_ACCEPT: a connection is not accepted until its first byte
// arrives; SetDeferAccept turns it on and off on a listening socket.
TEST(AgentSocketsTest, DeferAcceptHoldsConnectionsUntilData) {
  PF_ENTER_NETNS_OR_SKIP();
  absl::StatusOr<Fd> shard = Shard(8302, {.defer_accept_seconds = 5});
  ASSERT_TRUE(shard.ok()) << shard.status();
  EXPECT_GT(IntOption(shard->get(), IPPROTO_TCP, TCP_DEFER_ACCEPT), 0);
  // Probe with accept() without blocking (this test owns the socket).
  ASSERT_EQ(::fcntl(shard->get(), F_SETFL, O_NONBLOCK), 0);
  Fd client = ConnectTo(8302);
  absl::SleepFor(absl::Milliseconds(100));
  Fd none(
      ::accept4(shard->get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
  EXPECT_FALSE(none.valid()) << "accepted before any data";
  ASSERT_EQ(::send(client.get(), "x", 1, 0), 1);
  absl::SleepFor(absl::Milliseconds(100));
  Fd accepted(
      ::accept4(shard->get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
  EXPECT_TRUE(accepted.valid()) << std::strerror(errno);

  ASSERT_TRUE(SetDeferAccept(shard->get(), 0).ok());
  EXPECT_EQ(IntOption(shard->get(), IPPROTO_TCP, TCP_DEFER_ACCEPT), 0);
  Fd client2 = ConnectTo(8302);
  absl::SleepFor(absl::Milliseconds(100));
  Fd accepted2(
      ::accept4(shard->get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
  EXPECT_TRUE(accepted2.valid()) << "not accepted without data once off";
}

}  // namespace
}  // namespace portfleet
