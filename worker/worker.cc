#include "worker/worker.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/time.h"
#include "worker/sdk/base/version.h"
#include "worker/sdk/handoff_choice.h"
#include "worker/sdk/handoff_pauses.h"
#include "worker/sdk/handoff_sockets.h"
#include "worker/sdk/listen_fds.h"

namespace portfleet::worker {

namespace {

// Bytes of unsent output above which a connection stops reading (a client
// that pipelines without reading, or an echo peer that does not read).
constexpr size_t kMaxPendingOutput = 1 << 20;
// Bytes read from one connection per readiness event, for fairness.
constexpr size_t kReadBudget = 256 * 1024;
// Connections accepted per readiness event of the listening socket.
constexpr int kAcceptBatch = 64;
// Longest a blocking accept() may wait when another process took the
// connection it was meant for (see Worker::AcceptAll).
constexpr absl::Duration kAcceptGuard = absl::Milliseconds(20);

// SIGALRM ends a blocking accept() that lost its connection to another
// process (the handler runs, accept() fails with EINTR); the count tells
// whether the guard timer has already fired.
volatile sig_atomic_t accept_guard_fired = 0;
void OnAcceptGuard(int) { accept_guard_fired = accept_guard_fired + 1; }

// ---------------------------------------------------------------------------
// Flags

// ---------------------------------------------------------------------------
// HTTP

bool IsTokenChar(char c) {
  if (absl::ascii_isalnum(static_cast<unsigned char>(c))) return true;
  return absl::StrContains("!#$%&'*+-.^_`|~", c);
}

bool IsToken(absl::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), IsTokenChar);
}

// Field values: visible characters, spaces, tabs and obs-text; no controls.
bool IsFieldValue(absl::string_view s) {
  for (char c : s) {
    unsigned char u = static_cast<unsigned char>(c);
    if ((u < 0x20 && u != '\t') || u == 0x7f) return false;
  }
  return true;
}

bool IsRequestTarget(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) return false;
  }
  return true;
}

HttpParseResult Error(int status, std::string why) {
  HttpParseResult r;
  r.kind = HttpParseResult::Kind::kError;
  r.error_status = status;
  r.error = std::move(why);
  return r;
}

// Parses "METHOD SP target SP HTTP/1.x".
std::optional<HttpParseResult> ParseRequestLine(absl::string_view line,
                                                HttpRequestHead* head) {
  // Exactly two spaces.
  const size_t sp1 = line.find(' ');
  const size_t sp2 =
      sp1 == absl::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == absl::string_view::npos ||
      line.find(' ', sp2 + 1) != absl::string_view::npos) {
    return Error(400, "request line is not 'METHOD TARGET HTTP/1.x'");
  }
  absl::string_view method = line.substr(0, sp1);
  absl::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  absl::string_view version = line.substr(sp2 + 1);
  if (!IsToken(method)) return Error(400, "bad method");
  if (!IsRequestTarget(target)) return Error(400, "bad request target");
  if (version == "HTTP/1.1") {
    head->minor_version = 1;
  } else if (version == "HTTP/1.0") {
    head->minor_version = 0;
  } else if (version.size() == 8 && absl::StartsWith(version, "HTTP/") &&
             absl::ascii_isdigit(version[5]) && version[6] == '.' &&
             absl::ascii_isdigit(version[7])) {
    return Error(505, absl::StrCat("HTTP version ", version.substr(5),
                                   " is not supported"));
  } else {
    return Error(400, "bad HTTP version");
  }
  head->method = std::string(method);
  head->target = std::string(target);
  return std::nullopt;
}

absl::string_view ReasonPhrase(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 431:
      return "Request Header Fields Too Large";
    case 501:
      return "Not Implemented";
    case 505:
      return "HTTP Version Not Supported";
  }
  return "Error";
}

// Appends a whole response to `out` (one buffer, so one send()).
void AppendResponse(std::string* out, int status, absl::string_view body,
                    bool keep_alive, bool http10, bool head_only) {
  absl::StrAppend(
      out, "HTTP/1.1 ", status, " ", ReasonPhrase(status),
      "\r\nContent-Type: text/plain\r\nContent-Length: ", body.size(),
      !keep_alive ? "\r\nConnection: close\r\n\r\n"
      : http10    ? "\r\nConnection: keep-alive\r\n\r\n"
                  : "\r\n\r\n",
      head_only ? absl::string_view() : body);
}

// ---------------------------------------------------------------------------
// Small syscall helpers

void LogIfError(const absl::Status& status) {
  if (!status.ok()) PF_LOG(WARNING) << status.message();
}

absl::Status EpollCtl(int epoll, int op, int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll, op, fd, &ev) != 0) {
    return ErrnoError(absl::StrCat("epoll_ctl(op ", op, ", fd ", fd, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------
// Flags

std::string Usage() {
  return R"(Usage: portfleet-worker --mode http|echo [--log-level LEVEL]
                        [--drain-timeout DURATION] [--help]
       portfleet-worker --mode proxy --upstream HOST:PORT
                        [--connect-timeout DURATION] [--log-level LEVEL]
                        [--drain-timeout DURATION]

The reference portfleet worker. It serves the one listening TCP socket it is
handed by socket activation (fd 3) with a single-threaded epoll loop; it never
binds or listens itself. portfleet-agent starts one per shard.

Modes:
  --mode http     Minimal HTTP/1.1 (keep-alive, pipelining, request bodies
                  read and discarded). Every request is answered
                  "200 OK" with the text/plain body
                    portfleet listener=<L> shard=<N> pid=<P>
                  Malformed requests get 400, heads over 16 KiB get 431,
                  and the connection is closed.
  --mode echo     Echoes bytes back until the peer closes.
  --mode proxy    L4 TCP forwarder: every connection is forwarded to
                  --upstream over a new connection, bytes both ways,
                  unchanged. Half-close is passed on (a side's FIN becomes
                  shutdown(SHUT_WR) of the other side; the other direction
                  keeps flowing); a side that cannot take more stops the
                  other from being read (at most 16 KiB buffered per
                  direction); a reset is passed on as a reset. A client
                  whose upstream connect fails or times out is reset
                  (logged with the listener, shard and upstream). Load
                  reports count bytes from and to the clients.

Flags:
  --log-level LEVEL         debug, info (default), warning or error.
  --drain-timeout DURATION  Deadline to finish open connections after
                            SIGTERM/SIGINT (default 30s; "30", "30s",
                            "500ms" and "2m" are accepted).
  --upstream HOST:PORT      Proxy mode (required there, refused otherwise):
                            the upstream, "127.0.0.1:8080", "[::1]:8080" or
                            a name resolved once at start ("backend:80").
  --connect-timeout DURATION
                            Proxy mode: longest wait for the upstream's
                            connect (default 5s).
  -h, --help                This text.

Environment:
  LISTEN_FDS=1          Required: one socket is passed, as fd 3. fd 3 must be
                        a listening TCP socket (IPv4 or IPv6).
  LISTEN_PID            If set, must equal the worker's pid.
  LISTEN_FDNAMES        Name of the socket; the listener name if
                        PORTFLEET_LISTENER is not set.
  PORTFLEET_LISTENER    Listener name reported in answers and to the agent
                        (default: LISTEN_FDNAMES, else "unknown").
  PORTFLEET_SHARD       Shard index reported likewise (default 0).
  PORTFLEET_CONTROL_FD  Optional fd of the agent control channel (a Unix
                        SOCK_SEQPACKET socket, normally 4): the worker sends
                        hello, ready and a load report every second, and
                        drains on the agent's request. If the agent goes
                        away the worker keeps serving.
  PORTFLEET_AGENT_SOCKET
                        Optional path of the agent's control socket (a Unix
                        SOCK_SEQPACKET listener). When the control channel
                        hits end-of-file while the worker accepts, it
                        connects there every 250ms and says hello again with
                        its listening socket attached, so that a restarted
                        agent can adopt it; the new connection is then the
                        control channel.
  PORTFLEET_AGENT_UID   Optional uid of the agent. The listening socket is
                        handed only to a peer at PORTFLEET_AGENT_SOCKET that
                        runs as this uid (SO_PEERCRED); without it, only to
                        uid 0 or the worker's own uid. Other peers are
                        refused (logged) and the worker keeps serving.

Signals:
  SIGTERM, SIGINT  Drain: stop accepting, answer requests in progress with
                   "Connection: close", close idle connections, wait for the
                   rest until --drain-timeout, then exit 0. Proxy mode
                   knows no requests: its pairs go on until both sides
                   close or the deadline resets them.
                   A second signal closes remaining connections at once.

Exit status:
  0  drained and exited;  1  runtime failure;
  2  usage error, or no usable socket was passed (LISTEN_FDS missing, fd 3
     not a listening TCP socket).

Example (systemd-socket-activate comes with systemd):
  systemd-socket-activate -l 127.0.0.1:8080 -E PORTFLEET_LISTENER=web \
      -E PORTFLEET_SHARD=0 portfleet-worker --mode http
  curl http://127.0.0.1:8080/   # portfleet listener=web shard=0 pid=1234
  systemd-socket-activate -l 127.0.0.1:8443 \
      portfleet-worker --mode proxy --upstream 10.0.0.5:443
)";
}

absl::StatusOr<Flags> ParseFlags(const std::vector<std::string>& args) {
  Flags flags;
  std::string proxy_flag;  // a proxy-only flag that was given
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (arg == "-h" || arg == "--help") {
      flags.help = true;
      continue;
    }
    if (!absl::StartsWith(arg, "--")) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name;
    std::string value;
    if (size_t eq = arg.find('='); eq != absl::string_view::npos) {
      name = std::string(arg.substr(0, eq));
      value = std::string(arg.substr(eq + 1));
    } else {
      name = std::string(arg);
      if (name != "--mode" && name != "--log-level" &&
          name != "--drain-timeout" && name != "--upstream" &&
          name != "--connect-timeout") {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown flag '", name, "'"));
      }
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("flag ", name, " needs a value"));
      }
      value = args[++i];
    }
    if (name == "--mode") {
      if (value == "http") {
        flags.mode = Mode::kHttp;
      } else if (value == "echo") {
        flags.mode = Mode::kEcho;
      } else if (value == "proxy") {
        flags.mode = Mode::kProxy;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "--mode: unknown mode '", value, "' (want http, echo or proxy)"));
      }
    } else if (name == "--log-level") {
      absl::StatusOr<LogLevel> level = ParseLogLevel(value);
      if (!level.ok()) return Annotate(level.status(), "--log-level");
      flags.log_level = *level;
    } else if (name == "--drain-timeout") {
      ASSIGN_OR_RETURN(flags.drain_timeout,
                       ParseFlagDuration(value, "--drain-timeout"));
    } else if (name == "--upstream") {
      if (value.empty()) {
        return absl::InvalidArgumentError(
            "--upstream: empty value (want HOST:PORT)");
      }
      flags.upstream = value;
      proxy_flag = name;
    } else if (name == "--connect-timeout") {
      ASSIGN_OR_RETURN(flags.connect_timeout,
                       ParseFlagDuration(value, "--connect-timeout"));
      if (flags.connect_timeout <= absl::ZeroDuration()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--connect-timeout: '", value, "' is not a positive duration"));
      }
      proxy_flag = name;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag '", name, "'"));
    }
  }
  if (flags.help) return flags;
  if (flags.mode == Mode::kProxy && flags.upstream.empty()) {
    return absl::InvalidArgumentError(
        "--mode proxy needs --upstream HOST:PORT");
  }
  if (flags.mode != Mode::kProxy && !proxy_flag.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(proxy_flag, " is a proxy mode flag (add --mode proxy)"));
  }
  return flags;
}

// ---------------------------------------------------------------------------
// HTTP

HttpParseResult ParseHttpRequestHead(absl::string_view buffer,
                                     size_t max_head) {
  // RFC 9112 2.2: ignore empty lines before the request line.
  size_t start = 0;
  while (buffer.size() - start >= 2 && buffer.substr(start, 2) == "\r\n") {
    start += 2;
  }
  if (start > max_head) return Error(400, "too many empty lines");
  absl::string_view rest = buffer.substr(start);
  size_t end = rest.find("\r\n\r\n");
  if (end == absl::string_view::npos) {
    if (rest.size() >= max_head) {
      return Error(431,
                   absl::StrCat("request head exceeds ", max_head, " bytes"));
    }
    // Reject a bad request line as soon as it is complete.
    if (size_t eol = rest.find("\r\n"); eol != absl::string_view::npos) {
      HttpRequestHead ignored;
      if (auto error = ParseRequestLine(rest.substr(0, eol), &ignored)) {
        return *error;
      }
    }
    return HttpParseResult{};
  }
  if (end + 4 > max_head) {
    return Error(431,
                 absl::StrCat("request head exceeds ", max_head, " bytes"));
  }
  HttpParseResult result;
  HttpRequestHead& head = result.head;
  absl::string_view head_text = rest.substr(0, end);
  const size_t first_eol = head_text.find("\r\n");
  if (auto error = ParseRequestLine(head_text.substr(0, first_eol), &head)) {
    return *error;
  }

  bool saw_close = false;
  bool saw_keep_alive = false;
  bool saw_length = false;
  int hosts = 0;
  // The header lines, split lazily (no vector).
  absl::string_view fields = first_eol == absl::string_view::npos
                                 ? absl::string_view()
                                 : head_text.substr(first_eol + 2);
  for (absl::string_view line : absl::StrSplit(fields, "\r\n")) {
    if (first_eol == absl::string_view::npos) break;
    if (line.front() == ' ' || line.front() == '\t') {
      return Error(400, "obsolete header line folding");
    }
    size_t colon = line.find(':');
    if (colon == absl::string_view::npos) {
      return Error(400, "header line without ':'");
    }
    absl::string_view name = line.substr(0, colon);
    if (!IsToken(name)) return Error(400, "bad header name");
    absl::string_view value =
        absl::StripAsciiWhitespace(line.substr(colon + 1));
    if (!IsFieldValue(value)) {
      return Error(400, absl::StrCat("bad characters in header ", name));
    }
    if (absl::EqualsIgnoreCase(name, "Content-Length")) {
      uint64_t length = 0;
      if (value.empty() ||
          !std::all_of(value.begin(), value.end(),
                       [](char c) { return absl::ascii_isdigit(c); }) ||
          !absl::SimpleAtoi(value, &length)) {
        return Error(400, "bad Content-Length");
      }
      if (saw_length && length != head.content_length) {
        return Error(400, "conflicting Content-Length headers");
      }
      saw_length = true;
      head.content_length = length;
    } else if (absl::EqualsIgnoreCase(name, "Transfer-Encoding")) {
      return Error(501, "Transfer-Encoding is not supported");
    } else if (absl::EqualsIgnoreCase(name, "Host")) {
      ++hosts;
    } else if (absl::EqualsIgnoreCase(name, "Connection")) {
      for (absl::string_view option : absl::StrSplit(value, ',')) {
        option = absl::StripAsciiWhitespace(option);
        if (absl::EqualsIgnoreCase(option, "close")) saw_close = true;
        if (absl::EqualsIgnoreCase(option, "keep-alive")) saw_keep_alive = true;
      }
    }
  }
  if (head.minor_version == 1 && hosts != 1) {
    return Error(400, hosts == 0 ? "HTTP/1.1 request without Host"
                                 : "more than one Host header");
  }
  head.keep_alive =
      head.minor_version == 1 ? !saw_close : saw_keep_alive && !saw_close;
  result.kind = HttpParseResult::Kind::kComplete;
  result.head_length = start + end + 4;
  return result;
}

std::string IdentityBody(absl::string_view listener, uint32_t shard,
                         pid_t pid) {
  return absl::StrCat("portfleet listener=", listener, " shard=", shard,
                      " pid=", pid, "\n");
}

void HttpSession::Respond(const HttpRequestHead& head, std::string* out) {
  ++requests_;
  bool keep_alive = head.keep_alive && !draining_;
  AppendResponse(out, 200, body_, keep_alive, head.minor_version == 0,
                 head.method == "HEAD");
  if (!keep_alive) {
    closing_ = true;
    client_close_ = !head.keep_alive;
  }
}

void HttpSession::Consume(absl::string_view data, std::string* out) {
  if (closing_) {
    if (!data.empty()) unanswered_input_ = true;
    return;
  }
  // Discard body bytes without buffering them.
  if (in_body_ && buffer_.empty()) {
    uint64_t n = std::min<uint64_t>(body_remaining_, data.size());
    body_remaining_ -= n;
    data.remove_prefix(n);
    if (body_remaining_ > 0) return;
    in_body_ = false;
    Respond(pending_, out);
    if (closing_) {
      if (!data.empty()) unanswered_input_ = true;
      return;
    }
  }
  // Parse straight from `data` unless a partial request is buffered; only
  // what is left unparsed is copied into the buffer.
  const bool from_buffer = !buffer_.empty();
  if (from_buffer) buffer_.append(data.data(), data.size());
  const absl::string_view in = from_buffer ? absl::string_view(buffer_) : data;
  size_t pos = 0;
  while (!closing_ && pos < in.size()) {
    if (in_body_) {
      uint64_t n = std::min<uint64_t>(body_remaining_, in.size() - pos);
      body_remaining_ -= n;
      pos += n;
      if (body_remaining_ > 0) break;
      in_body_ = false;
      Respond(pending_, out);
      continue;
    }
    HttpParseResult r = ParseHttpRequestHead(in.substr(pos));
    if (r.kind == HttpParseResult::Kind::kIncomplete) break;
    if (r.kind == HttpParseResult::Kind::kError) {
      PF_LOG(DEBUG) << "bad request: " << r.error;
      AppendResponse(
          out, r.error_status,
          absl::StrCat(ReasonPhrase(r.error_status), ": ", r.error, "\n"),
          /*keep_alive=*/false, /*http10=*/false, /*head_only=*/false);
      closing_ = true;
      break;
    }
    pos += r.head_length;
    if (r.head.content_length > 0) {
      in_body_ = true;
      body_remaining_ = r.head.content_length;
      pending_ = std::move(r.head);
      continue;
    }
    Respond(r.head, out);
  }
  if (closing_) {
    if (pos < in.size()) unanswered_input_ = true;
    buffer_.clear();
    in_body_ = false;
  } else if (from_buffer) {
    buffer_.erase(0, pos);
  } else {
    buffer_.assign(in.data() + pos, in.size() - pos);
  }
}

void HttpSession::StartDrain() {
  draining_ = true;
  // An idle keep-alive connection is closed now (clients expect that). A
  // connection that has not sent its first request yet is not idle: its
  // request may be in flight, so it is answered (with "Connection: close")
  // when it arrives, within the drain deadline.
  if (idle() && requests_ > 0) closing_ = true;
}

// ---------------------------------------------------------------------------
// The server

struct Worker::Connection {
  Fd fd;
  std::optional<HttpSession> http;  // in http mode
  std::string out;                  // output not yet sent, from out_offset
  size_t out_offset = 0;
  bool read_eof = false;  // the peer will send nothing more
  // The last recv() found the receive queue empty (a short read or EAGAIN).
  bool input_drained = false;
  bool lingering = false;  // our FIN is sent; waiting for the peer's
  absl::Time linger_deadline;
  uint32_t events = 0;  // registered with epoll; 0 = not registered yet
  // Traffic (bytes in + out), and its rate over the last load report
  // period: what a hand-off by bytes chooses by.
  uint64_t bytes = 0;
  uint64_t bytes_at_report = 0;
  double bytes_per_second = 0;

  size_t pending() const { return out.size() - out_offset; }
};

Worker::Worker(WorkerConfig config) : config_(std::move(config)) {}
Worker::~Worker() = default;

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create(
    WorkerConfig config, Fd listen_fd, std::optional<ControlChannel> control) {
  std::unique_ptr<Worker> worker(new Worker(std::move(config)));
  RETURN_IF_ERROR(worker->Init(std::move(listen_fd), std::move(control)));
  return worker;
}

absl::Status Worker::Init(Fd listen_fd, std::optional<ControlChannel> control) {
  listen_fd_ = std::move(listen_fd);
  ASSIGN_OR_RETURN(
      agent_, AgentLink::Create({.listener = config_.listener,
                                 .shard = config_.shard,
                                 // Every mode hands off; proxy mode
                                 // its idle pairs, both sockets at once.
                                 .handoff = true,
                                 .handoff_pairs = config_.mode == Mode::kProxy},
                                listen_fd_, std::move(control), config_.agent));
  body_ = IdentityBody(config_.listener, config_.shard, ::getpid());

  ::signal(SIGPIPE, SIG_IGN);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) {
    return ErrnoError("sigprocmask(SIG_BLOCK, SIGTERM|SIGINT)");
  }
  signal_fd_ = Fd(::signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!signal_fd_) return ErrnoError("signalfd");
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) return ErrnoError("epoll_create1");
  if (config_.mode == Mode::kProxy) {
    proxy_ = std::make_unique<Proxy>(
        ProxyConfig{.upstream = config_.upstream,
                    .listener = config_.listener,
                    .shard = config_.shard,
                    .connect_timeout = config_.connect_timeout},
        epoll_);
  }
  RETURN_IF_ERROR(
      EpollCtl(epoll_.get(), EPOLL_CTL_ADD, signal_fd_.get(), EPOLLIN));
  RETURN_IF_ERROR(EpollCtl(epoll_.get(), EPOLL_CTL_ADD, agent_->fd(), EPOLLIN));
  RETURN_IF_ERROR(
      EpollCtl(epoll_.get(), EPOLL_CTL_ADD, listen_fd_.get(), EPOLLIN));
  accepting_ = true;
  // Accepted sockets inherit TCP_NODELAY from the listener (the agent sets
  // it on shard sockets): then no setsockopt per connection.
  int status_flags = ::fcntl(listen_fd_.get(), F_GETFL);
  if (status_flags < 0) return ErrnoError("fcntl(listening socket, F_GETFL)");
  listener_nonblocking_ = (status_flags & O_NONBLOCK) != 0;
  if (!listener_nonblocking_) {
    // Without SA_RESTART, so that the signal ends a blocking accept().
    struct sigaction action {};
    action.sa_handler = OnAcceptGuard;
    sigemptyset(&action.sa_mask);
    if (::sigaction(SIGALRM, &action, nullptr) != 0) {
      return ErrnoError("sigaction(SIGALRM)");
    }
    // A mask inherited from the parent must not keep the guard from firing.
    sigset_t alarm;
    sigemptyset(&alarm);
    sigaddset(&alarm, SIGALRM);
    if (::sigprocmask(SIG_UNBLOCK, &alarm, nullptr) != 0) {
      return ErrnoError("sigprocmask(SIG_UNBLOCK, SIGALRM)");
    }
  }
  int nodelay = 0;
  socklen_t length = sizeof(nodelay);
  listener_nodelay_ = ::getsockopt(listen_fd_.get(), IPPROTO_TCP, TCP_NODELAY,
                                   &nodelay, &length) == 0 &&
                      nodelay != 0;
  return absl::OkStatus();
}

absl::Status Worker::Run() {
  struct stat st {};
  if (::fstat(listen_fd_.get(), &st) != 0) {
    return ErrnoError("fstat listening socket");
  }
  sockaddr_storage addr{};
  socklen_t addr_len = sizeof(addr);
  std::string where = "?";
  if (::getsockname(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr),
                    &addr_len) == 0) {
    where = SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&addr),
                                        addr_len)
                .ToString();
  }
  PF_LOG(INFO) << "serving "
               << (config_.mode == Mode::kHttp   ? "http"
                   : config_.mode == Mode::kEcho ? "echo"
                                                 : "proxy")
               << " on " << where
               << (proxy_ ? absl::StrCat(" to upstream ",
                                         config_.upstream.ToString())
                          : "")
               << " (fd " << listen_fd_.get() << ", socket inode " << st.st_ino
               << ", pid " << ::getpid() << ")";
  agent_->SendHello();
  agent_->SendReady();
  next_load_ = absl::Now() + config_.load_interval;

  epoll_event events[64];
  while (!done_) {
    int n = ::epoll_wait(epoll_.get(), events, 64, EpollTimeoutMs(absl::Now()));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("epoll_wait");
    }
    for (int i = 0; i < n && !done_; ++i) {
      int fd = events[i].data.fd;
      if (fd == signal_fd_.get()) {
        HandleSignals();
      } else if (listen_fd_ && fd == listen_fd_.get()) {
        AcceptAll();
      } else if (fd == agent_->fd()) {
        agent_->DispatchWithAllFds(
            [this](const v1::AgentMessage& m, std::vector<Fd> fds) {
              OnAgentMessage(m, std::move(fds));
            });
      } else if (proxy_ && proxy_->Owns(fd)) {
        proxy_->Handle(fd, events[i].events);
      } else {
        HandleConnection(fd, events[i].events);
      }
    }
    if (done_) break;
    OnTimers(absl::Now());
    if (draining_ && OpenConnections() == 0) done_ = true;
  }
  if (draining_) {
    PF_LOG(INFO) << "drained (" << accepted_total_
                 << " connections served); exiting";
    v1::WorkerMessage drained;
    drained.mutable_drained();
    agent_->Send(drained);
  }
  return absl::OkStatus();
}

int Worker::EpollTimeoutMs(absl::Time now) const {
  absl::Time next = now + absl::Seconds(1);
  next = std::min(next, next_load_);
  next = std::min(next, drain_deadline_);
  if (resume_accept_at_) next = std::min(next, *resume_accept_at_);
  if (proxy_) next = std::min(next, proxy_->NextDeadline());
  if (lingering_ > 0) next = std::min(next, now + absl::Milliseconds(100));
  int64_t ms =
      absl::ToInt64Milliseconds(absl::Ceil(next - now, absl::Milliseconds(1)));
  return static_cast<int>(std::clamp<int64_t>(ms, 0, 1000));
}

size_t Worker::OpenConnections() const {
  return connections_.size() + (proxy_ ? proxy_->active() : 0);
}

void Worker::OnTimers(absl::Time now) {
  if (proxy_) proxy_->OnTimers(now);
  if (now >= next_load_) {
    if (agent_->connected()) SendLoad();
    next_load_ = now + config_.load_interval;
  }
  if (resume_accept_at_ && now >= *resume_accept_at_) {
    resume_accept_at_.reset();
    if (!draining_ && listen_fd_) {
      absl::Status s =
          EpollCtl(epoll_.get(), EPOLL_CTL_ADD, listen_fd_.get(), EPOLLIN);
      if (s.ok()) {
        accepting_ = true;
      } else {
        PF_LOG(ERROR) << "cannot resume accepting: " << s.message();
        resume_accept_at_ = now + absl::Seconds(1);
      }
    }
  }
  if (lingering_ > 0) {
    std::vector<int> expired;
    for (const auto& [fd, conn] : connections_) {
      if (conn->lingering && now >= conn->linger_deadline)
        expired.push_back(fd);
    }
    for (int fd : expired) CloseConnection(fd);
  }
  if (draining_ && now >= drain_deadline_) {
    ForceClose("drain deadline reached");
  }
}

void Worker::PauseAccepting(absl::Duration pause) {
  if (accepting_) {
    LogIfError(EpollCtl(epoll_.get(), EPOLL_CTL_DEL, listen_fd_.get(), 0));
    accepting_ = false;
  }
  resume_accept_at_ = absl::Now() + pause;
}

void Worker::WarnAcceptPaused(int err) {
  // At most one line per 10 s: the condition can last.
  absl::Time now = absl::Now();
  if (now - last_accept_warning_ < absl::Seconds(10)) {
    ++accept_warnings_suppressed_;
    return;
  }
  PF_LOG(WARNING) << "accept: " << std::strerror(err)
                  << "; leaving connections queued and retrying every 100ms ("
                  << OpenConnections() << " connections open, "
                  << accept_warnings_suppressed_
                  << " similar failures since the last warning)";
  last_accept_warning_ = now;
  accept_warnings_suppressed_ = 0;
}

int Worker::QueuedConnections() {
  tcp_info info{};
  socklen_t length = sizeof(info);
  if (::getsockopt(listen_fd_.get(), IPPROTO_TCP, TCP_INFO, &info, &length) !=
      0) {
    PF_LOG(ERROR) << "getsockopt(listening socket, TCP_INFO): "
                  << std::strerror(errno) << "; pausing accept for 1s";
    PauseAccepting(absl::Seconds(1));
    return 0;
  }
  if (info.tcpi_state != TCP_LISTEN) {
    // The agent shut the listening socket down (as accept's EINVAL below).
    BeginDrain(config_.drain_timeout, "listening socket shut down");
    return 0;
  }
  // For a listening socket, tcpi_unacked is its accept queue length.
  return static_cast<int>(info.tcpi_unacked);
}

void Worker::ArmAcceptGuard() {
  itimerval guard{};
  guard.it_value = absl::ToTimeval(kAcceptGuard);
  accept_guard_fired = 0;
  accept_guard_armed_ = true;
  if (::setitimer(ITIMER_REAL, &guard, nullptr) != 0) {
    PF_LOG(ERROR) << "setitimer: " << std::strerror(errno);  // cannot happen
    std::abort();
  }
}

void Worker::AcceptAll() {
  int accepted = 0;
  while (accepting_ && accepted < kAcceptBatch) {
    int budget = kAcceptBatch - accepted;
    if (!listener_nonblocking_) {
      // The listening socket is in blocking mode and must stay so:
      // O_NONBLOCK belongs to the open file description that the agent and
      // every worker on this socket share (a blocking worker may be rolled
      // onto it). An accept() on an empty queue would block this loop until
      // the next connection, so accept only as many as are queued, counting
      // again after each batch as the EAGAIN of a non-blocking socket would.
      // Another process may take one between the count and the accept: the
      // accept guard (a SIGALRM timer) bounds that wait to kAcceptGuard.
      budget = std::min(budget, QueuedConnections());
      if (budget <= 0) return;
    }
    for (int i = 0; i < budget; ++i, ++accepted) {
      if (!accepting_ || !AcceptOne()) return;
    }
  }
}

bool Worker::AcceptOne() {
  // The guard stays armed across batches until it fires (at most one
  // setitimer per kAcceptGuard while connections keep coming, none when
  // idle).
  if (!listener_nonblocking_ &&
      (!accept_guard_armed_ || accept_guard_fired != 0)) {
    ArmAcceptGuard();
  }
  int fd = ::accept4(listen_fd_.get(), nullptr, nullptr,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) {
    if (errno == EINTR && !listener_nonblocking_) {
      return false;  // the guard fired: another process took the connection
    }
    switch (errno) {
      case EAGAIN:
        return false;
      // The connection died in the queue, or a pending network error
      // (accept(2)): nothing to do with the listening socket.
      case EINTR:
      case ECONNABORTED:
      case EPROTO:
      case ENETDOWN:
      case ENOPROTOOPT:
      case EHOSTDOWN:
      case ENONET:
      case EHOSTUNREACH:
      case EOPNOTSUPP:
      case ENETUNREACH:
      case EPERM:
        return true;
      case EINVAL:
        // The agent shut the listening socket down (its shard is being
        // drained; the kernel migrated the queue to the other shards).
        BeginDrain(config_.drain_timeout, "listening socket shut down");
        return false;
      case EMFILE:
      case ENFILE:
      case ENOBUFS:
      case ENOMEM:
        // Leave the connections in the queue and retry shortly; level-
        // triggered epoll would otherwise spin.
        WarnAcceptPaused(errno);
        PauseAccepting(absl::Milliseconds(100));
        return false;
      default:
        PF_LOG(ERROR) << "accept: " << std::strerror(errno)
                      << "; pausing accept for 1s";
        PauseAccepting(absl::Seconds(1));
        return false;
    }
  }
  // Also in proxy mode: a relayed stream must not wait for Nagle (without
  // it bulk forwarding costs about 60% more CPU per byte, see proxy.cc).
  if (!listener_nodelay_) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  if (proxy_) {
    ++accepted_total_;
    proxy_->Accept(Fd(fd));
    return true;
  }
  auto conn = std::make_unique<Connection>();
  conn->fd = Fd(fd);
  if (config_.mode == Mode::kHttp) conn->http.emplace(body_);
  ++accepted_total_;
  connections_[fd] = std::move(conn);
  // Read at once rather than after a round through epoll: the request is
  // usually there already (always with TCP_DEFER_ACCEPT on the listener).
  // A connection that is finished here never enters the epoll set.
  HandleConnection(fd, EPOLLIN);
  return true;
}

void Worker::HandleConnection(int fd, uint32_t events) {
  auto it = connections_.find(fd);
  if (it == connections_.end()) return;  // closed earlier in this batch
  Connection& conn = *it->second;
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
    if (!ReadFrom(conn)) return CloseConnection(fd);
  }
  if (conn.pending() > 0 && !WriteTo(conn)) return CloseConnection(fd);
  Settle(conn);
}

bool Worker::ReadFrom(Connection& conn) {
  char buf[64 * 1024];
  size_t budget = kReadBudget;
  while (!conn.read_eof && budget > 0 &&
         (conn.lingering || conn.pending() < kMaxPendingOutput)) {
    ssize_t n = ::recv(conn.fd.get(), buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        conn.input_drained = true;
        return true;
      }
      PF_LOG(DEBUG) << "recv: " << std::strerror(errno);
      return false;
    }
    if (n == 0) {
      conn.read_eof = true;
      return true;
    }
    bytes_in_ += n;
    conn.bytes += n;
    budget -= std::min<size_t>(budget, n);
    // A short read emptied the receive queue: the next recv() would only
    // say EAGAIN, so leave it to epoll to say when more comes.
    conn.input_drained = static_cast<size_t>(n) < sizeof(buf);
    if (!conn.lingering) {
      absl::string_view data(buf, n);
      if (conn.http) {
        const uint64_t answered = conn.http->requests();
        conn.http->Consume(data, &conn.out);
        requests_total_ += conn.http->requests() - answered;
        // Nothing more will be answered: reading on is Settle()'s business.
        if (conn.http->closing()) return true;
      } else {
        conn.out.append(data.data(), data.size());
      }
    }
    if (conn.input_drained) return true;
  }
  return true;
}

bool Worker::WriteTo(Connection& conn) {
  while (conn.pending() > 0) {
    ssize_t n = ::send(conn.fd.get(), conn.out.data() + conn.out_offset,
                       conn.pending(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      PF_LOG(DEBUG) << "send: " << std::strerror(errno);
      return false;
    }
    bytes_out_ += n;
    conn.bytes += n;
    conn.out_offset += n;
  }
  conn.out.clear();
  conn.out_offset = 0;
  return true;
}

void Worker::Settle(Connection& conn) {
  int fd = conn.fd.get();
  if (conn.pending() == 0) {
    bool finished = conn.read_eof || (conn.http && conn.http->closing());
    if (conn.read_eof && (conn.lingering || finished)) {
      return CloseConnection(fd);
    }
    if (finished && !conn.lingering && conn.http && conn.http->clean_close() &&
        conn.input_drained) {
      // The client asked to close and nothing of its input is left unread:
      // close at once (no shutdown, no wait for its FIN).
      return CloseConnection(fd);
    }
    if (finished && !conn.lingering) {
      // Send our FIN but keep reading until the peer's, so that input we
      // never read (e.g. pipelined requests after "Connection: close") does
      // not make the kernel answer with a reset that could destroy the
      // response in flight.
      ::shutdown(fd, SHUT_WR);
      conn.lingering = true;
      conn.linger_deadline = absl::Now() + config_.linger_timeout;
      ++lingering_;
    }
  }
  uint32_t want = 0;
  if (!conn.read_eof &&
      (conn.lingering || conn.pending() < kMaxPendingOutput)) {
    want |= EPOLLIN;
  }
  if (conn.pending() > 0) want |= EPOLLOUT;
  if (want == 0) {
    // Peer finished sending and nothing to write: handled above. This is
    // only reached with pending output that cannot be written yet.
    want = EPOLLOUT;
  }
  if (want != conn.events) {
    int op = conn.events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (absl::Status s = EpollCtl(epoll_.get(), op, fd, want); !s.ok()) {
      PF_LOG(ERROR) << s.message();
      return CloseConnection(fd);
    }
    conn.events = want;
  }
}

void Worker::CloseConnection(int fd) {
  auto it = connections_.find(fd);
  if (it == connections_.end()) return;
  if (it->second->lingering) --lingering_;
  // Closing the fd removes it from the epoll set.
  connections_.erase(it);
}

void Worker::HandleSignals() {
  for (;;) {
    signalfd_siginfo info;
    ssize_t n = ::read(signal_fd_.get(), &info, sizeof(info));
    if (n != static_cast<ssize_t>(sizeof(info))) {
      if (n < 0 && errno == EINTR) continue;
      return;
    }
    const char* name = info.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM";
    if (draining_) {
      ForceClose(absl::StrCat("second ", name));
      return;
    }
    BeginDrain(config_.drain_timeout, name);
  }
}

void Worker::BeginDrain(absl::Duration timeout, absl::string_view why) {
  absl::Time deadline = absl::Now() + timeout;
  if (draining_) {
    drain_deadline_ = std::min(drain_deadline_, deadline);
    return;
  }
  draining_ = true;
  drain_deadline_ = deadline;
  resume_accept_at_.reset();
  agent_->StopReadoption();  // the listening socket goes
  if (accepting_) {
    LogIfError(EpollCtl(epoll_.get(), EPOLL_CTL_DEL, listen_fd_.get(), 0));
    accepting_ = false;
  }
  // The agent keeps its own copy of the socket; queued connections stay
  // there for the other shards or the next worker.
  listen_fd_.Reset();
  PF_LOG(INFO) << why << ": draining " << OpenConnections()
               << " connections (deadline " << timeout << ")";
  std::vector<int> fds;
  fds.reserve(connections_.size());
  for (const auto& [fd, conn] : connections_) fds.push_back(fd);
  for (int fd : fds) {
    Connection& conn = *connections_[fd];
    if (conn.http && conn.http->idle() && !conn.read_eof && !conn.lingering) {
      // What is idle depends on what has arrived: take in bytes already
      // queued (e.g. a request sent just before the signal, whose readiness
      // epoll has not reported yet), so that the request is answered rather
      // than dropped with the connection.
      if (!ReadFrom(conn)) {
        CloseConnection(fd);
        continue;
      }
    }
    if (conn.http) conn.http->StartDrain();
    if (conn.pending() > 0 && !WriteTo(conn)) {
      CloseConnection(fd);
      continue;
    }
    Settle(conn);
  }
  if (OpenConnections() == 0) done_ = true;
}

void Worker::ForceClose(absl::string_view why) {
  if (OpenConnections() > 0) {
    PF_LOG(WARNING) << why << ": closing " << OpenConnections()
                    << " remaining connections";
  } else {
    PF_LOG(INFO) << why;
  }
  connections_.clear();
  if (proxy_) proxy_->CloseAll();
  lingering_ = 0;
  draining_ = true;
  done_ = true;
}

bool Worker::Releasable(const Connection& conn) const {
  if (conn.lingering || conn.read_eof || conn.pending() > 0) return false;
  if (conn.http) return conn.http->idle() && !conn.http->closing();
  return true;  // echo: everything read was echoed
}

void Worker::ReleaseConnections(const v1::HandOffRequest& request) {
  if (proxy_) {
    // Idle pairs, each as one message with both sockets. None while
    // draining (the busy ones are still counted).
    ProxyRelease r = proxy_->Release(
        draining_ ? 0 : request.count(), request.bytes_per_second(),
        [&](int client, int upstream, uint64_t released_mono_ns) {
          return agent_->HandOffPair(request.id(), client, upstream,
                                     released_mono_ns);
        });
    handed_off_ += r.released;
    PF_LOG(DEBUG) << "hand-off " << request.id() << ": released " << r.released
                  << " proxied pairs of " << request.count() << " asked ("
                  << r.busy << " busy)";
    agent_->HandOffDone(request.id(), r.released, r.busy, r.bytes_per_second);
    return;
  }
  uint32_t released = 0;
  uint32_t busy = 0;
  double released_rate = 0;
  std::vector<HandOffCandidate> candidates;
  for (const auto& [fd, conn] : connections_) {
    if (!Releasable(*conn)) {
      ++busy;
    } else if (!draining_) {
      candidates.push_back(HandOffCandidate{
          .key = fd, .bytes_per_second = conn->bytes_per_second});
    }
  }
  const std::vector<int> chosen =
      ChooseForHandOff(std::move(candidates), request.count(),
                       request.bytes_per_second())
          .keys;
  for (int fd : chosen) {
    Connection& conn = *connections_[fd];
    // Out of the epoll set first: closing our descriptor would not remove
    // it while the socket lives on in the agent and the receiver (epoll
    // watches the open file), and the socket may come back to us.
    if (conn.events != 0) {
      if (absl::Status s = EpollCtl(epoll_.get(), EPOLL_CTL_DEL, fd, 0);
          !s.ok()) {
        PF_LOG(WARNING) << "hand-off " << request.id() << ": " << s.message()
                        << "; keeping the connection";
        break;
      }
      conn.events = 0;
    }
    // Its hand-off pause starts now: nobody serves it until the receiver
    // has it in its loop.
    absl::Status s =
        agent_->HandOffConnection(request.id(), fd, "", MonotonicNowNs());
    if (!s.ok()) {
      PF_LOG(WARNING) << "hand-off " << request.id() << ": " << s.message()
                      << "; keeping the connection";
      Settle(conn);  // back in the epoll set
      break;
    }
    ++released;
    ++handed_off_;
    released_rate += conn.bytes_per_second;
    CloseConnection(fd);
  }
  PF_LOG(DEBUG) << "hand-off " << request.id() << ": released " << released
                << " of " << request.count() << " asked (" << busy << " busy)";
  agent_->HandOffDone(request.id(), released, busy, released_rate);
}

void Worker::AdoptConnection(const v1::HandOffConnection& handoff,
                             std::vector<Fd> fds) {
  auto refuse = [&](absl::string_view why) {
    ++adopt_refused_;
    // Closing is all there is to do: the agent kept no copy.
    PF_LOG(ERROR) << "listener " << config_.listener << " shard "
                  << config_.shard << " pid " << ::getpid() << ": hand-off "
                  << handoff.id() << ": adopt_connection refused: " << why
                  << "; closed " << fds.size() << " descriptors";
    fds.clear();
  };
  if (absl::Status s = CheckHandOffSockets(fds, HandOffSocketCount(handoff));
      !s.ok()) {
    return refuse(s.message());
  }
  if (handoff.upstream_attached() && !proxy_) {
    return refuse("a proxied pair, and this worker does not proxy");
  }
  if (!handoff.upstream_attached() && proxy_) {
    return refuse(
        "a single connection, and a proxy worker adopts only proxied pairs "
        "(client and upstream)");
  }
  if (proxy_) {
    if (absl::Status s = proxy_->Adopt(std::move(fds[0]), std::move(fds[1]));
        !s.ok()) {
      PF_LOG(ERROR) << "listener " << config_.listener << " shard "
                    << config_.shard << ": hand-off " << handoff.id() << ": "
                    << s.message();
      return;
    }
    ++adopted_;
    agent_->AdoptedConnection(handoff);
    return;
  }
  Fd fd = std::move(fds[0]);
  int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    PF_LOG(ERROR) << "hand-off " << handoff.id()
                  << ": fcntl(O_NONBLOCK): " << std::strerror(errno);
  }
  const int raw = fd.get();
  auto conn = std::make_unique<Connection>();
  conn->fd = std::move(fd);
  if (config_.mode == Mode::kHttp) {
    conn->http.emplace(body_);
    if (draining_) conn->http->StartDrain();
    conn->http->Consume(handoff.buffered(), &conn->out);
  } else {
    conn->out.append(handoff.buffered());
  }
  ++adopted_;
  connections_[raw] = std::move(conn);
  // Served again from here on: the end of its hand-off pause.
  agent_->AdoptedConnection(handoff);
  // Input that came while it travelled waits in its receive queue.
  HandleConnection(raw, EPOLLIN);
}

void Worker::OnAgentMessage(const v1::AgentMessage& message,
                            std::vector<Fd> fds) {
  switch (message.msg_case()) {
    case v1::AgentMessage::kHandoffRequest:
      ReleaseConnections(message.handoff_request());
      break;
    case v1::AgentMessage::kAdoptConnection:
      AdoptConnection(message.adopt_connection(), std::move(fds));
      break;
    case v1::AgentMessage::kDrain: {
      uint32_t ms = message.drain().deadline_ms();
      BeginDrain(ms > 0 ? absl::Milliseconds(ms) : config_.drain_timeout,
                 "agent asked to drain");
      break;
    }
    default:
      PF_LOG(WARNING) << "ignoring an agent message of unknown kind "
                      << message.msg_case();
      break;
  }
}

void Worker::SendLoad() {
  // Each connection's rate over the period since the last report.
  const absl::Time now = absl::Now();
  const double secs = absl::ToDoubleSeconds(now - last_load_);
  last_load_ = now;
  for (auto& entry : connections_) {
    Connection& c = *entry.second;
    c.bytes_per_second =
        secs > 0 ? static_cast<double>(c.bytes - c.bytes_at_report) / secs : 0;
    c.bytes_at_report = c.bytes;
  }
  if (proxy_) proxy_->UpdateRates(secs);
  v1::WorkerMessage load;
  v1::WorkerLoad* l = load.mutable_load();
  l->set_active_connections(OpenConnections());
  l->set_accepted_total(accepted_total_);
  if (proxy_) {
    // Proxy mode: bytes from the clients (sent upstream) and to them.
    ProxyCounters c = proxy_->counters();
    l->set_bytes_in_total(c.bytes_from_client);
    l->set_bytes_out_total(c.bytes_to_client);
  } else {
    l->set_bytes_in_total(bytes_in_);
    l->set_bytes_out_total(bytes_out_);
  }
  l->set_requests_total(requests_total_);
  agent_->Send(load);
}

// ---------------------------------------------------------------------------
// main()

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  absl::StatusOr<Flags> flags = ParseFlags(args);
  if (!flags.ok()) {
    std::fprintf(stderr,
                 "portfleet-worker: %s\nTry 'portfleet-worker --help'.\n",
                 std::string(flags.status().message()).c_str());
    return 2;
  }
  if (flags->help) {
    std::fputs(Usage().c_str(), stdout);
    return 0;
  }
  SetLogLevel(flags->log_level);

  WorkerConfig config;
  config.mode = flags->mode;
  config.drain_timeout = flags->drain_timeout;
  config.connect_timeout = flags->connect_timeout;
  if (flags->mode == Mode::kProxy) {
    absl::StatusOr<SocketAddress> upstream = ResolveUpstream(flags->upstream);
    if (!upstream.ok()) {
      std::fprintf(stderr, "portfleet-worker: %s\n",
                   std::string(upstream.status().message()).c_str());
      return 2;
    }
    config.upstream = *upstream;
  }
  if (const char* l = std::getenv("PORTFLEET_LISTENER"); l && *l) {
    config.listener = l;
  } else if (std::string name = ListenFdName(); !name.empty()) {
    config.listener = name;
  }
  if (const char* s = std::getenv("PORTFLEET_SHARD"); s && *s) {
    if (!absl::SimpleAtoi(s, &config.shard)) {
      std::fprintf(stderr,
                   "portfleet-worker: PORTFLEET_SHARD='%s' is not a shard "
                   "number\n",
                   s);
      return 2;
    }
  }
  absl::StatusOr<AgentLinkOptions> agent = AgentLinkOptionsFromEnv();
  if (!agent.ok()) {
    std::fprintf(stderr, "portfleet-worker: %s\n",
                 std::string(agent.status().message()).c_str());
    return 2;
  }
  config.agent = std::move(*agent);
  SetLogTag(absl::StrCat("worker ", config.listener, "/", config.shard));

  absl::StatusOr<Fd> listen_fd = TakeListenFd();
  if (!listen_fd.ok()) {
    PF_LOG(ERROR) << "cannot start: " << listen_fd.status().message();
    return 2;
  }
  absl::StatusOr<std::optional<ControlChannel>> control =
      ControlChannel::FromEnv();
  if (!control.ok()) {
    PF_LOG(ERROR) << "cannot start: " << control.status().message();
    return 2;
  }
  absl::StatusOr<std::unique_ptr<Worker>> worker = Worker::Create(
      std::move(config), std::move(*listen_fd), std::move(*control));
  if (!worker.ok()) {
    PF_LOG(ERROR) << "cannot start: " << worker.status().message();
    return 1;
  }
  if (absl::Status s = (*worker)->Run(); !s.ok()) {
    PF_LOG(ERROR) << s.message();
    return 1;
  }
  return 0;
}

}  // namespace portfleet::worker
