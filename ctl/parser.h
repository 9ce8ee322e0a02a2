// The walk over a command line that ParseArgs and shell completion share.
//
// Leading words select the command (the longest match: "get shards");
// flags may come anywhere after the program name, but a command's own flags
// only once its words are complete (its short flags are its own: -f is
// apply's --filename and events' --follow). "--" ends the flags.
#ifndef PORTFLEET_CTL_PARSER_H_
#define PORTFLEET_CTL_PARSER_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "ctl/command.h"

namespace portfleet::ctl {

class CommandLineParser {
 public:
  // Lenient: unknown flags and bad values are skipped, not errors, and a
  // value flag at the end is left pending (for completion).
  explicit CommandLineParser(bool lenient) : lenient_(lenient) {}

  // Walks `args`; a usage error unless lenient. Leaves the command
  // unresolved while the words so far could still grow into a longer one.
  absl::Status Walk(const std::vector<std::string>& args);
  // Resolves the command from the words walked (at the end of the line).
  void Finish();

  bool resolved() const { return resolved_; }
  // The words walked while unresolved.
  const std::vector<std::string>& words() const { return words_; }
  // The flag whose value the line ends waiting for (lenient only).
  const FlagSpec* pending() const { return pending_; }
  Invocation& invocation() { return inv_; }

 private:
  void Resolve();
  void Positional(const std::string& arg);
  // The flag `args[*i]` (and its value, which may advance *i).
  absl::Status Flag(const std::vector<std::string>& args, size_t* i);
  absl::Status Store(const FlagSpec& flag, bool global,
                     const std::string& value);

  const bool lenient_;
  Invocation inv_;
  std::vector<std::string> words_;
  bool resolved_ = false;
  const FlagSpec* pending_ = nullptr;
};

// The flag that `spelling` ("--name" or "-x") names in `flags`; null if none.
const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags,
                         absl::string_view spelling);

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_PARSER_H_
