// Shared by the portfleetctl tests: a FakeController behind a real ApiServer
// on a unix socket in a temporary directory, and portfleetctl run in-process
// against it (to completion, or in the background for streams and watches).
#ifndef PORTFLEET_TESTS_UNIT_CTL_TEST_ENV_H_
#define PORTFLEET_TESTS_UNIT_CTL_TEST_ENV_H_

#include <atomic>
#include <memory>
#include <mutex>
#include <sstream>
#include <streambuf>
#include <string>
#include <thread>
#include <vector>

#include "agent/api/server.h"
#include "ctl/ctl.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"
#include "tests/unit/api_fake_controller.h"

namespace portfleet::ctl::testing {

struct Result {
  int code;
  std::string out;
  std::string err;
};

// A stream buffer that one thread writes and another reads.
class SyncBuf : public std::streambuf {
 public:
  std::string str() {
    std::lock_guard<std::mutex> lock(mu_);
    return data_;
  }

 protected:
  int_type overflow(int_type c) override {
    if (c == traits_type::eof()) return traits_type::not_eof(c);
    std::lock_guard<std::mutex> lock(mu_);
    data_.push_back(static_cast<char>(c));
    return c;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    std::lock_guard<std::mutex> lock(mu_);
    data_.append(s, n);
    return n;
  }

 private:
  std::mutex mu_;
  std::string data_;
};

// portfleetctl running in a thread until Stop() (Ctrl-C) or its end.
class Background {
 public:
  Background(std::vector<std::string> args) : out_(&out_buf_), err_(&err_buf_) {
    env_.out = &out_;
    env_.err = &err_;
    env_.interrupted = &interrupted_;
    thread_ = std::thread([this, args = std::move(args)] {
      code_ = ::portfleet::ctl::Run(env_, args);
      done_ = true;
    });
  }
  ~Background() { Stop(); }
  std::string out() { return out_buf_.str(); }
  std::string err() { return err_buf_.str(); }
  bool done() const { return done_; }
  // Waits until the output contains `text`.
  bool WaitForOutput(const std::string& text,
                     absl::Duration timeout = absl::Seconds(5)) {
    return ::portfleet::testing::WaitFor(
        [&] { return out().find(text) != std::string::npos; }, timeout);
  }
  // Interrupts (as Ctrl-C does) and returns the exit code.
  int Stop() {
    interrupted_ = true;
    if (thread_.joinable()) thread_.join();
    return code_;
  }
  // Waits for the command to end by itself; returns the exit code.
  int Join() {
    if (thread_.joinable()) thread_.join();
    return code_;
  }

 private:
  SyncBuf out_buf_, err_buf_;
  std::ostream out_, err_;
  CtlEnv env_;
  std::atomic<bool> interrupted_{false};
  std::atomic<bool> done_{false};
  int code_ = -1;
  std::thread thread_;
};

class CtlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_address_ = "unix://" + dir_.path() + "/api.sock";
    ApiServerOptions options;
    options.address = server_address_;
    auto server = ApiServer::Start(options, &fake_);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  // Runs portfleetctl with `args` against the fake (through
  // PORTFLEET_SERVER), with `input` as standard input.
  Result Ctl(std::vector<std::string> args, const std::string& input = "") {
    std::ostringstream out, err;
    std::istringstream in(input);
    CtlEnv env;
    env.out = &out;
    env.err = &err;
    env.in = &in;
    env.getenv = [this](const std::string& name) -> std::optional<std::string> {
      if (name == "PORTFLEET_SERVER") return server_address_;
      return std::nullopt;
    };
    int code = ::portfleet::ctl::Run(env, args);
    return {code, out.str(), err.str()};
  }

  // Runs portfleetctl in the background against the fake.
  std::unique_ptr<Background> Start(std::vector<std::string> args) {
    args.insert(args.begin(), {"--server", server_address_});
    return std::make_unique<Background>(std::move(args));
  }

  // Two listeners: web (2 shards, hash) and api (3 shards, cpu).
  void ApplyWeb() {
    std::string spec = dir_.WriteFile("fleet.textproto", R"pb(
      listeners {
        name: "web"
        address: "127.0.0.1:8080"
        shards: 2
        worker { command: "portfleet-worker" args: "--mode=http" }
      }
      listeners {
        name: "api"
        address: "127.0.0.1:9000"
        shards: 3
        worker { command: "portfleet-worker" }
        steering { policy: STEERING_POLICY_CPU }
      }
    )pb");
    Result r = Ctl({"apply", "-f", spec});
    ASSERT_EQ(r.code, 0) << r.err;
  }

  ::portfleet::testing::TempDir dir_;
  ::portfleet::testing::FakeController fake_;
  std::string server_address_;
  std::unique_ptr<ApiServer> server_;
};

}  // namespace portfleet::ctl::testing

#endif  // PORTFLEET_TESTS_UNIT_CTL_TEST_ENV_H_
