// portfleet-worker, the reference worker: a single-threaded epoll server on
// the listening socket it inherits by socket activation (fd 3), answering
// HTTP/1.1 with its identity, echoing bytes or forwarding connections to an
// upstream (proxy mode, worker/proxy.h), draining on SIGTERM or on the
// agent's request. The pieces are exposed for tests: flag parsing, the HTTP
// request-head parser, the per-connection HTTP session and the server loop.
#ifndef PORTFLEET_WORKER_WORKER_H_
#define PORTFLEET_WORKER_WORKER_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "portfleet/v1/control.pb.h"
#include "worker/proxy.h"
#include "worker/sdk/agent_link.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/control_channel.h"

namespace portfleet::worker {

// Largest request head (request line + headers + blank line) accepted.
inline constexpr size_t kMaxHttpHead = 16 * 1024;

enum class Mode { kHttp, kEcho, kProxy };

// Command-line flags of portfleet-worker.
struct Flags {
  Mode mode = Mode::kHttp;                            // --mode http|echo|proxy
  std::string upstream;                               // --upstream HOST:PORT
  absl::Duration connect_timeout = absl::Seconds(5);  // --connect-timeout
  LogLevel log_level = LogLevel::kInfo;               // --log-level
  absl::Duration drain_timeout = absl::Seconds(30);   // --drain-timeout
  bool help = false;                                  // --help / -h
};

// Parses the arguments after argv[0]. InvalidArgument for unknown flags,
// missing or bad values, positional arguments, proxy mode without
// --upstream and proxy flags without proxy mode. The upstream is checked
// for its form here and resolved by Main().
absl::StatusOr<Flags> ParseFlags(const std::vector<std::string>& args);

// The --help text.
std::string Usage();

// ---------------------------------------------------------------------------
// HTTP/1.x

struct HttpRequestHead {
  std::string method;
  std::string target;
  int minor_version = 1;        // HTTP/1.<minor_version>
  bool keep_alive = true;       // from the version and Connection header
  uint64_t content_length = 0;  // request body bytes that follow the head
};

struct HttpParseResult {
  enum class Kind {
    kIncomplete,  // need more bytes
    kComplete,    // `head` and `head_length` are set
    kError,       // answer `error_status` and close
  };
  Kind kind = Kind::kIncomplete;
  HttpRequestHead head;
  size_t head_length = 0;  // bytes consumed, blank line included
  int error_status = 0;    // 400, 431, 501 or 505
  std::string error;       // why, for the response body and logs
};

// Parses the request head at the start of `buffer` (leading empty lines are
// skipped). A head longer than `max_head` is a 431.
HttpParseResult ParseHttpRequestHead(absl::string_view buffer,
                                     size_t max_head = kMaxHttpHead);

// The body every request is answered with.
std::string IdentityBody(absl::string_view listener, uint32_t shard, pid_t pid);

// One HTTP connection's protocol state, without I/O: bytes in, responses
// out. Requests are answered in order (pipelining); request bodies are read
// and discarded; the answer is sent when the whole request has arrived.
class HttpSession {
 public:
  // `body` must outlive the session (the worker's identity body does).
  explicit HttpSession(absl::string_view body) : body_(body) {}

  // Consumes received bytes and appends responses to `out`. Once closing(),
  // further input is ignored.
  void Consume(absl::string_view data, std::string* out);

  // Graceful shutdown: the request in progress (if any) is answered with
  // "Connection: close"; an idle keep-alive session becomes closing() at
  // once; a session that has not received its first request yet waits for
  // it (its request may be in flight) and answers it with close.
  void StartDrain();

  // No further requests will be answered: close once the output is written.
  bool closing() const { return closing_; }
  // closing() because the client asked for it ("Connection: close", or
  // HTTP/1.0 without keep-alive), and it sent nothing after that request:
  // no input of its own is left that a close could turn into a reset, so
  // the connection may be closed without waiting for the client's FIN.
  bool clean_close() const {
    return closing_ && client_close_ && !unanswered_input_;
  }
  // No partial request (head or body) is buffered.
  bool idle() const { return buffer_.empty() && !in_body_; }
  uint64_t requests() const { return requests_; }

 private:
  void Respond(const HttpRequestHead& head, std::string* out);

  absl::string_view body_;
  std::string buffer_;  // unparsed input
  bool in_body_ = false;
  uint64_t body_remaining_ = 0;
  HttpRequestHead pending_;  // head whose body is being discarded
  bool draining_ = false;
  bool closing_ = false;
  bool client_close_ = false;      // the client's request said close
  bool unanswered_input_ = false;  // bytes came after the last answer
  uint64_t requests_ = 0;
};

// ---------------------------------------------------------------------------
// The server.

struct WorkerConfig {
  Mode mode = Mode::kHttp;
  // Proxy mode: where connections go and how long a connect may take.
  SocketAddress upstream;
  absl::Duration connect_timeout = absl::Seconds(5);
  std::string listener = "unknown";  // PORTFLEET_LISTENER / LISTEN_FDNAMES
  uint32_t shard = 0;                // PORTFLEET_SHARD
  // Drain deadline after SIGTERM/SIGINT, and after an AgentDrain without one.
  absl::Duration drain_timeout = absl::Seconds(30);
  // Period of WorkerLoad reports on the control channel.
  absl::Duration load_interval = absl::Seconds(1);
  // How long a closing connection waits for the peer's FIN after our FIN, so
  // that unread input does not turn our close into a reset.
  absl::Duration linger_timeout = absl::Seconds(2);
  // Re-adoption (PORTFLEET_AGENT_SOCKET, PORTFLEET_AGENT_UID): see
  // worker/sdk/agent_link.h.
  AgentLinkOptions agent;
};

class Worker {
 public:
  // `listen_fd` must be a listening TCP socket (TakeListenFd), blocking or
  // not; its O_NONBLOCK is left as it is. Blocks SIGTERM and SIGINT (they
  // are read from a signalfd) and ignores SIGPIPE for the process; on a
  // blocking socket, also handles SIGALRM (the accept guard).
  static absl::StatusOr<std::unique_ptr<Worker>> Create(
      WorkerConfig config, Fd listen_fd, std::optional<ControlChannel> control);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Serves until a drain (signal or AgentDrain) completes or times out.
  // Errors only for failures of the event loop itself.
  absl::Status Run();

 private:
  struct Connection;

  explicit Worker(WorkerConfig config);
  absl::Status Init(Fd listen_fd, std::optional<ControlChannel> control);

  void AcceptAll();
  bool AcceptOne();  // false: stop accepting in this round
  // Accept queue length of the listening socket; 0 (and the matching
  // action) when it cannot be read or the socket no longer listens.
  int QueuedConnections();
  void ArmAcceptGuard();
  void PauseAccepting(absl::Duration pause);
  void WarnAcceptPaused(int err);
  void HandleConnection(int fd, uint32_t events);
  size_t OpenConnections() const;
  bool ReadFrom(Connection& conn);  // false: the connection failed
  bool WriteTo(Connection& conn);   // false: the connection failed
  void Settle(Connection& conn);    // close, linger, or update epoll
  void CloseConnection(int fd);
  void HandleSignals();
  // `fd`: the descriptor attached to the message, if any.
  void OnAgentMessage(const v1::AgentMessage& message, std::vector<Fd> fds);
  // Connection hand-off (control.proto, HandOffRequest): a connection with
  // nothing in flight may be released; release up to the count asked;
  // adopt a released connection of another worker.
  bool Releasable(const Connection& conn) const;
  void ReleaseConnections(const v1::HandOffRequest& request);
  // `fds`: the connection's socket, or a proxied pair's two (checked
  // here: a worker refuses and closes what it cannot take).
  void AdoptConnection(const v1::HandOffConnection& handoff,
                       std::vector<Fd> fds);
  void BeginDrain(absl::Duration timeout, absl::string_view why);
  void ForceClose(absl::string_view why);
  void SendLoad();
  void OnTimers(absl::Time now);
  int EpollTimeoutMs(absl::Time now) const;

  WorkerConfig config_;
  Fd epoll_;
  Fd signal_fd_;
  Fd listen_fd_;
  std::unique_ptr<AgentLink> agent_;  // hello, load, drain, re-adoption
  std::string body_;                  // HTTP identity body
  std::unordered_map<int, std::unique_ptr<Connection>> connections_;
  std::unique_ptr<Proxy> proxy_;  // proxy mode: the pairs instead

  bool accepting_ = false;         // listen fd registered with epoll
  bool listener_nodelay_ = false;  // accepted sockets inherit TCP_NODELAY
  // O_NONBLOCK on the listening socket's open file description, as found
  // (never changed: it is shared with the agent and other workers).
  bool listener_nonblocking_ = false;
  bool accept_guard_armed_ = false;  // set once it was first armed
  std::optional<absl::Time> resume_accept_at_;
  bool draining_ = false;
  bool done_ = false;
  absl::Time drain_deadline_ = absl::InfiniteFuture();
  absl::Time last_load_ = absl::Now();  // the last SendLoad()
  absl::Time next_load_ = absl::InfiniteFuture();
  int lingering_ = 0;

  absl::Time last_accept_warning_ = absl::InfinitePast();
  uint64_t accept_warnings_suppressed_ = 0;

  uint64_t accepted_total_ = 0;
  uint64_t bytes_in_ = 0;
  uint64_t bytes_out_ = 0;
  uint64_t requests_total_ = 0;  // HTTP requests answered
  uint64_t handed_off_ = 0;      // connections released to other workers
  uint64_t adopted_ = 0;         // connections adopted from other workers
  uint64_t adopt_refused_ = 0;   // hand-offs refused and closed
};

// The whole program: flags, environment, socket, control channel, Run().
// Exit codes: 0 after a drain, 1 on a runtime failure, 2 on a usage or
// start-up error (no socket passed, fd 3 not a listening TCP socket).
int Main(int argc, char** argv);

}  // namespace portfleet::worker

#endif  // PORTFLEET_WORKER_WORKER_H_
