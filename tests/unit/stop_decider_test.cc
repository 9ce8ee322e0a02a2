// StopDecider with a fake RestartProbe: what a stop request does to the
// workers. A restart by systemd steps aside (workers neither drained nor
// killed); a stop, an error or no answer in time drains; a second request
// kills the workers now.
#include "agent/stop_decider.h"

#include <atomic>
#include <cstdlib>
#include <future>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/sdk/base/time.h"

namespace portfleet {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// Answers `answer`; with Hold(), only once Release() is called.
class FakeProbe : public RestartProbe {
 public:
  explicit FakeProbe(absl::StatusOr<RestartVerdict> answer)
      : answer_(std::move(answer)) {}
  void Hold() { held_ = true; }
  void Release() { release_.set_value(); }
  absl::StatusOr<RestartVerdict> Probe(absl::Duration timeout) override {
    timeout_ = timeout;
    ++calls_;
    if (held_) release_.get_future().wait();
    return answer_;
  }
  int calls() const { return calls_; }
  absl::Duration timeout() const { return timeout_; }

 private:
  absl::StatusOr<RestartVerdict> answer_;
  bool held_ = false;
  std::promise<void> release_;
  std::atomic<int> calls_{0};
  absl::Duration timeout_;
};

// The decider on a loop with a manual clock, recording its actions.
class StopDeciderTest : public ::testing::Test {
 protected:
  void Make(std::unique_ptr<RestartProbe> probe) {
    decider_.reset();  // before the loop it uses
    absl::StatusOr<std::unique_ptr<EventLoop>> loop =
        EventLoop::Create(&clock_);
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
    decider_ = std::make_unique<StopDecider>(
        loop_.get(), std::move(probe), absl::Seconds(1),
        StopDecider::Actions{
            .drain =
                [this](const std::string& why) { drained_.push_back(why); },
            .step_aside =
                [this](const std::string& why) {
                  stepped_aside_.push_back(why);
                },
            .kill_now =
                [this](const std::string& why) { killed_.push_back(why); }});
  }
  FakeProbe* MakeWith(absl::StatusOr<RestartVerdict> answer) {
    auto probe = std::make_unique<FakeProbe>(std::move(answer));
    FakeProbe* raw = probe.get();
    Make(std::move(probe));
    return raw;
  }
  // Runs the loop (real time for the probe's thread) until the decider has
  // left kProbing, at most 5 s.
  void RunUntilDecided() {
    for (int i = 0;
         i < 500 && decider_->state() == StopDecider::State::kProbing; ++i) {
      loop_->RunOnce(absl::Milliseconds(10));
    }
  }

  ManualClock clock_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<StopDecider> decider_;
  std::vector<std::string> drained_, stepped_aside_, killed_;
};

RestartVerdict Verdict(bool restarting, std::string unit,
                       std::string job_type) {
  return RestartVerdict{.restarting = restarting,
                        .unit = std::move(unit),
                        .job_type = std::move(job_type)};
}

TEST_F(StopDeciderTest, RestartStepsAsideWithoutDrainingOrKilling) {
  FakeProbe* probe =
      MakeWith(Verdict(true, "portfleet-agent.service", "restart"));
  decider_->OnStop("received SIGTERM", 1);
  EXPECT_EQ(decider_->state(), StopDecider::State::kProbing);
  EXPECT_THAT(drained_, IsEmpty());  // nothing before the answer
  RunUntilDecided();
  EXPECT_EQ(probe->calls(), 1);
  EXPECT_EQ(probe->timeout(), absl::Seconds(1));
  EXPECT_EQ(decider_->state(), StopDecider::State::kSteppingAside);
  EXPECT_THAT(stepped_aside_,
              ElementsAre("received SIGTERM: systemd is restarting "
                          "portfleet-agent.service (job restart)"));
  EXPECT_THAT(drained_, IsEmpty());
  EXPECT_THAT(killed_, IsEmpty());
}

TEST_F(StopDeciderTest, StopJobDrains) {
  MakeWith(Verdict(false, "portfleet-agent.service", "stop"));
  decider_->OnStop("received SIGTERM", 1);
  RunUntilDecided();
  EXPECT_EQ(decider_->state(), StopDecider::State::kDraining);
  EXPECT_THAT(drained_, ElementsAre("received SIGTERM "
                                    "(portfleet-agent.service: stop job)"));
  EXPECT_THAT(stepped_aside_, IsEmpty());
  EXPECT_THAT(killed_, IsEmpty());
}

TEST_F(StopDeciderTest, NoJobOrNoServiceDrains) {
  MakeWith(Verdict(false, "", ""));
  decider_->OnStop("received SIGINT", 1);
  RunUntilDecided();
  EXPECT_THAT(drained_, ElementsAre("received SIGINT"));
  EXPECT_THAT(stepped_aside_, IsEmpty());
}

TEST_F(StopDeciderTest, WithoutProbeDrainsAtOnce) {
  Make(nullptr);
  decider_->OnStop("received SIGTERM", 1);
  EXPECT_EQ(decider_->state(), StopDecider::State::kDraining);
  EXPECT_THAT(drained_, ElementsAre("received SIGTERM"));
}

TEST_F(StopDeciderTest, ProbeErrorDrainsAndSaysWhy) {
  MakeWith(absl::UnavailableError("GetUnitByPID: connection refused"));
  ::testing::internal::CaptureStderr();
  decider_->OnStop("received SIGTERM", 1);
  RunUntilDecided();
  std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(drained_, ElementsAre("received SIGTERM"));
  EXPECT_THAT(stepped_aside_, IsEmpty());
  EXPECT_THAT(log, HasSubstr("cannot tell whether systemd is restarting the "
                             "agent (GetUnitByPID: connection refused): "
                             "taking received SIGTERM as a stop"));
}

TEST_F(StopDeciderTest, NoAnswerInTimeDrainsAndALateRestartIsIgnored) {
  FakeProbe* probe =
      MakeWith(Verdict(true, "portfleet-agent.service", "restart"));
  probe->Hold();
  ::testing::internal::CaptureStderr();
  decider_->OnStop("received SIGTERM", 1);
  loop_->AdvanceTo(&clock_, clock_.Now() + absl::Milliseconds(999));
  EXPECT_THAT(drained_, IsEmpty());
  loop_->AdvanceTo(&clock_, clock_.Now() + absl::Milliseconds(1));
  std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(drained_, ElementsAre("received SIGTERM"));
  EXPECT_THAT(log, HasSubstr("no answer within 1s to whether systemd is "
                             "restarting the agent: taking received SIGTERM "
                             "as a stop"));
  // The answer comes after all: too late, the drain has begun.
  probe->Release();
  for (int i = 0; i < 20; ++i) loop_->RunOnce(absl::Milliseconds(10));
  EXPECT_THAT(stepped_aside_, IsEmpty());
  EXPECT_EQ(decider_->state(), StopDecider::State::kDraining);
}

TEST_F(StopDeciderTest, SecondStopWhileProbingDrainsAndKills) {
  FakeProbe* probe =
      MakeWith(Verdict(true, "portfleet-agent.service", "restart"));
  probe->Hold();
  decider_->OnStop("received SIGTERM", 1);
  decider_->OnStop("received SIGINT", 2);
  EXPECT_THAT(drained_, ElementsAre("received SIGINT"));
  EXPECT_THAT(killed_, ElementsAre("received SIGINT"));
  probe->Release();
  for (int i = 0; i < 20; ++i) loop_->RunOnce(absl::Milliseconds(10));
  EXPECT_THAT(stepped_aside_, IsEmpty());
}

TEST_F(StopDeciderTest, SecondStopKillsWhateverTheFirstBecame) {
  MakeWith(Verdict(true, "portfleet-agent.service", "restart"));
  decider_->OnStop("received SIGTERM", 1);
  RunUntilDecided();
  ASSERT_EQ(decider_->state(), StopDecider::State::kSteppingAside);
  decider_->OnStop("received SIGTERM", 2);
  EXPECT_THAT(killed_, ElementsAre("received SIGTERM"));

  MakeWith(Verdict(false, "portfleet-agent.service", "stop"));
  drained_.clear();
  killed_.clear();
  decider_->OnStop("received SIGTERM", 1);
  RunUntilDecided();
  decider_->OnStop("received SIGTERM", 2);
  EXPECT_EQ(drained_.size(), 1u);
  EXPECT_THAT(killed_, ElementsAre("received SIGTERM"));
}

TEST_F(StopDeciderTest, StepAsideRequestDoesNotAskAndHappensOnce) {
  FakeProbe* probe = MakeWith(Verdict(false, "", ""));
  decider_->OnStepAside("received SIGUSR2");
  decider_->OnStepAside("received SIGUSR2");
  EXPECT_EQ(probe->calls(), 0);
  EXPECT_THAT(stepped_aside_, ElementsAre("received SIGUSR2"));
  EXPECT_THAT(drained_, IsEmpty());
  // Once draining, a step-aside request changes nothing.
  MakeWith(Verdict(false, "", ""));
  stepped_aside_.clear();
  decider_->OnStop("received SIGTERM", 1);
  RunUntilDecided();
  decider_->OnStepAside("received SIGUSR2");
  EXPECT_THAT(stepped_aside_, IsEmpty());
  EXPECT_EQ(drained_.size(), 1u);
}

TEST(IsRestartJobTest, OnlyRestartJobs) {
  EXPECT_TRUE(IsRestartJob("restart"));
  EXPECT_TRUE(IsRestartJob("try-restart"));
  EXPECT_TRUE(IsRestartJob("reload-or-restart"));
  EXPECT_FALSE(IsRestartJob("stop"));
  EXPECT_FALSE(IsRestartJob("start"));
  EXPECT_FALSE(IsRestartJob("reload"));
  EXPECT_FALSE(IsRestartJob(""));
}

TEST(SystemdRestartProbeTest, OutsideASystemdServiceIsNeverARestart) {
  const char* saved = std::getenv("INVOCATION_ID");
  std::string keep = saved ? saved : "";
  ::unsetenv("INVOCATION_ID");
  absl::StatusOr<RestartVerdict> v =
      MakeSystemdRestartProbe()->Probe(absl::Seconds(1));
  if (saved) ::setenv("INVOCATION_ID", keep.c_str(), 1);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_FALSE(v->restarting);
  EXPECT_THAT(v->unit, IsEmpty());
}

}  // namespace
}  // namespace portfleet
