// MetricsServer: a poll(2) HTTP/1.1 server on one thread. Each connection
// reads one request (at most kMaxRequestBytes up to the blank line, within
// kRequestTimeout), gets a complete answer with "Connection: close", then the
// server shuts down its side and discards what the client still sends until
// EOF (briefly), so the client reads the answer instead of a reset.
#include "agent/metrics/metrics_server.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <list>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/spec/enum_names.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"

namespace portfleet {
namespace {

constexpr absl::Duration kRequestTimeout = absl::Seconds(5);
// A client that has not sent a byte by then is idle: probes and scrapers
// send their request at once.
constexpr absl::Duration kFirstByteTimeout = absl::Seconds(1);
constexpr absl::Duration kWriteTimeout = absl::Seconds(5);
constexpr absl::Duration kLingerTimeout = absl::Seconds(1);
constexpr size_t kMaxLingerBytes = 256 * 1024;

// "metrics 127.0.0.1:9474: address already in use": the errno's code, its
// text in lower case (strerror capitalises it).
absl::Status BindError(int err, absl::string_view address) {
  std::string text = std::strerror(err);
  if (!text.empty()) {
    text[0] =
        static_cast<char>(std::tolower(static_cast<unsigned char>(text[0])));
  }
  return absl::Status(absl::ErrnoToStatus(err, "").code(),
                      absl::StrCat("metrics ", address, ": ", text));
}

struct Response {
  int code = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  bool allow_get = false;  // 405: "Allow: GET"
};

absl::string_view Reason(int code) {
  switch (code) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 431:
      return "Request Header Fields Too Large";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Unknown";
  }
}

std::string Serialize(const Response& r) {
  std::string out = absl::StrCat("HTTP/1.1 ", r.code, " ", Reason(r.code),
                                 "\r\nContent-Type: ", r.content_type,
                                 "\r\nContent-Length: ", r.body.size(),
                                 "\r\nCache-Control: no-store\r\n");
  if (r.allow_get) out += "Allow: GET\r\n";
  absl::StrAppend(&out, "Connection: close\r\n\r\n", r.body);
  return out;
}

Response Text(int code, std::string body) {
  Response r;
  r.code = code;
  r.body = std::move(body);
  return r;
}

// Why the agent is not serving: the shards that are not running and ready.
std::string NotReadyReason(const MetricsSnapshot& snapshot) {
  std::vector<std::string> shards;
  for (const ListenerStatus& listener : snapshot.listeners) {
    for (const ShardStatus& shard : listener.shards) {
      if (shard.state == v1::SHARD_STATE_RUNNING && shard.ready) continue;
      shards.push_back(absl::StrCat(
          listener.spec.name(), "/", shard.index, " ", ShortName(shard.state),
          shard.state == v1::SHARD_STATE_RUNNING ? " (not ready)" : ""));
    }
  }
  constexpr size_t kMaxListed = 16;
  std::string out = "not ready: agent is not serving";
  if (!shards.empty()) {
    absl::StrAppend(&out, "; shards not up:");
    for (size_t i = 0; i < shards.size() && i < kMaxListed; ++i) {
      absl::StrAppend(&out, i == 0 ? " " : ", ", shards[i]);
    }
    if (shards.size() > kMaxListed) {
      absl::StrAppend(&out, ", and ", shards.size() - kMaxListed, " more");
    }
  }
  return out + "\n";
}

std::string HealthStateName(v1::HealthState state) {
  return v1::HealthState_Name(state).substr(sizeof("HEALTH_STATE_") - 1);
}

}  // namespace

std::pair<int, std::string> ReadinessAnswer(const AgentHealth& health) {
  if (health.ready()) {
    if (health.state == v1::HEALTH_STATE_SERVING) return {200, "ready\n"};
    return {200, absl::StrCat("ready (", HealthStateName(health.state), ": ",
                              health.reason, ")\n")};
  }
  return {503,
          absl::StrCat("not ready: ", HealthStateName(health.state),
                       health.reason.empty() ? "" : ": ", health.reason, "\n")};
}

namespace {

struct Connection {
  enum class State { kReading, kWriting, kLingering };
  Fd fd;
  State state = State::kReading;
  std::string in;
  std::string out;
  size_t out_pos = 0;
  size_t lingered = 0;
  absl::Time accepted;
  absl::Time deadline;
  // Nothing received yet: the first to go when every slot is taken.
  bool Idle() const { return state == State::kReading && in.empty(); }
};

}  // namespace

struct MetricsServer::Impl {
  Fd listen_fd;
  Fd wake_fd;  // eventfd: the destructor asks the thread to stop
  uint16_t port = 0;
  SnapshotFn snapshot;
  std::function<absl::Status()> liveness;
  std::function<AgentHealth()> health;
  std::list<Connection> connections;
  std::thread thread;

  void Run();
  void Accept();
  // Returns false when the connection is done and should be closed.
  bool OnReadable(Connection& c);
  bool OnWritable(Connection& c);
  void Respond(Connection& c, const Response& r);
  Response Handle(absl::string_view head);
  absl::StatusOr<MetricsSnapshot> TakeSnapshot();
};

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const MetricsServerOptions& options, SnapshotFn snapshot) {
  const std::string& address = options.address;
  absl::StatusOr<SocketAddress> parsed =
      SocketAddress::Parse(address, /*allow_port_zero=*/true);
  if (!parsed.ok()) {
    return absl::Status(
        parsed.status().code(),
        absl::StrCat("metrics ", address, ": ", parsed.status().message()));
  }
  if (!snapshot) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics ", address, ": no snapshot function"));
  }
  auto impl = std::make_unique<Impl>();
  impl->snapshot = std::move(snapshot);
  impl->listen_fd = Fd(::socket(parsed->family(),
                                SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!impl->listen_fd) return BindError(errno, address);
  int one = 1;
  if (::setsockopt(impl->listen_fd.get(), SOL_SOCKET, SO_REUSEADDR, &one,
                   sizeof(one)) != 0) {
    return BindError(errno, address);
  }
  if (parsed->family() == AF_INET6 &&
      ::setsockopt(impl->listen_fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one,
                   sizeof(one)) != 0) {
    return BindError(errno, address);
  }
  if (::bind(impl->listen_fd.get(), parsed->get(), parsed->length) != 0 ||
      ::listen(impl->listen_fd.get(), 128) != 0) {
    return BindError(errno, address);
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  if (::getsockname(impl->listen_fd.get(), reinterpret_cast<sockaddr*>(&bound),
                    &bound_len) != 0) {
    return BindError(errno, address);
  }
  impl->port = SocketAddress::FromSockaddr(
                   reinterpret_cast<const sockaddr*>(&bound), bound_len)
                   .port();
  impl->wake_fd = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!impl->wake_fd) return BindError(errno, address);
  impl->liveness = options.liveness;
  impl->health = options.health;
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Run(); });
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
}

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

MetricsServer::~MetricsServer() {
  uint64_t one = 1;
  // An eventfd write only fails when the counter would overflow.
  [[maybe_unused]] ssize_t n = ::write(impl_->wake_fd.get(), &one, sizeof(one));
  if (impl_->thread.joinable()) impl_->thread.join();
}

uint16_t MetricsServer::port() const { return impl_->port; }

void MetricsServer::Impl::Run() {
  std::vector<pollfd> fds;
  std::vector<Connection*> polled;
  while (true) {
    fds.clear();
    polled.clear();
    fds.push_back({wake_fd.get(), POLLIN, 0});
    // At capacity an idle connection makes room (Accept); only when every
    // slot has a request in progress does accepting wait.
    bool accepting =
        connections.size() < static_cast<size_t>(kMaxConnections) ||
        std::any_of(connections.begin(), connections.end(),
                    [](const Connection& c) { return c.Idle(); });
    if (accepting) fds.push_back({listen_fd.get(), POLLIN, 0});
    size_t first_connection = fds.size();
    absl::Time now = absl::Now();
    absl::Time next_deadline = absl::InfiniteFuture();
    for (Connection& c : connections) {
      short events = c.state == Connection::State::kWriting ? POLLOUT : POLLIN;
      fds.push_back({c.fd.get(), events, 0});
      polled.push_back(&c);
      next_deadline = std::min(next_deadline, c.deadline);
    }
    int timeout_ms = -1;
    if (next_deadline != absl::InfiniteFuture()) {
      timeout_ms = static_cast<int>(std::clamp<int64_t>(
          absl::ToInt64Milliseconds(next_deadline - now) + 1, 0, 60000));
    }
    int n = ::poll(fds.data(), fds.size(), timeout_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      PF_LOG(ERROR) << "metrics: poll: " << std::strerror(errno);
      return;
    }
    if (fds[0].revents != 0) return;  // stopping; connections close with us

    now = absl::Now();
    std::vector<Connection*> done;
    for (size_t i = 0; i < polled.size(); ++i) {
      Connection& c = *polled[i];
      short revents = fds[first_connection + i].revents;
      bool keep = true;
      if (revents != 0) {
        keep = c.state == Connection::State::kWriting ? OnWritable(c)
                                                      : OnReadable(c);
      } else if (now >= c.deadline) {
        if (c.Idle()) {
          keep = false;  // never said anything: nobody to answer
        } else if (c.state == Connection::State::kReading) {
          Respond(c, Text(408, "request timeout\n"));
        } else {
          keep = false;
        }
      }
      if (!keep) done.push_back(&c);
    }
    if (!done.empty()) {
      connections.remove_if([&](const Connection& c) {
        return std::find(done.begin(), done.end(), &c) != done.end();
      });
    }
    // Last: Accept() may shed an idle connection, which `polled` points at.
    if (accepting && fds[1].revents != 0) Accept();
  }
}

void MetricsServer::Impl::Accept() {
  for (;;) {
    if (connections.size() >= static_cast<size_t>(kMaxConnections)) {
      // Shed the oldest idle connection: a slow or hostile client must not
      // keep /healthz from the kubelet.
      auto oldest = connections.end();
      for (auto it = connections.begin(); it != connections.end(); ++it) {
        if (it->Idle() &&
            (oldest == connections.end() || it->accepted < oldest->accepted)) {
          oldest = it;
        }
      }
      if (oldest == connections.end()) return;
      connections.erase(oldest);
    }
    int fd = ::accept4(listen_fd.get(), nullptr, nullptr,
                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
          errno != ECONNABORTED) {
        PF_LOG(WARNING) << "metrics: accept: " << std::strerror(errno);
      }
      return;
    }
    Connection& c = connections.emplace_back();
    c.fd = Fd(fd);
    c.accepted = absl::Now();
    c.deadline = c.accepted + kFirstByteTimeout;
  }
}

bool MetricsServer::Impl::OnReadable(Connection& c) {
  char buf[4096];
  ssize_t n = ::recv(c.fd.get(), buf, sizeof(buf), 0);
  if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
  if (n == 0) return false;  // client gone (or done, when lingering)
  if (c.state == Connection::State::kLingering) {
    c.lingered += static_cast<size_t>(n);
    return c.lingered < kMaxLingerBytes;
  }
  if (c.in.empty()) c.deadline = c.accepted + kRequestTimeout;
  c.in.append(buf, static_cast<size_t>(n));
  size_t end = c.in.find("\r\n\r\n");
  size_t end_len = 4;
  size_t lf_end = c.in.find("\n\n");
  if (lf_end != std::string::npos &&
      (end == std::string::npos || lf_end < end)) {
    end = lf_end;
    end_len = 2;
  }
  if (end != std::string::npos && end + end_len <= kMaxRequestBytes) {
    Respond(c, Handle(absl::string_view(c.in).substr(0, end)));
  } else if (c.in.size() > kMaxRequestBytes) {
    Respond(c, Text(431, absl::StrCat("request too large (limit ",
                                      kMaxRequestBytes, " bytes)\n")));
  }
  return true;
}

void MetricsServer::Impl::Respond(Connection& c, const Response& r) {
  c.in.clear();
  c.in.shrink_to_fit();
  c.out = Serialize(r);
  c.out_pos = 0;
  c.state = Connection::State::kWriting;
  c.deadline = absl::Now() + kWriteTimeout;
}

bool MetricsServer::Impl::OnWritable(Connection& c) {
  while (c.out_pos < c.out.size()) {
    ssize_t n = ::send(c.fd.get(), c.out.data() + c.out_pos,
                       c.out.size() - c.out_pos, MSG_NOSIGNAL);
    if (n < 0) {
      return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    }
    c.out_pos += static_cast<size_t>(n);
  }
  ::shutdown(c.fd.get(), SHUT_WR);
  c.out.clear();
  c.out.shrink_to_fit();
  c.state = Connection::State::kLingering;
  c.deadline = absl::Now() + kLingerTimeout;
  return true;
}

absl::StatusOr<MetricsSnapshot> MetricsServer::Impl::TakeSnapshot() {
  absl::StatusOr<MetricsSnapshot> s = snapshot();
  if (!s.ok()) {
    PF_LOG(DEBUG) << "metrics: no snapshot: " << s.status().ToString();
  }
  return s;
}

Response MetricsServer::Impl::Handle(absl::string_view head) {
  absl::string_view line = head.substr(0, head.find('\n'));
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
  if (parts.size() != 3 || parts[0].empty() || parts[1].empty()) {
    return Text(400, "malformed request line\n");
  }
  if (!absl::StartsWith(parts[2], "HTTP/1.")) {
    return Text(505, "HTTP/1.x only\n");
  }
  absl::string_view path = parts[1].substr(0, parts[1].find('?'));
  bool known = path == "/metrics" || path == "/healthz" || path == "/readyz";
  if (!known) return Text(404, "not found; try /metrics, /healthz, /readyz\n");
  if (parts[0] != "GET") {
    Response r = Text(405, "method not allowed; GET only\n");
    r.allow_get = true;
    return r;
  }
  if (path == "/healthz") {
    absl::Status live = liveness ? liveness() : absl::OkStatus();
    if (!live.ok()) return Text(503, absl::StrCat(live.message(), "\n"));
    return Text(200, "ok\n");
  }
  if (path == "/readyz" && health) {
    auto [code, body] = ReadinessAnswer(health());
    return Text(code, std::move(body));
  }
  absl::StatusOr<MetricsSnapshot> s = TakeSnapshot();
  if (!s.ok()) {
    return Text(
        503, absl::StrCat(path == "/readyz" ? "not ready" : "no metrics", ": ",
                          s.status().message(), "\n"));
  }
  if (path == "/readyz") {
    if (s->agent.serving) return Text(200, "ready\n");
    return Text(503, NotReadyReason(*s));
  }
  Response r = Text(200, RenderPrometheus(*s));
  r.content_type = kPrometheusContentType;
  return r;
}

}  // namespace portfleet
