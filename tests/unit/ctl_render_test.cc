// The reflection walk behind -o json and -o yaml: every field type, short enum
// names, presence, and a YAML emitter whose output a real YAML parser reads
// back as the same data as the JSON.
#include <cstdio>
#include <string>

#include "ctl/output.pb.h"
#include "ctl/render.h"
#include "gmock/gmock.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "grpc/health/v1/health.pb.h"
#include "gtest/gtest.h"
#include "portfleet/v1/agent.pb.h"
#include "tests/testing/process.h"

namespace portfleet::ctl {
namespace {

using ::testing::ElementsAre;

v1::ListenerState Sample() {
  v1::ListenerState l;
  v1::Listener* spec = l.mutable_spec();
  spec->set_name("web");
  spec->set_address("127.0.0.1:8080");
  spec->set_shards(2);
  spec->mutable_worker()->set_command("portfleet-worker");
  spec->mutable_worker()->add_args("--mode=http");
  spec->mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  spec->mutable_steering()->add_weights(1);
  spec->mutable_steering()->add_weights(3);
  v1::Shard* s = l.add_shards();
  s->set_index(0);
  s->set_state(v1::SHARD_STATE_RUNNING);
  s->set_pid(1000);
  s->set_cpu(-1);
  s->set_ready(true);
  s->set_accepted_total(18446744073709551615ull);
  s->mutable_counters()->set_selected(5);
  v1::HandOffPauses* pauses = s->mutable_load()->mutable_handoff_pauses();
  pauses->set_adopted(2);
  pauses->set_p50_us(42);
  pauses->set_p99_us(184);
  v1::DurationBucket* b = pauses->mutable_histogram()->add_buckets();
  b->set_index(67);
  b->set_count(1);
  b->set_upper_ns(192000);
  return l;
}

TEST(ShortEnumNameTest, StripsTheTypePrefix) {
  EXPECT_EQ(ShortEnumName(v1::ShardState_descriptor(), v1::SHARD_STATE_RUNNING),
            "running");
  EXPECT_EQ(
      ShortEnumName(v1::EventType_descriptor(), v1::EVENT_TYPE_SHARD_RESTARTED),
      "shard-restarted");
  EXPECT_EQ(ShortEnumName(v1::SteeringPolicy_descriptor(),
                          v1::STEERING_POLICY_UNSPECIFIED),
            "unspecified");
  // No prefix to strip.
  EXPECT_EQ(
      ShortEnumName(
          ::grpc::health::v1::HealthCheckResponse::ServingStatus_descriptor(),
          ::grpc::health::v1::HealthCheckResponse::NOT_SERVING),
      "not-serving");
  EXPECT_EQ(ShortEnumName(ApplyResult::Action_descriptor(),
                          ApplyResult::ACTION_CONFIGURED),
            "configured");
  // A value this client does not know (a newer agent).
  EXPECT_EQ(ShortEnumName(v1::ShardState_descriptor(), 77), "77");
}

TEST(ShortEnumNameTest, ReadsBack) {
  EXPECT_EQ(FindEnumValueByShortName(v1::SteeringPolicy_descriptor(), "cpu")
                ->number(),
            v1::STEERING_POLICY_CPU);
  EXPECT_EQ(FindEnumValueByShortName(v1::SteeringPolicy_descriptor(), "CPU"),
            nullptr);
  EXPECT_THAT(ShortEnumNames(v1::SteeringPolicy_descriptor()),
              ElementsAre("hash", "cpu", "least-connections"));
  // Every event type is a flag value (events --type).
  EXPECT_EQ(ShortEnumNames(v1::EventType_descriptor()).size(),
            static_cast<size_t>(v1::EventType_descriptor()->value_count() - 1));
}

TEST(RenderTest, JsonHasEveryFieldNumbersAndShortEnums) {
  EXPECT_EQ(ToJson(ToValue(Sample()), /*multiline=*/false),
            R"({"spec":{"name":"web","address":"127.0.0.1:8080","shards":2,)"
            R"("worker":{"command":"portfleet-worker","args":["--mode=http"],)"
            R"("env":[],"user":"","group":"","socketMode":"unspecified"},)"
            R"("steering":{"policy":"hash",)"
            R"("weights":[1,3]},"drainTimeoutSeconds":0,"backlog":0,)"
            R"("deferAcceptSeconds":0,)"
            R"("health":{"stallWindowMs":0,"stallGraceSeconds":0},)"
            R"("rebalance":{"mode":"unspecified","metric":"unspecified",)"
            R"("thresholdPercent":0,"targetPercent":0,"periodSeconds":0,)"
            R"("maxMovesPerPeriod":0,"steeringOnly":false}},)"
            R"("shards":[{"index":0,"state":"running","pid":1000,"cpu":-1,)"
            R"("restarts":0,"ready":true,"queueDepth":0,"activeConnections":0,)"
            R"("acceptedTotal":18446744073709551615,"counters":{"selected":5,)"
            R"("migrated":0,"fallback":0},"socketInode":0,)"
            R"("health":"unspecified","healthReason":"","ejections":0,)"
            R"("replacements":0,"orphans":[],"orphansKilled":0,)"
            R"("selfBound":false,"adopted":false,)"
            R"("load":{"connections":0,"connectionsSource":"unspecified",)"
            R"("cpu":0,"bytesInTotal":0,"bytesOutTotal":0,)"
            R"("bytesPerSecond":0,"requestsTotal":0,"requestsPerSecond":0,)"
            R"("reports":false,"handoffPauses":{"adopted":2,"p50Us":42,)"
            R"("p99Us":184,"histogram":{"buckets":[{"index":67,"count":1,)"
            R"("upperNs":192000}],"count":0,"sumNs":0}}},)"
            R"("steeringSlots":0,"rebalanceSlotDelta":0}],)"
            R"("error":"","rebalance":{"imbalance":0,"autoActive":false,)"
            R"("autoSteps":0,"rebalances":0,"slotsMoved":0,)"
            R"("connectionsMoved":0,"refusals":0}})");
}

TEST(RenderTest, SpecStyleKeepsOnlySetFieldsAndFullNames) {
  v1::FleetSpec spec;
  *spec.add_listeners() = Sample().spec();
  EXPECT_EQ(ToYaml(ToValue(spec, {.short_enums = false,
                                  .proto_field_names = true,
                                  .include_defaults = false})),
            "listeners:\n"
            "- name: web\n"
            "  address: \"127.0.0.1:8080\"\n"
            "  shards: 2\n"
            "  worker:\n"
            "    command: portfleet-worker\n"
            "    args:\n"
            "    - \"--mode=http\"\n"
            "  steering:\n"
            "    policy: STEERING_POLICY_HASH\n"
            "    weights:\n"
            "    - 1\n"
            "    - 3\n");
}

TEST(RenderTest, OptionalFieldsOnlyWhenSet) {
  VersionInfo v;
  v.set_client("1.0");
  EXPECT_EQ(ToJson(ToValue(v), false), R"({"client":"1.0"})");
  v.set_server("");
  EXPECT_EQ(ToJson(ToValue(v), false), R"({"client":"1.0","server":""})");
}

TEST(RenderTest, EmptyCollectionsAndEscapes) {
  google::protobuf::Struct s;
  (*s.mutable_fields())["quote\"\n"].set_string_value("tab\t\x01");
  EXPECT_EQ(ToJson(ToValue(s), true),
            "{\n  \"fields\": {\n    \"quote\\\"\\n\": {\n"
            "      \"stringValue\": \"tab\\t\\u0001\"\n    }\n  }\n}");
  EXPECT_EQ(ToYaml(ToValue(v1::ListListenersResponse())), "listeners: []\n");
  EXPECT_EQ(ToYaml(ToValue(v1::GetStatusRequest())), "{}\n");
  google::protobuf::Timestamp t;
  t.set_seconds(1);
  EXPECT_EQ(ToJson(ToValue(t), false), "\"1970-01-01T00:00:01Z\"");
}

// Strings that a YAML reader would take for something else unless quoted.
TEST(RenderTest, YamlQuotesWhatWouldReadAsAnotherType) {
  v1::WorkerSpec w;
  w.set_command("plain words/ok");
  for (const char* arg :
       {"yes",    "No",  "on",    "null",   "~",    "true",  "1",  "0x1f",
        "1e3",    "-",   "- x",   "a: b",   "#c",   "x #y",  "",   " lead",
        "trail ", "[x]", "{x}",   "*a",     "&a",   "!t",    "%p", "@a",
        "`a",     "'q'", "\"q\"", "a\nb",   ".inf", "12:30", "=",  "<<",
        "?",      "|",   ">",     "ünïcode"}) {
    w.add_args(arg);
  }
  const std::string yaml = ToYaml(ToValue(w));
  EXPECT_THAT(yaml, ::testing::StartsWith("command: plain words/ok\nargs:\n"
                                          "- \"yes\"\n- \"No\"\n"));
  EXPECT_THAT(yaml, ::testing::HasSubstr("- ünïcode\n"));
  // A real YAML 1.1 parser reads the YAML as the same data as the JSON.
  ::portfleet::testing::TempDir dir;
  const std::string json = dir.WriteFile("w.json", ToJson(ToValue(w), true));
  const std::string y = dir.WriteFile("w.yaml", yaml);
  const std::string sample =
      dir.WriteFile("s.yaml", ToYaml(ToValue(Sample())) + "");
  const std::string sample_json =
      dir.WriteFile("s.json", ToJson(ToValue(Sample()), true));
  const std::string check = dir.WriteFile("check.py", R"(
import json, sys, yaml
for y, j in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    a = yaml.safe_load(open(y, encoding="utf-8"))
    b = json.load(open(j, encoding="utf-8"))
    if a != b:
        print("differ:", a, b)
        sys.exit(1)
)");
  const std::string cmd = "/usr/bin/python3 " + check + " " + y + " " + json +
                          " " + sample + " " + sample_json + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[256];
  while (size_t n = ::fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  EXPECT_EQ(::pclose(p), 0) << out << "\n" << yaml;
}

}  // namespace
}  // namespace portfleet::ctl
