// Self-bound sockets (issue 16), the pieces without an agent: the spec's
// socket_mode, the rollout refusal, and finding, copying and checking a
// process's own listening sockets (this test process's, on loopback).
#include "agent/fleet/selfbound.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

using ::testing::HasSubstr;

v1::Listener SelfBoundListener() {
  v1::Listener l;
  l.set_name("web");
  l.set_address("127.0.0.1:8080");
  l.mutable_worker()->set_command("/usr/bin/python3");
  l.mutable_worker()->set_socket_mode(v1::SOCKET_MODE_SELF_BOUND);
  return l;
}

TEST(SelfBoundSpecTest, SocketModeIsValidated) {
  v1::Listener l = SelfBoundListener();
  EXPECT_TRUE(ValidateListener(l).ok());
  l.mutable_worker()->set_socket_mode(static_cast<v1::SocketMode>(7));
  absl::Status s = ValidateListener(l);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(s.message(),
              HasSubstr("worker.socket_mode: 7 is not a SocketMode"));
}

TEST(SelfBoundSpecTest, RolloutsThatChangeTheSocketModeAreRefused) {
  v1::WorkerSpec inherited;
  v1::WorkerSpec self_bound;
  self_bound.set_socket_mode(v1::SOCKET_MODE_SELF_BOUND);
  EXPECT_TRUE(CheckRollOutSocketMode("web", inherited, inherited).ok());
  EXPECT_TRUE(CheckRollOutSocketMode("web", self_bound, self_bound).ok());
  absl::Status s = CheckRollOutSocketMode("web", inherited, self_bound);
  EXPECT_TRUE(absl::IsFailedPrecondition(s));
  EXPECT_EQ(s.message(),
            "listener web: worker.socket_mode cannot change on a running "
            "listener; delete the listener and create it again");
}

// A TCP socket on 127.0.0.1, port chosen by the kernel, listening unless
// `listen` is false.
Fd Socket(bool reuseport, bool listen, uint16_t port = 0) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  if (reuseport) {
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  if (listen) {
    EXPECT_EQ(::listen(fd.get(), 16), 0);
  }
  return fd;
}

TEST(SelfBoundSocketTest, ValidationSaysWhatIsWrong) {
  Fd good = Socket(true, true);
  SocketAddress address = *LocalAddressOf(good.get());
  EXPECT_TRUE(ValidateSelfBoundSocket(good.get(), address).ok());

  Fd other = Socket(true, true);
  absl::Status s = ValidateSelfBoundSocket(other.get(), address);
  EXPECT_THAT(s.message(),
              HasSubstr(absl::StrCat(
                  "bound to ", LocalAddressOf(other.get())->ToString(),
                  ", not the listener's ", address.ToString())));

  Fd plain = Socket(false, true);
  s = ValidateSelfBoundSocket(plain.get(), *LocalAddressOf(plain.get()));
  EXPECT_THAT(s.message(), HasSubstr("SO_REUSEPORT is not set"));

  Fd idle = Socket(true, false);
  s = ValidateSelfBoundSocket(idle.get(), *LocalAddressOf(idle.get()));
  EXPECT_THAT(s.message(), HasSubstr("not listening"));
}

TEST(SelfBoundSocketTest, FindsAndCopiesThisProcesssSockets) {
  Fd first = Socket(true, true);
  SocketAddress address = *LocalAddressOf(first.get());
  Fd second = Socket(true, true, address.port());
  Fd elsewhere = Socket(true, true);
  uint64_t first_inode = *SocketInodeOf(first.get());
  uint64_t second_inode = *SocketInodeOf(second.get());

  absl::StatusOr<SocketSearch> search = FindSelfBoundSockets(
      ::getpid(), /*tree=*/false, address, {first_inode}, ::geteuid());
  ASSERT_TRUE(search.ok()) << search.status();
  ASSERT_EQ(search->found.size(), 1u);
  EXPECT_EQ(search->found[0].inode, second_inode);
  EXPECT_EQ(search->found[0].holder, ::getpid());
  // The copy is the same socket.
  EXPECT_EQ(*SocketInodeOf(search->found[0].socket.get()), second_inode);
  ASSERT_EQ(search->refused.size(), 1u);
  EXPECT_THAT(search->refused[0],
              HasSubstr(absl::StrCat(
                  "bound to ", LocalAddressOf(elsewhere.get())->ToString())));

  // Another uid than the group's: refused with the reason.
  search = FindSelfBoundSockets(::getpid(), /*tree=*/true, address, {},
                                ::geteuid() + 1);
  ASSERT_TRUE(search.ok());
  EXPECT_TRUE(search->found.empty());
  const std::string want =
      absl::StrCat("owned by uid ", ::geteuid(), ", not uid ", ::geteuid() + 1);
  int owned = 0;
  for (const std::string& r : search->refused) {
    if (r.find(want) != std::string::npos) owned++;
  }
  EXPECT_EQ(owned, 2) << "refused: " << search->refused.size();
}

}  // namespace
}  // namespace portfleet
