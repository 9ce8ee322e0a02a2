// The proxy mode's flags and upstream address, without sockets.
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/proxy.h"
#include "worker/worker.h"

namespace portfleet::worker {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<Flags> Parse(std::vector<std::string> args) {
  return ParseFlags(args);
}

TEST(ProxyFlagsTest, ProxyModeTakesUpstreamAndConnectTimeout) {
  absl::StatusOr<Flags> f =
      Parse({"--mode=proxy", "--upstream", "127.0.0.1:9000",
             "--connect-timeout=250ms"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->mode, Mode::kProxy);
  EXPECT_EQ(f->upstream, "127.0.0.1:9000");
  EXPECT_EQ(f->connect_timeout, absl::Milliseconds(250));
  f = Parse({"--mode", "proxy", "--upstream=[::1]:80"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->connect_timeout, absl::Seconds(5));
}

TEST(ProxyFlagsTest, BadFlagsAreNamed) {
  struct Case {
    std::vector<std::string> args;
    std::string error;
  };
  const std::vector<Case> cases = {
      {{"--mode=proxy"}, "--mode proxy needs --upstream HOST:PORT"},
      {{"--mode=http", "--upstream=127.0.0.1:80"},
       "--upstream is a proxy mode flag (add --mode proxy)"},
      {{"--connect-timeout=1s"},
       "--connect-timeout is a proxy mode flag (add --mode proxy)"},
      {{"--mode=proxy", "--upstream="}, "--upstream: empty value"},
      {{"--mode=proxy", "--upstream=127.0.0.1:80", "--connect-timeout=0"},
       "--connect-timeout: '0' is not a positive duration"},
      {{"--mode=proxy", "--upstream=127.0.0.1:80", "--connect-timeout=soon"},
       "--connect-timeout"},
      {{"--mode=proxy", "--upstream"}, "flag --upstream needs a value"},
      {{"--mode=tcp"}, "unknown mode 'tcp' (want http, echo or proxy)"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<Flags> f = Parse(c.args);
    ASSERT_FALSE(f.ok()) << c.args[0];
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(c.error));
  }
}

TEST(ProxyFlagsTest, HelpNamesTheProxyFlags) {
  EXPECT_THAT(Usage(), HasSubstr("--mode proxy --upstream HOST:PORT"));
  EXPECT_THAT(Usage(), HasSubstr("--connect-timeout DURATION"));
}

TEST(ProxyUpstreamTest, NumericAndNamedAddresses) {
  absl::StatusOr<SocketAddress> a = ResolveUpstream("127.0.0.1:8080");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->ToString(), "127.0.0.1:8080");
  a = ResolveUpstream("[::1]:443");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->ToString(), "[::1]:443");
  a = ResolveUpstream("localhost:8080");  // /etc/hosts, no DNS
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->port(), 8080);
}

TEST(ProxyUpstreamTest, BadAddressesAreNamed) {
  EXPECT_THAT(std::string(ResolveUpstream("127.0.0.1").status().message()),
              HasSubstr("--upstream '127.0.0.1'"));
  EXPECT_THAT(std::string(ResolveUpstream("localhost:0").status().message()),
              HasSubstr("port '0' is not 1-65535"));
  EXPECT_THAT(std::string(ResolveUpstream("localhost:http").status().message()),
              HasSubstr("port 'http' is not 1-65535"));
  EXPECT_THAT(std::string(ResolveUpstream("[::1]:0").status().message()),
              HasSubstr("port must be a number from 1 to 65535"));
  EXPECT_THAT(
      std::string(
          ResolveUpstream("no-such-host.invalid:80").status().message()),
      HasSubstr("cannot resolve 'no-such-host.invalid'"));
}

}  // namespace
}  // namespace portfleet::worker
