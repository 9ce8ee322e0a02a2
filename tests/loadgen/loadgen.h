// portfleet-loadgen: a bounded, epoll-based load generator that checks every
// answer and counts every failure from the client side.
//
// The library is what the binary runs; tests may call Run() in-process.
#ifndef PORTFLEET_TESTS_LOADGEN_LOADGEN_H_
#define PORTFLEET_TESTS_LOADGEN_LOADGEN_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace portfleet::loadgen {

enum class Mode { kShort, kLong };
enum class Protocol { kHttp, kEcho };

// What happened to one request (short mode: one connection; long mode: one
// message exchange, or the connection attempt that failed).
enum class Outcome {
  kOk,
  kRefused,  // ECONNREFUSED
  kReset,    // ECONNRESET / EPIPE, or an echo connection closed while idle
  kTimeout,  // connect or request timeout
  kShort,    // EOF before the whole answer arrived
  kWrong,    // an answer that is complete but not what was expected
  kError,    // any other socket error (e.g. EADDRNOTAVAIL)
};
inline constexpr int kNumOutcomes = 7;
const char* OutcomeName(Outcome outcome);

struct Options {
  std::string target;         // "127.0.0.1:8080" / "[::1]:8080"
  std::string allow_address;  // a non-loopback host that may be targeted
  Mode mode = Mode::kShort;
  Protocol protocol = Protocol::kHttp;
  // Short mode: open `rate` connections per second, or (rate == 0) keep
  // `concurrency` connections in flight.
  int rate = 0;
  int concurrency = 8;
  // Long mode: hold `connections`, one exchange every `interval` each.
  int connections = 10;
  absl::Duration interval = absl::Milliseconds(100);
  // Hard bounds.
  absl::Duration duration = absl::Seconds(5);
  int64_t max_connections = 20000;  // connections opened in total
  int max_in_flight = 1000;         // connections open at once (short mode)
  absl::Duration connect_timeout = absl::Seconds(3);
  absl::Duration request_timeout = absl::Seconds(5);
  int threads = 2;
  std::string json_path;  // "" = no JSON file
  bool quiet = false;
};

// Parses the command line (without argv[0]). Validates every value and the
// target address policy.
absl::StatusOr<Options> ParseArgs(const std::vector<std::string>& args);
std::string Usage();

// Checks that `target` is a loopback address (127.0.0.0/8, ::1) or exactly
// the host given by `allow_address`.
absl::Status CheckTarget(const std::string& target,
                         const std::string& allow_address);

struct Percentiles {
  double p50 = 0, p90 = 0, p99 = 0, max = 0;  // same unit as the input
};
// Nearest-rank percentiles: pN is the smallest sample with at least N% of
// the samples <= it. Sorts `samples`. All zero when empty.
Percentiles ComputePercentiles(std::vector<double>& samples);

// One HTTP/1.1 answer parsed from the front of a buffer.
struct HttpAnswer {
  enum class State { kIncomplete, kComplete, kMalformed };
  State state = State::kIncomplete;
  int status = 0;
  size_t length = 0;   // bytes of the whole answer (head + body)
  bool close = false;  // "Connection: close"
  std::string body;
  std::string error;  // for kMalformed
  // From the portfleet-worker body "portfleet listener=L shard=N pid=P".
  std::string listener;
  int shard = -1;
  int pid = -1;
};
// Parses an answer at the start of `data`. A body without Content-Length
// is taken to end at EOF: pass `eof` = true once the peer has closed.
HttpAnswer ParseHttpAnswer(absl::string_view data, bool eof);
// Parses "portfleet listener=L shard=N pid=P" (trailing whitespace allowed).
bool ParseWorkerBody(absl::string_view body, std::string* listener, int* shard,
                     int* pid);

struct Result {
  int64_t outcomes[kNumOutcomes] = {};
  int64_t connections_opened = 0;
  int64_t requests = 0;            // outcomes summed
  int64_t server_closed_idle = 0;  // long http: keep-alive closed by server
  int64_t reconnects = 0;          // long mode
  // Rate mode: connections that fell due but never started because
  // max_in_flight connections were still open (a server that stops
  // answering). They count as failures: offered load that was not served.
  int64_t late_starts = 0;
  absl::Duration elapsed;
  Percentiles latency_ms;
  std::map<int, int64_t> by_shard;        // http: answers per shard
  std::map<int, int64_t> by_pid;          // http: answers per worker pid
  std::vector<std::string> first_errors;  // up to 10

  int64_t ok() const { return outcomes[0]; }
  int64_t failures() const { return requests - ok() + late_starts; }
  std::string Summary() const;  // one line
  std::string ToJson(const Options& options) const;
};

// Runs the load until `duration` ends, `max_connections` are used, or
// `*stop` becomes true (stop may be null). Then stops starting new work,
// lets requests in flight finish (within their timeouts) and closes every
// connection from the client side.
absl::StatusOr<Result> Run(const Options& options,
                           const std::atomic<bool>* stop = nullptr);

}  // namespace portfleet::loadgen

#endif  // PORTFLEET_TESTS_LOADGEN_LOADGEN_H_
