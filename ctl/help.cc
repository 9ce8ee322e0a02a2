#include "ctl/help.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "ctl/parser.h"
#include "worker/sdk/base/version.h"

namespace portfleet::ctl {
namespace {

constexpr char kIntro[] =
    "portfleetctl controls a portfleet agent: its listeners, their shards\n"
    "(SO_REUSEPORT sockets, one worker process each) and how new connections\n"
    "are steered to them.\n";

struct Doc {
  const char* key;
  const char* text;
};

constexpr Doc kFormats[] = {
    {"table", "aligned columns, or a sentence for a change (the default)"},
    {"wide", "the table with more columns"},
    {"json",
     "the result message: numbers as numbers, enums by short lower-case\n"
     "names (running, shard-restarted); every field present; streams\n"
     "print one object a line"},
    {"yaml", "the same as YAML; streams print one document each"},
    {"name", "resource names, one a line (listener/web)"},
    {"proto-json", "the raw proto3 JSON of the result message"},
    {"textproto", "protobuf text format (get spec, the default there)"},
};

constexpr Doc kExitCodes[] = {
    {"0", "ok"},
    {"1", "the agent returned an error (or health is not SERVING)"},
    {"2", "usage error: bad command line, flag value or spec file"},
    {"3",
     "the agent is unreachable: no socket, connection refused, TLS\n"
     "handshake failed, or the connection was lost"},
    {"4",
     "permission denied on the agent's API socket: run as root or as a\n"
     "member of the agent's --api-group"},
    {"5",
     "the agent is shutting down; retry once it (or its successor)\nserves"},
};

constexpr Doc kEnvironment[] = {
    {"PORTFLEET_SERVER", "default for --server"},
    {"PORTFLEET_TLS_CERT", "default for --tls-cert"},
    {"PORTFLEET_TLS_KEY", "default for --tls-key"},
    {"PORTFLEET_TLS_CA", "default for --tls-ca"},
};

std::vector<std::string> Words(const CommandSpec& c) {
  return absl::StrSplit(c.name, ' ');
}

// `text` broken at spaces into lines of at most `width` characters (longer
// words stay whole).
std::string Wrap(absl::string_view text, size_t width) {
  std::string out;
  size_t line = 0;
  for (absl::string_view word : absl::StrSplit(text, ' ')) {
    if (line > 0 && line + 1 + word.size() > width) {
      out += "\n";
      line = 0;
    } else if (line > 0) {
      out += " ";
      ++line;
    }
    absl::StrAppend(&out, word);
    line += word.size();
  }
  return out;
}

std::string FlagUsage(const FlagSpec& f) {
  std::string s = f.short_name != 0
                      ? absl::StrCat("-", std::string(1, f.short_name))
                      : absl::StrCat("--", f.name);
  if (!f.value.empty()) absl::StrAppend(&s, " ", f.value);
  return s;
}

// "  -o, --output FORMAT" / "      --server ADDR"
std::string FlagLeft(const FlagSpec& f) {
  std::string s = f.short_name != 0
                      ? absl::StrCat("  -", std::string(1, f.short_name), ", ")
                      : "      ";
  absl::StrAppend(&s, "--", f.name);
  if (!f.value.empty()) absl::StrAppend(&s, " ", f.value);
  return s;
}

// Two columns: `left`, then `text` (which may span lines) from column
// `width`; a left side too wide for it gets the text on the next line.
void PrintColumns(std::ostream& out, const std::string& left,
                  absl::string_view text, size_t width) {
  std::vector<absl::string_view> lines = absl::StrSplit(text, '\n');
  out << left;
  if (left.size() + 2 > width) {
    out << "\n" << std::string(width, ' ');
  } else {
    out << std::string(width - left.size(), ' ');
  }
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i > 0) out << "\n" << std::string(width, ' ');
    out << lines[i];
  }
  out << "\n";
}

void PrintFlags(std::ostream& out, const std::vector<FlagSpec>& flags) {
  size_t width = 0;
  for (const FlagSpec& f : flags) width = std::max(width, FlagLeft(f).size());
  width = std::min<size_t>(width + 3, 28);
  for (const FlagSpec& f : flags) {
    std::string help = f.help;
    if (!f.choices.empty() && f.name != "output") {
      absl::StrAppend(&help, "\n",
                      Wrap("one of: " + absl::StrJoin(f.choices, ", "), 50));
    }
    if (f.required) absl::StrAppend(&help, " (required)");
    PrintColumns(out, FlagLeft(f), help, width);
  }
}

void PrintDocs(std::ostream& out, const Doc* docs, size_t n, size_t width) {
  for (size_t i = 0; i < n; ++i) {
    PrintColumns(out, absl::StrCat("  ", docs[i].key), docs[i].text, width);
  }
}

std::string FormatList(const CommandSpec& c) {
  std::vector<std::string> names;
  for (size_t i = 0; i < c.formats.size(); ++i) {
    names.push_back(FormatName(c.formats[i]) + (i == 0 ? " (default)" : ""));
  }
  return absl::StrJoin(names, ", ");
}

// --- man(7) ---------------------------------------------------------------

// Text for a roff line: backslashes and leading control characters escaped,
// hyphens as \- (so that flags copy as ASCII hyphen-minus).
std::string Roff(absl::string_view text) {
  std::string s = absl::StrReplaceAll(text, {{"\\", "\\e"}, {"-", "\\-"}});
  if (!s.empty() && (s[0] == '.' || s[0] == '\'')) s = "\\&" + s;
  return s;
}

// Paragraphs of `text` (blank lines between them) as roff.
std::string RoffParagraphs(absl::string_view text) {
  std::string out;
  for (absl::string_view para :
       absl::StrSplit(text, "\n\n", absl::SkipEmpty())) {
    if (!out.empty()) out += ".PP\n";
    for (absl::string_view line :
         absl::StrSplit(para, '\n', absl::SkipEmpty())) {
      absl::StrAppend(&out, Roff(line), "\n");
    }
  }
  return out;
}

std::string RoffFlags(const std::vector<FlagSpec>& flags) {
  std::string out;
  for (const FlagSpec& f : flags) {
    std::string name = f.short_name != 0
                           ? absl::StrCat("\\-", std::string(1, f.short_name),
                                          ", \\-\\-", Roff(f.name))
                           : absl::StrCat("\\-\\-", Roff(f.name));
    absl::StrAppend(&out, ".TP\n\\fB", name, "\\fR");
    if (!f.value.empty()) absl::StrAppend(&out, " \\fI", Roff(f.value), "\\fR");
    absl::StrAppend(&out, "\n", RoffParagraphs(f.help));
    if (!f.choices.empty() && f.name != "output") {
      absl::StrAppend(&out, "One of: ", Roff(absl::StrJoin(f.choices, ", ")),
                      ".\n");
    }
    if (f.required) out += "Required.\n";
  }
  return out;
}

std::string RoffDocs(const Doc* docs, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    absl::StrAppend(&out, ".TP\n\\fB", Roff(docs[i].key), "\\fR\n",
                    RoffParagraphs(docs[i].text));
  }
  return out;
}

// --- completion -------------------------------------------------------------

constexpr char kBashScript[] =
    R"(# bash completion for portfleetctl, generated by `portfleetctl completion bash`
# from its command table. Load it in ~/.bashrc with
#   source <(portfleetctl completion bash)
# or install it as /usr/share/bash-completion/completions/portfleetctl.
_portfleetctl() {
  local cur=${COMP_WORDS[COMP_CWORD]} line
  local IFS=$'\n'
  local -a out
  out=($("${COMP_WORDS[0]}" __complete -- "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null)) || return 0
  COMPREPLY=()
  if [[ ${#out[@]} -eq 1 && ${out[0]} == ":file" ]]; then
    COMPREPLY=($(compgen -f -- "$cur"))
    return 0
  fi
  for line in "${out[@]}"; do
    COMPREPLY+=("${line%%$'\t'*}")
  done
}
complete -F _portfleetctl portfleetctl
)";

constexpr char kZshScript[] = R"(#compdef portfleetctl
# zsh completion for portfleetctl, generated by `portfleetctl completion zsh`
# from its command table. Load it in ~/.zshrc (after compinit) with
#   source <(portfleetctl completion zsh)
# or save it as _portfleetctl in a directory of $fpath.
_portfleetctl() {
  local -a out candidates
  local line word
  out=("${(@f)$("${words[1]}" __complete -- "${(@)words[2,CURRENT]}" 2>/dev/null)}")
  if [[ ${#out} -eq 1 && ${out[1]} == ":file" ]]; then
    _files
    return
  fi
  for line in "${out[@]}"; do
    [[ -z $line ]] && continue
    word=${line%%$'\t'*}
    word=${word//:/\\:}
    if [[ $line == *$'\t'* ]]; then
      candidates+=("$word:${line#*$'\t'}")
    else
      candidates+=("$word")
    fi
  done
  _describe -t values portfleetctl candidates
}
if [[ ${funcstack[1]} == _portfleetctl ]]; then
  _portfleetctl "$@"
else
  compdef _portfleetctl portfleetctl
fi
)";

std::string FirstLine(absl::string_view text) {
  return std::string(text.substr(0, text.find('\n')));
}

}  // namespace

std::vector<const CommandSpec*> CommandsUnder(
    const std::vector<std::string>& words) {
  std::vector<const CommandSpec*> out;
  for (const CommandSpec& c : Commands()) {
    std::vector<std::string> w = Words(c);
    if (!c.hidden && w.size() >= words.size() &&
        std::equal(words.begin(), words.end(), w.begin())) {
      out.push_back(&c);
    }
  }
  return out;
}

std::string Synopsis(const CommandSpec& c) {
  std::string s = c.name;
  if (!c.args.empty()) absl::StrAppend(&s, " ", c.args);
  for (const FlagSpec& f : c.flags) {
    if (f.required) absl::StrAppend(&s, " ", FlagUsage(f));
  }
  return s;
}

void PrintUsage(std::ostream& out) {
  out << kIntro
      << "\nUsage:\n  portfleetctl [global flags] COMMAND [ARGS] "
         "[flags]\n";
  const std::pair<Section, const char*> sections[] = {
      {Section::kRead, "Read-only commands"},
      {Section::kChange, "State-changing commands"},
      {Section::kTool, "Other commands"}};
  for (const auto& [section, title] : sections) {
    out << "\n" << title << ":\n";
    for (const CommandSpec& c : Commands()) {
      if (c.section == section && !c.hidden) {
        PrintColumns(out, "  " + Synopsis(c), c.summary, 27);
      }
    }
  }
  out << "\nGlobal flags (anywhere on the line):\n";
  PrintFlags(out, GlobalFlags());
  out << "\nOutput formats (-o; each command's --help lists its own):\n";
  PrintDocs(out, kFormats, std::size(kFormats), 15);
  out << "\nExit codes:\n";
  PrintDocs(out, kExitCodes, std::size(kExitCodes), 6);
  out << "\nRun 'portfleetctl COMMAND --help' for a command's flags and "
         "examples.\n";
}

void PrintGroupHelp(std::ostream& out, const std::vector<std::string>& words) {
  out << "Usage:\n  portfleetctl [global flags] " << absl::StrJoin(words, " ")
      << " ...\n\nCommands:\n";
  for (const CommandSpec* c : CommandsUnder(words)) {
    PrintColumns(out, "  " + Synopsis(*c), c->summary, 27);
  }
  out << "\nRun 'portfleetctl " << absl::StrJoin(words, " ")
      << " ... --help' for a command's flags and examples.\n";
}

void PrintCommandHelp(std::ostream& out, const CommandSpec& c) {
  std::vector<std::string> usage = {"portfleetctl [global flags] " +
                                    Synopsis(c)};
  // '\x01' keeps a flag and its value on one line when the usage wraps.
  for (const FlagSpec& f : c.flags) {
    if (f.required) continue;
    usage.push_back(absl::StrCat("[--", f.name,
                                 f.value.empty() ? "" : "\x01" + f.value, "]"));
  }
  out << c.description << "\nUsage:\n  "
      << absl::StrReplaceAll(Wrap(absl::StrJoin(usage, " "), 76),
                             {{"\n", "\n      "}, {"\x01", " "}})
      << "\n";
  if (!c.flags.empty()) {
    out << "\nFlags:\n";
    PrintFlags(out, c.flags);
  }
  if (!c.formats.empty())
    out << "\nOutput formats (-o): " << FormatList(c) << "\n";
  out << "\n" << (c.examples.size() == 1 ? "Example:" : "Examples:") << "\n";
  for (const Example& e : c.examples) {
    if (!e.comment.empty()) out << "  # " << e.comment << "\n";
    out << "  " << e.command << "\n";
  }
  out << "\nGlobal flags: portfleetctl --help.\n";
}

std::string ManPage() {
  std::string m = absl::StrCat(
      ".\\\" portfleetctl(1), generated by `portfleetctl man` from its command "
      "table.\n",
      ".TH PORTFLEETCTL 1 \"\" \"portfleet ", kVersion,
      "\" \"portfleet manual\"\n", ".SH NAME\n",
      "portfleetctl \\- control a portfleet agent\n", ".SH SYNOPSIS\n",
      ".B portfleetctl\n",
      "[\\fIglobal flags\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR] [\\fIflags\\fR]\n",
      ".SH DESCRIPTION\n", RoffParagraphs(kIntro),
      ".PP\nRead-only commands never change the fleet; state-changing "
      "commands each make one API call and return when it is done.\n");
  const std::pair<Section, const char*> sections[] = {
      {Section::kRead, "READ-ONLY COMMANDS"},
      {Section::kChange, "STATE-CHANGING COMMANDS"},
      {Section::kTool, "OTHER COMMANDS"}};
  for (const auto& [section, title] : sections) {
    absl::StrAppend(&m, ".SH ", title, "\n");
    for (const CommandSpec& c : Commands()) {
      if (c.section != section || c.hidden) continue;
      absl::StrAppend(&m, ".SS \"", Roff(Synopsis(c)), "\"\n",
                      RoffParagraphs(c.description));
      if (!c.flags.empty()) {
        absl::StrAppend(&m, ".PP\nFlags:\n.RS\n", RoffFlags(c.flags), ".RE\n");
      }
      if (!c.formats.empty()) {
        absl::StrAppend(&m, ".PP\nOutput formats: ", Roff(FormatList(c)),
                        ".\n");
      }
      absl::StrAppend(
          &m, ".PP\n",
          c.examples.size() == 1 ? "Example:" : "Examples:", "\n.RS\n.nf\n");
      for (const Example& e : c.examples) {
        if (!e.comment.empty())
          absl::StrAppend(&m, "# ", Roff(e.comment), "\n");
        absl::StrAppend(&m, Roff(e.command), "\n");
      }
      m += ".fi\n.RE\n";
    }
  }
  absl::StrAppend(
      &m, ".SH GLOBAL FLAGS\n", RoffFlags(GlobalFlags()),
      ".SH OUTPUT FORMATS\n", RoffDocs(kFormats, std::size(kFormats)),
      ".SH EXIT STATUS\n", RoffDocs(kExitCodes, std::size(kExitCodes)),
      ".SH ENVIRONMENT\n", RoffDocs(kEnvironment, std::size(kEnvironment)),
      ".SH SEE ALSO\n",
      "The portfleet README (the agent, the fleet spec, the API: "
      "proto/portfleet/v1/agent.proto).\n");
  return m;
}

std::string CompletionScript(absl::string_view shell) {
  if (shell == "bash") return kBashScript;
  if (shell == "zsh") return kZshScript;
  return "";
}

std::vector<std::string> CompletionCandidates(
    const std::vector<std::string>& words,
    const std::function<std::vector<std::string>(const GlobalOptions&)>&
        listeners) {
  const std::string cur = words.empty() ? "" : words.back();
  // The words before `cur`, walked as the parser does.
  CommandLineParser parser(/*lenient=*/true);
  (void)parser.Walk(std::vector<std::string>(
      words.begin(), words.empty() ? words.end() : words.end() - 1));
  const Invocation& inv = parser.invocation();
  const CommandSpec* command = inv.command;
  if (!parser.resolved()) {
    for (const CommandSpec& c : Commands()) {
      if (Words(c) == parser.words()) command = &c;
    }
  }
  std::vector<std::string> out;
  auto offer = [&](const std::string& word, const std::string& description) {
    if (!absl::StartsWith(word, cur)) return;
    for (const std::string& o : out) {
      if (o.substr(0, o.find('\t')) == word) return;
    }
    out.push_back(description.empty() ? word
                                      : absl::StrCat(word, "\t", description));
  };
  auto offer_values = [&](Complete kind,
                          const std::vector<std::string>& choices) {
    if (!choices.empty()) {
      for (const std::string& c : choices) offer(c, "");
    } else if (kind == Complete::kFile) {
      out = {":file"};
    } else if (kind == Complete::kListener) {
      for (const std::string& name : listeners(inv.global)) offer(name, "");
    }
  };
  if (const FlagSpec* pending = parser.pending()) {
    offer_values(pending->complete, pending->choices);
    return out;
  }
  if (absl::StartsWith(cur, "-")) {
    std::vector<FlagSpec> flags = GlobalFlags();
    if (command != nullptr) {
      flags.insert(flags.end(), command->flags.begin(), command->flags.end());
    }
    for (const FlagSpec& f : flags) {
      offer(absl::StrCat("--", f.name), FirstLine(f.help));
    }
    return out;
  }
  if (!parser.resolved()) {
    // The next command word; below, the arguments when the words so far are
    // a command already.
    const size_t n = parser.words().size();
    for (const CommandSpec* c : CommandsUnder(parser.words())) {
      std::vector<std::string> w = Words(*c);
      if (w.size() > n) offer(w[n], w.size() == n + 1 ? c->summary : "");
    }
  }
  const int nargs = parser.resolved() ? static_cast<int>(inv.args.size()) : 0;
  if (command != nullptr &&
      (command->max_args < 0 || nargs < command->max_args)) {
    offer_values(command->arg_complete, command->arg_choices);
  }
  return out;
}

}  // namespace portfleet::ctl
