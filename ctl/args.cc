// The command line against the command table.
//
// Leading words select the command (the longest match: "get shards");
// flags may come anywhere after the program name, but a command's own flags
// only once its words are complete (its short flags are its own: -f is
// apply's --filename and events' --follow). "--" ends the flags.
#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "ctl/command.h"

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

// The flag that `spelling` ("--name" or "-x") names in `flags`.
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

absl::StatusOr<Invocation> ParseArgs(const std::vector<std::string>& args) {
  Invocation inv;
  std::vector<std::string> words;
  bool resolved = false;
  // The longest command whose words begin `words`; the rest are arguments.
  auto resolve = [&] {
    resolved = true;
    size_t best = 0;
    for (const CommandSpec& c : Commands()) {
      std::vector<std::string> w = Words(c);
      if (w.size() > best && w.size() <= words.size() &&
          std::equal(w.begin(), w.end(), words.begin())) {
        inv.command = &c;
        best = w.size();
      }
    }
    if (inv.command == nullptr) {
      inv.words = words;
      return;
    }
    inv.words.assign(words.begin(), words.begin() + best);
    inv.args.assign(words.begin() + best, words.end());
  };
  auto positional = [&](const std::string& a) {
    if (resolved) {
      inv.args.push_back(a);
      return;
    }
    std::vector<std::string> candidate = words;
    candidate.push_back(a);
    if (IsCommandPrefix(candidate)) {
      words = std::move(candidate);
      return;
    }
    if (words.empty()) {
      words.push_back(a);
      resolve();
      return;
    }
    resolve();
    inv.args.push_back(a);
  };

  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") {
      for (++i; i < args.size(); ++i) positional(args[i]);
      break;
    }
    if (a.size() < 2 || a[0] != '-') {
      positional(a);
      continue;
    }
    if (!resolved && !words.empty()) resolve();
    std::string spelling = a;
    std::optional<std::string> value;
    if (size_t eq = a.find('='); eq != std::string::npos) {
      spelling = a.substr(0, eq);
      value = a.substr(eq + 1);
    }
    const FlagSpec* flag = FindFlag(GlobalFlags(), spelling);
    const bool global = flag != nullptr;
    if (flag == nullptr && inv.command != nullptr) {
      flag = FindFlag(inv.command->flags, spelling);
    }
    if (flag == nullptr && inv.command == nullptr && !inv.words.empty()) {
      continue;  // Run reports the unknown command, not its flags.
    }
    if (flag == nullptr) {
      return UsageError(
          inv.command != nullptr
              ? absl::StrCat(inv.command->name, ": unknown flag ", spelling)
              : absl::StrCat("unknown flag ", spelling));
    }
    if (flag->value.empty()) {
      if (value.has_value() && *value != "true" && *value != "false") {
        return UsageError(absl::StrCat(Spelling(*flag),
                                       " takes no value (or =true, =false)"));
      }
      value = value.value_or("true");
    } else if (!value.has_value()) {
      if (i + 1 >= args.size()) {
        return UsageError(absl::StrCat("flag ", spelling, " needs a value (",
                                       flag->value, ")"));
      }
      value = args[++i];
    }
    if (global) {
      absl::Status s = SetGlobal(*flag, *value, &inv.global);
      if (!s.ok()) return s;
    } else {
      std::vector<std::string>& values = inv.flags[flag->name];
      if (!flag->repeated) values.clear();
      values.push_back(*value);
    }
  }
  if (!resolved) resolve();
  return inv;
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
