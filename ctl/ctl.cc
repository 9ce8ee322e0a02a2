// Run: parse the command line against the command table, print help, or run
// the command and print its error once.
#include "ctl/ctl.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ctl/command.h"
#include "ctl/errors.h"
#include "ctl/help.h"

namespace portfleet::ctl {
namespace {

int Report(const CtlEnv& env, const absl::Status& status,
           const CommandSpec* command) {
  *env.err << "portfleetctl: " << status.message() << "\n";
  if (IsUsageError(status)) {
    *env.err << "Run 'portfleetctl"
             << (command != nullptr ? " " + command->name : std::string())
             << " --help' for usage.\n";
  }
  return ExitCodeOf(status);
}

// No complete command: help for what was typed, or a usage error.
int NoCommand(const CtlEnv& env, const Invocation& inv) {
  const bool group = !inv.words.empty() && !CommandsUnder(inv.words).empty();
  if (inv.global.help) {
    if (group) {
      PrintGroupHelp(*env.out, inv.words);
    } else {
      PrintUsage(*env.out);
    }
    return kExitOk;
  }
  if (inv.words.empty()) {
    PrintUsage(*env.err);
    return Report(env, UsageError("no command given"), nullptr);
  }
  if (group) {
    std::vector<std::string> next;
    for (const CommandSpec* c : CommandsUnder(inv.words)) {
      next.push_back(Synopsis(*c));
    }
    std::string what = absl::StrJoin(inv.words, " ");
    if (!inv.args.empty()) {
      return Report(env,
                    UsageError(absl::StrCat("unknown command \"", what, " ",
                                            inv.args[0], "\"; did you mean ",
                                            absl::StrJoin(next, " | "), "?")),
                    nullptr);
    }
    return Report(env,
                  UsageError(absl::StrCat("\"", what, "\" needs more: ",
                                          absl::StrJoin(next, " | "))),
                  nullptr);
  }
  return Report(env,
                UsageError(absl::StrCat("unknown command \"",
                                        absl::StrJoin(inv.words, " "), "\"")),
                nullptr);
}

}  // namespace

int Run(const CtlEnv& env, const std::vector<std::string>& args) {
  absl::StatusOr<Invocation> inv = ParseArgs(args);
  if (!inv.ok()) return Report(env, inv.status(), nullptr);
  if (inv->command == nullptr) return NoCommand(env, *inv);
  const CommandSpec* command = inv->command;
  if (inv->global.help) {
    PrintCommandHelp(*env.out, *command);
    return kExitOk;
  }
  if (absl::Status s = ValidateInvocation(*inv); !s.ok()) {
    return Report(env, s, command);
  }
  Context ctx(env, *std::move(inv));
  absl::Status s = command->run(ctx);
  env.out->flush();
  if (!s.ok()) return Report(env, s, command);
  return kExitOk;
}

}  // namespace portfleet::ctl
