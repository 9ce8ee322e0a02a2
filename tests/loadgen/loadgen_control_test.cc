// Negative controls for the client-side counters that every "0 failed
// connections" claim rests on: loadgen::Run and the blocking test clients
// (testing::HttpGet, EchoOnce, Tally) are pointed at small misbehaving
// servers on 127.0.0.1 and each misbehaviour must land in its own class.
//
// Steps of every case:
//  1. start a server on 127.0.0.1 (kernel-chosen port) that misbehaves in one
//     way: refuse (bound, not listening), RST right after accept, accept and
//     never answer, answer short then close, close after the request with no
//     answer, answer with a wrong status, answer completely but never close;
//  2. run a small bounded load (or one client call) against it;
//  3. assert the exact class counts: every request in the expected class,
//     none counted ok, and failures() equal to the number of requests.
// A correct server is the positive control: all ok, no failures.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/loadgen.h"
#include "tests/testing/client.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::loadgen {
namespace {

using ::testing::HasSubstr;

enum class Behaviour {
  kOk,           // complete 200 answer with the worker body, then close
  kRefuse,       // bound but not listening: the kernel answers RST to SYN
  kResetAccept,  // accept, then close with SO_LINGER 0 (RST)
  kStall,        // accept and hold the connection, never answer
  kShortAnswer,  // read the request, send half an answer, close
  kEarlyClose,   // read the request, close without a byte
  kWrongStatus,  // complete 503 answer, then close
  kNoEof,        // complete 200 answer, never close
  kEchoWrong,    // echo: read a line, send a different line of equal length
  kEchoShort,    // echo: read a line, send half of it, close
};

constexpr char kBody[] = "portfleet listener=ctl shard=0 pid=4242\n";

std::string OkAnswer() {
  return absl::StrCat("HTTP/1.1 200 OK\r\nContent-Length: ", strlen(kBody),
                      "\r\nConnection: close\r\n\r\n", kBody);
}

// A one-thread misbehaving server on 127.0.0.1:<kernel's choice>.
class ControlServer {
 public:
  explicit ControlServer(Behaviour b) : behaviour_(b) {
    fd_ = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (!fd_ ||
        ::bind(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      ADD_FAILURE() << "bind 127.0.0.1:0: " << strerror(errno);
      return;
    }
    socklen_t len = sizeof(a);
    ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    if (b == Behaviour::kRefuse) return;  // no listen(): SYN gets a RST
    if (::listen(fd_.get(), 128) != 0) {
      ADD_FAILURE() << "listen: " << strerror(errno);
      return;
    }
    thread_ = std::thread([this] { Loop(); });
  }
  ~ControlServer() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }
  int accepted() const { return accepted_.load(); }

 private:
  // Reads until the end of an HTTP head (or a newline for echo), EOF, or 2 s.
  static std::string ReadRequest(int fd, bool echo) {
    std::string in;
    absl::Time deadline = absl::Now() + absl::Seconds(2);
    while (absl::Now() < deadline) {
      if (echo ? in.find('\n') != std::string::npos
               : in.find("\r\n\r\n") != std::string::npos) {
        break;
      }
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      char buf[4096];
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      in.append(buf, n);
    }
    return in;
  }

  static void SendAll(int fd, const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += n;
    }
  }

  void Serve(Fd conn) {
    int fd = conn.get();
    switch (behaviour_) {
      case Behaviour::kRefuse:
        return;
      case Behaviour::kResetAccept: {
        linger l{1, 0};
        ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
        return;  // conn closes: RST
      }
      case Behaviour::kStall:
        held_.push_back(std::move(conn));
        return;
      case Behaviour::kOk:
        ReadRequest(fd, false);
        SendAll(fd, OkAnswer());
        return;
      case Behaviour::kShortAnswer: {
        ReadRequest(fd, false);
        std::string a = OkAnswer();
        SendAll(fd, a.substr(0, a.size() - 10));
        return;
      }
      case Behaviour::kEarlyClose:
        ReadRequest(fd, false);
        return;
      case Behaviour::kWrongStatus:
        ReadRequest(fd, false);
        SendAll(fd,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n"
                "Connection: close\r\n\r\nbusy\n");
        return;
      case Behaviour::kNoEof:
        ReadRequest(fd, false);
        SendAll(fd, OkAnswer());
        held_.push_back(std::move(conn));
        return;
      case Behaviour::kEchoWrong: {
        std::string line = ReadRequest(fd, true);
        if (!line.empty()) line[0] = line[0] == 'x' ? 'y' : 'x';
        SendAll(fd, line);
        return;
      }
      case Behaviour::kEchoShort: {
        std::string line = ReadRequest(fd, true);
        SendAll(fd, line.substr(0, line.size() / 2));
        return;
      }
    }
  }

  void Loop() {
    while (!stop_) {
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      Fd conn(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn) continue;
      accepted_++;
      Serve(std::move(conn));
    }
  }

  Behaviour behaviour_;
  Fd fd_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::vector<Fd> held_;  // stalled connections, closed at the end
  std::thread thread_;
};

// Small, bounded, one thread: `n` connections, two at a time.
Options Small(const ControlServer& s, int n) {
  Options o;
  o.target = s.target();
  o.threads = 1;
  o.concurrency = 2;
  o.max_connections = n;
  o.duration = absl::Seconds(10);  // the count ends the run, not the clock
  o.connect_timeout = absl::Milliseconds(1000);
  o.request_timeout = absl::Milliseconds(300);
  o.quiet = true;
  return o;
}

int64_t Count(const Result& r, Outcome o) {
  return r.outcomes[static_cast<int>(o)];
}

// Every request of `r` is in class `want`; nothing is ok.
void ExpectAllIn(const Result& r, Outcome want, int64_t n) {
  EXPECT_EQ(r.requests, n) << r.Summary();
  EXPECT_EQ(Count(r, want), n) << r.Summary();
  EXPECT_EQ(r.ok(), 0) << r.Summary();
  EXPECT_EQ(r.failures(), n) << r.Summary();
  EXPECT_EQ(r.late_starts, 0) << r.Summary();
}

TEST(LoadgenControl, CorrectServerIsAllOk) {
  ControlServer s(Behaviour::kOk);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 20));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->requests, 20) << r->Summary();
  EXPECT_EQ(r->ok(), 20) << r->Summary();
  EXPECT_EQ(r->failures(), 0) << r->Summary();
  EXPECT_EQ(r->by_pid[4242], 20) << r->Summary();
  EXPECT_EQ(s.accepted(), 20);
}

TEST(LoadgenControl, RefusedIsRefused) {
  ControlServer s(Behaviour::kRefuse);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kRefused, 10);
}

TEST(LoadgenControl, ResetAfterAcceptIsReset) {
  ControlServer s(Behaviour::kResetAccept);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kReset, 10);
  EXPECT_EQ(s.accepted(), 10);
}

TEST(LoadgenControl, StallIsTimeout) {
  ControlServer s(Behaviour::kStall);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 4));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kTimeout, 4);
  EXPECT_THAT(r->first_errors[0], HasSubstr("no complete answer in time"));
  // The connections were accepted: the timeout is the answer's, not connect's.
  EXPECT_EQ(s.accepted(), 4);
}

TEST(LoadgenControl, ShortAnswerIsShort) {
  ControlServer s(Behaviour::kShortAnswer);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kShort, 10);
}

TEST(LoadgenControl, EarlyCloseIsShort) {
  ControlServer s(Behaviour::kEarlyClose);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kShort, 10);
  EXPECT_THAT(r->first_errors[0], HasSubstr("EOF after 0 bytes"));
}

TEST(LoadgenControl, WrongStatusIsWrong) {
  ControlServer s(Behaviour::kWrongStatus);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kWrong, 10);
  EXPECT_THAT(r->first_errors[0], HasSubstr("HTTP status 503"));
}

TEST(LoadgenControl, AnswerWithoutEofIsTimeout) {
  ControlServer s(Behaviour::kNoEof);
  absl::StatusOr<Result> r = loadgen::Run(Small(s, 4));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectAllIn(*r, Outcome::kTimeout, 4);
  EXPECT_THAT(r->first_errors[0], HasSubstr("answer complete but no EOF"));
}

TEST(LoadgenControl, EchoWrongAndShort) {
  {
    ControlServer s(Behaviour::kEchoWrong);
    Options o = Small(s, 6);
    o.protocol = Protocol::kEcho;
    absl::StatusOr<Result> r = loadgen::Run(o);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectAllIn(*r, Outcome::kWrong, 6);
  }
  {
    ControlServer s(Behaviour::kEchoShort);
    Options o = Small(s, 6);
    o.protocol = Protocol::kEcho;
    absl::StatusOr<Result> r = loadgen::Run(o);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectAllIn(*r, Outcome::kShort, 6);
  }
}

// Rate mode against a server that never answers: the connections that could
// not even start (max_in_flight reached) are counted as not started and are
// failures too, so a stalled server cannot look healthy by answering
// nothing at a fixed rate.
TEST(LoadgenControl, StartsHeldBackByAStallAreFailures) {
  ControlServer s(Behaviour::kStall);
  Options o;
  o.target = s.target();
  o.threads = 1;
  o.rate = 200;
  o.max_in_flight = 5;
  o.duration = absl::Milliseconds(500);
  o.request_timeout = absl::Seconds(2);  // longer than the run: none repeats
  o.quiet = true;
  absl::StatusOr<Result> r = loadgen::Run(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->requests, 5) << r->Summary();
  EXPECT_EQ(Count(*r, Outcome::kTimeout), 5) << r->Summary();
  // About 100 were due in 0.5 s at 200/s; only 5 could start.
  EXPECT_GE(r->late_starts, 50) << r->Summary();
  EXPECT_EQ(r->failures(), 5 + r->late_starts) << r->Summary();
  EXPECT_THAT(r->Summary(), HasSubstr("not_started="));
}

testing::ClientOptions Timeout(absl::Duration d) {
  testing::ClientOptions o;
  o.timeout = d;
  return o;
}

// The blocking clients the netns tests tally with.
TEST(ClientControl, HttpGetClassifiesEveryMisbehaviour) {
  struct Case {
    Behaviour b;
    testing::Outcome want;
  };
  const Case cases[] = {
      {Behaviour::kOk, testing::Outcome::kOk},
      {Behaviour::kRefuse, testing::Outcome::kRefused},
      {Behaviour::kResetAccept, testing::Outcome::kReset},
      {Behaviour::kStall, testing::Outcome::kTimeout},
      {Behaviour::kShortAnswer, testing::Outcome::kShort},
      {Behaviour::kEarlyClose, testing::Outcome::kShort},
      {Behaviour::kWrongStatus, testing::Outcome::kWrong},
      {Behaviour::kNoEof, testing::Outcome::kTimeout},
  };
  testing::Tally tally;
  for (const Case& c : cases) {
    ControlServer s(c.b);
    testing::Reply reply =
        testing::HttpGet(s.target(), Timeout(absl::Milliseconds(300)));
    EXPECT_EQ(reply.outcome, c.want)
        << "behaviour " << static_cast<int>(c.b) << ": got "
        << testing::OutcomeName(reply.outcome) << " (" << reply.error << ")";
    tally.Add(reply);
  }
  EXPECT_EQ(tally.ok, 1);
  EXPECT_EQ(tally.failed, 7);
  EXPECT_EQ(tally.by_pid[4242], 1);
  EXPECT_FALSE(tally.first_error.empty());
}

TEST(ClientControl, EchoOnceClassifiesWrongAndShort) {
  {
    ControlServer s(Behaviour::kEchoWrong);
    testing::Reply r = testing::EchoOnce(s.target(), "hello\n",
                                         Timeout(absl::Milliseconds(500)));
    EXPECT_EQ(r.outcome, testing::Outcome::kWrong) << r.error;
  }
  {
    ControlServer s(Behaviour::kEchoShort);
    testing::Reply r = testing::EchoOnce(s.target(), "hello world\n",
                                         Timeout(absl::Milliseconds(500)));
    EXPECT_EQ(r.outcome, testing::Outcome::kShort) << r.error;
  }
}

}  // namespace
}  // namespace portfleet::loadgen
