#include "tests/loadgen/loadgen.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>
#include <unordered_map>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::loadgen {

const char* OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kOk:
      return "ok";
    case Outcome::kRefused:
      return "refused";
    case Outcome::kReset:
      return "reset";
    case Outcome::kTimeout:
      return "timeout";
    case Outcome::kShort:
      return "short";
    case Outcome::kWrong:
      return "wrong";
    case Outcome::kError:
      return "error";
  }
  return "?";
}

// ---------------------------------------------------------------------------
// Command line

std::string Usage() {
  return R"(Usage: portfleet-loadgen --target HOST:PORT [options]

Opens connections to HOST:PORT for a bounded time, sends a request, checks
the whole answer and counts every outcome: ok, refused, reset, timeout,
short (EOF before the whole answer), wrong (complete but unexpected answer),
error (any other socket error); with --rate also not_started (connections
that fell due but could not start because --max-in-flight were still open).
Every class but ok is a failure. Only loopback targets (127.0.0.0/8, [::1])
are accepted, or the one host named by --allow-address (an address of a
network namespace the caller created).

  --target HOST:PORT        "127.0.0.1:8080" or "[::1]:8080" (required)
  --allow-address HOST      also accept this exact non-loopback host
  --mode short|long         short: one request per connection (default);
                            long: hold --connections, one exchange each
                            every --interval
  --protocol http|echo      http: GET / and a complete 200 answer, the
                            portfleet-worker body gives shard and pid
                            (default); echo: a payload must come back as is
  --rate N/s                short mode: open N connections per second
  --concurrency N           short mode: keep N in flight (default 8; used
                            when --rate is not given)
  --connections N           long mode: connections to hold (default 10)
  --interval MS             long mode: ms between exchanges (default 100)
  --duration SECONDS        how long to run (default 5, at most 600)
  --max-connections N       connections opened in total, a hard bound
                            (default 20000, at most 10000000)
  --max-in-flight N         connections open at once (default 1000)
  --connect-timeout MS      default 3000
  --request-timeout MS      default 5000
  --threads N               default 2
  --json FILE               also write the result as JSON
  --quiet                   no summary line
  --help

Output: one summary line on stdout, e.g.
  ok=9980 failed=0 (refused=0 reset=0 timeout=0 short=0 wrong=0 error=0
  not_started=0)
  conns=9980 1995.6/s p50=0.21ms p90=0.40ms p99=1.10ms max=4.00ms
  shards={0:2495,1:2497,...}

Exit status: 0 when every request succeeded (failures == 0) and at least
one was made; 1 when any failed or none was made; 2 on a usage error.

Example:
  portfleet-loadgen --target 127.0.0.1:8080 --rate 2000/s --duration 10 \
      --json /tmp/load.json
  portfleet-loadgen --target [::1]:9000 --protocol echo --mode long \
      --connections 200 --interval 100 --duration 30
)";
}

namespace {

absl::StatusOr<int64_t> ParseInt(absl::string_view flag,
                                 absl::string_view value, int64_t min,
                                 int64_t max) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < min || v > max) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": '", value, "' is not an integer in [", min, ", ", max, "]"));
  }
  return v;
}

bool IsLoopback(const SocketAddress& addr) {
  if (addr.family() == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(addr.get());
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (addr.family() == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(addr.get());
    return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr);
  }
  return false;
}

// "127.0.0.1:80" -> "127.0.0.1", "[::1]:80" -> "::1".
std::string HostOf(const std::string& target) {
  size_t colon = target.rfind(':');
  std::string host =
      target.substr(0, colon == std::string::npos ? target.size() : colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return host;
}

}  // namespace

absl::Status CheckTarget(const std::string& target,
                         const std::string& allow_address) {
  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(target);
  if (!addr.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--target: ", addr.status().message()));
  }
  if (IsLoopback(*addr)) return absl::OkStatus();
  if (!allow_address.empty()) {
    std::string want = allow_address;
    if (want.size() >= 2 && want.front() == '[' && want.back() == ']') {
      want = want.substr(1, want.size() - 2);
    }
    absl::StatusOr<SocketAddress> allowed = SocketAddress::Parse(absl::StrCat(
        want.find(':') != std::string::npos ? "[" + want + "]" : want, ":",
        addr->port()));
    if (allowed.ok() && *allowed == *addr) return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "--target ", target, ": refusing to send load to ", HostOf(target),
      ", which is not a loopback address (127.0.0.0/8 or ::1); to target an "
      "address of a network namespace you created, also pass "
      "--allow-address ",
      HostOf(target)));
}

absl::StatusOr<Options> ParseArgs(const std::vector<std::string>& args) {
  Options o;
  bool have_rate = false, have_concurrency = false;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i];
    std::string value;
    bool has_inline = false;
    if (size_t eq = name.find('=');
        absl::StartsWith(name, "--") && eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_inline = true;
    }
    if (name == "--help") {
      return absl::CancelledError("help");
    }
    if (name == "--quiet") {
      o.quiet = true;
      continue;
    }
    static const char* kWithValue[] = {
        "--target",          "--allow-address", "--mode",
        "--protocol",        "--rate",          "--concurrency",
        "--connections",     "--interval",      "--duration",
        "--max-connections", "--max-in-flight", "--connect-timeout",
        "--request-timeout", "--threads",       "--json"};
    bool known = std::any_of(std::begin(kWithValue), std::end(kWithValue),
                             [&](const char* f) { return name == f; });
    if (!known) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown argument '", args[i], "' (see --help)"));
    }
    if (!has_inline) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat(name, " needs a value"));
      }
      value = args[++i];
    }
    if (name == "--target") {
      o.target = value;
    } else if (name == "--allow-address") {
      o.allow_address = value;
    } else if (name == "--mode") {
      if (value == "short") {
        o.mode = Mode::kShort;
      } else if (value == "long") {
        o.mode = Mode::kLong;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--mode: '", value, "' (want short or long)"));
      }
    } else if (name == "--protocol") {
      if (value == "http") {
        o.protocol = Protocol::kHttp;
      } else if (value == "echo") {
        o.protocol = Protocol::kEcho;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--protocol: '", value, "' (want http or echo)"));
      }
    } else if (name == "--rate") {
      absl::string_view v = value;
      absl::ConsumeSuffix(&v, "/s");
      auto r = ParseInt("--rate", v, 1, 1000000);
      if (!r.ok()) return r.status();
      o.rate = static_cast<int>(*r);
      have_rate = true;
    } else if (name == "--concurrency") {
      auto r = ParseInt(name, value, 1, 100000);
      if (!r.ok()) return r.status();
      o.concurrency = static_cast<int>(*r);
      have_concurrency = true;
    } else if (name == "--connections") {
      auto r = ParseInt(name, value, 1, 100000);
      if (!r.ok()) return r.status();
      o.connections = static_cast<int>(*r);
    } else if (name == "--interval") {
      auto r = ParseInt(name, value, 1, 3600000);
      if (!r.ok()) return r.status();
      o.interval = absl::Milliseconds(*r);
    } else if (name == "--duration") {
      absl::string_view v = value;
      absl::ConsumeSuffix(&v, "s");
      double d = 0;
      if (!absl::SimpleAtod(v, &d) || !(d > 0) || d > 600) {
        return absl::InvalidArgumentError(
            absl::StrCat("--duration: '", value,
                         "' is not a number of seconds in (0, 600]"));
      }
      o.duration = absl::Seconds(d);
    } else if (name == "--max-connections") {
      auto r = ParseInt(name, value, 1, 10000000);
      if (!r.ok()) return r.status();
      o.max_connections = *r;
    } else if (name == "--max-in-flight") {
      auto r = ParseInt(name, value, 1, 100000);
      if (!r.ok()) return r.status();
      o.max_in_flight = static_cast<int>(*r);
    } else if (name == "--connect-timeout") {
      auto r = ParseInt(name, value, 1, 600000);
      if (!r.ok()) return r.status();
      o.connect_timeout = absl::Milliseconds(*r);
    } else if (name == "--request-timeout") {
      auto r = ParseInt(name, value, 1, 600000);
      if (!r.ok()) return r.status();
      o.request_timeout = absl::Milliseconds(*r);
    } else if (name == "--threads") {
      auto r = ParseInt(name, value, 1, 64);
      if (!r.ok()) return r.status();
      o.threads = static_cast<int>(*r);
    } else if (name == "--json") {
      o.json_path = value;
    }
  }
  if (o.target.empty()) {
    return absl::InvalidArgumentError("--target HOST:PORT is required");
  }
  if (absl::Status s = CheckTarget(o.target, o.allow_address); !s.ok()) {
    return s;
  }
  if (have_rate && have_concurrency) {
    return absl::InvalidArgumentError("give --rate or --concurrency, not both");
  }
  if (o.mode == Mode::kLong && have_rate) {
    return absl::InvalidArgumentError(
        "--rate applies to --mode short; long mode uses --connections and "
        "--interval");
  }
  if (o.mode == Mode::kLong && o.connections > o.max_connections) {
    return absl::InvalidArgumentError(
        "--connections is larger than --max-connections");
  }
  return o;
}

// ---------------------------------------------------------------------------
// Pure helpers

Percentiles ComputePercentiles(std::vector<double>& samples) {
  Percentiles p;
  if (samples.empty()) return p;
  std::sort(samples.begin(), samples.end());
  auto rank = [&](double q) {
    size_t n = samples.size();
    size_t k = static_cast<size_t>(std::ceil(q * static_cast<double>(n)));
    if (k < 1) k = 1;
    if (k > n) k = n;
    return samples[k - 1];
  };
  p.p50 = rank(0.50);
  p.p90 = rank(0.90);
  p.p99 = rank(0.99);
  p.max = samples.back();
  return p;
}

bool ParseWorkerBody(absl::string_view body, std::string* listener, int* shard,
                     int* pid) {
  body = absl::StripTrailingAsciiWhitespace(body);
  if (!absl::ConsumePrefix(&body, "portfleet ")) return false;
  std::vector<absl::string_view> parts = absl::StrSplit(body, ' ');
  if (parts.size() != 3) return false;
  absl::string_view l = parts[0], s = parts[1], p = parts[2];
  if (!absl::ConsumePrefix(&l, "listener=") ||
      !absl::ConsumePrefix(&s, "shard=") || !absl::ConsumePrefix(&p, "pid=")) {
    return false;
  }
  int shard_v = 0, pid_v = 0;
  if (l.empty() || !absl::SimpleAtoi(s, &shard_v) ||
      !absl::SimpleAtoi(p, &pid_v) || shard_v < 0 || pid_v <= 0) {
    return false;
  }
  *listener = std::string(l);
  *shard = shard_v;
  *pid = pid_v;
  return true;
}

HttpAnswer ParseHttpAnswer(absl::string_view data, bool eof) {
  HttpAnswer a;
  auto malformed = [&](std::string why) {
    a.state = HttpAnswer::State::kMalformed;
    a.error = std::move(why);
    return a;
  };
  size_t head_end = data.find("\r\n\r\n");
  if (head_end == absl::string_view::npos) {
    if (data.size() > 64 * 1024) return malformed("header larger than 64 KiB");
    return a;  // incomplete
  }
  absl::string_view head = data.substr(0, head_end);
  std::vector<absl::string_view> lines = absl::StrSplit(head, "\r\n");
  absl::string_view status_line = lines[0];
  if (!absl::StartsWith(status_line, "HTTP/1.")) {
    return malformed(
        absl::StrCat("bad status line '", status_line.substr(0, 40), "'"));
  }
  std::vector<absl::string_view> sl =
      absl::StrSplit(status_line, absl::MaxSplits(' ', 2));
  if (sl.size() < 2 || !absl::SimpleAtoi(sl[1], &a.status)) {
    return malformed(
        absl::StrCat("bad status line '", status_line.substr(0, 40), "'"));
  }
  int64_t content_length = -1;
  for (size_t i = 1; i < lines.size(); ++i) {
    size_t colon = lines[i].find(':');
    if (colon == absl::string_view::npos) {
      return malformed(
          absl::StrCat("bad header line '", lines[i].substr(0, 40), "'"));
    }
    absl::string_view name = lines[i].substr(0, colon);
    absl::string_view value =
        absl::StripAsciiWhitespace(lines[i].substr(colon + 1));
    if (absl::EqualsIgnoreCase(name, "content-length")) {
      if (!absl::SimpleAtoi(value, &content_length) || content_length < 0) {
        return malformed(absl::StrCat("bad Content-Length '", value, "'"));
      }
    } else if (absl::EqualsIgnoreCase(name, "connection") &&
               absl::StrContains(absl::AsciiStrToLower(value), "close")) {
      a.close = true;
    } else if (absl::EqualsIgnoreCase(name, "transfer-encoding")) {
      return malformed("chunked answers are not supported");
    }
  }
  size_t body_start = head_end + 4;
  if (content_length < 0) {
    if (!eof) return a;
    a.close = true;
    content_length = static_cast<int64_t>(data.size() - body_start);
  }
  if (data.size() - body_start < static_cast<size_t>(content_length)) {
    return a;  // incomplete
  }
  a.body = std::string(data.substr(body_start, content_length));
  a.length = body_start + content_length;
  a.state = HttpAnswer::State::kComplete;
  ParseWorkerBody(a.body, &a.listener, &a.shard, &a.pid);
  return a;
}

// ---------------------------------------------------------------------------
// Results

std::string Result::Summary() const {
  std::string shards;
  for (const auto& [shard, n] : by_shard) {
    absl::StrAppend(&shards, shards.empty() ? "" : ",", shard, ":", n);
  }
  double secs = absl::ToDoubleSeconds(elapsed);
  return absl::StrFormat(
      "ok=%d failed=%d (refused=%d reset=%d timeout=%d short=%d wrong=%d "
      "error=%d not_started=%d) conns=%d %.1f/s p50=%.2fms p90=%.2fms "
      "p99=%.2fms max=%.2fms shards={%s}%s",
      ok(), failures(), outcomes[1], outcomes[2], outcomes[3], outcomes[4],
      outcomes[5], outcomes[6], late_starts, connections_opened,
      secs > 0 ? static_cast<double>(requests) / secs : 0.0, latency_ms.p50,
      latency_ms.p90, latency_ms.p99, latency_ms.max, shards,
      first_errors.empty() ? "" : " first_error=\"" + first_errors[0] + "\"");
}

namespace {

std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", c);
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace

std::string Result::ToJson(const Options& options) const {
  std::string out = "{\n";
  absl::StrAppend(&out, "  \"target\": ", JsonString(options.target), ",\n");
  absl::StrAppend(&out, "  \"mode\": \"",
                  options.mode == Mode::kShort ? "short" : "long", "\",\n");
  absl::StrAppend(&out, "  \"protocol\": \"",
                  options.protocol == Protocol::kHttp ? "http" : "echo",
                  "\",\n");
  absl::StrAppendFormat(&out, "  \"elapsed_seconds\": %.3f,\n",
                        absl::ToDoubleSeconds(elapsed));
  absl::StrAppend(&out, "  \"requests\": ", requests, ",\n");
  absl::StrAppend(&out, "  \"ok\": ", ok(), ",\n");
  absl::StrAppend(&out, "  \"failures\": ", failures(), ",\n");
  absl::StrAppend(&out, "  \"outcomes\": {");
  for (int i = 0; i < kNumOutcomes; ++i) {
    absl::StrAppend(&out, i ? ", " : "", "\"",
                    OutcomeName(static_cast<Outcome>(i)), "\": ", outcomes[i]);
  }
  absl::StrAppend(&out, "},\n");
  absl::StrAppend(&out, "  \"connections_opened\": ", connections_opened,
                  ",\n");
  absl::StrAppend(&out, "  \"reconnects\": ", reconnects, ",\n");
  absl::StrAppend(&out, "  \"server_closed_idle\": ", server_closed_idle,
                  ",\n");
  absl::StrAppend(&out, "  \"not_started\": ", late_starts, ",\n");
  absl::StrAppendFormat(&out,
                        "  \"latency_ms\": {\"p50\": %.3f, \"p90\": %.3f, "
                        "\"p99\": %.3f, \"max\": %.3f},\n",
                        latency_ms.p50, latency_ms.p90, latency_ms.p99,
                        latency_ms.max);
  auto map_json = [](const std::map<int, int64_t>& m) {
    std::string s = "{";
    for (const auto& [k, v] : m) {
      absl::StrAppend(&s, s.size() > 1 ? ", " : "", "\"", k, "\": ", v);
    }
    return s + "}";
  };
  absl::StrAppend(&out, "  \"by_shard\": ", map_json(by_shard), ",\n");
  absl::StrAppend(&out, "  \"by_pid\": ", map_json(by_pid), ",\n");
  absl::StrAppend(&out, "  \"first_errors\": [");
  for (size_t i = 0; i < first_errors.size(); ++i) {
    absl::StrAppend(&out, i ? ", " : "", JsonString(first_errors[i]));
  }
  absl::StrAppend(&out, "]\n}\n");
  return out;
}

// ---------------------------------------------------------------------------
// The engine: one epoll loop per thread.

namespace {

Outcome FromErrno(int err) {
  switch (err) {
    case ECONNREFUSED:
      return Outcome::kRefused;
    case ECONNRESET:
    case EPIPE:
      return Outcome::kReset;
    case ETIMEDOUT:
      return Outcome::kTimeout;
    default:
      return Outcome::kError;
  }
}

struct Conn {
  enum class Phase { kConnecting, kWaiting, kIdle };
  Fd fd;
  Phase phase = Phase::kConnecting;
  absl::Time started;    // of the connection (short) or exchange (long)
  absl::Time deadline;   // connect or request deadline
  absl::Time next_send;  // long mode, when idle
  std::string out;
  size_t out_offset = 0;
  std::string in;
  std::string expect;  // echo
  uint64_t seq = 0;
  uint32_t events = 0;
};

class Engine {
 public:
  Engine(const Options& o, int id, int share_rate, int share_concurrency,
         int share_connections, int64_t share_max, int share_in_flight,
         const SocketAddress& addr, const std::atomic<bool>* stop,
         absl::Time start)
      : o_(o),
        id_(id),
        rate_(share_rate),
        concurrency_(share_concurrency),
        connections_(share_connections),
        max_connections_(share_max),
        max_in_flight_(share_in_flight),
        addr_(addr),
        stop_(stop),
        start_(start) {}

  void Run();
  Result& result() { return r_; }
  std::vector<double>& latencies() { return latencies_; }

 private:
  void Record(Outcome outcome, absl::Time started, const std::string& error,
              int shard = -1, int pid = -1);
  void StartConnection();
  void Close(int fd);
  void Fail(int fd, Outcome outcome, const std::string& error);
  void SetEvents(Conn& c, uint32_t events);
  void BeginExchange(Conn& c);
  void Flush(int fd);
  void OnEvent(int fd, uint32_t events);
  void OnReadable(int fd);
  void CheckAnswer(int fd, bool eof);
  void Tick(absl::Time now);
  bool Stopping(absl::Time now) const {
    return now >= start_ + o_.duration ||
           (stop_ != nullptr && stop_->load(std::memory_order_relaxed));
  }

  const Options& o_;
  int id_;
  int rate_, concurrency_, connections_;
  int64_t max_connections_;
  int max_in_flight_;
  SocketAddress addr_;
  const std::atomic<bool>* stop_;
  absl::Time start_;
  Fd epoll_;
  std::unordered_map<int, std::unique_ptr<Conn>> conns_;
  int64_t started_ = 0;  // connections started
  uint64_t seq_ = 0;
  bool stopping_ = false;
  Result r_;
  std::vector<double> latencies_;
};

void Engine::Record(Outcome outcome, absl::Time started,
                    const std::string& error, int shard, int pid) {
  r_.outcomes[static_cast<int>(outcome)]++;
  r_.requests++;
  if (outcome == Outcome::kOk) {
    latencies_.push_back(absl::ToDoubleMilliseconds(absl::Now() - started));
    if (shard >= 0) r_.by_shard[shard]++;
    if (pid > 0) r_.by_pid[pid]++;
  } else if (r_.first_errors.size() < 10) {
    r_.first_errors.push_back(absl::StrCat(OutcomeName(outcome), ": ", error));
  }
}

void Engine::SetEvents(Conn& c, uint32_t events) {
  if (c.events == events) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = c.fd.get();
  ::epoll_ctl(epoll_.get(), c.events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD,
              c.fd.get(), &ev);
  c.events = events;
}

void Engine::StartConnection() {
  started_++;
  r_.connections_opened++;
  absl::Time now = absl::Now();
  auto c = std::make_unique<Conn>();
  c->started = now;
  c->deadline = now + o_.connect_timeout;
  c->fd = Fd(
      ::socket(addr_.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!c->fd) {
    Record(FromErrno(errno), now, absl::StrCat("socket: ", strerror(errno)));
    return;
  }
  if (::connect(c->fd.get(), addr_.get(), addr_.length) != 0 &&
      errno != EINPROGRESS) {
    Record(FromErrno(errno), now, absl::StrCat("connect: ", strerror(errno)));
    return;
  }
  int fd = c->fd.get();
  SetEvents(*c, EPOLLOUT);
  conns_[fd] = std::move(c);
}

void Engine::Close(int fd) {
  auto it = conns_.find(fd);
  if (it == conns_.end()) return;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  conns_.erase(it);  // Fd closes
}

void Engine::Fail(int fd, Outcome outcome, const std::string& error) {
  Conn& c = *conns_[fd];
  std::string where = c.phase == Conn::Phase::kConnecting ? "connect: "
                      : c.phase == Conn::Phase::kIdle     ? "idle: "
                                                          : "exchange: ";
  Record(outcome, c.started, where + error);
  Close(fd);
  if (o_.mode == Mode::kLong) r_.reconnects++;  // replaced by Tick()
}

void Engine::BeginExchange(Conn& c) {
  absl::Time now = absl::Now();
  c.phase = Conn::Phase::kWaiting;
  c.started = now;
  c.deadline = now + o_.request_timeout;
  c.in.clear();
  c.seq = ++seq_;
  if (o_.protocol == Protocol::kHttp) {
    c.out = absl::StrCat("GET / HTTP/1.1\r\nHost: ", o_.target,
                         "\r\nUser-Agent: portfleet-loadgen\r\n",
                         o_.mode == Mode::kShort ? "Connection: close\r\n" : "",
                         "\r\n");
  } else {
    c.out = absl::StrFormat("portfleet-loadgen t%d seq %020d ...........\n",
                            id_, c.seq);
    c.expect = c.out;
  }
  c.out_offset = 0;
  Flush(c.fd.get());
}

void Engine::Flush(int fd) {
  Conn& c = *conns_[fd];
  while (c.out_offset < c.out.size()) {
    ssize_t n = ::send(fd, c.out.data() + c.out_offset,
                       c.out.size() - c.out_offset, MSG_NOSIGNAL);
    if (n > 0) {
      c.out_offset += n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      SetEvents(c, EPOLLIN | EPOLLOUT);
      return;
    }
    Fail(fd, FromErrno(errno), absl::StrCat("send: ", strerror(errno)));
    return;
  }
  SetEvents(c, EPOLLIN);
}

void Engine::OnEvent(int fd, uint32_t events) {
  auto it = conns_.find(fd);
  if (it == conns_.end()) return;
  Conn& c = *it->second;
  if (c.phase == Conn::Phase::kConnecting) {
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      Fail(fd, FromErrno(err), strerror(err));
      return;
    }
    if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    if (o_.mode == Mode::kShort) {
      BeginExchange(c);
    } else {
      c.phase = Conn::Phase::kIdle;
      // Spread the first exchanges over one interval.
      c.next_send =
          absl::Now() + (o_.interval * ((c.fd.get() * 7919) % 1000)) / 1000;
      SetEvents(c, EPOLLIN);
    }
    return;
  }
  if (events & EPOLLOUT) {
    Flush(fd);
    if (conns_.find(fd) == conns_.end()) return;
  }
  if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) OnReadable(fd);
}

void Engine::OnReadable(int fd) {
  char buf[16384];
  for (;;) {
    auto it = conns_.find(fd);
    if (it == conns_.end()) return;
    Conn& c = *it->second;
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      if (c.phase == Conn::Phase::kIdle) {
        Fail(fd, Outcome::kWrong, "unexpected bytes while idle");
        return;
      }
      c.in.append(buf, n);
      CheckAnswer(fd, false);
      continue;
    }
    if (n == 0) {
      if (c.phase == Conn::Phase::kIdle) {
        if (o_.protocol == Protocol::kHttp) {
          // A keep-alive connection closed by the server between requests
          // is normal HTTP; open a new one.
          r_.server_closed_idle++;
          Close(fd);
          r_.reconnects++;
        } else {
          Fail(fd, Outcome::kReset, "connection closed by the server");
        }
        return;
      }
      CheckAnswer(fd, true);
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return;
    Fail(fd, FromErrno(errno), absl::StrCat("recv: ", strerror(errno)));
    return;
  }
}

void Engine::CheckAnswer(int fd, bool eof) {
  Conn& c = *conns_[fd];
  if (o_.protocol == Protocol::kEcho) {
    if (c.in.size() < c.expect.size()) {
      if (eof) {
        Fail(fd, Outcome::kShort,
             absl::StrCat("EOF after ", c.in.size(), " of ", c.expect.size(),
                          " bytes"));
      }
      return;
    }
    if (c.in != c.expect) {
      Fail(fd, Outcome::kWrong, "echo differs from what was sent");
      return;
    }
    Record(Outcome::kOk, c.started, "");
    if (o_.mode == Mode::kShort) {
      Close(fd);
    } else {
      c.phase = Conn::Phase::kIdle;
      c.next_send = absl::Now() + o_.interval;
      c.in.clear();
    }
    return;
  }
  HttpAnswer a = ParseHttpAnswer(c.in, eof);
  if (a.state == HttpAnswer::State::kMalformed) {
    Fail(fd, Outcome::kWrong, a.error);
    return;
  }
  if (a.state == HttpAnswer::State::kIncomplete) {
    if (eof) {
      Fail(fd, Outcome::kShort,
           absl::StrCat("EOF after ", c.in.size(), " bytes of the answer"));
    }
    return;
  }
  if (a.status != 200) {
    Fail(fd, Outcome::kWrong, absl::StrCat("HTTP status ", a.status));
    return;
  }
  if (a.length != c.in.size()) {
    Fail(fd, Outcome::kWrong, "bytes after the answer");
    return;
  }
  if (o_.mode == Mode::kShort) {
    // Wait for the server's FIN so the server, not us, holds TIME_WAIT (a
    // fast client would otherwise run out of ports).
    if (!eof) return;
    Record(Outcome::kOk, c.started, "", a.shard, a.pid);
    Close(fd);
    return;
  }
  Record(Outcome::kOk, c.started, "", a.shard, a.pid);
  if (a.close || eof) {
    Close(fd);
    r_.reconnects++;
    return;
  }
  c.phase = Conn::Phase::kIdle;
  c.next_send = absl::Now() + o_.interval;
  c.in.clear();
}

void Engine::Tick(absl::Time now) {
  // Deadlines.
  std::vector<int> expired;
  for (auto& [fd, c] : conns_) {
    if (c->phase != Conn::Phase::kIdle && now >= c->deadline) {
      expired.push_back(fd);
    }
  }
  for (int fd : expired) {
    Conn& c = *conns_[fd];
    if (o_.mode == Mode::kShort && o_.protocol == Protocol::kHttp &&
        c.phase == Conn::Phase::kWaiting) {
      HttpAnswer a = ParseHttpAnswer(c.in, false);
      if (a.state == HttpAnswer::State::kComplete && a.status == 200) {
        // Whole answer, but the server never closed.
        Fail(fd, Outcome::kTimeout, "answer complete but no EOF");
        continue;
      }
    }
    Fail(fd, Outcome::kTimeout,
         c.phase == Conn::Phase::kConnecting ? "connect timed out"
                                             : "no complete answer in time");
  }
  if (stopping_) {
    // Long mode: idle connections are closed by us, cleanly.
    std::vector<int> idle;
    for (auto& [fd, c] : conns_) {
      if (c->phase == Conn::Phase::kIdle) idle.push_back(fd);
    }
    for (int fd : idle) Close(fd);
    return;
  }
  if (o_.mode == Mode::kLong) {
    std::vector<int> due;
    for (auto& [fd, c] : conns_) {
      if (c->phase == Conn::Phase::kIdle && now >= c->next_send) {
        due.push_back(fd);
      }
    }
    // BeginExchange may close a connection: look each one up again.
    for (int fd : due) {
      auto it = conns_.find(fd);
      if (it != conns_.end()) BeginExchange(*it->second);
    }
    // Flush may have closed connections; (re)open up to the target.
    while (static_cast<int>(conns_.size()) < connections_ &&
           started_ < max_connections_) {
      StartConnection();
    }
    return;
  }
  if (rate_ > 0) {
    int64_t due =
        static_cast<int64_t>(absl::ToDoubleSeconds(now - start_) * rate_);
    due = std::min(due, max_connections_);
    while (started_ < due && static_cast<int>(conns_.size()) < max_in_flight_) {
      StartConnection();
    }
  } else {
    int want = std::min(concurrency_, max_in_flight_);
    while (static_cast<int>(conns_.size()) < want &&
           started_ < max_connections_) {
      StartConnection();
    }
  }
}

void Engine::Run() {
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) return;
  absl::Duration grace =
      std::max(o_.connect_timeout, o_.request_timeout) + absl::Seconds(1);
  epoll_event events[256];
  for (;;) {
    absl::Time now = absl::Now();
    if (!stopping_ && (Stopping(now) || (started_ >= max_connections_ &&
                                         o_.mode == Mode::kShort))) {
      if (rate_ > 0 && o_.mode == Mode::kShort) {
        // Start what fell due up to the end, then count what could not
        // start (max_in_flight reached).
        Tick(std::min(now, start_ + o_.duration));
      }
      stopping_ = true;
      if (rate_ > 0) {
        int64_t due = static_cast<int64_t>(
            absl::ToDoubleSeconds(std::min(now, start_ + o_.duration) -
                                  start_) *
            rate_);
        r_.late_starts =
            std::max<int64_t>(0, std::min(due, max_connections_) - started_);
      }
    }
    Tick(now);
    if (stopping_ && conns_.empty()) break;
    if (now > start_ + o_.duration + grace) {
      // Hard bound: whatever is still open is a timeout.
      std::vector<int> left;
      for (auto& [fd, c] : conns_) left.push_back(fd);
      for (int fd : left) Fail(fd, Outcome::kTimeout, "still open at the end");
      break;
    }
    int n = ::epoll_wait(epoll_.get(), events, 256, 2);
    for (int i = 0; i < n; ++i) OnEvent(events[i].data.fd, events[i].events);
  }
}

}  // namespace

absl::StatusOr<Result> Run(const Options& o, const std::atomic<bool>* stop) {
  if (absl::Status s = CheckTarget(o.target, o.allow_address); !s.ok()) {
    return s;
  }
  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(o.target);
  if (!addr.ok()) return addr.status();
  int threads = std::max(1, o.threads);
  auto share = [&](int64_t total, int i) {
    return total / threads + (i < total % threads ? 1 : 0);
  };
  absl::Time start = absl::Now();
  std::vector<std::unique_ptr<Engine>> engines;
  for (int i = 0; i < threads; ++i) {
    engines.push_back(std::make_unique<Engine>(
        o, i, static_cast<int>(share(o.rate, i)),
        static_cast<int>(share(o.concurrency, i)),
        static_cast<int>(share(o.connections, i)), share(o.max_connections, i),
        std::max<int>(1, static_cast<int>(share(o.max_in_flight, i))), *addr,
        stop, start));
  }
  std::vector<std::thread> running;
  for (auto& e : engines) running.emplace_back([&e] { e->Run(); });
  for (auto& t : running) t.join();
  Result total;
  std::vector<double> latencies;
  for (auto& e : engines) {
    Result& r = e->result();
    for (int i = 0; i < kNumOutcomes; ++i) total.outcomes[i] += r.outcomes[i];
    total.connections_opened += r.connections_opened;
    total.requests += r.requests;
    total.server_closed_idle += r.server_closed_idle;
    total.reconnects += r.reconnects;
    total.late_starts += r.late_starts;
    for (const auto& [k, v] : r.by_shard) total.by_shard[k] += v;
    for (const auto& [k, v] : r.by_pid) total.by_pid[k] += v;
    for (auto& err : r.first_errors) {
      if (total.first_errors.size() < 10) total.first_errors.push_back(err);
    }
    latencies.insert(latencies.end(), e->latencies().begin(),
                     e->latencies().end());
  }
  total.elapsed = absl::Now() - start;
  total.latency_ms = ComputePercentiles(latencies);
  if (!o.json_path.empty()) {
    std::ofstream f(o.json_path);
    f << total.ToJson(o);
    if (!f) {
      return absl::UnavailableError(
          absl::StrCat("--json ", o.json_path, ": cannot write"));
    }
  }
  return total;
}

}  // namespace portfleet::loadgen
