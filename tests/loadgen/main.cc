// portfleet-loadgen: see Usage() in loadgen.cc.
#include <iostream>
#include <string>
#include <vector>

#include "tests/loadgen/loadgen.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  absl::StatusOr<portfleet::loadgen::Options> options =
      portfleet::loadgen::ParseArgs(args);
  if (!options.ok()) {
    if (absl::IsCancelled(options.status())) {
      std::cout << portfleet::loadgen::Usage();
      return 0;
    }
    std::cerr << "portfleet-loadgen: " << options.status().message() << "\n";
    return 2;
  }
  absl::StatusOr<portfleet::loadgen::Result> result =
      portfleet::loadgen::Run(*options);
  if (!result.ok()) {
    std::cerr << "portfleet-loadgen: " << result.status().message() << "\n";
    return 2;
  }
  if (!options->quiet) std::cout << result->Summary() << std::endl;
  return result->requests > 0 && result->failures() == 0 ? 0 : 1;
}
