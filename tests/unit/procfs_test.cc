// agent/procfs: the one reader of /proc/PID/{stat,fd} and sock_diag, against
// this process and sockets it opens on loopback.
#include "agent/procfs.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include "gtest/gtest.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

TEST(ProcfsTest, ParsesStatWhoseCommandHoldsSpacesAndParentheses) {
  ProcIds ids;
  ASSERT_TRUE(ParseProcStatIds("42 (a) b (c) T 7 9 9 0 -1", &ids));
  EXPECT_EQ(ids.state, 'T');
  EXPECT_EQ(ids.ppid, 7);
  EXPECT_EQ(ids.pgid, 9);
}

TEST(ProcfsTest, RefusesMalformedStat) {
  ProcIds ids;
  EXPECT_FALSE(ParseProcStatIds("", &ids));
  EXPECT_FALSE(ParseProcStatIds("42 (cut", &ids));
  EXPECT_FALSE(ParseProcStatIds("42 (x) S", &ids));
  EXPECT_FALSE(ParseProcStatIds("42 (x) S one 9", &ids));
}

TEST(ProcfsTest, ReadsTheStartTimeAndUidOfAProcess) {
  // Field 22 counted from the pid: state is 3, so f[19] after the comm.
  ProcIds ids;
  ASSERT_TRUE(ParseProcStatIds(
      "42 (a b) S 1 42 42 0 -1 4194560 1 0 0 0 5 6 0 0 20 0 1 0 123456 9 9",
      &ids));
  EXPECT_EQ(ids.start_time, 123456u);
  EXPECT_FALSE(ParseProcStatIds(
      "42 (a) S 1 42 42 0 -1 4194560 1 0 0 0 5 6 0 0 20 0 1 0 soon 9", &ids));

  std::optional<ProcIds> self = ProcessIds(::getpid());
  ASSERT_TRUE(self.has_value());
  EXPECT_GT(self->start_time, 0u);
  EXPECT_EQ(ProcessIds(::getpid())->start_time, self->start_time);
  EXPECT_EQ(ProcessEffectiveUid(::getpid()), ::geteuid());
  EXPECT_FALSE(ProcessIds(-1).has_value());
  EXPECT_FALSE(ProcessEffectiveUid(0).has_value());
}

TEST(ProcfsTest, ProcessTableHoldsThisProcessAndItsParent) {
  std::map<pid_t, ProcIds> table = ProcessTable();
  auto self = table.find(::getpid());
  ASSERT_NE(self, table.end());
  EXPECT_EQ(self->second.ppid, ::getppid());
  EXPECT_EQ(self->second.pgid, ::getpgrp());
  EXPECT_EQ(self->second.state, 'R');
}

TEST(ProcfsTest, FindsAListeningSocketByFdAndBySockDiag) {
  Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(listener);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(
      ::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
      0);
  ASSERT_EQ(::listen(listener.get(), 4), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(
      ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len),
      0);
  const uint16_t port = ntohs(addr.sin_port);

  std::vector<ProcessSocket> mine = SocketsOfProcess(::getpid());
  auto by_fd = std::find_if(mine.begin(), mine.end(), [&](const auto& s) {
    return s.fd == listener.get();
  });
  ASSERT_NE(by_fd, mine.end());
  EXPECT_EQ(by_fd->pid, ::getpid());

  absl::StatusOr<std::vector<DiagSocket>> listening =
      DumpTcpSockets(AF_INET, kTcpListenMask, port);
  ASSERT_TRUE(listening.ok()) << listening.status();
  ASSERT_EQ(listening->size(), 1u);
  EXPECT_EQ((*listening)[0].inode, by_fd->inode);
  EXPECT_EQ((*listening)[0].uid, ::geteuid());
  EXPECT_EQ((*listening)[0].local.port(), port);

  // The established dump on that port is empty until a connection is
  // accepted (a queued one has no socket inode yet), then holds its server
  // side (the client's end has another local port).
  absl::StatusOr<std::vector<DiagSocket>> none =
      DumpTcpSockets(AF_INET, kTcpEstablishedMask, port);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(client);
  ASSERT_EQ(
      ::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
      0);
  Fd accepted(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(accepted);
  absl::StatusOr<std::vector<DiagSocket>> one =
      DumpTcpSockets(AF_INET, kTcpEstablishedMask, port);
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->size(), 1u);
  std::vector<ProcessSocket> now = SocketsOfProcess(::getpid());
  EXPECT_TRUE(std::any_of(now.begin(), now.end(), [&](const auto& s) {
    return s.fd == accepted.get() && s.inode == (*one)[0].inode;
  }));
}

TEST(ProcfsTest, AnExitedProcessHasNoSockets) {
  EXPECT_TRUE(SocketsOfProcess(0).empty());
  EXPECT_TRUE(ReadProcFile("/proc/0/stat").empty());
}

}  // namespace
}  // namespace portfleet
