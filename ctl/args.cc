// The command line against the command table (see parser.h).
#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "ctl/command.h"
#include "ctl/parser.h"

namespace portfleet::ctl {
namespace {

std::vector<std::string> Words(const CommandSpec& c) {
  return absl::StrSplit(c.name, ' ');
}

// Some command's words start with `words`.
bool IsCommandPrefix(const std::vector<std::string>& words) {
  for (const CommandSpec& c : Commands()) {
    std::vector<std::string> w = Words(c);
    if (w.size() >= words.size() &&
        std::equal(words.begin(), words.end(), w.begin())) {
      return true;
    }
  }
  return false;
}

std::string Spelling(const FlagSpec& f) { return absl::StrCat("--", f.name); }

absl::Status SetGlobal(const FlagSpec& f, const std::string& value,
                       GlobalOptions* g) {
  if (f.name == "server") {
    g->server = value;
  } else if (f.name == "tls-cert") {
    g->tls_cert = value;
  } else if (f.name == "tls-key") {
    g->tls_key = value;
  } else if (f.name == "tls-ca") {
    g->tls_ca = value;
  } else if (f.name == "no-headers") {
    g->no_headers = value == "true";
  } else if (f.name == "help") {
    g->help = value == "true";
  } else if (f.name == "output") {
    std::optional<Format> format = ParseFormat(value);
    if (!format.has_value()) {
      return UsageError(absl::StrCat("-o: '", value, "' is not one of ",
                                     absl::StrJoin(f.choices, ", ")));
    }
    g->output = format;
  } else if (f.name == "timeout") {
    absl::Duration d;
    if (!absl::ParseDuration(value, &d) || d <= absl::ZeroDuration()) {
      return UsageError(absl::StrCat("--timeout: bad duration '", value,
                                     "' (e.g. 10s, 500ms)"));
    }
    g->timeout = d;
  }
  return absl::OkStatus();
}

}  // namespace

const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags,
                         absl::string_view spelling) {
  for (const FlagSpec& f : flags) {
    if (absl::StartsWith(spelling, "--") && spelling.substr(2) == f.name) {
      return &f;
    }
    if (f.short_name != 0 && spelling.size() == 2 && spelling[0] == '-' &&
        spelling[1] == f.short_name) {
      return &f;
    }
  }
  return nullptr;
}

void CommandLineParser::Resolve() {
  // The longest command whose words begin `words_`; the rest are arguments.
  resolved_ = true;
  size_t best = 0;
  for (const CommandSpec& c : Commands()) {
    std::vector<std::string> w = Words(c);
    if (w.size() > best && w.size() <= words_.size() &&
        std::equal(w.begin(), w.end(), words_.begin())) {
      inv_.command = &c;
      best = w.size();
    }
  }
  if (inv_.command == nullptr) {
    inv_.words = words_;
    return;
  }
  inv_.words.assign(words_.begin(), words_.begin() + best);
  inv_.args.assign(words_.begin() + best, words_.end());
}

void CommandLineParser::Finish() {
  if (!resolved_) Resolve();
}

void CommandLineParser::Positional(const std::string& arg) {
  if (resolved_) {
    inv_.args.push_back(arg);
    return;
  }
  std::vector<std::string> candidate = words_;
  candidate.push_back(arg);
  if (IsCommandPrefix(candidate)) {
    words_ = std::move(candidate);
  } else if (words_.empty()) {
    words_.push_back(arg);
    Resolve();
  } else {
    Resolve();
    inv_.args.push_back(arg);
  }
}

absl::Status CommandLineParser::Store(const FlagSpec& flag, bool global,
                                      const std::string& value) {
  if (global) {
    absl::Status s = SetGlobal(flag, value, &inv_.global);
    return lenient_ ? absl::OkStatus() : s;
  }
  std::vector<std::string>& values = inv_.flags[flag.name];
  if (!flag.repeated) values.clear();
  values.push_back(value);
  return absl::OkStatus();
}

absl::Status CommandLineParser::Flag(const std::vector<std::string>& args,
                                     size_t* i) {
  const std::string& a = args[*i];
  if (!resolved_ && !words_.empty()) Resolve();
  std::string spelling = a;
  std::optional<std::string> value;
  if (size_t eq = a.find('='); eq != std::string::npos) {
    spelling = a.substr(0, eq);
    value = a.substr(eq + 1);
  }
  const FlagSpec* flag = FindFlag(GlobalFlags(), spelling);
  const bool global = flag != nullptr;
  if (flag == nullptr && inv_.command != nullptr) {
    flag = FindFlag(inv_.command->flags, spelling);
  }
  if (flag == nullptr) {
    // An unknown command is reported as such, not by its flags.
    if (lenient_ || (inv_.command == nullptr && !inv_.words.empty())) {
      return absl::OkStatus();
    }
    // The agent's flag for its API address is --api; here it is --server.
    const std::string hint = spelling == "--api"
                                 ? " (the agent's API address is --server here)"
                                 : "";
    return UsageError(inv_.command != nullptr
                          ? absl::StrCat(inv_.command->name, ": unknown flag ",
                                         spelling, hint)
                          : absl::StrCat("unknown flag ", spelling, hint));
  }
  if (flag->value.empty()) {
    if (value.has_value() && *value != "true" && *value != "false") {
      if (lenient_) return absl::OkStatus();
      return UsageError(
          absl::StrCat(Spelling(*flag), " takes no value (or =true, =false)"));
    }
    value = value.value_or("true");
  } else if (!value.has_value()) {
    if (*i + 1 >= args.size()) {
      if (lenient_) {
        pending_ = flag;
        return absl::OkStatus();
      }
      return UsageError(absl::StrCat("flag ", spelling, " needs a value (",
                                     flag->value, ")"));
    }
    value = args[++*i];
  }
  return Store(*flag, global, *value);
}

absl::Status CommandLineParser::Walk(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") {
      for (++i; i < args.size(); ++i) Positional(args[i]);
      break;
    }
    if (a.size() < 2 || a[0] != '-') {
      Positional(a);
      continue;
    }
    absl::Status s = Flag(args, &i);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<Invocation> ParseArgs(const std::vector<std::string>& args) {
  CommandLineParser parser(/*lenient=*/false);
  absl::Status s = parser.Walk(args);
  if (!s.ok()) return s;
  parser.Finish();
  return std::move(parser.invocation());
}

absl::Status ValidateInvocation(const Invocation& inv) {
  const CommandSpec& c = *inv.command;
  const int n = static_cast<int>(inv.args.size());
  if (n < c.min_args || (c.max_args >= 0 && n > c.max_args)) {
    return UsageError(absl::StrCat(
        c.name, ": expected ", c.args.empty() ? "no arguments" : c.args,
        ", got ", n == 0 ? "none" : absl::StrJoin(inv.args, " ")));
  }
  if (!c.arg_choices.empty()) {
    for (const std::string& a : inv.args) {
      if (std::find(c.arg_choices.begin(), c.arg_choices.end(), a) ==
          c.arg_choices.end()) {
        return UsageError(absl::StrCat(c.name, ": '", a, "' is not one of ",
                                       absl::StrJoin(c.arg_choices, ", ")));
      }
    }
  }
  for (const FlagSpec& f : c.flags) {
    auto it = inv.flags.find(f.name);
    if (it == inv.flags.end()) {
      if (f.required) {
        return UsageError(
            absl::StrCat(c.name, ": --", f.name, " ", f.value, " required"));
      }
      continue;
    }
    if (f.choices.empty()) continue;
    for (const std::string& v : it->second) {
      for (absl::string_view part : absl::StrSplit(v, ',')) {
        if (std::find(f.choices.begin(), f.choices.end(), part) ==
            f.choices.end()) {
          return UsageError(absl::StrCat("--", f.name, ": '", part,
                                         "' is not one of ",
                                         absl::StrJoin(f.choices, ", ")));
        }
      }
    }
  }
  if (inv.global.output.has_value()) {
    if (c.formats.empty()) {
      return UsageError(absl::StrCat(c.name, ": takes no -o"));
    }
    if (std::find(c.formats.begin(), c.formats.end(), *inv.global.output) ==
        c.formats.end()) {
      std::vector<std::string> names;
      for (Format f : c.formats) names.push_back(FormatName(f));
      return UsageError(absl::StrCat(
          c.name, ": -o ", FormatName(*inv.global.output),
          " is not supported; use one of ", absl::StrJoin(names, ", ")));
    }
  }
  return absl::OkStatus();
}

}  // namespace portfleet::ctl
