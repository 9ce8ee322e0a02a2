// The proxy mode of portfleet-worker: an L4 TCP forwarder. Every accepted
// client connection is paired with a new connection to the upstream; bytes
// flow both ways until both sides have finished sending. The Proxy owns the
// pairs and their sockets; the Worker (worker.h) owns the listening socket,
// the epoll loop, signals, the agent channel and the drain, and hands the
// Proxy each accepted socket and each readiness event of a proxied socket.
#ifndef PORTFLEET_WORKER_PROXY_H_
#define PORTFLEET_WORKER_PROXY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::worker {

struct ProxyConfig {
  SocketAddress upstream;  // where every client connection is forwarded
  // Named in log lines (the upstream failures).
  std::string listener = "unknown";
  uint32_t shard = 0;
  // Longest a non-blocking connect() to the upstream may take; the client
  // is then reset as for a refused connect.
  absl::Duration connect_timeout = absl::Seconds(5);
};

// Totals for the load reports (WorkerLoad).
struct ProxyCounters {
  uint64_t active = 0;             // client connections open (pairs)
  uint64_t bytes_from_client = 0;  // read from clients, sent upstream
  uint64_t bytes_to_client = 0;    // read from the upstream, sent to clients
  uint64_t upstream_failures = 0;  // connects refused, failed or timed out
};

// One direction of a proxied pair, as far as hand-off cares.
struct ProxyDirectionState {
  size_t pending = 0;         // read from the source, not yet written
  bool src_finished = false;  // the source sent its FIN or hung up
  bool dst_shut = false;      // its FIN was passed on (shutdown SHUT_WR)
};

// A pair may be handed off to another worker (it is idle) when its
// upstream connect has finished and, both ways, nothing read is waiting to
// be written and neither side has finished sending (no half-close, no
// hang-up, not closing). Bytes in the sockets' kernel queues travel with
// the sockets and do not make a pair busy.
bool ProxyPairIdle(bool connecting, const ProxyDirectionState& up,
                   const ProxyDirectionState& down);

// What Proxy::Release did.
struct ProxyRelease {
  uint32_t released = 0;
  uint32_t busy = 0;            // pairs with something in flight (kept)
  double bytes_per_second = 0;  // the released pairs' traffic
};

// "HOST:PORT" -> the upstream address: a numeric IPv4 or [IPv6] literal,
// or a name resolved once (getaddrinfo, the first TCP address). Errors name
// the text and the cause.
absl::StatusOr<SocketAddress> ResolveUpstream(absl::string_view text);

class Proxy {
 public:
  // `epoll` is the worker's epoll instance; it must outlive the Proxy.
  Proxy(ProxyConfig config, const Fd& epoll);
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // Takes an accepted, non-blocking client socket: starts the upstream
  // connect and registers both sockets (edge-triggered) with epoll.
  void Accept(Fd client);
  // True when `fd` is one of the proxy's sockets.
  bool Owns(int fd) const { return by_fd_.count(fd) != 0; }
  // A readiness event of one of the proxy's sockets.
  void Handle(int fd, uint32_t events);
  // Pairs with more to read (scheduled), then connect timeouts. Call on
  // every turn of the loop.
  void OnTimers(absl::Time now);
  // The earliest time OnTimers has something to do.
  absl::Time NextDeadline() const;
  // Closes every pair at once (drain deadline, second signal).
  void CloseAll();

  // Connection hand-off (HandOffRequest in control.proto): picks up to
  // `count` idle pairs (ProxyPairIdle; by traffic when `bytes_per_second`
  // > 0, as ChooseForHandOff does, a pair's rate being its bytes both ways)
  // and passes each one's client and upstream sockets to `send`, with the
  // CLOCK_MONOTONIC time (ns) the pair left the epoll set (the start of its
  // hand-off pause), which returns OK once the agent has them; the proxy
  // then forgets the pair (its descriptors are closed; the sockets live
  // on). A send that fails stops the release and the pair stays here,
  // served as before.
  ProxyRelease Release(uint32_t count, uint64_t bytes_per_second,
                       absl::FunctionRef<absl::Status(
                           int client, int upstream, uint64_t released_mono_ns)>
                           send);
  // Serves a pair released by another worker: `client` and `upstream` are
  // connected TCP sockets (checked by the caller). Anything queued on them
  // meanwhile is forwarded at once. An error (epoll) closes the pair.
  absl::Status Adopt(Fd client, Fd upstream);
  // Each pair's traffic over the `seconds` since the previous call (bytes
  // both ways per second), what Release() chooses by.
  void UpdateRates(double seconds);

  size_t active() const { return pairs_.size(); }
  ProxyCounters counters() const;

 private:
  struct Pair;
  struct Direction;

  void StartConnect(Pair& pair);
  void OnConnected(Pair& pair);
  void FailConnect(Pair& pair, int err, const char* what);
  // Moves bytes from one side to the other until the source would block,
  // the destination is full or the source finished; false: the pair failed.
  bool Pump(Pair& pair, Direction& d);
  bool Flush(Pair& pair, Direction& d);
  void Schedule(Pair& pair, Direction& d);
  void RunReady();
  void Progress(Pair& pair);  // pumps both directions
  // Closes the pair when a pump failed (reset) or both sides are done.
  void Settle(Pair& pair, bool ok);
  // `reset`: abortive close of both sockets (SO_LINGER 0): the failure of
  // one side is passed on to the other as a reset, not as a clean FIN.
  void Close(Pair& pair, bool reset);
  bool Register(int fd, uint32_t events);
  bool Idle(const Pair& pair) const;
  // Wires a new pair's directions and indexes it.
  Pair& AddPair(Fd client);
  void LogUpstreamFailure(const Pair& pair, int err, const char* what);

  ProxyConfig config_;
  const Fd& epoll_;
  std::string upstream_text_;
  // Pairs by client fd; both fds of a pair are in by_fd_.
  std::unordered_map<int, std::unique_ptr<Pair>> pairs_;
  std::unordered_map<int, Pair*> by_fd_;
  // Pairs whose upstream connect is in progress, by deadline.
  std::set<std::pair<absl::Time, Pair*>> connecting_;
  // Directions to pump again on the next turn of the loop: the pair's
  // client fd, and true for client -> upstream.
  std::vector<std::pair<int, bool>> ready_;

  uint64_t bytes_from_client_ = 0;
  uint64_t bytes_to_client_ = 0;
  uint64_t upstream_failures_ = 0;
  absl::Time last_failure_log_ = absl::InfinitePast();
  uint64_t failures_not_logged_ = 0;
};

}  // namespace portfleet::worker

#endif  // PORTFLEET_WORKER_PROXY_H_
