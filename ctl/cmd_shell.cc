// For shells and manuals: completion scripts, the man page, and the hidden
// __complete command the scripts call.
#include "absl/time/time.h"
#include "ctl/command.h"
#include "ctl/help.h"

namespace portfleet::ctl {
namespace {

absl::Status RunCompletion(Context& ctx) {
  ctx.out() << CompletionScript(ctx.arg(0));
  return absl::OkStatus();
}

absl::Status RunMan(Context& ctx) {
  ctx.out() << ManPage();
  return absl::OkStatus();
}

// Listener names for completion, from the agent the command line names;
// none when it does not answer within a second.
std::vector<std::string> ListenerNames(const CtlEnv& env,
                                       const GlobalOptions& global) {
  Invocation inv;
  for (const CommandSpec& c : Commands()) {
    if (c.name == "get listeners") inv.command = &c;
  }
  inv.global = global;
  inv.global.timeout = absl::Seconds(1);
  Context ctx(env, std::move(inv));
  absl::StatusOr<v1::ListListenersResponse> resp = ctx.Call(
      &v1::FleetService::Stub::ListListeners, v1::ListListenersRequest());
  std::vector<std::string> names;
  if (!resp.ok()) return names;
  for (const v1::ListenerState& l : resp->listeners()) {
    names.push_back(l.spec().name());
  }
  return names;
}

absl::Status RunComplete(Context& ctx) {
  std::vector<std::string> words = ctx.args();
  if (words.empty()) words.push_back("");
  for (const std::string& line :
       CompletionCandidates(words, [&](const GlobalOptions& global) {
         return ListenerNames(ctx.env(), global);
       })) {
    ctx.out() << line << "\n";
  }
  return absl::OkStatus();
}

}  // namespace

void AddShellCommands(std::vector<CommandSpec>* commands) {
  commands->push_back({
      .name = "completion",
      .args = "bash|zsh",
      .min_args = 1,
      .max_args = 1,
      .arg_choices = {"bash", "zsh"},
      .section = Section::kTool,
      .summary = "shell completion script",
      .description =
          "Prints a completion script for bash or zsh. It completes commands,\n"
          "flags, flag values and listener names (asked of the agent that\n"
          "--server names).\n",
      .examples = {{"bash, for this shell",
                    "source <(portfleetctl completion bash)"},
                   {"zsh, for every shell",
                    "portfleetctl completion zsh > "
                    "\"${fpath[1]}/_portfleetctl\""}},
      .run = RunCompletion,
  });
  commands->push_back({
      .name = "man",
      .section = Section::kTool,
      .summary = "the manual page, portfleetctl(1)",
      .description =
          "Prints the manual page in man(7) format. The build also writes it\n"
          "to build/ctl/portfleetctl.1.\n",
      .examples = {{"", "portfleetctl man | man -l -"}},
      .run = RunMan,
  });
  commands->push_back({
      .name = "__complete",
      .args = "-- WORDS...",
      .min_args = 0,
      .max_args = -1,
      .section = Section::kTool,
      .summary = "completion candidates (called by the completion scripts)",
      .description = "Prints what may follow WORDS, one candidate a line.\n",
      .examples = {{"", "portfleetctl __complete -- get sh"}},
      .hidden = true,
      .run = RunComplete,
  });
}

}  // namespace portfleet::ctl
