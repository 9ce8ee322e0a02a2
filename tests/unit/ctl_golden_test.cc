// Golden output of portfleetctl per format: the exact bytes of table, wide,
// json, yaml, name, proto-json, textproto and --no-headers output for the
// same fleet, compared with tests/unit/testdata/ctl/*.golden so that every
// change of output is deliberate. After a deliberate change, rewrite the
// files with
//   PORTFLEET_UPDATE_GOLDEN=1 ctest -R ctl_golden_test
// and review the diff.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/ctl_test_env.h"

namespace portfleet::ctl {
namespace {

using ::portfleet::ctl::testing::CtlTest;
using ::portfleet::ctl::testing::Result;

std::string GoldenPath(const std::string& name) {
  return std::string(PORTFLEET_SOURCE_DIR) + "/tests/unit/testdata/ctl/" +
         name + ".golden";
}

class CtlGoldenTest : public CtlTest {
 protected:
  // Runs `args` and compares stdout with the golden file `name`.
  void ExpectGolden(const std::string& name,
                    const std::vector<std::string>& args) {
    SCOPED_TRACE(name + ": portfleetctl " + absl::StrJoin(args, " "));
    Result r = Ctl(args);
    ASSERT_EQ(r.code, 0) << r.err;
    const std::string path = GoldenPath(name);
    if (std::getenv("PORTFLEET_UPDATE_GOLDEN") != nullptr) {
      std::ofstream(path, std::ios::binary) << r.out;
      return;
    }
    std::ifstream in(path, std::ios::binary);
    ASSERT_TRUE(in) << "no golden file " << path
                    << " (PORTFLEET_UPDATE_GOLDEN=1 writes it)";
    std::ostringstream golden;
    golden << in.rdbuf();
    EXPECT_EQ(r.out, golden.str())
        << "output differs from " << path
        << "; if the change is deliberate, rerun with "
           "PORTFLEET_UPDATE_GOLDEN=1 and review the diff";
  }
};

TEST_F(CtlGoldenTest, GetListeners) {
  ApplyWeb();
  ASSERT_EQ(Ctl({"steer", "web", "--policy", "hash", "--weights", "1,3"}).code,
            0);
  ExpectGolden("get_listeners.table", {"get", "listeners"});
  ExpectGolden("get_listeners.no_headers",
               {"get", "listeners", "--no-headers"});
  ExpectGolden("get_listeners.wide", {"get", "listeners", "-o", "wide"});
  ExpectGolden("get_listeners.json", {"get", "listeners", "-o", "json"});
  ExpectGolden("get_listeners.yaml", {"get", "listeners", "-o", "yaml"});
  ExpectGolden("get_listeners.name", {"get", "listeners", "-o", "name"});
  ExpectGolden("get_listeners.proto_json",
               {"get", "listeners", "-o", "proto-json"});
}

TEST_F(CtlGoldenTest, GetShards) {
  ApplyWeb();
  ExpectGolden("get_shards.table", {"get", "shards", "api"});
  ExpectGolden("get_shards.no_headers",
               {"get", "shards", "api", "--no-headers"});
  ExpectGolden("get_shards.wide", {"get", "shards", "api", "-o", "wide"});
  ExpectGolden("get_shards.json", {"get", "shards", "api", "-o", "json"});
  ExpectGolden("get_shards.yaml", {"get", "shards", "api", "-o", "yaml"});
  ExpectGolden("get_shards.name", {"get", "shards", "api", "-o", "name"});
}

TEST_F(CtlGoldenTest, GetSpec) {
  ApplyWeb();
  ASSERT_EQ(Ctl({"steer", "web", "--policy", "hash", "--weights", "1,3"}).code,
            0);
  ExpectGolden("get_spec.textproto", {"get", "spec"});
  ExpectGolden("get_spec.json", {"get", "spec", "-o", "json"});
  ExpectGolden("get_spec.yaml", {"get", "spec", "-o", "yaml"});
}

TEST_F(CtlGoldenTest, Apply) {
  ApplyWeb();
  const std::string spec = dir_.WriteFile("more.textproto", R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:8080"
      shards: 2
      worker { command: "portfleet-worker" args: "--mode=http" }
    }
    listeners {
      name: "db"
      address: "[::1]:5432"
      worker { command: "portfleet-worker" }
    }
  )pb");
  ExpectGolden("apply.yaml", {"apply", "-f", spec, "-o", "yaml"});
}

TEST_F(CtlGoldenTest, DiffAndDryRun) {
  ApplyWeb();
  const std::string spec = dir_.WriteFile("next.textproto", R"pb(
    listeners {
      name: "web"
      address: "127.0.0.1:8080"
      shards: 4
      worker { command: "portfleet-worker" args: "--mode=echo" }
    }
    listeners {
      name: "db"
      address: "[::1]:5432"
      worker { command: "portfleet-worker" }
    }
  )pb");
  ExpectGolden("diff.table", {"diff", "-f", spec, "--prune"});
  ExpectGolden("diff.json", {"diff", "-f", spec, "--prune", "-o", "json"});
  ExpectGolden("diff.name", {"diff", "-f", spec, "--prune", "-o", "name"});
  ExpectGolden("apply_dry_run.table",
               {"apply", "-f", spec, "--prune", "--dry-run"});
  ExpectGolden("apply_dry_run.json",
               {"apply", "-f", spec, "--prune", "--dry-run", "-o", "json"});
}

TEST_F(CtlGoldenTest, Rollout) {
  ApplyWeb();
  ASSERT_EQ(
      Ctl({"rollout", "start", "web", "--worker-args", "--mode=echo"}).code, 0);
  fake_.hold_rollouts = true;
  ExpectGolden("rollout_start.yaml",
               {"rollout", "start", "web", "--worker-args", "--mode=http", "-o",
                "yaml"});
  ExpectGolden("rollout_status.table", {"rollout", "status", "web"});
  ExpectGolden("rollout_status.json",
               {"rollout", "status", "web", "-o", "json"});
  ExpectGolden("rollout_history.table", {"rollout", "history", "web"});
  ExpectGolden("rollout_history.yaml",
               {"rollout", "history", "web", "-o", "yaml"});
}

TEST_F(CtlGoldenTest, EventHistory) {
  const absl::Time t = absl::FromUnixSeconds(1764654872);
  fake_.Emit({v1::EVENT_TYPE_SHARD_EXITED, t, "web", 2, 1234, "exit status 1"});
  fake_.Emit({v1::EVENT_TYPE_SHARD_RESTARTED, t + absl::Milliseconds(250),
              "web", 2, 1240, "restart 1"});
  fake_.Emit({v1::EVENT_TYPE_ROLLOUT_STARTED, t + absl::Seconds(3), "api", -1,
              0, "api/1: rolling out 'portfleet-worker' to 3 shard(s)"});
  ExpectGolden("events.table", {"events"});
  ExpectGolden("events.json", {"events", "-o", "json"});
  ExpectGolden("events.yaml", {"events", "-o", "yaml"});
}

}  // namespace
}  // namespace portfleet::ctl
