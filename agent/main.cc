#include <string>
#include <vector>

#include "agent/agent.h"
#include "agent/options.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  portfleet::ParsedArgs parsed = portfleet::ParseAgentArgs(args);
  if (parsed.exit_now) return parsed.exit_code;
  return portfleet::RunAgent(parsed.options);
}
