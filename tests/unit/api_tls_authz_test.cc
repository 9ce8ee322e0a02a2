// The authorization policy of the TLS API listener without a server: pattern
// matching (exact, "*", "prefix*"), evaluation (deny wins, no match refused),
// the parser's errors, and reloading the file (good, bad, good again).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "agent/api/authz.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "gtest/gtest.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "tests/testing/process.h"

namespace portfleet {
namespace {

using ::portfleet::testing::TempDir;
using ::testing::HasSubstr;

constexpr char kScale[] = "/portfleet.v1.FleetService/ScaleListener";
constexpr char kList[] = "/portfleet.v1.FleetService/ListListeners";

TEST(AuthzPatternTest, Exact) {
  EXPECT_TRUE(AuthzPatternMatches("spiffe://a/b", "spiffe://a/b"));
  EXPECT_FALSE(AuthzPatternMatches("spiffe://a/b", "spiffe://a/bc"));
  EXPECT_FALSE(AuthzPatternMatches("spiffe://a/b", "spiffe://a/"));
  EXPECT_FALSE(AuthzPatternMatches("spiffe://a/b", ""));
}

TEST(AuthzPatternTest, Star) {
  EXPECT_TRUE(AuthzPatternMatches("*", "anything"));
  EXPECT_TRUE(AuthzPatternMatches("*", ""));
}

TEST(AuthzPatternTest, Prefix) {
  EXPECT_TRUE(AuthzPatternMatches("/portfleet.v1.FleetService/List*", kList));
  EXPECT_TRUE(AuthzPatternMatches("/portfleet.v1.FleetService/List*",
                                  "/portfleet.v1.FleetService/List"));
  EXPECT_FALSE(AuthzPatternMatches("/portfleet.v1.FleetService/List*",
                                   "/portfleet.v1.FleetService/Lis"));
  EXPECT_FALSE(AuthzPatternMatches("/portfleet.v1.FleetService/List*", kScale));
  EXPECT_TRUE(AuthzPatternMatches("spiffe://example/*", "spiffe://example/x"));
}

AuthzPolicy Parse(const std::string& json) {
  absl::StatusOr<AuthzPolicy> p = ParseAuthzPolicy(json, "test.json");
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *p : AuthzPolicy{};
}

TEST(AuthzPolicyTest, ParsesRules) {
  AuthzPolicy p = Parse(R"({
    "name": "p",
    "deny_rules": [{"name": "d", "request": {"paths": ["/x/Y"]}}],
    "allow_rules": [
      {"name": "a", "source": {"principals": ["spiffe://r", "c*"]},
       "request": {"paths": ["/x/*"]}},
      {"name": "b"}
    ]
  })");
  EXPECT_EQ(p.name, "p");
  ASSERT_EQ(p.deny_rules.size(), 1u);
  EXPECT_TRUE(p.deny_rules[0].principals.empty());
  EXPECT_EQ(p.deny_rules[0].paths, std::vector<std::string>{"/x/Y"});
  ASSERT_EQ(p.allow_rules.size(), 2u);
  EXPECT_EQ(p.allow_rules[0].principals,
            (std::vector<std::string>{"spiffe://r", "c*"}));
  EXPECT_TRUE(p.allow_rules[1].paths.empty());
}

TEST(AuthzPolicyTest, DenyWinsAndNoMatchRefuses) {
  AuthzPolicy p = Parse(R"({
    "name": "p",
    "deny_rules": [{"name": "no-scale-for-bob",
                    "source": {"principals": ["bob"]},
                    "request": {"paths": [
                      "/portfleet.v1.FleetService/ScaleListener"]}}],
    "allow_rules": [
      {"name": "read", "source": {"principals": ["*"]},
       "request": {"paths": ["/portfleet.v1.FleetService/List*"]}},
      {"name": "ops", "source": {"principals": ["spiffe://ops/*", "bob"]}}
    ]
  })");
  AuthzDecision d = EvaluateAuthzPolicy(p, {"bob"}, kScale);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.rule, "no-scale-for-bob");
  d = EvaluateAuthzPolicy(p, {"bob"}, kList);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.rule, "read");
  d = EvaluateAuthzPolicy(p, {"x", "spiffe://ops/1"}, kScale);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.rule, "ops");
  d = EvaluateAuthzPolicy(p, {"carol"}, kScale);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.rule, "");
  EXPECT_TRUE(EvaluateAuthzPolicy(p, {}, kList).allowed);  // "*"
  EXPECT_FALSE(EvaluateAuthzPolicy(p, {}, kScale).allowed);
}

void ExpectError(const std::string& json, const std::string& needle) {
  absl::StatusOr<AuthzPolicy> p = ParseAuthzPolicy(json, "/etc/p.json");
  ASSERT_FALSE(p.ok()) << json;
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("/etc/p.json"));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr(needle)) << json;
}

TEST(AuthzPolicyTest, ParserErrors) {
  ExpectError("", "not a JSON object");
  ExpectError("{\"name\": ", "not a JSON object");
  ExpectError("[1]", "not a JSON object");
  ExpectError(R"({"allow_rules": [{"name": "a"}]})", "name: required");
  ExpectError(R"({"name": 3, "allow_rules": [{"name": "a"}]})",
              "name: expected a string, got a number");
  ExpectError(R"({"name": "p"})", "allow_rules: required");
  ExpectError(R"({"name": "p", "allow_rules": []})",
              "allow_rules: must hold at least one rule");
  ExpectError(R"({"name": "p", "allow_rules": {}})",
              "allow_rules: expected an array of rules, got an object");
  ExpectError(R"({"name": "p", "allow_rules": ["a"]})",
              "allow_rules[0]: expected a rule object, got a string");
  ExpectError(R"({"name": "p", "allow_rules": [{"source": {}}]})",
              "allow_rules[0].name: required");
  ExpectError(R"({"name": "p", "allow_rules": [{"name": "a"}, {"name": "a"}]})",
              "allow_rules[1].name: duplicate rule name \"a\"");
  ExpectError(
      R"({"name": "p", "deny_rule": [], "allow_rules": [{"name": "a"}]})",
      "unknown or unsupported field \"deny_rule\"");
  ExpectError(
      R"({"name": "p", "allow_rules": [{"name": "a", "request": {"headers": []}}]})",
      "allow_rules[0].request: unknown or unsupported field \"headers\"");
  ExpectError(
      R"({"name": "p", "allow_rules": [{"name": "a", "source": {"principals": "x"}}]})",
      "allow_rules[0].source.principals: expected an array of strings, got a "
      "string");
  ExpectError(
      R"({"name": "p", "allow_rules": [{"name": "a", "request": {"paths": ["/a", 1]}}]})",
      "allow_rules[0].request.paths[1]: expected a string, got a number");
  ExpectError(
      R"({"name": "p", "allow_rules": [{"name": "a", "request": {"paths": ["*/Scale"]}}]})",
      "allow_rules[0].request.paths[0]: '*/Scale': '*' is only allowed at the "
      "end");
  ExpectError(
      R"({"name": "p", "allow_rules": [{"name": "a"}], "deny_rules": [{"name": "d", "source": []}]})",
      "deny_rules[0].source: expected an object, got an array");
}

TEST(AuthzPolicyTest, FileErrorsNameTheFile) {
  TempDir dir;
  absl::StatusOr<AuthzPolicy> p = LoadAuthzPolicyFile(dir.path() + "/none");
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(std::string(p.status().message()),
              HasSubstr(dir.path() + "/none"));
  const std::string empty = dir.WriteFile("empty.json", "\n");
  p = LoadAuthzPolicyFile(empty);
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(std::string(p.status().message()),
              HasSubstr(empty + ": file is empty"));
}

TEST(AuthzPolicyTest, ExamplePolicySeparatesReadersFromOperators) {
  absl::StatusOr<AuthzPolicy> p =
      LoadAuthzPolicyFile(std::string(PORTFLEET_SOURCE_DIR) +
                          "/deploy/examples/api-authz-policy.json");
  ASSERT_TRUE(p.ok()) << p.status();
  const std::vector<std::string> reader = {"spiffe://example/reader"};
  const std::vector<std::string> op = {"spiffe://example/operator"};
  for (const char* m : {"ListListeners", "GetListener", "ListShards",
                        "GetStatus", "WatchEvents"}) {
    const std::string path = std::string("/portfleet.v1.FleetService/") + m;
    EXPECT_TRUE(EvaluateAuthzPolicy(*p, reader, path).allowed) << m;
    EXPECT_TRUE(EvaluateAuthzPolicy(*p, op, path).allowed) << m;
    EXPECT_FALSE(EvaluateAuthzPolicy(*p, {"spiffe://other"}, path).allowed);
  }
  // Every other method of the service mutates: operators only. Taken from
  // the service's descriptor, so a new RPC cannot be left out of the example.
  const google::protobuf::ServiceDescriptor* service =
      portfleet::v1::ListListenersRequest::descriptor()
          ->file()
          ->FindServiceByName("FleetService");
  ASSERT_NE(service, nullptr);
  int mutating = 0;
  for (int i = 0; i < service->method_count(); ++i) {
    const std::string m = service->method(i)->name();
    if (absl::StartsWith(m, "List") || absl::StartsWith(m, "Get") ||
        m == "WatchEvents") {
      continue;
    }
    ++mutating;
    const std::string path = "/portfleet.v1.FleetService/" + m;
    EXPECT_FALSE(EvaluateAuthzPolicy(*p, reader, path).allowed) << m;
    EXPECT_TRUE(EvaluateAuthzPolicy(*p, op, path).allowed)
        << m << " is missing from the example policy's operator rule";
  }
  EXPECT_GE(mutating, 9);
}

std::string Policy(const std::string& principal) {
  return R"({"name": "for-)" + principal +
         R"(", "allow_rules": [{"name": "a", "source": {"principals": [")" +
         principal + R"("]}}]})";
}

// Replaces the file atomically, as an editor or a config manager would.
void Replace(const TempDir& dir, const std::string& contents) {
  const std::string tmp = dir.WriteFile("policy.json.tmp", contents);
  ASSERT_EQ(std::rename(tmp.c_str(), (dir.path() + "/policy.json").c_str()), 0);
}

TEST(AuthzPolicyFileTest, ReloadsKeepsLastGoodOnError) {
  TempDir dir;
  const std::string path = dir.WriteFile("policy.json", Policy("alice"));
  auto file = AuthzPolicyFile::Load(path, absl::ZeroDuration());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->Check({"alice"}, kScale).allowed);
  EXPECT_FALSE((*file)->Check({"bob"}, kScale).allowed);

  Replace(dir, Policy("bob"));
  EXPECT_TRUE((*file)->Check({"bob"}, kScale).allowed);
  EXPECT_FALSE((*file)->Check({"alice"}, kScale).allowed);
  EXPECT_EQ((*file)->policy_name(), "for-bob");

  Replace(dir, "{\"name\": \"broken\", ");
  EXPECT_TRUE((*file)->Check({"bob"}, kScale).allowed);
  EXPECT_EQ((*file)->policy_name(), "for-bob");
  EXPECT_THAT(std::string((*file)->last_reload_status().message()),
              HasSubstr(path));

  Replace(dir, Policy("carol"));
  EXPECT_TRUE((*file)->Check({"carol"}, kScale).allowed);
  EXPECT_TRUE((*file)->last_reload_status().ok());
}

TEST(AuthzPolicyFileTest, LooksAtTheFileAtMostOncePerInterval) {
  TempDir dir;
  const std::string path = dir.WriteFile("policy.json", Policy("alice"));
  auto file = AuthzPolicyFile::Load(path, absl::Hours(1));
  ASSERT_TRUE(file.ok()) << file.status();
  Replace(dir, Policy("bob"));
  EXPECT_TRUE((*file)->Check({"alice"}, kScale).allowed);
  EXPECT_FALSE((*file)->Check({"bob"}, kScale).allowed);
}

TEST(AuthzPolicyFileTest, LoadFailsNamingTheFile) {
  TempDir dir;
  const std::string path = dir.WriteFile("policy.json", "{}");
  auto file = AuthzPolicyFile::Load(path);
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(std::string(file.status().message()),
              HasSubstr(path + ": name: required"));
}

}  // namespace
}  // namespace portfleet
