// Helpers of the health tests and the health benchmark: shard health from
// the API, the agent's four health signals (gRPC health, /readyz, GetStatus,
// /metrics) read from outside, and what a stopped worker holds.
#ifndef PORTFLEET_TESTS_NETNS_HEALTH_TESTING_H_
#define PORTFLEET_TESTS_NETNS_HEALTH_TESTING_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/client_unary_call.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/loadgen/fleet_testing.h"
#include "tests/testing/agent_harness.h"
#include "tests/testing/process.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {

inline constexpr char kMetricsAddress[] = "127.0.0.1:9464";

inline v1::ShardHealth ShardHealth(v1::FleetService::Stub& stub,
                                   const std::string& name, uint32_t index) {
  for (const v1::Shard& s : Shards(stub, name)) {
    if (s.index() == index) return s.health();
  }
  return v1::SHARD_HEALTH_UNSPECIFIED;
}

inline v1::GetStatusResponse Status(v1::FleetService::Stub& stub) {
  v1::GetStatusResponse resp;
  stub.GetStatus(RpcContext().get(), v1::GetStatusRequest(), &resp);
  return resp;
}

// Client connections a worker holds: its socket fds other than the
// listening socket (3) and the control channel (4).
inline int HeldConnections(pid_t pid) {
  int n = 0;
  for (int fd = 5; fd < 4096; ++fd) {
    char buf[64];
    std::string link = absl::StrCat("/proc/", pid, "/fd/", fd);
    ssize_t len = ::readlink(link.c_str(), buf, sizeof(buf) - 1);
    if (len > 0 && absl::StartsWith(std::string(buf, len), "socket:")) n++;
  }
  return n;
}

// GET `path` from `address`: status code and body; code 0 when unreachable.
inline std::pair<int, std::string> HttpGetPath(const std::string& address,
                                               const std::string& path) {
  absl::StatusOr<SocketAddress> a = SocketAddress::Parse(address);
  if (!a.ok()) return {0, ""};
  Fd fd(::socket(a->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  timeval tv{.tv_sec = 3, .tv_usec = 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (::connect(fd.get(), a->get(), a->length) != 0) return {0, ""};
  std::string req = absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: x\r\n\r\n");
  if (::send(fd.get(), req.data(), req.size(), MSG_NOSIGNAL) < 0)
    return {0, ""};
  std::string in;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
    if (n <= 0) break;
    in.append(buf, n);
  }
  int code = 0;
  if (in.size() <= 12 || !absl::SimpleAtoi(in.substr(9, 3), &code)) code = 0;
  size_t body = in.find("\r\n\r\n");
  return {code, body == std::string::npos ? "" : in.substr(body + 4)};
}

// grpc.health.v1 Check of `service` (hand-encoded, as portfleetctl does):
// 1 SERVING, 2 NOT_SERVING, -1 on error (e.g. NOT_FOUND).
inline int GrpcHealth(const std::string& api_socket,
                      const std::string& service) {
  auto channel = grpc::CreateChannel("unix://" + api_socket,
                                     grpc::InsecureChannelCredentials());
  std::string req;
  if (!service.empty()) {
    req.push_back(0x0a);
    req.push_back(static_cast<char>(service.size()));
    req += service;
  }
  grpc::Slice slice(req);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Status st =
      grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
          channel.get(),
          grpc::internal::RpcMethod("/grpc.health.v1.Health/Check",
                                    grpc::internal::RpcMethod::NORMAL_RPC),
          &ctx, request, &response);
  if (!st.ok()) return -1;
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  return bytes.size() >= 2 && bytes[0] == 0x08 ? bytes[1] : 0;
}

// The value of an unlabelled (or exactly labelled) sample in /metrics text.
inline std::string MetricValue(const std::string& metrics,
                               const std::string& sample) {
  size_t at = metrics.find("\n" + sample + " ");
  if (at == std::string::npos) return "";
  size_t start = at + sample.size() + 2;
  return metrics.substr(start, metrics.find('\n', start) - start);
}

// gRPC health (overall and listener/web), /readyz, GetStatus and /metrics
// all say `expected` (readiness: SERVING and DEGRADED are ready). Waits up
// to 3 s for them to settle.
inline void SignalsAgree(AgentHarness& agent, v1::FleetService::Stub& stub,
                         v1::HealthState expected) {
  bool ready = expected == v1::HEALTH_STATE_SERVING ||
               expected == v1::HEALTH_STATE_DEGRADED;
  std::string state = v1::HealthState_Name(expected).substr(13);
  std::string last;
  bool agree = WaitFor(
      [&] {
        v1::GetStatusResponse st = Status(stub);
        auto [code, body] = HttpGetPath(kMetricsAddress, "/readyz");
        std::string metrics = HttpGetPath(kMetricsAddress, "/metrics").second;
        int grpc_all = GrpcHealth(agent.api_socket(), "");
        last = absl::StrCat(
            "status=", v1::HealthState_Name(st.health()),
            " serving=", st.serving(), " readyz=", code, " grpc=", grpc_all,
            " metrics=", MetricValue(metrics, "portfleet_serving"), "/",
            MetricValue(metrics, absl::StrCat("portfleet_health_state{state=\"",
                                              state, "\"}")));
        return st.health() == expected && st.serving() == ready &&
               code == (ready ? 200 : 503) && grpc_all == (ready ? 1 : 2) &&
               MetricValue(metrics, "portfleet_serving") ==
                   (ready ? "1" : "0") &&
               MetricValue(metrics,
                           absl::StrCat("portfleet_health_state{state=\"",
                                        state, "\"}")) == "1";
      },
      absl::Seconds(3));
  EXPECT_TRUE(agree) << "expected " << state << "; " << last;
}

// Collects the agent's events from WatchEvents on a thread.
class EventLog {
 public:
  explicit EventLog(v1::FleetService::Stub& stub) {
    thread_ = std::thread([this, &stub] {
      std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader =
          stub.WatchEvents(&ctx_, v1::WatchEventsRequest());
      v1::WatchEventsResponse resp;
      while (reader->Read(&resp)) {
        std::lock_guard<std::mutex> lock(mu_);
        events_.push_back(resp.event());
      }
      reader->Finish().IgnoreError();
    });
  }
  ~EventLog() {
    ctx_.TryCancel();
    thread_.join();
  }
  // Time of the first event of `type` about shard `shard` and `pid` after
  // `since`, waiting up to `timeout`.
  std::optional<absl::Time> Wait(v1::EventType type, int shard, pid_t pid,
                                 absl::Time since, absl::Duration timeout) {
    absl::Time end = absl::Now() + timeout;
    while (absl::Now() < end) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (const v1::Event& e : events_) {
          absl::Time t = absl::FromUnixMicros(e.time_unix_micros());
          if (e.type() == type && e.shard() == shard && e.pid() == pid &&
              t >= since) {
            return t;
          }
        }
      }
      absl::SleepFor(absl::Milliseconds(2));
    }
    return std::nullopt;
  }

 private:
  grpc::ClientContext ctx_;
  std::mutex mu_;
  std::vector<v1::Event> events_;
  std::thread thread_;
};

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_NETNS_HEALTH_TESTING_H_
