// agent/worker_registry: the agent's record of its workers, and the checks
// a reconnecting worker of another uid must pass (agent/adoption.h), against
// real processes: a child that runs as uid 65534 plays a worker of another
// user.
#include "agent/worker_registry.h"

#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/adoption.h"
#include "agent/procfs.h"
#include "gtest/gtest.h"
#include "tests/testing/netns.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

using ::portfleet::testing::TempDir;

constexpr uid_t kNobody = 65534;

// A child process that sleeps until killed, as `uid` (the caller's when
// `uid` is the caller's own).
class Sleeper {
 public:
  explicit Sleeper(uid_t uid) {
    int ready[2];
    if (::pipe(ready) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(ready[0]);
      if (uid != ::geteuid() && (::setgroups(0, nullptr) != 0 ||
                                 ::setgid(uid) != 0 || ::setuid(uid) != 0)) {
        _exit(3);
      }
      char ok = 1;
      if (::write(ready[1], &ok, 1) != 1) _exit(4);
      for (;;) ::pause();
    }
    ::close(ready[1]);
    char ok = 0;
    started_ = ::read(ready[0], &ok, 1) == 1;
    ::close(ready[0]);
  }
  ~Sleeper() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  bool started() const { return started_; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool started_ = false;
};

v1::WorkerRecord RecordOf(pid_t pid, const std::string& listener,
                          uint32_t shard, uint64_t inode) {
  v1::WorkerRecord r;
  r.set_listener(listener);
  r.set_shard(shard);
  r.set_pid(static_cast<uint32_t>(pid));
  r.set_uid(*ProcessEffectiveUid(pid));
  r.set_start_time(ProcessIds(pid)->start_time);
  r.set_socket_inode(inode);
  return r;
}

TEST(WorkerRegistryTest, SavedRecordsOfRunningProcessesLoadBack) {
  TempDir dir;
  Sleeper a(::geteuid()), b(::geteuid());
  ASSERT_TRUE(a.started() && b.started());
  ASSERT_TRUE(SaveWorkerRegistry(dir.path(), {RecordOf(a.pid(), "web", 0, 11),
                                              RecordOf(b.pid(), "web", 1, 12)})
                  .ok());
  struct stat st;
  ASSERT_EQ(::stat((dir.path() + "/workers").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  std::vector<v1::WorkerRecord> live = LoadLiveWorkers(dir.path());
  ASSERT_EQ(live.size(), 2u);
  EXPECT_EQ(live[0].pid(), static_cast<uint32_t>(a.pid()));
  EXPECT_EQ(live[1].socket_inode(), 12u);
  KnownWorkers known(live);
  ASSERT_NE(known.Find(b.pid()), nullptr);
  EXPECT_EQ(known.Find(b.pid())->shard(), 1u);
  ASSERT_NE(known.FindBySocket(11), nullptr);
  EXPECT_EQ(known.FindBySocket(11)->pid(), static_cast<uint32_t>(a.pid()));
  EXPECT_EQ(known.FindBySocket(13), nullptr);
  EXPECT_EQ(known.Find(::getpid()), nullptr);
}

// A record whose process is gone, whose pid now names another process (other
// start time) or another uid, is not a worker any more.
TEST(WorkerRegistryTest, RecordsOfGoneOrDifferentProcessesAreDropped) {
  TempDir dir;
  Sleeper alive(::geteuid());
  ASSERT_TRUE(alive.started());
  pid_t gone;
  v1::WorkerRecord gone_record;
  {
    Sleeper s(::geteuid());
    ASSERT_TRUE(s.started());
    gone = s.pid();
    gone_record = RecordOf(gone, "web", 0, 1);
  }
  ASSERT_FALSE(::kill(gone, 0) == 0 && ProcessIds(gone).has_value() &&
               ProcessIds(gone)->start_time == gone_record.start_time());
  v1::WorkerRecord reused = RecordOf(alive.pid(), "web", 1, 2);
  reused.set_start_time(reused.start_time() + 1);
  v1::WorkerRecord other_uid = RecordOf(alive.pid(), "web", 2, 3);
  other_uid.set_uid(other_uid.uid() + 1);
  v1::WorkerRecord good = RecordOf(alive.pid(), "web", 3, 4);
  EXPECT_FALSE(StillRunning(gone_record));
  EXPECT_FALSE(StillRunning(reused));
  EXPECT_FALSE(StillRunning(other_uid));
  EXPECT_TRUE(StillRunning(good));
  ASSERT_TRUE(
      SaveWorkerRegistry(dir.path(), {gone_record, reused, other_uid, good})
          .ok());
  std::vector<v1::WorkerRecord> live = LoadLiveWorkers(dir.path());
  ASSERT_EQ(live.size(), 1u);
  EXPECT_EQ(live[0].shard(), 3u);
}

// Another boot's records, a corrupt file, a file others could write and a
// missing file all give no records (and the agent goes on).
TEST(WorkerRegistryTest, UntrustworthyFilesGiveNoRecords) {
  TempDir dir;
  Sleeper s(::geteuid());
  ASSERT_TRUE(s.started());
  const std::string path = dir.path() + "/workers";
  EXPECT_TRUE(LoadLiveWorkers(dir.path()).empty());  // missing

  v1::WorkerRegistry other_boot;
  other_boot.set_boot_id("00000000-0000-0000-0000-000000000000");
  *other_boot.add_workers() = RecordOf(s.pid(), "web", 0, 1);
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << other_boot.SerializeAsString();
  }
  ::chmod(path.c_str(), 0600);
  EXPECT_TRUE(LoadLiveWorkers(dir.path()).empty());

  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << "\xff\xff\xff garbage";
  }
  EXPECT_TRUE(LoadLiveWorkers(dir.path()).empty());

  ASSERT_TRUE(
      SaveWorkerRegistry(dir.path(), {RecordOf(s.pid(), "web", 0, 1)}).ok());
  ASSERT_EQ(LoadLiveWorkers(dir.path()).size(), 1u);
  ::chmod(path.c_str(), 0666);
  EXPECT_TRUE(LoadLiveWorkers(dir.path()).empty());
}

// The writer rewrites the file only when the set of workers changes, and
// fills in uid and start time itself.
TEST(WorkerRegistryTest, WriterRewritesOnlyOnChange) {
  TempDir dir;
  Sleeper a(::geteuid()), b(::geteuid());
  ASSERT_TRUE(a.started() && b.started());
  const std::string path = dir.path() + "/workers";
  auto inode = [&] {
    struct stat st {};
    ::stat(path.c_str(), &st);
    return st.st_ino;
  };
  auto bare = [](pid_t pid, uint32_t shard) {
    v1::WorkerRecord r;
    r.set_listener("web");
    r.set_shard(shard);
    r.set_pid(static_cast<uint32_t>(pid));
    r.set_uid(::geteuid());
    r.set_socket_inode(100 + shard);
    return r;
  };
  WorkerRegistryWriter writer(dir.path());
  writer.Update({bare(a.pid(), 0)});
  const ino_t first = inode();
  ASSERT_NE(first, 0u);
  ASSERT_EQ(LoadLiveWorkers(dir.path()).size(), 1u);
  EXPECT_EQ(LoadLiveWorkers(dir.path())[0].start_time(),
            ProcessIds(a.pid())->start_time);
  writer.Update({bare(a.pid(), 0)});
  EXPECT_EQ(inode(), first) << "rewritten without a change";
  writer.Update({bare(a.pid(), 0), bare(b.pid(), 1)});
  EXPECT_NE(inode(), first);
  EXPECT_EQ(LoadLiveWorkers(dir.path()).size(), 2u);
  writer.Update({});
  EXPECT_TRUE(LoadLiveWorkers(dir.path()).empty());
}

// A reconnect from a process of another uid (the control socket is open to
// every user) is accepted only when the records name that process, with the
// listener, shard and socket of its hello.
TEST(WorkerRegistryTest, AReconnectOfAnotherUidNeedsAMatchingRecord) {
  if (::geteuid() != 0) PF_SKIP_OR_FAIL("needs root to run a child as nobody");
  Sleeper nobody(kNobody);
  ASSERT_TRUE(nobody.started());
  ASSERT_EQ(ProcessEffectiveUid(nobody.pid()), kNobody);

  auto connection = [&](const std::string& listener, uint32_t shard,
                        uint64_t* inode) {
    Fd sock(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(
        ::bind(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
        0);
    EXPECT_EQ(::listen(sock.get(), 8), 0);
    struct stat st;
    ::fstat(sock.get(), &st);
    *inode = st.st_ino;
    ControlConnection c;
    v1::WorkerHello* hello = c.message.mutable_hello();
    hello->set_pid(static_cast<uint32_t>(nobody.pid()));
    hello->set_listener(listener);
    hello->set_shard(shard);
    hello->set_socket_inode(st.st_ino);
    hello->set_reconnect(true);
    c.fd = std::move(sock);
    c.peer_pid = nobody.pid();
    c.peer_uid = kNobody;
    return c;
  };

  uint64_t inode = 0;
  ControlConnection unknown = connection("web", 1, &inode);
  absl::StatusOr<Adoptee> refused = CheckReconnect(unknown, KnownWorkers());
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("runs as uid 65534"),
            std::string::npos)
      << refused.status();
  EXPECT_FALSE(AdmitControlPeer(nobody.pid(), kNobody, KnownWorkers()));

  ControlConnection good = connection("web", 1, &inode);
  KnownWorkers known({RecordOf(nobody.pid(), "web", 1, inode)});
  EXPECT_TRUE(AdmitControlPeer(nobody.pid(), kNobody, known));
  EXPECT_FALSE(AdmitControlPeer(nobody.pid(), kNobody + 1, known));
  absl::StatusOr<Adoptee> adopted = CheckReconnect(good, known);
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  EXPECT_EQ(adopted->hello.shard(), 1u);

  // The same process claiming another shard, or another socket.
  ControlConnection other_shard = connection("web", 2, &inode);
  KnownWorkers known2({RecordOf(nobody.pid(), "web", 1, inode)});
  absl::StatusOr<Adoptee> wrong = CheckReconnect(other_shard, known2);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("not what the records say"),
            std::string::npos)
      << wrong.status();
  uint64_t recorded_inode = inode;
  ControlConnection other_socket = connection("web", 1, &inode);
  KnownWorkers known3({RecordOf(nobody.pid(), "web", 1, recorded_inode)});
  EXPECT_FALSE(CheckReconnect(other_socket, known3).ok());

  // A record whose start time is not the process's (a reused pid).
  ControlConnection reused = connection("web", 1, &inode);
  v1::WorkerRecord stale = RecordOf(nobody.pid(), "web", 1, inode);
  stale.set_start_time(stale.start_time() + 1);
  EXPECT_FALSE(CheckReconnect(reused, KnownWorkers({stale})).ok());
  EXPECT_FALSE(AdmitControlPeer(nobody.pid(), kNobody, KnownWorkers({stale})));
}

}  // namespace
}  // namespace portfleet
