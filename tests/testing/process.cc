#include "tests/testing/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/status.h"

extern char** environ;

namespace portfleet::testing {

std::string BinaryPath(const std::string& name) {
  for (const char* dir : {"agent", "worker", "ctl", "tests", ""}) {
    std::string path = absl::StrCat(PORTFLEET_BINARY_DIR, "/", dir, "/", name);
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return absl::StrCat(PORTFLEET_BINARY_DIR, "/", name);
}

TempDir::TempDir() {
  std::string tmpl = "/tmp/portfleet-test-XXXXXX";
  char* p = ::mkdtemp(tmpl.data());
  path_ = p ? p : "/tmp";
  ::chmod(path_.c_str(), 0755);
}

TempDir::~TempDir() {
  std::error_code ec;
  if (path_ != "/tmp") std::filesystem::remove_all(path_, ec);
}

std::string TempDir::WriteFile(const std::string& name,
                               const std::string& contents) const {
  std::string full = absl::StrCat(path_, "/", name);
  std::ofstream out(full, std::ios::trunc);
  out << contents;
  return full;
}

Subprocess::~Subprocess() {
  if (pid_ > 0 && !status_) {
    ::kill(pid_, SIGKILL);
    int st;
    ::waitpid(pid_, &st, 0);
  }
}

Subprocess::Subprocess(Subprocess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      status_(std::exchange(other.status_, std::nullopt)),
      log_path_(std::move(other.log_path_)) {}

Subprocess& Subprocess::operator=(Subprocess&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      int st;
      ::waitpid(pid_, &st, 0);
    }
    pid_ = std::exchange(other.pid_, -1);
    status_ = std::exchange(other.status_, std::nullopt);
    log_path_ = std::move(other.log_path_);
  }
  return *this;
}

absl::Status Subprocess::Start(const std::vector<std::string>& argv,
                               const std::string& log_path,
                               const std::vector<std::string>& env) {
  log_path_ = log_path;
  int log =
      ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log < 0) return ErrnoError(absl::StrCat("open ", log_path));
  std::vector<std::string> envs;
  for (char** e = environ; *e; ++e) envs.emplace_back(*e);
  for (const auto& e : env) envs.push_back(e);
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  for (const auto& e : envs) cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log);
    return ErrnoError("fork");
  }
  if (pid == 0) {
    ::dup2(log, 1);
    ::dup2(log, 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    ::execve(cargv[0], cargv.data(), cenv.data());
    ::dprintf(2, "exec %s: %s\n", cargv[0], strerror(errno));
    ::_exit(127);
  }
  ::close(log);
  pid_ = pid;
  status_.reset();
  return absl::OkStatus();
}

bool Subprocess::running() {
  if (pid_ <= 0 || status_) return false;
  int st;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    status_ = st;
    return false;
  }
  return true;
}

void Subprocess::Signal(int sig) {
  if (running()) ::kill(pid_, sig);
}

std::optional<int> Subprocess::Wait(absl::Duration timeout) {
  if (status_) return status_;
  if (pid_ <= 0) return std::nullopt;
  WaitFor([&] { return !running(); }, timeout);
  return status_;
}

std::string Subprocess::Log() const { return ReadFileOrEmpty(log_path_); }

bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (absl::Now() >= deadline) return pred();
    absl::SleepFor(absl::Milliseconds(20));
  }
}

std::vector<pid_t> ChildrenOf(pid_t pid) {
  std::vector<pid_t> out;
  std::string task_dir = absl::StrCat("/proc/", pid, "/task");
  DIR* dir = ::opendir(task_dir.c_str());
  if (!dir) return out;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::string text =
        ReadFileOrEmpty(absl::StrCat(task_dir, "/", e->d_name, "/children"));
    for (absl::string_view tok :
         absl::StrSplit(text, ' ', absl::SkipWhitespace())) {
      int child;
      if (absl::SimpleAtoi(tok, &child)) out.push_back(child);
    }
  }
  ::closedir(dir);
  return out;
}

std::vector<pid_t> DescendantsOf(pid_t pid) {
  std::vector<pid_t> out;
  for (pid_t child : ChildrenOf(pid)) {
    out.push_back(child);
    for (pid_t d : DescendantsOf(child)) out.push_back(d);
  }
  return out;
}

::testing::AssertionResult ExitedWith(int wait_status, int code) {
  if (WIFEXITED(wait_status)) {
    if (WEXITSTATUS(wait_status) == code) {
      return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure()
           << "exited with status " << WEXITSTATUS(wait_status) << ", want "
           << code;
  }
  if (WIFSIGNALED(wait_status)) {
    return ::testing::AssertionFailure()
           << "killed by signal " << WTERMSIG(wait_status) << " ("
           << strsignal(WTERMSIG(wait_status)) << "), want exit status "
           << code;
  }
  return ::testing::AssertionFailure()
         << "wait status " << wait_status << " is not an exit, want " << code;
}

bool ProcessExists(pid_t pid) {
  std::string stat = ReadFileOrEmpty(absl::StrCat("/proc/", pid, "/stat"));
  if (stat.empty()) return false;
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
  char state = stat[paren + 2];
  return state != 'Z' && state != 'X';
}

absl::StatusOr<uint64_t> SocketInode(pid_t pid, int fd) {
  std::string link = absl::StrCat("/proc/", pid, "/fd/", fd);
  char buf[256];
  ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf) - 1);
  if (n < 0) return ErrnoError(absl::StrCat("readlink ", link));
  std::string target(buf, n);
  uint64_t inode;
  if (target.rfind("socket:[", 0) != 0 ||
      !absl::SimpleAtoi(target.substr(8, target.size() - 9), &inode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(link, " is not a socket: ", target));
  }
  return inode;
}

int CountFds(pid_t pid) {
  int count = 0;
  std::string path = absl::StrCat("/proc/", pid, "/fd");
  DIR* dir = ::opendir(path.c_str());
  if (!dir) return -1;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') count++;
  }
  ::closedir(dir);
  return count;
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int CountOccurrences(const std::string& haystack, const std::string& needle) {
  if (needle.empty()) return 0;
  int count = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos;
       pos = haystack.find(needle, pos + needle.size())) {
    count++;
  }
  return count;
}

}  // namespace portfleet::testing
