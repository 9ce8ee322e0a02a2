// Fleet spec parsing and validation: one case per error class, with the exact
// message an operator sees.
#include "agent/spec/spec.h"

#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace portfleet {
namespace {

using ::testing::HasSubstr;

constexpr char kGood[] = R"pb(
  listeners {
    name: "web"
    address: "127.0.0.1:8080"
    shards: 4
    worker { command: "portfleet-worker" args: "--mode=http" }
    steering { policy: STEERING_POLICY_CPU }
    drain_timeout_seconds: 30
  }
  listeners {
    name: "api-v6"
    address: "[::1]:9090"
    worker { command: "/usr/bin/env" env: "A=b" }
  }
)pb";

absl::Status ParseText(const std::string& text) {
  return ParseFleetSpec(text, SpecFormat::kTextproto, "fleet.textproto")
      .status();
}

std::string Message(const absl::Status& s) { return std::string(s.message()); }

TEST(SpecTest, ParsesGoodTextproto) {
  absl::StatusOr<v1::FleetSpec> spec =
      ParseFleetSpec(kGood, SpecFormat::kTextproto, "fleet.textproto");
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->listeners_size(), 2);
  EXPECT_EQ(spec->listeners(0).name(), "web");
  EXPECT_EQ(spec->listeners(0).shards(), 4u);
  EXPECT_EQ(spec->listeners(0).steering().policy(), v1::STEERING_POLICY_CPU);
  EXPECT_EQ(spec->listeners(1).worker().env(0), "A=b");
}

TEST(SpecTest, ParsesGoodJson) {
  absl::StatusOr<v1::FleetSpec> spec = ParseFleetSpec(
      R"({"listeners": [{"name": "web", "address": "127.0.0.1:8080",
          "shards": 2, "worker": {"command": "portfleet-worker"},
          "steering": {"policy": "STEERING_POLICY_HASH", "weights": [3, 1]},
          "drainTimeoutSeconds": 5, "backlog": 128}]})",
      SpecFormat::kJson, "fleet.json");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->listeners(0).steering().weights(0), 3u);
  EXPECT_EQ(spec->listeners(0).backlog(), 128u);
}

TEST(SpecTest, UnknownFieldTextprotoNamesLineAndColumn) {
  absl::Status s = ParseText("listeners {\n  name: \"web\"\n  shard: 4\n}\n");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Message(s),
            "fleet.textproto:3:8: Message type \"portfleet.v1.Listener\" has "
            "no field named \"shard\".");
}

TEST(SpecTest, UnknownFieldJson) {
  absl::Status s = ParseFleetSpec(R"({"listeners": [{"nmae": "web"}]})",
                                  SpecFormat::kJson, "fleet.json")
                       .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(s), HasSubstr("fleet.json: "));
  EXPECT_THAT(Message(s), HasSubstr("nmae"));
}

TEST(SpecTest, SyntaxErrorNamesLine) {
  absl::Status s = ParseText("listeners {\n  name: \"web\"\n");
  EXPECT_EQ(Message(s), "fleet.textproto:3:1: Expected identifier, got: ");
}

TEST(SpecTest, DuplicateName) {
  absl::Status s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:8080" worker { command: "w" } }
    listeners { name: "web" address: "127.0.0.1:8081" worker { command: "w" } }
  )pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[1] (\"web\"): name: duplicate name "
            "'web' (also listeners[0])");
}

TEST(SpecTest, DuplicateAddressAfterCanonicalisation) {
  absl::Status s = ParseText(R"pb(
    listeners { name: "a" address: "[::1]:8080" worker { command: "w" } }
    listeners { name: "b" address: "[0:0::1]:8080" worker { command: "w" } }
  )pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[1] (\"b\"): address: duplicate "
            "address [::1]:8080 (also listeners[0] \"a\")");
}

TEST(SpecTest, BadAddresses) {
  struct Case {
    std::string address;
    std::string message;
  } cases[] = {
      {"127.0.0.1", "invalid address '127.0.0.1': want host:port"},
      {"127.0.0.1:0",
       "invalid address '127.0.0.1:0': port must be a number from 1 to 65535"},
      {"127.0.0.1:70000",
       "invalid address '127.0.0.1:70000': port must be a number from 1 to "
       "65535"},
      {"localhost:80",
       "invalid address 'localhost:80': 'localhost' is not an IPv4 address "
       "(host names are not resolved)"},
      {"::1:80",
       "invalid address '::1:80': IPv6 addresses are written in brackets: "
       "[::1]:8080"},
      {"[::1]", "invalid address '[::1]': want [ipv6]:port"},
      {":80",
       "invalid address ':80': missing host (use 0.0.0.0 or [::] for any)"},
  };
  for (const Case& c : cases) {
    absl::Status s =
        ParseText(absl::StrCat("listeners { name: \"web\" address: \"",
                               c.address, "\" worker { command: \"w\" } }"));
    EXPECT_EQ(Message(s), absl::StrCat("fleet.textproto: listeners[0] "
                                       "(\"web\"): address: ",
                                       c.message))
        << c.address;
  }
}

TEST(SpecTest, MissingAddress) {
  absl::Status s =
      ParseText(R"pb(listeners { name: "web" worker { command: "w" } })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): address: required "
            "(host:port, e.g. 127.0.0.1:8080 or [::1]:8080)");
}

TEST(SpecTest, ShardsOutOfRange) {
  absl::Status s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:80" shards: 65
                worker { command: "w" } })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): shards: 65 is out of "
            "range (0-64; 0 = one per online CPU)");
}

TEST(SpecTest, MissingWorkerCommand) {
  absl::Status s = ParseText(
      R"pb(listeners { name: "web" address: "127.0.0.1:80" worker {} })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): worker.command: "
            "required (the program to run per shard, e.g. "
            "\"portfleet-worker\")");
}

TEST(SpecTest, BadName) {
  absl::Status s = ParseText(
      R"pb(listeners { name: "Web_1" address: "127.0.0.1:80" worker { command: "w" } })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"Web_1\"): name: 'Web_1' is not "
            "a DNS label (1-63 characters of a-z, 0-9 and '-', not starting "
            "or ending with '-')");
  s = ParseText(
      R"pb(listeners { address: "127.0.0.1:80" worker { command: "w" } })pb");
  EXPECT_EQ(Message(s), "fleet.textproto: listeners[0]: name: required");
}

TEST(SpecTest, WeightsMustMatchShards) {
  absl::Status s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:80" shards: 2
                worker { command: "w" } steering { weights: [ 1, 2, 3 ] } })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): steering.weights: 3 "
            "weights for 2 shards (want one each)");
  s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:80" shards: 2
                worker { command: "w" } steering { weights: [ 0, 0 ] } })pb");
  EXPECT_THAT(Message(s), HasSubstr("all weights are 0"));
}

// A listener with `rebalance { ... }` set to `block`.
absl::Status ParseRebalance(const std::string& block) {
  return ParseText(
      absl::StrCat("listeners { name: \"web\" address: \"127.0.0.1:80\" "
                   "worker { command: \"w\" } rebalance { ",
                   block, " } }"));
}

TEST(SpecTest, RebalanceBlockRanges) {
  EXPECT_TRUE(ParseRebalance("").ok());
  EXPECT_TRUE(ParseRebalance("mode: REBALANCE_MODE_AUTO metric: "
                             "REBALANCE_METRIC_CPU threshold_percent: 105 "
                             "target_percent: 100 period_seconds: 2 "
                             "max_moves_per_period: 100000 steering_only: true")
                  .ok());
  const std::string prefix = "fleet.textproto: listeners[0] (\"web\"): ";
  EXPECT_EQ(Message(ParseRebalance("threshold_percent: 104")),
            prefix +
                "rebalance.threshold_percent: 104 is out of range (105-1000; "
                "0 = default 125)");
  EXPECT_EQ(Message(ParseRebalance("threshold_percent: 1001")),
            prefix +
                "rebalance.threshold_percent: 1001 is out of range (105-1000; "
                "0 = default 125)");
  EXPECT_EQ(Message(ParseRebalance("target_percent: 99")),
            prefix +
                "rebalance.target_percent: 99 is out of range (100-1000; 0 = "
                "default 110)");
  EXPECT_EQ(Message(ParseRebalance("target_percent: 130")),
            prefix +
                "rebalance.target_percent: 130 is above the threshold "
                "(threshold_percent 125): a rebalance must stop at or below "
                "where it starts");
  EXPECT_EQ(
      Message(ParseRebalance("threshold_percent: 150 target_percent: 151")),
      prefix +
          "rebalance.target_percent: 151 is above the threshold "
          "(threshold_percent 150): a rebalance must stop at or below where "
          "it starts");
  EXPECT_EQ(Message(ParseRebalance("period_seconds: 1")),
            prefix +
                "rebalance.period_seconds: 1 is out of range (2-3600; 0 = "
                "default 10)");
  EXPECT_EQ(Message(ParseRebalance("period_seconds: 3601")),
            prefix +
                "rebalance.period_seconds: 3601 is out of range (2-3600; 0 = "
                "default 10)");
  EXPECT_EQ(Message(ParseRebalance("max_moves_per_period: 100001")),
            prefix +
                "rebalance.max_moves_per_period: 100001 is out of range "
                "(0-100000; 0 = default 1000)");
  EXPECT_EQ(Message(ParseRebalance("mode: 7")),
            prefix + "rebalance.mode: unknown value 7");
  EXPECT_EQ(Message(ParseRebalance("metric: 9")),
            prefix + "rebalance.metric: unknown value 9");
}

TEST(SpecTest, RebalanceDefaults) {
  v1::Listener l;
  EffectiveRebalance off = EffectiveRebalanceOf(l);
  EXPECT_FALSE(off.automatic);
  EXPECT_EQ(off.metric, v1::REBALANCE_METRIC_CONNECTIONS);
  EXPECT_DOUBLE_EQ(off.threshold, 1.25);
  EXPECT_DOUBLE_EQ(off.target, 1.10);
  EXPECT_EQ(off.period_seconds, 10u);
  EXPECT_EQ(off.max_moves, 1000u);
  EXPECT_TRUE(off.move_connections);
  l.mutable_rebalance()->set_mode(v1::REBALANCE_MODE_AUTO);
  l.mutable_rebalance()->set_threshold_percent(105);
  EffectiveRebalance low = EffectiveRebalanceOf(l);
  EXPECT_TRUE(low.automatic);
  EXPECT_DOUBLE_EQ(low.target, 1.05) << "the default target is capped";
  l.mutable_rebalance()->set_metric(v1::REBALANCE_METRIC_CPU);
  EXPECT_FALSE(EffectiveRebalanceOf(l).move_connections);
  l.mutable_rebalance()->set_metric(v1::REBALANCE_METRIC_CONNECTIONS);
  l.mutable_rebalance()->set_steering_only(true);
  EXPECT_FALSE(EffectiveRebalanceOf(l).move_connections);
}

TEST(SpecTest, DrainTimeoutAndBacklogRanges) {
  absl::Status s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:80" worker { command: "w" }
                drain_timeout_seconds: 4000 })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): drain_timeout_seconds: "
            "4000 is out of range (0-3600; 0 = default 30)");
  s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:80" worker { command: "w" }
                backlog: 70000 })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): backlog: 70000 is out "
            "of range (0-65535; 0 = default 1024)");
  s = ParseText(R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:80"
      worker { command: "w" }
      defer_accept_seconds: 601
    })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): defer_accept_seconds: "
            "601 is out of range (0-600; 0 = off)");
  EXPECT_TRUE(ParseText(R"pb(
                listeners {
                  name: "web"
                  address: "127.0.0.1:80"
                  worker { command: "w" }
                  defer_accept_seconds: 600
                })pb")
                  .ok());
}

TEST(SpecTest, BadEnvEntry) {
  absl::Status s = ParseText(R"pb(
    listeners { name: "web" address: "127.0.0.1:80"
                worker { command: "w" env: "NOVALUE" } })pb");
  EXPECT_EQ(Message(s),
            "fleet.textproto: listeners[0] (\"web\"): worker.env: 'NOVALUE' "
            "is not of the form NAME=value");
}

TEST(SpecTest, FileErrors) {
  absl::Status s = LoadFleetSpecFile("/nonexistent/fleet.textproto").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(s),
              HasSubstr("cannot read fleet spec /nonexistent/fleet.textproto"));
  std::string path = ::testing::TempDir() + "/fleet.yaml";
  std::ofstream(path) << "x";
  s = LoadFleetSpecFile(path).status();
  EXPECT_EQ(Message(s),
            path +
                ": unknown spec format (want a .textproto, .txtpb or .json "
                "file)");
}

TEST(SpecTest, EffectiveValues) {
  v1::Listener l;
  EXPECT_EQ(EffectiveShards(l, 2), 2u);
  EXPECT_EQ(EffectiveShards(l, 200), kMaxShards);
  l.set_shards(3);
  EXPECT_EQ(EffectiveShards(l, 2), 3u);
  EXPECT_EQ(EffectiveBacklog(l), kDefaultBacklog);
  EXPECT_EQ(EffectiveDrainTimeoutSeconds(l), kDefaultDrainTimeoutSeconds);
}

// Issue 9: inputs that used to pass --check and fail (or misbehave) later.
v1::Listener Good() {
  v1::Listener l;
  l.set_name("web");
  l.set_address("127.0.0.1:8080");
  l.mutable_worker()->set_command("portfleet-worker");
  return l;
}

TEST(SpecTest, Ipv4MappedAddressIsRefusedWithTheIpv4Form) {
  v1::Listener l = Good();
  l.set_address("[::ffff:127.0.0.1]:8102");
  absl::Status s = ValidateListener(l);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(Message(s), HasSubstr("IPv4-mapped"));
  EXPECT_THAT(Message(s), HasSubstr("write it as 127.0.0.1:8102"));
}

TEST(SpecTest, NulBytesAreRefusedNotTruncated) {
  v1::Listener l = Good();
  l.mutable_worker()->add_args(std::string("--mode=http\0--evil", 19));
  EXPECT_EQ(Message(ValidateListener(l)),
            "worker.args[0]: contains a NUL byte");
  l = Good();
  l.mutable_worker()->add_env(std::string("A=1\0B=2", 7));
  EXPECT_EQ(Message(ValidateListener(l)), "worker.env[0]: contains a NUL byte");
}

TEST(SpecTest, OversizedWorkerAndTooManyListenersAreRefused) {
  v1::Listener l = Good();
  for (int i = 0; i < 5; ++i) {
    l.mutable_worker()->add_args(std::string(4096, 'a'));
  }
  EXPECT_THAT(Message(ValidateListener(l)), HasSubstr("at most 16384"));
  v1::FleetSpec spec;
  for (int i = 0; i <= kMaxListeners; ++i) {
    v1::Listener* x = spec.add_listeners();
    *x = Good();
    x->set_name(absl::StrCat("l", i));
    x->set_address(absl::StrCat("127.0.0.1:", 1000 + i));
  }
  EXPECT_THAT(Message(ValidateFleetSpec(spec, "f")),
              HasSubstr("at most 128 per agent"));
}

TEST(SpecTest, RelativeCommandsBecomeAbsolute) {
  v1::WorkerSpec w;
  w.set_command("bin/../w");
  MakeCommandAbsolute(&w);
  EXPECT_EQ(w.command().front(), '/');
  EXPECT_THAT(w.command(), ::testing::EndsWith("/w"));
  w.set_command("portfleet-worker");  // looked up next to the agent, PATH
  MakeCommandAbsolute(&w);
  EXPECT_EQ(w.command(), "portfleet-worker");
}

}  // namespace
}  // namespace portfleet
