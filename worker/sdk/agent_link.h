// AgentLink: a worker's whole relation with its agent, on top of the control
// channel (control_channel.h): hello and ready, load reports and drained,
// drain requests from the agent, and re-adoption. Any C++ worker that links
// portfleet_worker_sdk gets re-adoption from it:
//
//   ASSIGN_OR_RETURN(Fd listen_fd, TakeListenFd());
//   ASSIGN_OR_RETURN(std::optional<ControlChannel> control,
//                    ControlChannel::FromEnv());
//   ASSIGN_OR_RETURN(AgentLinkOptions options, AgentLinkOptionsFromEnv());
//   ASSIGN_OR_RETURN(std::unique_ptr<AgentLink> link,
//                    AgentLink::Create({.listener = "web", .shard = 0},
//                                      listen_fd, std::move(control),
//                                      options));
//   link->SendHello();
//   link->SendReady();                       // once the worker accepts
//   epoll_ctl(ADD, link->fd(), EPOLLIN);     // once: the fd never changes
//   ...
//   when link->fd() is readable:
//     link->Dispatch([&](const v1::AgentMessage& m) {
//       if (m.has_drain()) { link->StopReadoption(); /* drain */ }
//     });
//   every second: if (link->connected()) link->Send(load);
//   hand-off (WorkerIdentity.handoff; DispatchWithFds):
//     handoff_request: take each idle connection out of the loop, then
//       HandOffConnection(id, fd, "", MonotonicNowNs() read then); close it;
//       HandOffDone() once;
//     adopt_connection: add the socket to the loop, then
//       AdoptedConnection(m.adopt_connection()): load reports sent through
//       the link then carry the connections' hand-off pauses.
//
// Re-adoption (see WorkerHello in control.proto): when the channel hits
// end-of-file (the agent died) and the worker still serves, the link connects
// to $PORTFLEET_AGENT_SOCKET every `reconnect_interval`, checks that the peer
// runs as the expected agent uid (SO_PEERCRED), and sends WorkerHello
// {reconnect: true} with the listening socket attached (SCM_RIGHTS), then
// ready if the worker had said ready. The new connection is the channel from
// then on. A peer of another uid never receives the socket: the link closes
// that connection, logs (rate-limited) and keeps trying. Failures are logged
// once, then at most once per `log_interval`; the worker serves throughout.
//
// fd() is one descriptor for the worker's event loop whatever happens to the
// channel underneath (an epoll set holding the channel and a timerfd for the
// reconnect timer): register it once, call Dispatch() when it is readable.
// Not thread-safe; all calls from the worker's loop thread.
#ifndef PORTFLEET_WORKER_SDK_AGENT_LINK_H_
#define PORTFLEET_WORKER_SDK_AGENT_LINK_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/duration_histogram.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {

struct AgentLinkOptions {
  // The agent's control socket (PORTFLEET_AGENT_SOCKET). Empty: no
  // re-adoption; the worker serves on alone once its channel is gone.
  std::string agent_socket;
  // The uid the agent runs as (PORTFLEET_AGENT_UID): the listening socket is
  // handed only to a peer with this SO_PEERCRED uid. Unset: uid 0 or the
  // worker's own effective uid.
  std::optional<uid_t> agent_uid;
  // Period of reconnect attempts.
  absl::Duration reconnect_interval = absl::Milliseconds(250);
  // A connect still in progress after this is abandoned (and retried).
  absl::Duration connect_timeout = absl::Seconds(2);
  // Repeated failures (reconnects, refused peers, malformed messages) are
  // logged at most this often.
  absl::Duration log_interval = absl::Seconds(10);
};

// Environment variable naming the uid of the agent (decimal).
inline constexpr char kAgentUidEnvVar[] = "PORTFLEET_AGENT_UID";

// Options from PORTFLEET_AGENT_SOCKET and PORTFLEET_AGENT_UID, other fields
// at their defaults. InvalidArgument for a uid that is not a decimal number
// below 2^32-1.
absl::StatusOr<AgentLinkOptions> AgentLinkOptionsFromEnv();

// Who the worker is, for its hello.
struct WorkerIdentity {
  std::string listener;
  uint32_t shard = 0;
  // The worker takes part in connection hand-off (rebalancing): it answers
  // AgentMessage.handoff_request with HandOffConnection() for each idle
  // connection it releases and HandOffDone(), and adopts the sockets of
  // AgentMessage.adopt_connection (see HandOffRequest in control.proto).
  bool handoff = false;
  // With `handoff`: the worker also hands off and adopts proxied pairs
  // (HandOffPair(); an adopt_connection with `upstream_attached` carries
  // both sockets).
  bool handoff_pairs = false;
};

class AgentLink {
 public:
  // `listen_fd` is the worker's listening socket; the link keeps its own
  // duplicate to hand back on a reconnect (until StopReadoption()).
  // `control` is the channel the worker was started with, if any.
  static absl::StatusOr<std::unique_ptr<AgentLink>> Create(
      WorkerIdentity identity, const Fd& listen_fd,
      std::optional<ControlChannel> control, AgentLinkOptions options);
  ~AgentLink();
  AgentLink(const AgentLink&) = delete;
  AgentLink& operator=(const AgentLink&) = delete;

  // Readable when Dispatch() has work (a message, a lost channel, the
  // reconnect timer). Stable for the link's life.
  int fd() const { return epoll_.get(); }

  // A channel is up (messages sent now reach an agent).
  bool connected() const { return control_.has_value(); }
  // Reconnect attempts are scheduled or in progress.
  bool reconnecting() const { return reconnect_armed_ || pending_.has_value(); }
  // Peers refused because of their uid, since Create().
  uint64_t refused_peers() const { return refused_peers_; }
  // Successful reconnects since Create().
  uint64_t reconnects() const { return reconnects_; }

  // WorkerHello{reconnect: false}; nothing without a channel.
  void SendHello();
  // WorkerReady. Also remembered: a reconnect says ready again.
  void SendReady();
  // Any other message (load, drained). A load report gets the hand-off
  // pauses counted by AdoptedConnection() (WorkerLoad.handoff_pauses). A
  // channel that fails is closed and, if the worker still serves,
  // reconnecting starts. A full channel (the agent does not read) drops the
  // message.
  void Send(const v1::WorkerMessage& message);

  // Handles whatever made fd() readable; `on_message` gets each message from
  // the agent, in order. Never blocks. Descriptors attached to a message
  // are closed.
  void Dispatch(absl::FunctionRef<void(const v1::AgentMessage&)> on_message);
  // Dispatch() that also hands over the descriptor attached to a message
  // (an invalid Fd when none): the socket of adopt_connection.
  void DispatchWithFds(
      absl::FunctionRef<void(const v1::AgentMessage&, Fd)> on_message);
  // Dispatch() that hands over every descriptor attached to a message, in
  // order (empty when none): both sockets of a proxied pair's
  // adopt_connection.
  void DispatchWithAllFds(
      absl::FunctionRef<void(const v1::AgentMessage&, std::vector<Fd>)>
          on_message);

  // Connection hand-off: releases the connected socket `fd` for the agent's
  // HandOffRequest `id`, with the input already read from it and not yet
  // consumed. The caller closes its descriptor once this returned OK (the
  // agent has its own); on an error the connection stays the caller's.
  // `released_mono_ns`: MonotonicNowNs() (handoff_pauses.h) read when the
  // caller took the connection out of its event loop, the start of its
  // hand-off pause (HandOffConnection.released_mono_ns); unset: now.
  absl::Status HandOffConnection(
      uint64_t id, int fd, absl::string_view buffered,
      std::optional<uint64_t> released_mono_ns = std::nullopt);
  // Connection hand-off of an idle proxied pair: its client socket and its
  // upstream socket in one packet (HandOffConnection.upstream_attached).
  // As HandOffConnection(): the caller closes both once this returned OK.
  absl::Status HandOffPair(
      uint64_t id, int client_fd, int upstream_fd,
      std::optional<uint64_t> released_mono_ns = std::nullopt);
  // The receiving side: call once the connection (or pair) of an
  // AgentMessage.adopt_connection is in the worker's event loop. Counts its
  // pause (now minus the sender's released_mono_ns; not counted when the
  // sender did not stamp it) for the load reports.
  void AdoptedConnection(const v1::HandOffConnection& handoff);
  // The pauses counted so far (cumulative).
  const DurationHistogram& handoff_pauses() const { return handoff_pauses_; }
  // Ends the answer to HandOffRequest `id`: connections released, kept
  // because they had data in flight, and the released ones' recent traffic
  // (bytes per second; see ChooseForHandOff in handoff_choice.h).
  void HandOffDone(uint64_t id, uint32_t released, uint32_t busy,
                   double bytes_per_second = 0);

  // The worker stops serving its listening socket (it drains): the link
  // closes its copy and never reconnects. The channel, if up, stays (for
  // drained).
  void StopReadoption();

 private:
  AgentLink(WorkerIdentity identity, AgentLinkOptions options);
  absl::Status Init(const Fd& listen_fd, std::optional<ControlChannel> control);

  v1::WorkerMessage Hello(bool reconnect) const;
  void SendNow(const v1::WorkerMessage& message);
  absl::Status Watch(int fd);
  void LoseControl(absl::string_view why, bool on_send);
  bool CanReconnect() const {
    return !options_.agent_socket.empty() && listen_;
  }
  void ArmReconnect(absl::Duration after);
  void TryReconnect();
  absl::Status CheckPeer(const ControlChannel& channel) const;
  absl::Status HandOver(ControlChannel channel);
  void ReconnectFailed(const absl::Status& status);

  WorkerIdentity identity_;
  AgentLinkOptions options_;
  Fd epoll_;   // holds the channel (when up) and timer_
  Fd timer_;   // reconnect timer (timerfd)
  Fd listen_;  // duplicate of the listening socket, until StopReadoption()
  uint64_t socket_inode_ = 0;
  std::optional<ControlChannel> control_;
  bool ready_ = false;

  bool reconnect_armed_ = false;
  std::optional<ControlChannel> pending_;  // connect in progress
  absl::Time pending_deadline_ = absl::InfiniteFuture();
  absl::Time lost_at_ = absl::InfinitePast();
  uint64_t failures_ = 0;  // since the channel was lost
  absl::Time last_failure_log_ = absl::InfinitePast();
  uint64_t refused_peers_ = 0;
  uint64_t reconnects_ = 0;
  // When the current control connection was handed over by a reconnect.
  absl::Time reconnected_at_ = absl::InfinitePast();
  absl::Time last_bad_message_log_ = absl::InfinitePast();
  uint64_t bad_messages_suppressed_ = 0;
  DurationHistogram handoff_pauses_;  // of the connections adopted
};

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_AGENT_LINK_H_
