// Fleet state file: round trip, atomic replacement, and every way a file can
// be bad (truncated, corrupt, invalid) reported with the file's name.
#include <dirent.h>
#include <sys/stat.h>

#include <fstream>
#include <string>
#include <vector>

#include "agent/api/state_store.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace portfleet {
namespace {

using ::portfleet::testing::ReadFileOrEmpty;
using ::portfleet::testing::TempDir;

v1::FleetSpec TwoListeners() {
  v1::FleetSpec spec;
  v1::Listener* web = spec.add_listeners();
  web->set_name("web");
  web->set_address("127.0.0.1:8080");
  web->set_shards(4);
  web->mutable_worker()->set_command("portfleet-worker");
  web->mutable_worker()->add_args("--mode=http");
  web->mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  for (int w : {1, 1, 2, 2}) web->mutable_steering()->add_weights(w);
  v1::Listener* echo = spec.add_listeners();
  echo->set_name("echo");
  echo->set_address("[::1]:9000");
  echo->set_shards(2);
  echo->mutable_worker()->set_command("portfleet-worker");
  return spec;
}

std::vector<std::string> DirEntries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  closedir(d);
  return out;
}

void WriteRaw(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

TEST(StateStoreTest, MissingFileIsNullopt) {
  TempDir dir;
  auto loaded = LoadFleetState(dir.path() + "/nothing-here");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_FALSE(loaded->has_value());
}

TEST(StateStoreTest, RoundTrip) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  ASSERT_TRUE(SaveFleetState(state, TwoListeners()).ok());
  auto loaded = LoadFleetState(state);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_TRUE(loaded->has_value());
  EXPECT_EQ((*loaded)->DebugString(), TwoListeners().DebugString());

  const std::string text = ReadFileOrEmpty(FleetStatePath(state));
  EXPECT_EQ(text.rfind(kFleetStateHeader, 0), 0u) << text;
  EXPECT_NE(text.find(std::string(kFleetStateEndMarker) + "\n"),
            std::string::npos);
}

TEST(StateStoreTest, EmptyFleetRoundTrips) {
  TempDir dir;
  ASSERT_TRUE(SaveFleetState(dir.path(), v1::FleetSpec()).ok());
  auto loaded = LoadFleetState(dir.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_TRUE(loaded->has_value());
  EXPECT_EQ((*loaded)->listeners_size(), 0);
}

TEST(StateStoreTest, CreatesDirectory0750AndLeavesNoTempFiles) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  for (int i = 0; i < 5; ++i) {
    v1::FleetSpec spec = TwoListeners();
    spec.mutable_listeners(0)->set_shards(i + 1);
    spec.mutable_listeners(0)->mutable_steering()->clear_weights();
    ASSERT_TRUE(SaveFleetState(state, spec).ok());
  }
  struct stat st;
  ASSERT_EQ(stat(state.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0750u);
  EXPECT_EQ(DirEntries(state), std::vector<std::string>{kFleetStateFileName});
  auto loaded = LoadFleetState(state);
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ((*loaded)->listeners(0).shards(), 5u);
}

TEST(StateStoreTest, InvalidSpecIsNotWrittenAndOldFileStays) {
  TempDir dir;
  ASSERT_TRUE(SaveFleetState(dir.path(), TwoListeners()).ok());
  const std::string before = ReadFileOrEmpty(FleetStatePath(dir.path()));
  v1::FleetSpec bad = TwoListeners();
  bad.mutable_listeners(1)->set_name("web");  // duplicate
  absl::Status s = SaveFleetState(dir.path(), bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(ReadFileOrEmpty(FleetStatePath(dir.path())), before);
  EXPECT_EQ(DirEntries(dir.path()).size(), 1u);
}

TEST(StateStoreTest, TruncatedFileIsAnErrorNamingTheFile) {
  TempDir dir;
  ASSERT_TRUE(SaveFleetState(dir.path(), TwoListeners()).ok());
  const std::string path = FleetStatePath(dir.path());
  const std::string text = ReadFileOrEmpty(path);
  // Every cut short of the end marker is detected.
  for (size_t cut :
       {size_t{0}, text.size() / 3, text.size() / 2, text.size() - 5}) {
    WriteRaw(path, text.substr(0, cut));
    auto loaded = LoadFleetState(dir.path());
    ASSERT_FALSE(loaded.ok()) << "cut at " << cut;
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(loaded.status().message().find(path), std::string::npos)
        << loaded.status();
  }
}

TEST(StateStoreTest, CorruptFileIsAnErrorWithFileAndLine) {
  TempDir dir;
  const std::string path = FleetStatePath(dir.path());
  WriteRaw(path,
           absl::StrCat(kFleetStateHeader,
                        "\nlisteners {\n  name: \"web\"\n  shardz: 3\n}\n",
                        kFleetStateEndMarker, "\n"));
  auto loaded = LoadFleetState(dir.path());
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find(path + ":4:"), std::string::npos)
      << loaded.status();
  EXPECT_NE(loaded.status().message().find("shardz"), std::string::npos)
      << loaded.status();
}

TEST(StateStoreTest, InvalidContentIsAnErrorNamingTheFile) {
  TempDir dir;
  const std::string path = FleetStatePath(dir.path());
  WriteRaw(path, absl::StrCat(kFleetStateHeader,
                              "\nlisteners { name: \"Bad_Name\" address: "
                              "\"127.0.0.1:80\" }\n",
                              kFleetStateEndMarker, "\n"));
  auto loaded = LoadFleetState(dir.path());
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find(path), std::string::npos)
      << loaded.status();
  EXPECT_NE(loaded.status().message().find("name"), std::string::npos);
}

}  // namespace
}  // namespace portfleet
