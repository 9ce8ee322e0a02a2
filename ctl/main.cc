// portfleetctl: thin main() around portfleet::ctl::Run.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "ctl/ctl.h"

namespace {

std::atomic<bool> g_interrupted{false};

void OnSignal(int) { g_interrupted.store(true); }

}  // namespace

int main(int argc, char** argv) {
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  portfleet::ctl::CtlEnv env;
  env.out = &std::cout;
  env.in = &std::cin;
  env.err = &std::cerr;
  env.getenv = [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
  env.interrupted = &g_interrupted;
  env.input_fd = isatty(STDIN_FILENO) ? STDIN_FILENO : -1;
  env.terminal = isatty(STDOUT_FILENO);
  std::vector<std::string> args(argv + 1, argv + argc);
  int code = portfleet::ctl::Run(env, args);
  std::cout.flush();
  return code;
}
