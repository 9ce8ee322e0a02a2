// What portfleetctl generates from its command table for shells and
// manuals: completion candidates (in-process, with listener names from a
// fake agent), the bash and zsh scripts run by the real shells against the
// built binary, and the man page rendered by groff without warnings.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "ctl/help.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/ctl_test_env.h"

namespace portfleet::ctl {
namespace {

using ::portfleet::ctl::testing::CtlTest;
using ::portfleet::ctl::testing::Result;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

// Candidates without descriptions.
std::vector<std::string> Words(const std::vector<std::string>& words) {
  std::vector<std::string> out;
  for (const std::string& c :
       CompletionCandidates(words, [](const GlobalOptions&) {
         return std::vector<std::string>{"api", "web"};
       })) {
    out.push_back(c.substr(0, c.find('\t')));
  }
  return out;
}

TEST(CompletionCandidatesTest, CommandsFlagsAndValues) {
  EXPECT_THAT(Words({"g"}), ElementsAre("get"));
  EXPECT_THAT(Words({"get", ""}),
              ElementsAre("listeners", "listener", "shards", "spec"));
  EXPECT_THAT(Words({"get", "shards", ""}), ElementsAre("api", "web"));
  EXPECT_THAT(Words({"get", "shards", "web", ""}), IsEmpty());
  EXPECT_THAT(Words({"--server", "unix:/x", "sc"}), ElementsAre("scale"));
  EXPECT_THAT(Words({"steer", "web", "--policy", ""}),
              ElementsAre("hash", "cpu", "least-connections"));
  EXPECT_THAT(
      Words({"events", "--type", "shard-re"}),
      ElementsAre("shard-restarted", "shard-restored", "shard-replaced"));
  EXPECT_THAT(Words({"-o", "pr"}), ElementsAre("proto-json"));
  EXPECT_THAT(Words({"apply", "-f", ""}), ElementsAre(":file"));
  // -f is events' --follow: no value to complete, the next word is free.
  EXPECT_THAT(Words({"events", "-f", "--l"}), ElementsAre("--listener"));
  EXPECT_THAT(Words({"get", "shards", "web", "--w"}), ElementsAre("--watch"));
  EXPECT_THAT(Words({"completion", ""}), ElementsAre("bash", "zsh"));
  EXPECT_THAT(Words({""}), Not(Contains("__complete")));
  EXPECT_THAT(Words({"--no"}), ElementsAre("--no-headers"));
}

TEST(CompletionCandidatesTest, CommandsCarryTheirSummary) {
  std::vector<std::string> c = CompletionCandidates(
      {"sc"}, [](const GlobalOptions&) { return std::vector<std::string>{}; });
  EXPECT_THAT(c, ElementsAre("scale\tchange the shard count"));
}

TEST_F(CtlTest, CompleteAsksTheAgentForListenerNames) {
  ApplyWeb();
  Result r =
      Ctl({"__complete", "--", "--server", server_address_, "scale", "w"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "web\n");
  // No agent: no names, no error.
  r = Ctl({"__complete", "--", "--server", "unix:/nonexistent", "scale", ""});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "");
}

std::string Shell(const std::string& command, int* status) {
  FILE* p = ::popen(command.c_str(), "r");
  std::string out;
  char buf[512];
  while (size_t n = ::fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  *status = ::pclose(p);
  return out;
}

std::string Binary() {
  return std::string(PORTFLEET_BINARY_DIR) + "/ctl/portfleetctl";
}

TEST(CompletionScriptTest, BashCompletesThroughTheBinary) {
  ::portfleet::testing::TempDir dir;
  const std::string script = dir.path() + "/portfleetctl.bash";
  int status;
  Shell(Binary() + " completion bash > " + script, &status);
  ASSERT_EQ(status, 0);
  // COMP_WORDS[0] is the binary itself, as when it is on PATH.
  auto complete = [&](const std::string& words, int cword) {
    int st;
    std::string out =
        Shell("bash -c 'source " + script + "; COMP_WORDS=(" + Binary() + " " +
                  words + "); COMP_CWORD=" + std::to_string(cword) +
                  "; _portfleetctl; printf \"%s\\n\" \"${COMPREPLY[@]}\"' 2>&1",
              &st);
    EXPECT_EQ(st, 0) << out;
    return out;
  };
  EXPECT_EQ(complete("get sh", 2), "shards\n");
  EXPECT_EQ(complete("steer web --policy c", 4), "cpu\n");
  EXPECT_EQ(complete("get \"\"", 2), "listeners\nlistener\nshards\nspec\n");
  // File names for apply -f.
  dir.WriteFile("fleet.textproto", "");
  EXPECT_EQ(complete("apply -f " + dir.path() + "/fle", 3),
            dir.path() + "/fleet.textproto\n");
}

TEST(CompletionScriptTest, ZshScriptParses) {
  ::portfleet::testing::TempDir dir;
  const std::string script = dir.path() + "/_portfleetctl";
  int status;
  Shell(Binary() + " completion zsh > " + script, &status);
  ASSERT_EQ(status, 0);
  std::string out = Shell("zsh -n " + script + " 2>&1", &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_THAT(out, IsEmpty());
}

TEST(ManPageTest, RendersWithoutWarningsAndCoversTheTable) {
  const std::string page = ManPage();
  for (const CommandSpec& c : Commands()) {
    if (c.hidden) continue;
    EXPECT_THAT(
        page,
        HasSubstr(".SS \"" + absl::StrReplaceAll(Synopsis(c), {{"-", "\\-"}}) +
                  "\"\n"));
  }
  EXPECT_THAT(page, HasSubstr(".SH EXIT STATUS\n"));
  // The page the build wrote is the same.
  int status;
  std::string built =
      Shell("cat " + std::string(PORTFLEET_BINARY_DIR) + "/ctl/portfleetctl.1",
            &status);
  EXPECT_EQ(built, page);
  // groff: no warnings (-ww) and the text it renders.
  std::string text =
      Shell("groff -man -Tutf8 -ww " + std::string(PORTFLEET_BINARY_DIR) +
                "/ctl/portfleetctl.1 2>&1 >/dev/null",
            &status);
  EXPECT_EQ(status, 0);
  EXPECT_THAT(text, IsEmpty());
  text = Shell("groff -man -Tascii -P-c -P-b -P-u " +
                   std::string(PORTFLEET_BINARY_DIR) + "/ctl/portfleetctl.1",
               &status);
  EXPECT_THAT(text, HasSubstr("portfleetctl - control a portfleet agent"));
  EXPECT_THAT(text, HasSubstr("portfleetctl get shards web --watch"));
}

}  // namespace
}  // namespace portfleet::ctl
