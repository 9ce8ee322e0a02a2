// portfleetctl: the command-line client of the agent's FleetService.
//
//   portfleetctl [global flags] COMMAND [ARGS] [flags]
//
// The commands, their flags, help, examples and output formats are one table
// (ctl/commands.h); --help, the man page and shell completion are generated
// from it. Everything but main() lives in this library so that tests run
// commands in-process: Run() takes the arguments (without argv[0]) and a
// CtlEnv that carries the streams and the environment.
#ifndef PORTFLEET_CTL_CTL_H_
#define PORTFLEET_CTL_CTL_H_

#include <atomic>
#include <functional>
#include <istream>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace portfleet::ctl {

// Exit codes (documented in --help, the man page and the README).
inline constexpr int kExitOk = 0;
// The agent returned an error, or `health` is not SERVING.
inline constexpr int kExitAgentError = 1;
// Bad command line, flag value or input file; nothing was sent.
inline constexpr int kExitUsage = 2;
// No agent answers at --server (no socket, connection refused, TLS
// handshake failed, connection lost).
inline constexpr int kExitUnreachable = 3;
// The API socket exists but this user may not connect to it (EACCES): run
// as root or as a member of the agent's --api-group.
inline constexpr int kExitPermissionDenied = 4;
// The agent answered that it is shutting down (UNAVAILABLE); retry once it,
// or the agent taking over from it, serves.
inline constexpr int kExitShuttingDown = 5;

inline constexpr char kDefaultServer[] = "unix:///run/portfleet/api.sock";

struct CtlEnv {
  std::ostream* out = nullptr;  // results
  std::ostream* err = nullptr;  // errors, once, as "portfleetctl: <message>"
  // Standard input, for `apply -f -`; null = none.
  std::istream* in = nullptr;
  // Environment lookup (PORTFLEET_SERVER, PORTFLEET_TLS_*); null = no
  // environment.
  std::function<std::optional<std::string>(const std::string&)> getenv;
  // Set (by a SIGINT handler) to stop `events`, `top` and watches; may be
  // null.
  const std::atomic<bool>* interrupted = nullptr;
  // File descriptor `top` reads keys from ('q' quits) when it is a terminal;
  // -1 = none.
  int input_fd = -1;
  // Clear the screen between `top` refreshes.
  bool terminal = false;
};

// Runs one command line; returns the exit code.
int Run(const CtlEnv& env, const std::vector<std::string>& args);

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_CTL_H_
