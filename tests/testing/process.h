// Test-side process control: start real binaries, read their logs, find
// their children, wait with deadlines.
#ifndef PORTFLEET_TESTS_TESTING_PROCESS_H_
#define PORTFLEET_TESTS_TESTING_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace portfleet::testing {

// Path of a binary built by this project, e.g. BinaryPath("portfleet-agent").
std::string BinaryPath(const std::string& name);

// A fresh temporary directory, removed (recursively) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  // Writes `contents` to path()/name and returns the full path.
  std::string WriteFile(const std::string& name,
                        const std::string& contents) const;

 private:
  std::string path_;
};

// A child process whose stdout+stderr go to a log file. The destructor
// SIGKILLs and reaps it if still running.
class Subprocess {
 public:
  Subprocess() = default;
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  // Moves the child (and the duty to reap it); a process already held by
  // the target is killed and reaped first, as the destructor does.
  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;

  // argv[0] is the program path. `env` entries ("K=V") are added to the
  // current environment.
  absl::Status Start(const std::vector<std::string>& argv,
                     const std::string& log_path,
                     const std::vector<std::string>& env = {});
  pid_t pid() const { return pid_; }
  bool running();
  void Signal(int sig);
  // Waits for exit; returns the wait status, or nullopt on timeout.
  std::optional<int> Wait(absl::Duration timeout);
  std::string Log() const;  // everything written so far
  const std::string& log_path() const { return log_path_; }

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
  std::string log_path_;
};

// Polls `pred` every 20 ms until true or `timeout`; returns the last value.
bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout);

// Direct children of `pid` (from /proc/PID/task/*/children).
std::vector<pid_t> ChildrenOf(pid_t pid);
// Every descendant of `pid`, depth first.
std::vector<pid_t> DescendantsOf(pid_t pid);
bool ProcessExists(pid_t pid);  // alive and not a zombie
// Inode of the socket behind /proc/PID/fd/FD, or an error.
absl::StatusOr<uint64_t> SocketInode(pid_t pid, int fd);
// Number of open fds of a process.
int CountFds(pid_t pid);
// Whole file, or "" if unreadable.
std::string ReadFileOrEmpty(const std::string& path);
// Count of non-overlapping occurrences of `needle` in `haystack`.
int CountOccurrences(const std::string& haystack, const std::string& needle);

// Success when a wait status says the process exited normally with `code`;
// a process killed by a signal is a failure naming the signal (WEXITSTATUS
// alone reads 0 for a SIGKILLed process).
::testing::AssertionResult ExitedWith(int wait_status, int code);

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_TESTING_PROCESS_H_
