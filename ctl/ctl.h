// portfleetctl: the command-line client of the agent's FleetService.
//
//   portfleetctl [--server ADDR] [-o table|json] [--timeout DURATION]
//                [--tls-cert FILE --tls-key FILE [--tls-ca FILE]] COMMAND
//
// A HOST:PORT server is reached with TLS when any --tls-* flag (or
// PORTFLEET_TLS_CERT, PORTFLEET_TLS_KEY, PORTFLEET_TLS_CA) is set, presenting
// the client certificate the agent's remote listener requires.
//
// Everything but main() lives here so that tests run commands in-process:
// Run() takes the arguments (without argv[0]) and a CtlEnv that carries the
// output streams and the environment.
//
// Exit codes: 0 ok, 1 the agent returned an error (or reports NOT_SERVING for
// `health`), 2 usage error, 3 the agent is unreachable.
#ifndef PORTFLEET_CTL_CTL_H_
#define PORTFLEET_CTL_CTL_H_

#include <atomic>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace portfleet::ctl {

inline constexpr int kExitOk = 0;
inline constexpr int kExitAgentError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitUnreachable = 3;

inline constexpr char kDefaultServer[] = "unix:///run/portfleet/api.sock";

struct CtlEnv {
  std::ostream* out = nullptr;  // results
  std::ostream* err = nullptr;  // errors, once, as "portfleetctl: <message>"
  // Environment lookup (PORTFLEET_SERVER, PORTFLEET_TLS_*); null = no
  // environment.
  std::function<std::optional<std::string>(const std::string&)> getenv;
  // Set (by a SIGINT handler) to stop `events` and `top`; may be null.
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
