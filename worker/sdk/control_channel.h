// The worker control channel: a Unix SOCK_SEQPACKET socket carrying one
// serialized protobuf per packet (portfleet.v1.WorkerMessage from worker to
// agent, portfleet.v1.AgentMessage from agent to worker). The worker finds it
// as fd PORTFLEET_CONTROL_FD; the agent keeps the other end of a socketpair.
// Both sides use this class:
//
//   worker: channel.Send(worker_message);
//           ASSIGN_OR_RETURN(auto msg, channel.Receive());  // AgentMessage
//   agent:  channel.Send(agent_message);
//           ASSIGN_OR_RETURN(auto msg,
//                            channel.Receive<v1::WorkerMessage>());
//
// All I/O is non-blocking. A zero-length packet cannot be told apart from
// end-of-file on SOCK_SEQPACKET, so Send() refuses empty messages (a message
// whose oneof is unset) and a zero-length read means the peer is gone.
//
// Re-adoption (see WorkerHello in control.proto): a worker whose channel hits
// end-of-file connects to the agent's listener at $PORTFLEET_AGENT_SOCKET and
// sends its hello with the listening socket attached; the agent accepts the
// connection, adopts it and takes both:
//
//   worker: ASSIGN_OR_RETURN(ControlChannel c, ControlChannel::Connect(path));
//           RETURN_IF_ERROR(c.SendWithFd(hello, listen_fd.get()));
//   agent:  ASSIGN_OR_RETURN(ControlChannel c,
//                            ControlChannel::Adopt(Fd(accept4(...))));
//           ASSIGN_OR_RETURN(auto got, c.ReceiveWithFd());
//           // got: nullopt (nothing yet) or {WorkerMessage, Fd (may be
//           // invalid when the packet carried none)}
#ifndef PORTFLEET_WORKER_SDK_CONTROL_CHANNEL_H_
#define PORTFLEET_WORKER_SDK_CONTROL_CHANNEL_H_

#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "google/protobuf/message_lite.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

class ControlChannel {
 public:
  // Largest packet either side sends or accepts.
  static constexpr size_t kMaxMessageSize = 64 * 1024;
  // Environment variable naming the worker's end of the channel.
  static constexpr const char kEnvVar[] = "PORTFLEET_CONTROL_FD";
  // Environment variable naming the agent's control socket, a Unix
  // SOCK_SEQPACKET listener that a worker reconnects to (Connect()) when its
  // channel hits end-of-file.
  static constexpr const char kAgentSocketEnvVar[] = "PORTFLEET_AGENT_SOCKET";
  // Most file descriptors one received packet may carry (SCM_RIGHTS); a
  // packet with more is dropped, descriptors included.
  static constexpr int kMaxFdsPerPacket = 16;

  // Wraps `fd` without checking it; see Adopt() for the checked version.
  explicit ControlChannel(Fd fd) : fd_(std::move(fd)) {}
  ControlChannel(ControlChannel&&) = default;
  ControlChannel& operator=(ControlChannel&&) = default;

  // Checks that `fd` is an AF_UNIX SOCK_SEQPACKET socket and sets
  // FD_CLOEXEC. FailedPrecondition otherwise.
  static absl::StatusOr<ControlChannel> Adopt(Fd fd);

  // The worker's channel from PORTFLEET_CONTROL_FD: nullopt when the
  // variable is absent (the channel is optional), InvalidArgument when it is
  // not a fd number, FailedPrecondition when that fd is not a seqpacket Unix
  // socket. Removes the variable from the environment on success.
  static absl::StatusOr<std::optional<ControlChannel>> FromEnv();

  // A connected pair (agent end, worker end), both FD_CLOEXEC; the agent
  // clears FD_CLOEXEC on the worker end in the child it starts.
  static absl::StatusOr<std::pair<ControlChannel, ControlChannel>> Pair();

  // Starts a non-blocking connection to the Unix SOCK_SEQPACKET listener at
  // `path` (a leading '@' names an abstract socket). The socket is
  // O_NONBLOCK and FD_CLOEXEC. A Unix connect on Linux completes or fails at
  // once; should it be in progress, connecting() is true and FinishConnect()
  // tells when it is done (the fd becomes writable). Sending before then
  // fails. Errors: InvalidArgument for an empty or too long path, NotFound
  // when nothing is at `path`, Unavailable when nobody listens there or its
  // backlog is full, other errno codes as they come.
  static absl::StatusOr<ControlChannel> Connect(absl::string_view path);

  // A channel from Connect() whose connection is still in progress.
  bool connecting() const { return connecting_; }

  // Completes a pending Connect(): true once connected (connecting() is then
  // false; also when it never was in progress), false while still in
  // progress, the connect error when it failed.
  absl::StatusOr<bool> FinishConnect();

  // Sends one message as one packet without blocking. InvalidArgument for an
  // empty or too large message, ResourceExhausted when the socket buffer is
  // full (the peer does not read), Unavailable when the peer is gone.
  absl::Status Send(const google::protobuf::MessageLite& message);

  // Send() with `fd` attached to the same packet as SCM_RIGHTS ancillary
  // data; the receiver gets its own descriptor for the same open file. The
  // caller keeps `fd`. InvalidArgument for a negative `fd`, otherwise the
  // errors of Send() (EBADF and the like as their errno codes).
  absl::Status SendWithFd(const google::protobuf::MessageLite& message, int fd);

  // Send() with every descriptor of `fds` attached to the same packet, in
  // order (one SCM_RIGHTS record): e.g. both sockets of a proxied pair, so
  // that they arrive together or not at all. The caller keeps them.
  // InvalidArgument for a negative descriptor or more than
  // kMaxFdsPerPacket; an empty `fds` is Send().
  absl::Status SendWithFds(const google::protobuf::MessageLite& message,
                           absl::Span<const int> fds);

  // Receives one pending message without blocking: nullopt when nothing is
  // pending, Unavailable on end-of-file (the peer closed its end),
  // InvalidArgument for a malformed or oversized packet (the packet is
  // consumed, so the next call reads the next one).
  template <typename Message = v1::AgentMessage>
  absl::StatusOr<std::optional<Message>> Receive() {
    Message message;
    absl::StatusOr<bool> got = ReceiveInto(&message);
    if (!got.ok()) return got.status();
    if (!*got) return std::optional<Message>();
    return std::optional<Message>(std::move(message));
  }

  // Non-generic form of Receive(): true when a message was parsed into
  // `message`, false when nothing is pending. Descriptors that come with a
  // packet are closed.
  absl::StatusOr<bool> ReceiveInto(google::protobuf::MessageLite* message);

  // Receive() that also takes the first file descriptor attached to the
  // packet (SCM_RIGHTS): nullopt when nothing is pending, else the message
  // and the descriptor (an invalid Fd when the packet carried none). The
  // descriptor is FD_CLOEXEC; any further ones are closed. Errors as for
  // Receive(), plus InvalidArgument when the ancillary data was truncated
  // (more than kMaxFdsPerPacket descriptors): the packet is dropped and every
  // descriptor it carried closed. No error path leaves a descriptor open.
  template <typename Message = v1::WorkerMessage>
  absl::StatusOr<std::optional<std::pair<Message, Fd>>> ReceiveWithFd() {
    Message message;
    Fd fd;
    absl::StatusOr<bool> got = ReceiveIntoWithFd(&message, &fd);
    if (!got.ok()) return got.status();
    if (!*got) return std::optional<std::pair<Message, Fd>>();
    return std::optional<std::pair<Message, Fd>>(
        std::in_place, std::move(message), std::move(fd));
  }

  // Non-generic form of ReceiveWithFd(): true when a message was parsed into
  // `message` (and `*fd` holds the first descriptor, or is invalid), false
  // when nothing is pending. `*fd` is reset first.
  absl::StatusOr<bool> ReceiveIntoWithFd(google::protobuf::MessageLite* message,
                                         Fd* fd);

  // Receive() that takes every descriptor attached to the packet, in the
  // order they were sent (SendWithFds): nullopt when nothing is pending,
  // else the message and its descriptors (empty when it carried none), all
  // FD_CLOEXEC. Errors and the packet limits as for ReceiveWithFd(); no
  // error path leaves a descriptor open. The receiver checks how many it
  // expected: a packet with more or fewer is the sender's error.
  template <typename Message = v1::WorkerMessage>
  absl::StatusOr<std::optional<std::pair<Message, std::vector<Fd>>>>
  ReceiveWithFds() {
    Message message;
    std::vector<Fd> fds;
    absl::StatusOr<bool> got = ReceiveIntoWithFds(&message, &fds);
    if (!got.ok()) return got.status();
    if (!*got) return std::optional<std::pair<Message, std::vector<Fd>>>();
    return std::optional<std::pair<Message, std::vector<Fd>>>(
        std::in_place, std::move(message), std::move(fds));
  }

  // Non-generic form of ReceiveWithFds(); `*fds` is cleared first.
  absl::StatusOr<bool> ReceiveIntoWithFds(
      google::protobuf::MessageLite* message, std::vector<Fd>* fds);

  // For registering with epoll/poll only; the channel keeps ownership.
  int fd() const { return fd_.get(); }
  // Gives up the channel's descriptor (the agent keeps it as a plain fd).
  Fd ReleaseFd() && { return std::move(fd_); }
  bool valid() const { return fd_.valid(); }
  // Closes the channel.
  void Close() {
    fd_.Reset();
    connecting_ = false;
  }
  // Gives up the socket (e.g. to pass it to a child process).
  Fd Release() {
    connecting_ = false;
    return std::move(fd_);
  }

 private:
  absl::Status SendPacket(const google::protobuf::MessageLite& message,
                          absl::Span<const int> attached);
  // Every descriptor the packet carried goes to `*fds` when it is given,
  // else they are closed.
  absl::StatusOr<bool> ReceivePacket(google::protobuf::MessageLite* message,
                                     std::vector<Fd>* fds);

  Fd fd_;
  bool connecting_ = false;
};

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_CONTROL_CHANNEL_H_
