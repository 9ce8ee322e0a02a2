// The health policy's pure parts and the health signals: the stall detector
// and its hysteresis, /proc parsing, the heartbeat that /healthz reads, the
// /readyz answer, and sd_notify (datagrams on a socket of the test's own,
// watchdog pings from the event loop that stop when the loop is wedged).
#include "agent/fleet/health.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/event_loop.h"
#include "agent/fleet/observer.h"
#include "agent/health_board.h"
#include "agent/metrics/metrics_server.h"
#include "agent/sd_notify.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::UnixEpoch() + absl::Hours(1);

ShardSample At(absl::Duration t, uint32_t depth = 0,
               ProcessState state = ProcessState::kRunning) {
  ShardSample s;
  s.time = kT0 + t;
  s.pid = 42;
  s.process = state;
  s.has_queue = true;
  s.queue_depth = depth;
  return s;
}

TEST(StallDetectorTest, StoppedProcessStallsAfterTheWindowOnly) {
  StallDetector d;
  HealthParams p;  // window 600 ms, restore after 1 s
  for (int ms = 0; ms < 600; ms += 200) {
    EXPECT_FALSE(
        d.Observe(At(absl::Milliseconds(ms), 0, ProcessState::kStopped), p)
            .stalled);
  }
  Judgement j =
      d.Observe(At(absl::Milliseconds(600), 0, ProcessState::kStopped), p);
  EXPECT_TRUE(j.stalled);
  EXPECT_THAT(j.reason, HasSubstr("worker pid 42 is stopped"));
  // Running again: still stalled until 1 s without suspicion.
  EXPECT_TRUE(d.Observe(At(absl::Milliseconds(800)), p).stalled);
  EXPECT_TRUE(d.Observe(At(absl::Milliseconds(1600)), p).stalled);
  EXPECT_FALSE(d.Observe(At(absl::Milliseconds(1800)), p).stalled);
}

TEST(StallDetectorTest, ABriefStopIsNotAStall) {
  StallDetector d;
  HealthParams p;
  d.Observe(At(absl::Milliseconds(0), 0, ProcessState::kStopped), p);
  d.Observe(At(absl::Milliseconds(200), 0, ProcessState::kStopped), p);
  d.Observe(At(absl::Milliseconds(400)), p);  // continued
  EXPECT_FALSE(
      d.Observe(At(absl::Milliseconds(800), 0, ProcessState::kStopped), p)
          .stalled);
}

TEST(StallDetectorTest, QueueWithoutAcceptsStalls) {
  HealthParams p;
  ShardSample a = At(absl::ZeroDuration(), 3);
  ShardSample b = At(absl::Milliseconds(200), 3);
  // Same depth, nothing else known: nothing was accepted.
  EXPECT_TRUE(StallDetector::Suspect(b, a, p).has_value());
  // Shrinking queue: accepted.
  b.queue_depth = 2;
  EXPECT_FALSE(StallDetector::Suspect(b, a, p).has_value());
  // Arrivals beyond the growth: accepted.
  a.has_arrivals = b.has_arrivals = true;
  a.arrivals = 100;
  b.arrivals = 110;
  b.queue_depth = 5;
  EXPECT_FALSE(StallDetector::Suspect(b, a, p).has_value());
  // Every arrival still queued: none accepted.
  b.queue_depth = 13;
  EXPECT_TRUE(StallDetector::Suspect(b, a, p).has_value());
  // The worker's accepted counter moved.
  a.reports = b.reports = true;
  a.last_report = b.last_report = b.time;
  a.accepted_total = 7;
  b.accepted_total = 9;
  EXPECT_FALSE(StallDetector::Suspect(b, a, p).has_value());
  // An empty queue is never a queue stall.
  EXPECT_FALSE(
      StallDetector::Suspect(At(absl::Milliseconds(200), 0), a, p).has_value());
}

TEST(StallDetectorTest, ReportsThatStopAreAStall) {
  HealthParams p;  // report timeout 3 s
  ShardSample s = At(absl::Seconds(10));
  s.reports = true;
  s.last_report = s.time - absl::Seconds(2);
  EXPECT_FALSE(StallDetector::Suspect(s, std::nullopt, p).has_value());
  s.last_report = s.time - absl::Seconds(4);
  std::optional<std::string> why = StallDetector::Suspect(s, std::nullopt, p);
  ASSERT_TRUE(why.has_value());
  EXPECT_THAT(*why, HasSubstr("no load report"));
}

TEST(StallDetectorTest, ANewWorkerStartsAfresh) {
  StallDetector d;
  HealthParams p;
  for (int ms = 0; ms <= 800; ms += 200) {
    d.Observe(At(absl::Milliseconds(ms), 0, ProcessState::kStopped), p);
  }
  ASSERT_TRUE(d.stalled());
  ShardSample fresh = At(absl::Seconds(1));
  fresh.pid = 43;
  EXPECT_FALSE(d.Observe(fresh, p).stalled);
}

TEST(ObserverTest, ParsesProcStat) {
  ProcessInfo p = ParseProcStat(
      "123 (we (ird) name) T 1 123 123 0 -1 4194560 100 0 0 0 17 4 0 0 20 0 "
      "1 0 100 1000 10");
  EXPECT_EQ(p.state, ProcessState::kStopped);
  EXPECT_EQ(p.cpu_ticks, 21u);
  EXPECT_EQ(ParseProcStat("1 (x) S 0").state, ProcessState::kRunning);
  EXPECT_EQ(ParseProcStat("1 (x) Z 0").state, ProcessState::kZombie);
  EXPECT_EQ(ParseProcStat("garbage").state, ProcessState::kUnknown);
}

TEST(ObserverTest, ReadsThisProcessAndAListeningSocket) {
  std::unique_ptr<ShardObserver> o = MakeKernelShardObserver();
  EXPECT_EQ(o->Process(::getpid()).state, ProcessState::kRunning);
  EXPECT_EQ(o->Process(0x3ffffff0).state, ProcessState::kUnknown);
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(s.get(), 77), 0);
  absl::StatusOr<QueueInfo> q = o->Queue(s.get());
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->depth, 0u);
  EXPECT_EQ(q->backlog, 77u);
}

TEST(HealthBoardTest, LivenessFollowsTheHeartbeat) {
  HealthBoard board;
  EXPECT_FALSE(board.Live(kT0, absl::Seconds(3)).ok());
  board.Beat(kT0);
  EXPECT_TRUE(board.Live(kT0 + absl::Seconds(2), absl::Seconds(3)).ok());
  absl::Status late = board.Live(kT0 + absl::Seconds(5), absl::Seconds(3));
  EXPECT_FALSE(late.ok());
  EXPECT_THAT(late.message(), HasSubstr("wedged"));
}

TEST(HealthBoardTest, PublishesChangesOnly) {
  HealthBoard board;
  int changes = 0;
  board.OnChange([&](const AgentHealth&) { changes++; });
  AgentHealth h;
  h.state = v1::HEALTH_STATE_SERVING;
  EXPECT_TRUE(board.Publish(h));
  EXPECT_FALSE(board.Publish(h));
  h.state = v1::HEALTH_STATE_DEGRADED;
  EXPECT_TRUE(board.Publish(h));
  EXPECT_EQ(changes, 2);
  EXPECT_EQ(board.Current().state, v1::HEALTH_STATE_DEGRADED);
}

TEST(ReadinessTest, ReadyWhenServingOrDegraded) {
  AgentHealth h;
  h.state = v1::HEALTH_STATE_SERVING;
  EXPECT_EQ(ReadinessAnswer(h).first, 200);
  h.state = v1::HEALTH_STATE_DEGRADED;
  h.reason = "listener web DEGRADED";
  EXPECT_EQ(ReadinessAnswer(h).first, 200);
  EXPECT_THAT(ReadinessAnswer(h).second, HasSubstr("DEGRADED"));
  for (v1::HealthState s :
       {v1::HEALTH_STATE_STARTING, v1::HEALTH_STATE_NOT_SERVING,
        v1::HEALTH_STATE_STOPPING}) {
    h.state = s;
    EXPECT_EQ(ReadinessAnswer(h).first, 503);
  }
}

// A datagram socket of the test's own, standing in for systemd.
class NotifySocket {
 public:
  NotifySocket() {
    path_ = absl::StrCat("/tmp/pf-notify-", ::getpid(), "-", counter_++);
    fd_ = Fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, path_.c_str(), path_.size());
    ::unlink(path_.c_str());
    EXPECT_EQ(::bind(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    timeval tv{.tv_sec = 0, .tv_usec = 20000};
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  ~NotifySocket() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }
  // Every datagram that arrives within `d`, with the time it arrived.
  std::vector<std::pair<absl::Time, std::string>> Read(absl::Duration d) {
    std::vector<std::pair<absl::Time, std::string>> out;
    absl::Time end = absl::Now() + d;
    while (absl::Now() < end) {
      char buf[512];
      ssize_t n = ::recv(fd_.get(), buf, sizeof(buf), 0);
      if (n > 0) out.emplace_back(absl::Now(), std::string(buf, n));
    }
    return out;
  }

 private:
  static inline int counter_ = 0;
  std::string path_;
  Fd fd_;
};

TEST(SdNotifyTest, SendsAssignmentsAsOneDatagram) {
  NotifySocket systemd;
  absl::StatusOr<std::unique_ptr<SdNotifier>> n =
      SdNotifier::Open(systemd.path());
  ASSERT_TRUE(n.ok()) << n.status();
  ASSERT_TRUE((*n)->Send("READY=1\nSTATUS=serving").ok());
  auto got = systemd.Read(absl::Milliseconds(100));
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].second, "READY=1\nSTATUS=serving");
  EXPECT_FALSE(SdNotifier::Open("relative/path").ok());
}

TEST(SdNotifyTest, WatchdogIntervalIsHalfTheTimeout) {
  EXPECT_EQ(SdNotifier::WatchdogInterval("4000000", nullptr, 10),
            absl::Seconds(2));
  EXPECT_EQ(SdNotifier::WatchdogInterval("4000000", "10", 10),
            absl::Seconds(2));
  EXPECT_FALSE(SdNotifier::WatchdogInterval("4000000", "11", 10).has_value());
  EXPECT_FALSE(SdNotifier::WatchdogInterval(nullptr, nullptr, 10).has_value());
  EXPECT_FALSE(SdNotifier::WatchdogInterval("x", nullptr, 10).has_value());
}

TEST(SdNotifyTest, WatchdogPingsStopWhileTheLoopIsWedged) {
  NotifySocket systemd;
  std::unique_ptr<SdNotifier> n = *SdNotifier::Open(systemd.path());
  std::unique_ptr<EventLoop> loop = *EventLoop::Create();
  auto pinger = std::make_unique<WatchdogPinger>(loop.get(), n.get(),
                                                 absl::Milliseconds(50));
  std::thread runner([&] { loop->Run(); });
  auto before = systemd.Read(absl::Milliseconds(400));
  EXPECT_GE(before.size(), 4u);
  // Wedge the loop for 600 ms: no ping in that time.
  absl::Time wedged = absl::Now();
  loop->Post([] { absl::SleepFor(absl::Milliseconds(600)); });
  auto during = systemd.Read(absl::Milliseconds(900));
  int in_wedge = 0;
  for (const auto& [t, text] : during) {
    EXPECT_EQ(text, "WATCHDOG=1");
    if (t > wedged + absl::Milliseconds(100) &&
        t < wedged + absl::Milliseconds(550)) {
      in_wedge++;
    }
  }
  EXPECT_EQ(in_wedge, 0);
  EXPECT_GE(during.size(), 2u);  // and they resume
  loop->RunSync([&] { pinger.reset(); });
  loop->Stop();
  runner.join();
}

}  // namespace
}  // namespace portfleet
