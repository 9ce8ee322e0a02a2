// RealProcessLauncher: the socket-activation contract seen from the child.
#include "agent/launcher.h"

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace portfleet {
namespace {

using ::testing::HasSubstr;
using testing::ReadFileOrEmpty;
using testing::TempDir;
using testing::WaitFor;

int WaitExit(RealProcessLauncher& launcher, const LaunchedProcess& p) {
  std::optional<int> status;
  WaitFor(
      [&] {
        auto r = launcher.Reap(p);
        if (r.ok() && r->has_value()) status = **r;
        return status.has_value();
      },
      absl::Seconds(10));
  return status.value_or(-1);
}

TEST(LauncherTest, ChildGetsFd3Fd4AndActivationEnv) {
  TempDir dir;
  std::string out = dir.path() + "/out";
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  int ctl[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl), 0);
  LaunchSpec spec;
  spec.path = "/bin/sh";
  spec.argv = {
      "sh", "-c",
      absl::StrCat("echo \"$LISTEN_FDS $LISTEN_PID $$ $X\" > ", out,
                   "; ls /proc/self/fd | sort -n | tr '\\n' ' ' >> ", out)};
  spec.env = {"X=y", "LISTEN_PID=999"};
  spec.listen_fd = sv[0];
  spec.control_fd = ctl[1];
  spec.env.push_back("LISTEN_FDS=1");
  RealProcessLauncher launcher;
  absl::StatusOr<LaunchedProcess> p = launcher.Launch(spec);
  ASSERT_TRUE(p.ok()) << p.status();
  int status = WaitExit(launcher, *p);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  std::string text = ReadFileOrEmpty(out);
  EXPECT_EQ(text.substr(0, text.find('\n')),
            absl::StrCat("1 ", p->pid, " ", p->pid, " y"));
  // fds 0-2, 3 (socket), 4 (control) and the one ls opens; nothing leaked.
  EXPECT_THAT(text, HasSubstr("\n0 1 2 3 4 "));
  EXPECT_EQ(text.find(" 5 6"), std::string::npos) << text;
  for (int fd : {sv[0], sv[1], ctl[0], ctl[1]}) ::close(fd);
}

TEST(LauncherTest, ExecFailureIsReportedAtLaunch) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  LaunchSpec spec;
  spec.path = "/nonexistent/worker";
  spec.argv = {"worker"};
  spec.listen_fd = sv[0];
  RealProcessLauncher launcher;
  absl::StatusOr<LaunchedProcess> p = launcher.Launch(spec);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(std::string(p.status().message()),
            "exec /nonexistent/worker: No such file or directory");
  ::close(sv[0]);
  ::close(sv[1]);
}

TEST(LauncherTest, ResolveCommand) {
  EXPECT_EQ(*ResolveCommand("sh"), "/usr/bin/sh");
  EXPECT_EQ(std::string(ResolveCommand("/etc/passwd").status().message()),
            "worker command '/etc/passwd' is not an executable file");
  EXPECT_EQ(ResolveCommand("no-such-worker").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(LauncherTest, DescribeWaitStatus) {
  EXPECT_EQ(DescribeWaitStatus(W_EXITCODE(3, 0)), "exited with status 3");
  EXPECT_EQ(DescribeWaitStatus(9), "killed by signal 9 (SIGKILL)");
}

}  // namespace
}  // namespace portfleet
