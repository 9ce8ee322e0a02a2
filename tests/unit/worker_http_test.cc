// HTTP request-head parser, per-connection HTTP session and flag parsing of
// portfleet-worker, in-process.
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/worker.h"

namespace portfleet::worker {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Kind = HttpParseResult::Kind;

constexpr char kBody[] = "portfleet listener=web shard=2 pid=42\n";

int CountOf(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos;
       pos = haystack.find(needle, pos + needle.size())) {
    ++n;
  }
  return n;
}

TEST(WorkerHttpParserTest, SimpleGet) {
  std::string req = "GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
  HttpParseResult r = ParseHttpRequestHead(req + "GET / HTTP/1.1\r\n");
  ASSERT_EQ(r.kind, Kind::kComplete) << r.error;
  EXPECT_EQ(r.head_length, req.size());
  EXPECT_EQ(r.head.method, "GET");
  EXPECT_EQ(r.head.target, "/x?y=1");
  EXPECT_EQ(r.head.minor_version, 1);
  EXPECT_TRUE(r.head.keep_alive);
  EXPECT_EQ(r.head.content_length, 0u);
}

TEST(WorkerHttpParserTest, IncompleteUntilBlankLine) {
  std::string req = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
  for (size_t n = 0; n < req.size(); ++n) {
    EXPECT_EQ(ParseHttpRequestHead(req.substr(0, n)).kind, Kind::kIncomplete)
        << "prefix of " << n << " bytes";
  }
  EXPECT_EQ(ParseHttpRequestHead(req).kind, Kind::kComplete);
}

TEST(WorkerHttpParserTest, ConnectionHeaderAndVersions) {
  auto keep = [](const std::string& req) {
    HttpParseResult r = ParseHttpRequestHead(req);
    EXPECT_EQ(r.kind, Kind::kComplete) << r.error;
    return r.head.keep_alive;
  };
  EXPECT_TRUE(keep("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
  EXPECT_FALSE(keep("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"));
  EXPECT_FALSE(
      keep("GET / HTTP/1.1\r\nHost: a\r\nconnection: Upgrade, CLOSE\r\n\r\n"));
  EXPECT_FALSE(keep("GET / HTTP/1.0\r\n\r\n"));
  EXPECT_TRUE(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
  EXPECT_EQ(ParseHttpRequestHead("GET / HTTP/1.0\r\n\r\n").head.minor_version,
            0);
}

TEST(WorkerHttpParserTest, ContentLength) {
  HttpParseResult r = ParseHttpRequestHead(
      "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
  ASSERT_EQ(r.kind, Kind::kComplete) << r.error;
  EXPECT_EQ(r.head.content_length, 12u);
  r = ParseHttpRequestHead(
      "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
      "Content-Length: 5\r\n\r\n");
  EXPECT_EQ(r.kind, Kind::kComplete) << r.error;
}

TEST(WorkerHttpParserTest, LeadingEmptyLinesAreSkipped) {
  std::string req = "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
  HttpParseResult r = ParseHttpRequestHead(req);
  ASSERT_EQ(r.kind, Kind::kComplete) << r.error;
  EXPECT_EQ(r.head_length, req.size());
}

struct BadCase {
  const char* name;
  std::string request;
  int status;
};

TEST(WorkerHttpParserTest, MalformedRequests) {
  const BadCase cases[] = {
      {"garbage line", "hello\r\n", 400},
      {"two tokens", "GET /\r\n\r\n", 400},
      {"bad version", "GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400},
      {"http2", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505},
      {"no host", "GET / HTTP/1.1\r\n\r\n", 400},
      {"two hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
      {"no colon", "GET / HTTP/1.1\r\nHost: a\r\nbroken\r\n\r\n", 400},
      {"space in name", "GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400},
      {"folding", "GET / HTTP/1.1\r\nHost: a\r\n  more\r\n\r\n", 400},
      {"control char", std::string("GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n"),
       400},
      {"bad length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
       400},
      {"conflicting lengths",
       "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
       "Content-Length: 2\r\n\r\n",
       400},
      {"chunked",
       "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
  };
  for (const BadCase& c : cases) {
    HttpParseResult r = ParseHttpRequestHead(c.request);
    EXPECT_EQ(r.kind, Kind::kError) << c.name;
    EXPECT_EQ(r.error_status, c.status) << c.name << ": " << r.error;
  }
}

TEST(WorkerHttpParserTest, OversizedHeadIs431) {
  std::string head =
      "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + std::string(kMaxHttpHead, 'x');
  HttpParseResult r = ParseHttpRequestHead(head);  // no end in sight
  EXPECT_EQ(r.kind, Kind::kError);
  EXPECT_EQ(r.error_status, 431);
  r = ParseHttpRequestHead(head + "\r\n\r\n");  // complete but too long
  EXPECT_EQ(r.error_status, 431);
  // Just under the limit is fine.
  std::string fits = "GET / HTTP/1.1\r\nHost: a\r\nX: ";
  fits += std::string(kMaxHttpHead - fits.size() - 4, 'x') + "\r\n\r\n";
  ASSERT_EQ(fits.size(), kMaxHttpHead);
  EXPECT_EQ(ParseHttpRequestHead(fits).kind, Kind::kComplete);
}

TEST(WorkerIdentityBodyTest, MatchesTheTestRegex) {
  EXPECT_EQ(IdentityBody("web", 2, 42), kBody);
}

std::string Ok(bool close) {
  return std::string(
             "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
             "Content-Length: 38\r\n") +
         (close ? "Connection: close\r\n" : "") + "\r\n" + kBody;
}

TEST(WorkerHttpSessionTest, PipelinedRequestsInOneBuffer) {
  HttpSession session(kBody);
  std::string out;
  session.Consume(
      "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
      "GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
      "GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
      "GET /4 HTTP/1.1\r\nHost: a\r\n\r\n",
      &out);
  EXPECT_EQ(out, Ok(false) + Ok(false) + Ok(true));
  EXPECT_EQ(session.requests(), 3u);
  EXPECT_TRUE(session.closing());
  // Input after the close is ignored.
  session.Consume("GET /5 HTTP/1.1\r\nHost: a\r\n\r\n", &out);
  EXPECT_EQ(session.requests(), 3u);
}

TEST(WorkerHttpSessionTest, RequestSplitAcrossReads) {
  HttpSession session(kBody);
  std::string out;
  std::string req = "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHo";
  for (char c : req) {
    session.Consume(std::string(1, c), &out);
  }
  EXPECT_EQ(out, Ok(false));
  EXPECT_FALSE(session.idle());
  session.Consume("st: a\r\n\r\n", &out);
  EXPECT_EQ(out, Ok(false) + Ok(false));
  EXPECT_TRUE(session.idle());
  EXPECT_FALSE(session.closing());
}

TEST(WorkerHttpSessionTest, Http10ClosesUnlessKeepAlive) {
  HttpSession session(kBody);
  std::string out;
  session.Consume("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &out);
  EXPECT_THAT(out, HasSubstr("Connection: keep-alive\r\n"));
  EXPECT_FALSE(session.closing());
  out.clear();
  session.Consume("GET / HTTP/1.0\r\n\r\n", &out);
  EXPECT_EQ(out, Ok(true));
  EXPECT_TRUE(session.closing());
}

TEST(WorkerHttpSessionTest, HeadHasNoBody) {
  HttpSession session(kBody);
  std::string out;
  session.Consume("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", &out);
  EXPECT_THAT(out, HasSubstr("Content-Length: 38\r\n"));
  EXPECT_THAT(out, Not(HasSubstr("portfleet listener")));
}

TEST(WorkerHttpSessionTest, BodiesAreDiscardedAndAnsweredWhenComplete) {
  HttpSession session(kBody);
  std::string out;
  // The body looks like a request: it must not be parsed as one.
  std::string body = "GET /evil HTTP/1.1\r\nHost: a\r\n\r\n";
  session.Consume("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " +
                      std::to_string(body.size()) + "\r\n\r\n" +
                      body.substr(0, 10),
                  &out);
  EXPECT_EQ(out, "");  // answered only when the body is complete
  EXPECT_FALSE(session.idle());
  session.Consume(body.substr(10) + "GET / HTTP/1.1\r\nHost: a\r\n\r\n", &out);
  EXPECT_EQ(out, Ok(false) + Ok(false));
  EXPECT_EQ(session.requests(), 2u);
  EXPECT_TRUE(session.idle());
}

TEST(WorkerHttpSessionTest, LargeBodyInManyReads) {
  HttpSession session(kBody);
  std::string out;
  session.Consume(
      "PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n", &out);
  std::string chunk(10000, 'z');
  for (int i = 0; i < 99; ++i) session.Consume(chunk, &out);
  EXPECT_EQ(out, "");
  session.Consume(chunk + "GET / HTTP/1.1\r\nHost: a\r\n\r\n", &out);
  EXPECT_EQ(out, Ok(false) + Ok(false));
}

TEST(WorkerHttpSessionTest, MalformedRequestGets400AndCloses) {
  HttpSession session(kBody);
  std::string out;
  session.Consume("GET / HTTP/1.1\r\nHost: a\r\n\r\nBLAH\r\n\r\n", &out);
  EXPECT_THAT(out, HasSubstr(Ok(false)));
  EXPECT_THAT(out, HasSubstr("HTTP/1.1 400 Bad Request\r\n"));
  EXPECT_THAT(out.substr(Ok(false).size()), HasSubstr("Connection: close\r\n"));
  EXPECT_TRUE(session.closing());
}

TEST(WorkerHttpSessionTest, OversizedHeadGets431) {
  HttpSession session(kBody);
  std::string out;
  session.Consume("GET / HTTP/1.1\r\nHost: a\r\nX-Big: ", &out);
  std::string chunk(4096, 'x');
  for (int i = 0; i < 5 && !session.closing(); ++i) {
    session.Consume(chunk, &out);
  }
  EXPECT_THAT(out, HasSubstr("HTTP/1.1 431 Request Header Fields Too Large"));
  EXPECT_TRUE(session.closing());
}

TEST(WorkerHttpSessionTest, DrainWhileIdleClosesAtOnce) {
  HttpSession session(kBody);
  std::string out;
  session.Consume("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &out);
  session.StartDrain();
  EXPECT_TRUE(session.closing());
}

TEST(WorkerHttpSessionTest, DrainAnswersTheRequestInProgressWithClose) {
  HttpSession session(kBody);
  std::string out;
  session.Consume("GET / HTTP/1.1\r\nHost: a\r\n", &out);
  session.StartDrain();
  EXPECT_FALSE(session.closing());
  session.Consume("\r\n", &out);
  EXPECT_EQ(out, Ok(true));
  EXPECT_TRUE(session.closing());
}

TEST(WorkerHttpSessionTest, ManyPipelinedRequests) {
  HttpSession session(kBody);
  std::string in;
  for (int i = 0; i < 500; ++i) in += "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
  std::string out;
  // Odd-sized pieces so that requests straddle reads.
  for (size_t pos = 0; pos < in.size(); pos += 97) {
    session.Consume(in.substr(pos, 97), &out);
  }
  EXPECT_EQ(CountOf(out, "HTTP/1.1 200 OK\r\n"), 500);
  EXPECT_EQ(session.requests(), 500u);
  EXPECT_TRUE(session.idle());
}

// clean_close(): the worker may close without waiting for the client's FIN
// only when the client asked to close and sent nothing after that request.
TEST(WorkerHttpSessionTest, CleanCloseOnlyWhenTheClientAskedAndSentNoMore) {
  constexpr char kClose[] =
      "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
  {
    HttpSession s(kBody);
    std::string out;
    s.Consume(kClose, &out);
    EXPECT_TRUE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // HTTP/1.0 closes by default
    std::string out;
    s.Consume("GET / HTTP/1.0\r\n\r\n", &out);
    EXPECT_TRUE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // a body, then close
    std::string out;
    s.Consume(
        "POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        "Content-Length: 3\r\n\r\nab",
        &out);
    EXPECT_FALSE(s.closing());
    s.Consume("c", &out);
    EXPECT_TRUE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // body bytes beyond Content-Length
    std::string out;
    s.Consume(
        "POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        "Content-Length: 3\r\n\r\nabcGET",
        &out);
    EXPECT_TRUE(s.closing());
    EXPECT_FALSE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // pipelined after the close request
    std::string out;
    s.Consume(std::string(kClose) + "GET / HTTP/1.1\r\n", &out);
    EXPECT_TRUE(s.closing());
    EXPECT_FALSE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // input arriving after the close was decided
    std::string out;
    s.Consume(kClose, &out);
    s.Consume("x", &out);
    EXPECT_FALSE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // our decision (drain), not the client's
    std::string out;
    s.Consume("GET / HTTP/1.1\r\nHost: a\r\n", &out);
    s.StartDrain();
    s.Consume("\r\n", &out);
    EXPECT_TRUE(s.closing());
    EXPECT_FALSE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // an error answer
    std::string out;
    s.Consume("BAD\r\n\r\n", &out);
    EXPECT_TRUE(s.closing());
    EXPECT_FALSE(s.clean_close());
  }
  {
    HttpSession s(kBody);  // keep-alive
    std::string out;
    s.Consume("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &out);
    EXPECT_FALSE(s.closing());
    EXPECT_FALSE(s.clean_close());
  }
}

TEST(WorkerFlagsTest, Defaults) {
  absl::StatusOr<Flags> flags = ParseFlags({});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->mode, Mode::kHttp);
  EXPECT_EQ(flags->drain_timeout, absl::Seconds(30));
  EXPECT_FALSE(flags->help);
}

TEST(WorkerFlagsTest, BothFlagForms) {
  absl::StatusOr<Flags> flags = ParseFlags(
      {"--mode", "echo", "--log-level=debug", "--drain-timeout=1500ms"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->mode, Mode::kEcho);
  EXPECT_EQ(flags->log_level, LogLevel::kDebug);
  EXPECT_EQ(flags->drain_timeout, absl::Milliseconds(1500));
  flags = ParseFlags({"--mode=http", "--drain-timeout", "7"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->drain_timeout, absl::Seconds(7));
  EXPECT_TRUE(ParseFlags({"-h"})->help);
}

TEST(WorkerFlagsTest, Errors) {
  EXPECT_THAT(ParseFlags({"--bogus"}).status().message(),
              HasSubstr("unknown flag '--bogus'"));
  EXPECT_THAT(ParseFlags({"--bogus=1"}).status().message(),
              HasSubstr("unknown flag '--bogus'"));
  EXPECT_THAT(ParseFlags({"--mode", "tcp"}).status().message(),
              HasSubstr("unknown mode 'tcp'"));
  EXPECT_THAT(ParseFlags({"--mode", "proxy"}).status().message(),
              HasSubstr("--mode proxy needs --upstream"));
  EXPECT_THAT(ParseFlags({"--mode"}).status().message(),
              HasSubstr("needs a value"));
  EXPECT_THAT(ParseFlags({"--drain-timeout=soon"}).status().message(),
              HasSubstr("not a duration"));
  EXPECT_THAT(ParseFlags({"--log-level=loud"}).status().message(),
              HasSubstr("--log-level"));
  EXPECT_THAT(ParseFlags({"stray"}).status().message(),
              HasSubstr("unexpected argument"));
}

TEST(WorkerUsageTest, DocumentsModesEnvironmentAndSignals) {
  std::string usage = Usage();
  for (const char* word :
       {"--mode http", "echo", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
        "PORTFLEET_LISTENER", "PORTFLEET_SHARD", "PORTFLEET_CONTROL_FD",
        "SIGTERM", "Example"}) {
    EXPECT_THAT(usage, HasSubstr(word));
  }
}

}  // namespace
}  // namespace portfleet::worker
