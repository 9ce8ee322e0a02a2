#include "worker/proxy.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/handoff_choice.h"
#include "worker/sdk/handoff_pauses.h"

namespace portfleet::worker {

namespace {

// Buffered, not spliced. Each direction reads one 16 KiB chunk into a stack
// buffer and sends it on at once; only what the destination cannot take
// right now is copied into the direction's pending buffer, and while
// anything is pending the source is not read (backpressure: the source's
// receive buffer fills and TCP closes its window). So an idle or flowing
// pair holds no memory of its own and a blocked one at most kChunk per
// direction. A direction whose read filled the chunk is scheduled for
// another turn after the other ready sockets (fairness under edge
// triggering).
//
// Measured on the 2-core bench machine (CPU of the proxy process per MiB
// forwarded, 4 bulk connections through an echo server, clients without
// TCP_NODELAY; tests/bench/README.md): 64 KiB chunks read until EAGAIN cost
// about 1,230 us/MiB, 16 KiB chunks about 985 us/MiB, and splice() through
// a pipe per direction (switched on once a direction moved a full chunk, so
// that short connections never pay for the pipes) 920-1,130 us/MiB, within
// the noise of the buffered version: the copies are not what costs here,
// the TCP stack is. So the simpler buffered code was kept. What mattered
// most was TCP_NODELAY on the client socket too (as HAProxy sets it):
// 800-1,030 us/MiB, HAProxy 2.6 800-990 in the same runs.
constexpr size_t kChunk = 16 * 1024;

// All events a proxied socket is registered for, once, edge-triggered: no
// epoll_ctl() after registration; a direction that stops (backpressure)
// resumes on the destination's next EPOLLOUT edge.
constexpr uint32_t kEvents = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;

// One ERROR line per second at most for upstream failures (a dead upstream
// under load fails every connection).
constexpr absl::Duration kFailureLogPeriod = absl::Seconds(1);

std::string PeerName(int fd) {
  sockaddr_storage addr{};
  socklen_t length = sizeof(addr);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &length) != 0) {
    return "?";
  }
  return SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&addr), length)
      .ToString();
}

void SetResetOnClose(int fd) {
  linger l{};
  l.l_onoff = 1;
  l.l_linger = 0;
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

}  // namespace

bool ProxyPairIdle(bool connecting, const ProxyDirectionState& up,
                   const ProxyDirectionState& down) {
  auto quiet = [](const ProxyDirectionState& d) {
    return d.pending == 0 && !d.src_finished && !d.dst_shut;
  };
  return !connecting && quiet(up) && quiet(down);
}

absl::StatusOr<SocketAddress> ResolveUpstream(absl::string_view text) {
  absl::StatusOr<SocketAddress> numeric = SocketAddress::Parse(text);
  if (numeric.ok()) return numeric;
  // Not a numeric literal: HOST:PORT with a name (no brackets, one colon).
  const size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos || colon == 0 ||
      text.find(':') != colon || text.front() == '[') {
    return absl::InvalidArgumentError(
        absl::StrCat("--upstream '", text, "': ", numeric.status().message()));
  }
  const std::string host(text.substr(0, colon));
  const std::string port(text.substr(colon + 1));
  int port_number = 0;
  if (!absl::SimpleAtoi(port, &port_number) || port_number < 1 ||
      port_number > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--upstream '", text, "': port '", port, "' is not 1-65535"));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0 || found == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--upstream '", text, "': cannot resolve '", host,
                     "': ", rc != 0 ? ::gai_strerror(rc) : "no address"));
  }
  SocketAddress address = SocketAddress::FromSockaddr(
      found->ai_addr, static_cast<socklen_t>(found->ai_addrlen));
  ::freeaddrinfo(found);
  return address;
}

// One direction of a pair: bytes read from `src`, written to `dst`.
struct Proxy::Direction {
  int src = -1;
  int dst = -1;
  uint64_t* counter = nullptr;  // the proxy's byte total for this direction
  std::string pending;          // read, not yet written to dst
  size_t pending_offset = 0;
  bool src_eof = false;   // src sent its FIN (recv returned 0)
  bool dst_shut = false;  // src's FIN was passed on: shutdown(dst, SHUT_WR)
  // src reported EPOLLRDHUP, EPOLLHUP or EPOLLERR: read until recv() says
  // EOF or EAGAIN (no short-read shortcut, whose next edge may never come).
  bool src_hup = false;
  bool scheduled = false;  // in ready_: pump again on the next turn

  size_t pending_size() const { return pending.size() - pending_offset; }
};

struct Proxy::Pair {
  Fd client;
  Fd upstream;
  Direction up;    // client -> upstream
  Direction down;  // upstream -> client
  bool connecting = false;
  absl::Time connect_deadline;
  // Bytes both ways, and their rate over the last load report period:
  // what a hand-off by bytes chooses by.
  uint64_t bytes = 0;
  uint64_t bytes_at_report = 0;
  double bytes_per_second = 0;
};

Proxy::Proxy(ProxyConfig config, const Fd& epoll)
    : config_(std::move(config)),
      epoll_(epoll),
      upstream_text_(config_.upstream.ToString()) {}

Proxy::~Proxy() = default;

ProxyCounters Proxy::counters() const {
  return {.active = pairs_.size(),
          .bytes_from_client = bytes_from_client_,
          .bytes_to_client = bytes_to_client_,
          .upstream_failures = upstream_failures_};
}

bool Proxy::Register(int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    PF_LOG(ERROR) << "listener " << config_.listener << " shard "
                  << config_.shard << ": epoll_ctl(ADD, fd " << fd
                  << "): " << std::strerror(errno);
    return false;
  }
  return true;
}

Proxy::Pair& Proxy::AddPair(Fd client) {
  auto owned = std::make_unique<Pair>();
  Pair& pair = *owned;
  const int cfd = client.get();
  pair.client = std::move(client);
  pair.up.counter = &bytes_from_client_;
  pair.down.counter = &bytes_to_client_;
  pairs_[cfd] = std::move(owned);
  by_fd_[cfd] = &pair;
  return pair;
}

void Proxy::Accept(Fd client) {
  Pair& pair = AddPair(std::move(client));
  if (!Register(pair.client.get(), kEvents)) {
    return Close(pair, /*reset=*/true);
  }
  StartConnect(pair);
}

bool Proxy::Idle(const Pair& pair) const {
  auto state = [](const Direction& d) {
    return ProxyDirectionState{.pending = d.pending_size(),
                               .src_finished = d.src_eof || d.src_hup,
                               .dst_shut = d.dst_shut};
  };
  return pair.upstream.valid() &&
         ProxyPairIdle(pair.connecting, state(pair.up), state(pair.down));
}

ProxyRelease Proxy::Release(
    uint32_t count, uint64_t bytes_per_second,
    absl::FunctionRef<absl::Status(int client, int upstream,
                                   uint64_t released_mono_ns)>
        send) {
  ProxyRelease out;
  std::vector<HandOffCandidate> candidates;
  for (const auto& [cfd, pair] : pairs_) {
    if (!Idle(*pair)) {
      ++out.busy;
    } else {
      candidates.push_back(HandOffCandidate{
          .key = cfd, .bytes_per_second = pair->bytes_per_second});
    }
  }
  const std::vector<int> chosen =
      ChooseForHandOff(std::move(candidates), count, bytes_per_second).keys;
  for (int cfd : chosen) {
    Pair& pair = *pairs_.at(cfd);
    const int ufd = pair.upstream.get();
    // Out of the epoll set first: closing our descriptors would not remove
    // the sockets while they live on in the agent and the receiver (epoll
    // watches the open file), and the pair may come back to us.
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, cfd, nullptr) != 0) {
      PF_LOG(WARNING) << "listener " << config_.listener << " shard "
                      << config_.shard << ": hand-off: epoll_ctl(DEL, fd "
                      << cfd << "): " << std::strerror(errno)
                      << "; keeping the pair";
      break;
    }
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, ufd, nullptr) != 0) {
      PF_LOG(WARNING) << "listener " << config_.listener << " shard "
                      << config_.shard << ": hand-off: epoll_ctl(DEL, fd "
                      << ufd << "): " << std::strerror(errno)
                      << "; keeping the pair";
      if (!Register(cfd, kEvents)) Close(pair, /*reset=*/true);
      break;
    }
    // The start of the pair's hand-off pause: out of the loop.
    if (absl::Status s = send(cfd, ufd, MonotonicNowNs()); !s.ok()) {
      PF_LOG(WARNING) << "listener " << config_.listener << " shard "
                      << config_.shard << ": hand-off: " << s.message()
                      << "; keeping the pair";
      // Back in the epoll set; registering reports what came meanwhile.
      if (!Register(cfd, kEvents) || !Register(ufd, kEvents)) {
        Close(pair, /*reset=*/true);
      }
      break;
    }
    ++out.released;
    out.bytes_per_second += pair.bytes_per_second;
    // The agent has the sockets: forget the pair without touching them
    // (no shutdown, no SO_LINGER).
    by_fd_.erase(ufd);
    by_fd_.erase(cfd);
    pairs_.erase(cfd);
  }
  return out;
}

absl::Status Proxy::Adopt(Fd client, Fd upstream) {
  for (const Fd* fd : {&client, &upstream}) {
    // The flag belongs to the open file, which the sender shared: it is
    // set already; set it in case a third party sent a blocking socket.
    int flags = ::fcntl(fd->get(), F_GETFL);
    if (flags < 0 || (!(flags & O_NONBLOCK) &&
                      ::fcntl(fd->get(), F_SETFL, flags | O_NONBLOCK) != 0)) {
      return ErrnoError("adopt a proxied pair: fcntl(O_NONBLOCK)");
    }
  }
  Pair& pair = AddPair(std::move(client));
  const int ufd = upstream.get();
  pair.upstream = std::move(upstream);
  by_fd_[ufd] = &pair;
  pair.up.src = pair.client.get();
  pair.up.dst = ufd;
  pair.down.src = ufd;
  pair.down.dst = pair.client.get();
  if (!Register(pair.client.get(), kEvents) || !Register(ufd, kEvents)) {
    Close(pair, /*reset=*/true);
    return absl::InternalError("adopt a proxied pair: epoll_ctl failed");
  }
  // Bytes that arrived while the pair travelled wait in its sockets.
  Progress(pair);
  return absl::OkStatus();
}

void Proxy::UpdateRates(double seconds) {
  for (auto& [cfd, pair] : pairs_) {
    pair->bytes_per_second =
        seconds > 0
            ? static_cast<double>(pair->bytes - pair->bytes_at_report) / seconds
            : 0;
    pair->bytes_at_report = pair->bytes;
  }
}

void Proxy::StartConnect(Pair& pair) {
  const SocketAddress& to = config_.upstream;
  pair.upstream =
      Fd(::socket(to.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!pair.upstream) return FailConnect(pair, errno, "socket");
  const int ufd = pair.upstream.get();
  by_fd_[ufd] = &pair;
  int one = 1;
  ::setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  pair.up.src = pair.client.get();
  pair.up.dst = ufd;
  pair.down.src = ufd;
  pair.down.dst = pair.client.get();
  if (::connect(ufd, to.get(), to.length) != 0 && errno != EINPROGRESS) {
    return FailConnect(pair, errno, "connect");
  }
  // Even a connect() that returned 0 is finished through EPOLLOUT, which
  // the registration reports at once: one path for both.
  pair.connecting = true;
  pair.connect_deadline = absl::Now() + config_.connect_timeout;
  connecting_.emplace(pair.connect_deadline, &pair);
  if (!Register(ufd, kEvents)) return Close(pair, /*reset=*/true);
}

void Proxy::OnConnected(Pair& pair) {
  connecting_.erase({pair.connect_deadline, &pair});
  pair.connecting = false;
  Progress(pair);
}

void Proxy::LogUpstreamFailure(const Pair& pair, int err, const char* what) {
  ++upstream_failures_;
  absl::Time now = absl::Now();
  if (now - last_failure_log_ < kFailureLogPeriod) {
    ++failures_not_logged_;
    return;
  }
  PF_LOG(ERROR) << "listener " << config_.listener << " shard " << config_.shard
                << ": upstream " << upstream_text_ << ": " << what << ": "
                << std::strerror(err) << "; client "
                << PeerName(pair.client.get()) << " reset"
                << (failures_not_logged_ > 0
                        ? absl::StrCat(" (", failures_not_logged_,
                                       " more failures since the last line)")
                        : "");
  last_failure_log_ = now;
  failures_not_logged_ = 0;
}

void Proxy::FailConnect(Pair& pair, int err, const char* what) {
  LogUpstreamFailure(pair, err, what);
  // The client gets a reset, not a FIN: a FIN would read as a clean, empty
  // answer from the upstream (and an HTTP client may retry or trust it);
  // a reset is what it would see connecting to a refused upstream itself.
  Close(pair, /*reset=*/true);
}

void Proxy::Handle(int fd, uint32_t events) {
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return;  // closed earlier in this batch
  Pair& pair = *it->second;
  const bool is_client = fd == pair.client.get();
  if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
    (is_client ? pair.up : pair.down).src_hup = true;
  }
  if (pair.connecting) {
    // Client input waits (it is read once connected); the upstream socket
    // reports the end of its connect() with EPOLLOUT or an error.
    if (is_client || !(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    // A failed TCP connect (reset, timeout, unreachable) always reports
    // EPOLLERR and EPOLLHUP (sk_err set, state CLOSE); EPOLLOUT alone is an
    // established connection: no getsockopt(SO_ERROR) per connection.
    if (events & (EPOLLERR | EPOLLHUP)) {
      int err = 0;
      socklen_t length = sizeof(err);
      if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &length) != 0) {
        err = errno;
      }
      if (err != 0) return FailConnect(pair, err, "connect");
    }
    return OnConnected(pair);
  }
  // Only the directions the event concerns: input on fd feeds the
  // direction it is the source of; EPOLLOUT resumes the one it is the
  // destination of, if that one waits for it.
  Direction& from = is_client ? pair.up : pair.down;
  Direction& to = is_client ? pair.down : pair.up;
  bool ok = true;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
    ok = Pump(pair, from);
  }
  if (ok && (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) &&
      to.pending_size() > 0) {
    ok = Pump(pair, to);
  }
  Settle(pair, ok);
}

void Proxy::Progress(Pair& pair) {
  Settle(pair, Pump(pair, pair.up) && Pump(pair, pair.down));
}

void Proxy::Settle(Pair& pair, bool ok) {
  if (!ok) return Close(pair, /*reset=*/true);
  if (pair.up.dst_shut && pair.down.dst_shut) {
    // Both sides sent their FIN and got everything: a clean close.
    Close(pair, /*reset=*/false);
  }
}

bool Proxy::Flush(Pair& pair, Direction& d) {
  while (d.pending_size() > 0) {
    ssize_t n = ::send(d.dst, d.pending.data() + d.pending_offset,
                       d.pending_size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      return false;  // the destination is gone (EPIPE, ECONNRESET)
    }
    d.pending_offset += static_cast<size_t>(n);
    *d.counter += static_cast<uint64_t>(n);
    pair.bytes += static_cast<uint64_t>(n);
  }
  d.pending.clear();
  d.pending_offset = 0;
  if (d.src_eof && !d.dst_shut) {
    // Half-close: pass the FIN on; the other direction keeps flowing. When
    // the other direction is finished already, Settle() closes the pair
    // right after this, and close() sends the FIN (the destination's
    // receive queue was read to its end, so it is a FIN, not a reset): no
    // shutdown() for the last direction of a pair.
    const Direction& other = &d == &pair.up ? pair.down : pair.up;
    if (!other.dst_shut) ::shutdown(d.dst, SHUT_WR);
    d.dst_shut = true;
  }
  return true;
}

bool Proxy::Pump(Pair& pair, Direction& d) {
  if (!Flush(pair, d)) return false;
  if (d.pending_size() > 0 || d.src_eof) return true;  // wait for dst
  // One chunk per turn: a pair with more to read is scheduled again after
  // the other ready sockets had theirs (see kChunk).
  char buf[kChunk];
  ssize_t n;
  do {
    n = ::recv(d.src, buf, sizeof(buf), 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    // ECONNRESET and friends: reset the other side too.
    return errno == EAGAIN || errno == EWOULDBLOCK;
  }
  if (n == 0) {
    d.src_eof = true;
    return Flush(pair, d);  // pass the FIN on
  }
  size_t sent = 0;
  while (sent < static_cast<size_t>(n)) {
    ssize_t w = ::send(d.dst, buf + sent, n - sent, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return false;
    }
    sent += static_cast<size_t>(w);
  }
  *d.counter += sent;
  pair.bytes += sent;
  if (sent < static_cast<size_t>(n)) {
    // dst is full: keep the rest, stop reading src until dst drains.
    d.pending.assign(buf + sent, n - sent);
    d.pending_offset = 0;
    return true;
  }
  // A short read emptied src's receive queue; new data raises a new edge.
  // A full one may have left more, and after a hang-up was seen the FIN
  // raises no further edge: read again on the next turn.
  if (static_cast<size_t>(n) == sizeof(buf) || d.src_hup) Schedule(pair, d);
  return true;
}

void Proxy::Schedule(Pair& pair, Direction& d) {
  if (d.scheduled) return;
  d.scheduled = true;
  ready_.push_back({pair.client.get(), &d == &pair.up});
}

void Proxy::RunReady() {
  std::vector<std::pair<int, bool>> ready;
  ready.swap(ready_);
  for (const auto& [fd, up] : ready) {
    auto it = pairs_.find(fd);
    if (it == pairs_.end()) continue;  // closed meanwhile
    Pair& pair = *it->second;
    Direction& d = up ? pair.up : pair.down;
    if (!d.scheduled) continue;  // fd reused by a new pair
    d.scheduled = false;
    Settle(pair, Pump(pair, d));
  }
}

void Proxy::Close(Pair& pair, bool reset) {
  if (pair.connecting) connecting_.erase({pair.connect_deadline, &pair});
  if (reset) {
    if (pair.client) SetResetOnClose(pair.client.get());
    if (pair.upstream) SetResetOnClose(pair.upstream.get());
  }
  if (pair.upstream) by_fd_.erase(pair.upstream.get());
  const int cfd = pair.client.get();
  by_fd_.erase(cfd);
  // Closing the fds removes them from the epoll set.
  pairs_.erase(cfd);
}

void Proxy::OnTimers(absl::Time now) {
  RunReady();
  while (!connecting_.empty() && connecting_.begin()->first <= now) {
    Pair* pair = connecting_.begin()->second;
    FailConnect(*pair, ETIMEDOUT,
                absl::StrCat("connect (timeout ",
                             absl::FormatDuration(config_.connect_timeout), ")")
                    .c_str());
  }
}

absl::Time Proxy::NextDeadline() const {
  if (!ready_.empty()) return absl::InfinitePast();  // at once
  return connecting_.empty() ? absl::InfiniteFuture()
                             : connecting_.begin()->first;
}

void Proxy::CloseAll() {
  while (!pairs_.empty()) Close(*pairs_.begin()->second, /*reset=*/true);
}

}  // namespace portfleet::worker
