// Everything generated from the command table for people and shells: the
// usage text, each command's --help, the man page, the completion scripts and
// the completion candidates they ask for.
#ifndef PORTFLEET_CTL_HELP_H_
#define PORTFLEET_CTL_HELP_H_

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "ctl/command.h"

namespace portfleet::ctl {

// `portfleetctl --help`.
void PrintUsage(std::ostream& out);
// `portfleetctl get --help`: the commands that begin with `words`.
void PrintGroupHelp(std::ostream& out, const std::vector<std::string>& words);
// `portfleetctl COMMAND --help`.
void PrintCommandHelp(std::ostream& out, const CommandSpec& command);
// "get shards NAME" plus the required flags ("scale NAME --shards N").
std::string Synopsis(const CommandSpec& command);
// The commands that begin with `words` (for "get" with no resource).
std::vector<const CommandSpec*> CommandsUnder(
    const std::vector<std::string>& words);

// portfleetctl(1) in man(7) format.
std::string ManPage();

// The completion script for "bash" or "zsh". Both call
// `portfleetctl __complete -- WORDS...` and offer what it prints.
std::string CompletionScript(absl::string_view shell);

// What may come next on a command line: `words` are the words after the
// program name, the last one being completed (possibly empty). One candidate
// a line, "word" or "word\tdescription"; the single line ":file" asks the
// shell for file names. `listeners` returns the listener names (asked only
// when a NAME is to be completed).
std::vector<std::string> CompletionCandidates(
    const std::vector<std::string>& words,
    const std::function<std::vector<std::string>(const GlobalOptions&)>&
        listeners);

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_HELP_H_
