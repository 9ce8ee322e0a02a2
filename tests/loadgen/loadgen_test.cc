// Unit tests of the load generator's pure pieces: argument parsing and the
// target policy, percentile math, HTTP answer and worker body parsing.
#include "tests/loadgen/loadgen.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace portfleet::loadgen {
namespace {

using ::testing::HasSubstr;

TEST(LoadgenArgs, DefaultsAreSmallAndBounded) {
  auto o = ParseArgs({"--target", "127.0.0.1:8080"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->mode, Mode::kShort);
  EXPECT_EQ(o->protocol, Protocol::kHttp);
  EXPECT_EQ(o->duration, absl::Seconds(5));
  EXPECT_EQ(o->max_connections, 20000);
  EXPECT_EQ(o->threads, 2);
  EXPECT_EQ(o->rate, 0);
  EXPECT_EQ(o->concurrency, 8);
}

TEST(LoadgenArgs, ParsesEveryFlag) {
  auto o = ParseArgs({"--target=[::1]:9000",
                      "--mode",
                      "long",
                      "--protocol",
                      "echo",
                      "--connections",
                      "200",
                      "--interval",
                      "50",
                      "--duration",
                      "2.5",
                      "--max-connections",
                      "500",
                      "--connect-timeout",
                      "100",
                      "--request-timeout",
                      "200",
                      "--threads",
                      "1",
                      "--json",
                      "/tmp/x.json",
                      "--quiet"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->mode, Mode::kLong);
  EXPECT_EQ(o->protocol, Protocol::kEcho);
  EXPECT_EQ(o->connections, 200);
  EXPECT_EQ(o->interval, absl::Milliseconds(50));
  EXPECT_EQ(o->duration, absl::Milliseconds(2500));
  EXPECT_EQ(o->max_connections, 500);
  EXPECT_EQ(o->connect_timeout, absl::Milliseconds(100));
  EXPECT_EQ(o->request_timeout, absl::Milliseconds(200));
  EXPECT_EQ(o->threads, 1);
  EXPECT_EQ(o->json_path, "/tmp/x.json");
  EXPECT_TRUE(o->quiet);
}

TEST(LoadgenArgs, RateAcceptsPerSecondSuffix) {
  auto o = ParseArgs({"--target", "127.0.0.2:80", "--rate", "2000/s"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->rate, 2000);
}

TEST(LoadgenArgs, RejectsBadInput) {
  EXPECT_FALSE(ParseArgs({}).ok());                         // no target
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1"}).ok());  // no port
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1:80", "--rate", "0"}).ok());
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1:80", "--rate", "x"}).ok());
  EXPECT_FALSE(
      ParseArgs({"--target", "127.0.0.1:80", "--duration", "601"}).ok());
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1:80", "--mode", "x"}).ok());
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1:80", "--bogus"}).ok());
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1:80", "--rate"}).ok());
  EXPECT_FALSE(ParseArgs({"--target", "127.0.0.1:80", "--rate", "10",
                          "--concurrency", "2"})
                   .ok());
  EXPECT_FALSE(
      ParseArgs({"--target", "127.0.0.1:80", "--mode", "long", "--rate", "10"})
          .ok());
  EXPECT_TRUE(absl::IsCancelled(ParseArgs({"--help"}).status()));
}

TEST(LoadgenArgs, RefusesNonLoopbackTargetsUnlessAllowed) {
  auto o = ParseArgs({"--target", "10.1.2.3:80"});
  ASSERT_FALSE(o.ok());
  EXPECT_THAT(std::string(o.status().message()),
              HasSubstr("not a loopback address"));
  EXPECT_THAT(std::string(o.status().message()),
              HasSubstr("--allow-address 10.1.2.3"));
  EXPECT_FALSE(ParseArgs({"--target", "[2001:db8::1]:80"}).ok());
  EXPECT_FALSE(ParseArgs({"--target", "0.0.0.0:80"}).ok());
  EXPECT_TRUE(ParseArgs({"--target", "127.9.9.9:80"}).ok());
  EXPECT_TRUE(ParseArgs({"--target", "[::1]:80"}).ok());
  EXPECT_TRUE(
      ParseArgs({"--target", "10.1.2.3:80", "--allow-address", "10.1.2.3"})
          .ok());
  EXPECT_TRUE(
      ParseArgs({"--target", "[fd00::2]:80", "--allow-address", "fd00::2"})
          .ok());
  // The allowance is for that one host only.
  EXPECT_FALSE(
      ParseArgs({"--target", "10.1.2.4:80", "--allow-address", "10.1.2.3"})
          .ok());
}

TEST(LoadgenPercentiles, NearestRank) {
  std::vector<double> empty;
  Percentiles p0 = ComputePercentiles(empty);
  EXPECT_EQ(p0.max, 0);
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);  // 1..100, unsorted
  Percentiles p = ComputePercentiles(v);
  EXPECT_EQ(p.p50, 50);
  EXPECT_EQ(p.p90, 90);
  EXPECT_EQ(p.p99, 99);
  EXPECT_EQ(p.max, 100);
  std::vector<double> one{7};
  Percentiles p1 = ComputePercentiles(one);
  EXPECT_EQ(p1.p50, 7);
  EXPECT_EQ(p1.p99, 7);
  std::vector<double> three{3, 1, 2};
  Percentiles p3 = ComputePercentiles(three);
  EXPECT_EQ(p3.p50, 2);  // ceil(1.5) = 2nd
  EXPECT_EQ(p3.p90, 3);
}

TEST(LoadgenHttp, ParsesACompleteWorkerAnswer) {
  std::string body = "portfleet listener=web shard=3 pid=1234\n";
  std::string raw =
      "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(body.size()) +
      "\r\nConnection: close\r\n\r\n" + body;
  HttpAnswer a = ParseHttpAnswer(raw, false);
  ASSERT_EQ(a.state, HttpAnswer::State::kComplete) << a.error;
  EXPECT_EQ(a.status, 200);
  EXPECT_TRUE(a.close);
  EXPECT_EQ(a.length, raw.size());
  EXPECT_EQ(a.listener, "web");
  EXPECT_EQ(a.shard, 3);
  EXPECT_EQ(a.pid, 1234);
  // Every strict prefix is incomplete.
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(ParseHttpAnswer(raw.substr(0, n), false).state,
              HttpAnswer::State::kIncomplete)
        << n;
  }
}

TEST(LoadgenHttp, MalformedAndEofDelimited) {
  EXPECT_EQ(ParseHttpAnswer("SSH-2.0\r\n\r\n", false).state,
            HttpAnswer::State::kMalformed);
  EXPECT_EQ(ParseHttpAnswer("HTTP/1.1 abc\r\n\r\n", false).state,
            HttpAnswer::State::kMalformed);
  EXPECT_EQ(
      ParseHttpAnswer("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false)
          .state,
      HttpAnswer::State::kMalformed);
  std::string no_len = "HTTP/1.1 503 Busy\r\n\r\nbusy";
  EXPECT_EQ(ParseHttpAnswer(no_len, false).state,
            HttpAnswer::State::kIncomplete);
  HttpAnswer a = ParseHttpAnswer(no_len, true);
  ASSERT_EQ(a.state, HttpAnswer::State::kComplete);
  EXPECT_EQ(a.status, 503);
  EXPECT_EQ(a.body, "busy");
  EXPECT_EQ(a.shard, -1);
}

TEST(LoadgenHttp, WorkerBody) {
  std::string l;
  int s = 0, p = 0;
  EXPECT_TRUE(
      ParseWorkerBody("portfleet listener=a shard=0 pid=9", &l, &s, &p));
  EXPECT_EQ(l, "a");
  EXPECT_EQ(s, 0);
  EXPECT_EQ(p, 9);
  EXPECT_FALSE(ParseWorkerBody("hello", &l, &s, &p));
  EXPECT_FALSE(
      ParseWorkerBody("portfleet listener=a shard=x pid=9", &l, &s, &p));
  EXPECT_FALSE(ParseWorkerBody("portfleet listener=a shard=1", &l, &s, &p));
  EXPECT_FALSE(
      ParseWorkerBody("portfleet listener=a shard=1 pid=0", &l, &s, &p));
}

TEST(LoadgenResult, SummaryAndJson) {
  Result r;
  r.outcomes[0] = 9;
  r.outcomes[2] = 1;
  r.requests = 10;
  r.by_shard[1] = 9;
  r.first_errors.push_back("reset: recv: \"x\"");
  r.elapsed = absl::Seconds(1);
  EXPECT_EQ(r.failures(), 1);
  EXPECT_THAT(r.Summary(), HasSubstr("ok=9 failed=1"));
  EXPECT_THAT(r.Summary(), HasSubstr("shards={1:9}"));
  Options o;
  o.target = "127.0.0.1:1";
  std::string json = r.ToJson(o);
  EXPECT_THAT(json, HasSubstr("\"failures\": 1"));
  EXPECT_THAT(json, HasSubstr("\"reset\": 1"));
  EXPECT_THAT(json, HasSubstr("\\\"x\\\""));
}

}  // namespace
}  // namespace portfleet::loadgen
