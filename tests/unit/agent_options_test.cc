// The agent's command line (flags that resolve at the edge) and the retired
// instances file that decides the direction of a takeover.
#include <sys/stat.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "agent/options.h"
#include "agent/retired.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace portfleet {
namespace {

using ::portfleet::testing::ReadFileOrEmpty;
using ::portfleet::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

ParsedArgs Parse(std::vector<std::string> args) { return ParseAgentArgs(args); }

TEST(AgentOptionsTest, MetricsDefaultIsNotOpenTelemetrysPort) {
  ParsedArgs p = Parse({});
  ASSERT_FALSE(p.exit_now);
  EXPECT_EQ(p.options.metrics, "127.0.0.1:9474");
}

TEST(AgentOptionsTest, MetricsAddressReplacesTheHostOfMetrics) {
  ParsedArgs v4 = Parse({"--metrics-address=10.1.2.3"});
  ASSERT_FALSE(v4.exit_now);
  EXPECT_EQ(v4.options.metrics, "10.1.2.3:9474");
  ParsedArgs v6 =
      Parse({"--metrics=127.0.0.1:9100", "--metrics-address", "fd00::17"});
  ASSERT_FALSE(v6.exit_now);
  EXPECT_EQ(v6.options.metrics, "[fd00::17]:9100");
  // The order of the flags does not matter.
  ParsedArgs later = Parse({"--metrics-address=10.1.2.3", "--metrics=:0"});
  EXPECT_TRUE(later.exit_now);  // ":0" has no host: a usage error
  ParsedArgs after =
      Parse({"--metrics-address=10.1.2.3", "--metrics=0.0.0.0:9200"});
  ASSERT_FALSE(after.exit_now);
  EXPECT_EQ(after.options.metrics, "10.1.2.3:9200");
}

TEST(AgentOptionsTest, MetricsAddressMustBeAnIpLiteral) {
  for (const char* bad :
       {"node-1", "[fd00::1]", "10.1.2.3:80", "", "$(NODE_IP)"}) {
    ParsedArgs p = Parse({absl::StrCat("--metrics-address=", bad)});
    EXPECT_TRUE(p.exit_now) << bad;
    EXPECT_EQ(p.exit_code, 2) << bad;
  }
}

TEST(AgentOptionsTest, InstanceIdAndAfterHandover) {
  ParsedArgs p = Parse({"--instance-id=0b7c6a4e-2f1d-4c55-9a8e-5d1f0c2b3a41",
                        "--after-handover=idle", "--takeover=auto"});
  ASSERT_FALSE(p.exit_now);
  EXPECT_EQ(p.options.instance_id, "0b7c6a4e-2f1d-4c55-9a8e-5d1f0c2b3a41");
  EXPECT_TRUE(p.options.idle_after_handover);
  EXPECT_FALSE(Parse({"--after-handover", "exit"}).options.idle_after_handover);
  EXPECT_EQ(Parse({"--after-handover=linger"}).exit_code, 2);
  EXPECT_EQ(Parse({"--instance-id=a/b"}).exit_code, 2);
  EXPECT_EQ(Parse({"--instance-id", std::string(129, 'a')}).exit_code, 2);
}

TEST(AgentOptionsTest, LogFormat) {
  EXPECT_EQ(Parse({}).options.log_format, "");
  EXPECT_EQ(Parse({"--log-format=json"}).options.log_format, "json");
  EXPECT_EQ(Parse({"--log-format", "text"}).options.log_format, "text");
  EXPECT_EQ(Parse({"--log-format=xml"}).exit_code, 2);
}

TEST(RetiredInstancesTest, RetireListsTheIdOnceAndKeepsTheLast32) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  EXPECT_TRUE(LoadRetiredInstances(state)->empty());  // no dir, no file
  ASSERT_TRUE(RetireInstance(state, "pod-a").ok());
  ASSERT_TRUE(RetireInstance(state, "pod-b").ok());
  ASSERT_TRUE(RetireInstance(state, "pod-a").ok());
  EXPECT_THAT(*LoadRetiredInstances(state), ElementsAre("pod-b", "pod-a"));
  struct stat st {};
  ASSERT_EQ(::stat((state + "/retired-instances").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  for (int i = 0; i < 40; ++i) {
    ASSERT_TRUE(RetireInstance(state, absl::StrCat("pod-", i)).ok());
  }
  std::vector<std::string> ids = *LoadRetiredInstances(state);
  ASSERT_EQ(ids.size(), kMaxRetiredInstances);
  EXPECT_EQ(ids.front(), "pod-8");
  EXPECT_EQ(ids.back(), "pod-39");
  EXPECT_FALSE(RetireInstance(state, "bad id").ok());
}

TEST(RetiredInstancesTest, ADamagedFileIsAnErrorNamingTheLine) {
  TempDir dir;
  dir.WriteFile("retired-instances", "# header\npod-a\nnot/valid\n");
  absl::StatusOr<std::vector<std::string>> ids =
      LoadRetiredInstances(dir.path());
  ASSERT_FALSE(ids.ok());
  EXPECT_THAT(ids.status().message(),
              HasSubstr(dir.path() + "/retired-instances:3:"));
  // Retiring replaces a damaged list rather than failing the hand-over.
  ASSERT_TRUE(RetireInstance(dir.path(), "pod-b").ok());
  EXPECT_THAT(*LoadRetiredInstances(dir.path()), ElementsAre("pod-b"));
  EXPECT_THAT(ReadFileOrEmpty(dir.path() + "/retired-instances"),
              HasSubstr("# portfleet"));
}

}  // namespace
}  // namespace portfleet
