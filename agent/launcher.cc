#include "agent/launcher.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/procfs.h"
#include "worker/sdk/base/status.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace portfleet {
namespace {

int PidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

// Async-signal-safe decimal formatting into `out` (at least 12 bytes).
void FormatPid(pid_t pid, char* out) {
  char tmp[16];
  int n = 0;
  unsigned v = static_cast<unsigned>(pid);
  do {
    tmp[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
  for (int i = 0; i < n; ++i) out[i] = tmp[n - 1 - i];
  out[n] = '\0';
}

// What the child was doing when it failed.
enum class ChildStage {
  kAffinity,
  kPark,
  kErrorFd,
  kListenFd,
  kControlFd,
  kSetgroups,
  kSetgid,
  kSetuid,
  kCapabilities,
  kNoNewPrivs,
  kExec,
};

std::string StageText(ChildStage stage, const std::string& path) {
  switch (stage) {
    case ChildStage::kAffinity:
      return "pinning the new worker to its CPU";
    case ChildStage::kPark:
      return "duplicating the worker's descriptors (the open file limit of "
             "the agent may be too low)";
    case ChildStage::kErrorFd:
    case ChildStage::kListenFd:
    case ChildStage::kControlFd:
      return "placing the worker's descriptors as fds 3-5";
    case ChildStage::kSetgroups:
      return "setting the worker's supplementary groups";
    case ChildStage::kSetgid:
      return "switching the worker to its group";
    case ChildStage::kSetuid:
      return "switching the worker to its user";
    case ChildStage::kCapabilities:
      return "dropping the worker's capabilities";
    case ChildStage::kNoNewPrivs:
      return "setting no_new_privs for the worker";
    case ChildStage::kExec:
      break;
  }
  return absl::StrCat("exec ", path);
}

bool IsExecutableFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
         ::access(path.c_str(), X_OK) == 0;
}

}  // namespace

absl::StatusOr<std::string> ResolveCommand(const std::string& command) {
  if (command.find('/') != std::string::npos) {
    if (!IsExecutableFile(command)) {
      return absl::NotFoundError(absl::StrCat("worker command '", command,
                                              "' is not an executable file"));
    }
    return command;
  }
  std::vector<std::string> tried;
  char self[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    std::string dir(self, n);
    dir = dir.substr(0, dir.rfind('/'));
    std::string candidate = absl::StrCat(dir, "/", command);
    if (IsExecutableFile(candidate)) return candidate;
    tried.push_back(dir);
    // In a build tree the worker sits in a sibling folder.
    std::string parent = dir.substr(0, dir.rfind('/'));
    for (const char* sub : {"/worker/", "/ctl/"}) {
      candidate = absl::StrCat(parent, sub, command);
      if (IsExecutableFile(candidate)) return candidate;
    }
  }
  const char* path_env = std::getenv("PATH");
  std::string path = path_env ? path_env : "/usr/local/bin:/usr/bin:/bin";
  for (absl::string_view dir : absl::StrSplit(path, ':')) {
    if (dir.empty()) continue;
    std::string candidate = absl::StrCat(dir, "/", command);
    if (IsExecutableFile(candidate)) return candidate;
  }
  tried.push_back("PATH");
  return absl::NotFoundError(absl::StrCat("worker command '", command,
                                          "' not found (looked next to the "
                                          "agent binary and in PATH)"));
}

absl::StatusOr<Credentials> ResolveCredentials(const std::string& user,
                                               const std::string& group) {
  Credentials out;
  std::vector<char> buf(16384);
  passwd pw{};
  passwd* found = nullptr;
  uint32_t numeric;
  if (absl::SimpleAtoi(user, &numeric)) {
    ::getpwuid_r(numeric, &pw, buf.data(), buf.size(), &found);
    out.uid = numeric;
    out.gid = found ? found->pw_gid : numeric;
  } else {
    ::getpwnam_r(user.c_str(), &pw, buf.data(), buf.size(), &found);
    if (found == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("worker.user: no such user '", user, "'"));
    }
    out.uid = found->pw_uid;
    out.gid = found->pw_gid;
  }
  out.user = found ? found->pw_name : user;
  out.home = found ? found->pw_dir : "/";
  if (!group.empty()) {
    std::vector<char> gbuf(16384);
    struct group gr {};
    struct group* gfound = nullptr;
    if (absl::SimpleAtoi(group, &numeric)) {
      out.gid = numeric;
    } else {
      ::getgrnam_r(group.c_str(), &gr, gbuf.data(), gbuf.size(), &gfound);
      if (gfound == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("worker.group: no such group '", group, "'"));
      }
      out.gid = gfound->gr_gid;
    }
  }
  out.groups.push_back(out.gid);
  if (found != nullptr) {
    int n = 64;
    std::vector<gid_t> groups(n);
    if (::getgrouplist(found->pw_name, out.gid, groups.data(), &n) < 0) {
      groups.resize(n);
      ::getgrouplist(found->pw_name, out.gid, groups.data(), &n);
    }
    groups.resize(n);
    out.groups = groups;
  }
  return out;
}

absl::StatusOr<LaunchedProcess> RealProcessLauncher::Launch(
    const LaunchSpec& spec) {
  // listen_fd < 0: a self-bound worker (binds its own socket): no fd 3, no
  // LISTEN_PID.
  const bool activated = spec.listen_fd >= 0;
  // Everything the child touches is prepared before fork: after fork only
  // async-signal-safe calls are allowed (the agent has gRPC threads).
  std::vector<char*> argv;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  char listen_pid[32] = "LISTEN_PID=";
  constexpr size_t kPidOffset = sizeof("LISTEN_PID=") - 1;
  std::vector<char*> envp;
  for (const auto& e : spec.env) {
    if (e.rfind("LISTEN_PID=", 0) == 0) continue;
    envp.push_back(const_cast<char*>(e.c_str()));
  }
  if (activated) envp.push_back(listen_pid);
  envp.push_back(nullptr);
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  if (spec.cpu >= 0) CPU_SET(spec.cpu, &cpus);

  // Capabilities the running kernel knows (to empty the bounding set).
  int last_cap = 63;
  if (std::FILE* f = std::fopen("/proc/sys/kernel/cap_last_cap", "r")) {
    if (std::fscanf(f, "%d", &last_cap) != 1) last_cap = 63;
    std::fclose(f);
  }

  int err_pipe[2];
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe2");
  Fd err_read(err_pipe[0]);
  Fd err_write(err_pipe[1]);

  pid_t pid = ::fork();
  if (pid < 0) return ErrnoError("fork");
  if (pid == 0) {
    // Only async-signal-safe calls from here on. A failure is reported as
    // {stage, errno} on the error pipe (fd 5 once placed).
    int report_fd = err_write.get();
    auto fail = [&](ChildStage stage, int err) {
      int msg[2] = {static_cast<int>(stage), err};
      ssize_t unused = ::write(report_fd, msg, sizeof(msg));
      (void)unused;
      ::_exit(127);
    };
    // Own process group: a terminal's Ctrl-C reaches the agent, which then
    // stops the workers in order; a stop signals the whole group.
    ::setpgid(0, 0);
    sigset_t all;
    sigemptyset(&all);
    ::sigprocmask(SIG_SETMASK, &all, nullptr);
    for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
    if (spec.cpu >= 0 && ::sched_setaffinity(0, sizeof(cpus), &cpus) != 0) {
      fail(ChildStage::kAffinity, errno);
    }
    // Park the fds above the target range 3-5, then place them.
    int lfd = activated ? ::fcntl(spec.listen_fd, F_DUPFD, 6) : -1;
    int cfd = spec.control_fd >= 0 ? ::fcntl(spec.control_fd, F_DUPFD, 6) : -1;
    int efd = ::fcntl(err_write.get(), F_DUPFD_CLOEXEC, 6);
    if ((activated && lfd < 0) || (spec.control_fd >= 0 && cfd < 0) ||
        efd < 0) {
      fail(ChildStage::kPark, errno);
    }
    if (::dup3(efd, 5, O_CLOEXEC) < 0) fail(ChildStage::kErrorFd, errno);
    report_fd = 5;
    if (lfd >= 0) {
      if (::dup2(lfd, 3) < 0) fail(ChildStage::kListenFd, errno);
    } else {
      ::close(3);
    }
    if (cfd >= 0) {
      if (::dup2(cfd, 4) < 0) fail(ChildStage::kControlFd, errno);
    } else {
      ::close(4);
    }
    ::syscall(SYS_close_range, 6, ~0U, 0);
    if (spec.credentials) {
      const Credentials& c = *spec.credentials;
      if (::setgroups(c.groups.size(), c.groups.data()) != 0) {
        fail(ChildStage::kSetgroups, errno);
      }
      if (::setgid(c.gid) != 0) fail(ChildStage::kSetgid, errno);
      if (::setuid(c.uid) != 0) fail(ChildStage::kSetuid, errno);
    }
    // Workers parse untrusted traffic: no capability at all (also after an
    // exec as root: the bounding set is empty) and no way to gain one.
    for (int cap = 0; cap <= last_cap; ++cap) {
      if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL &&
          errno != EPERM) {
        fail(ChildStage::kCapabilities, errno);
      }
    }
    ::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct none[2] = {};
    if (::syscall(SYS_capset, &header, none) != 0) {
      fail(ChildStage::kCapabilities, errno);
    }
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
      fail(ChildStage::kNoNewPrivs, errno);
    }
    FormatPid(::getpid(), listen_pid + kPidOffset);
    ::execve(spec.path.c_str(), argv.data(), envp.data());
    fail(ChildStage::kExec, errno);
  }
  err_write.Reset();
  int report[2] = {0, 0};
  ssize_t n;
  do {
    n = ::read(err_read.get(), report, sizeof(report));
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    int st;
    ::waitpid(pid, &st, 0);
    if (n != sizeof(report)) {
      return absl::InternalError("the new worker process failed to start");
    }
    return ErrnoError(report[1],
                      StageText(static_cast<ChildStage>(report[0]), spec.path));
  }
  LaunchedProcess out;
  out.pid = pid;
  out.pidfd = Fd(PidfdOpen(pid));
  if (!out.pidfd) {
    int err = errno;
    ::kill(pid, SIGKILL);
    int st;
    ::waitpid(pid, &st, 0);
    return ErrnoError(err, "pidfd_open (needs Linux 5.3+)");
  }
  return out;
}

bool RealProcessLauncher::Signal(const LaunchedProcess& process, int sig) {
  bool sent = ::syscall(SYS_pidfd_send_signal, process.pidfd.get(), sig,
                        nullptr, 0) == 0;
  // The worker's process group too (it is the group's leader, see Launch):
  // a pre-fork server's children must not outlive a stop. A group id stays
  // reserved while any member lives, so this never reaches strangers.
  if (process.pid > 0) ::kill(-process.pid, sig);
  return sent;
}

// A process group id is not handed out again while any process of the group
// lives (the kernel keeps the number reserved), so a group found alive is the
// worker's own.
bool RealProcessLauncher::GroupAlive(pid_t pgid) {
  if (pgid <= 1) return false;
  if (::kill(-pgid, 0) != 0 && errno != EPERM) return false;
  // kill() also finds zombies, which wait for whoever reaps orphans (PID 1,
  // or a subreaper that may be slow or never do it): only a member that
  // still runs counts.
  std::map<pid_t, ProcIds> procs = ProcessTable();
  if (procs.empty()) return true;  // /proc unreadable: trust kill()
  for (const auto& entry : procs) {
    const ProcIds& ids = entry.second;
    if (ids.pgid == pgid && ids.state != 'Z' && ids.state != 'X') return true;
  }
  return false;
}

bool RealProcessLauncher::SignalGroup(pid_t pgid, int sig) {
  if (pgid <= 1) return false;
  return ::kill(-pgid, sig) == 0;
}

bool RealProcessLauncher::KillProcess(pid_t pid) {
  Fd pidfd(PidfdOpen(pid));
  if (!pidfd) return false;
  return ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0) ==
         0;
}

absl::StatusOr<std::optional<int>> RealProcessLauncher::Reap(
    const LaunchedProcess& process) {
  siginfo_t info{};
  if (::waitid(static_cast<idtype_t>(P_PIDFD),
               static_cast<id_t>(process.pidfd.get()), &info,
               WEXITED | WNOHANG) != 0) {
    return ErrnoError(absl::StrCat("waitid(pid ", process.pid, ")"));
  }
  if (info.si_pid == 0) return std::nullopt;
  if (info.si_code == CLD_EXITED) return W_EXITCODE(info.si_status, 0);
  return info.si_status | (info.si_code == CLD_DUMPED ? 0x80 : 0);
}

absl::Status RealProcessLauncher::SetAffinity(const LaunchedProcess& process,
                                              const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  if (::sched_setaffinity(process.pid, sizeof(set), &set) != 0) {
    if (errno == ESRCH) {
      return absl::NotFoundError(absl::StrCat("pid ", process.pid, " is gone"));
    }
    return ErrnoError(absl::StrCat("sched_setaffinity(pid ", process.pid, ")"));
  }
  return absl::OkStatus();
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) {
    return absl::StrCat("exited with status ", WEXITSTATUS(status));
  }
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* abbrev = sigabbrev_np(sig);
    return absl::StrCat("killed by signal ", sig, " (SIG",
                        abbrev ? abbrev : "?", ")",
                        WCOREDUMP(status) ? ", core dumped" : "");
  }
  return absl::StrCat("ended with wait status ", status);
}

}  // namespace portfleet
