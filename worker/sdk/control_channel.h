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
#ifndef PORTFLEET_WORKER_SDK_CONTROL_CHANNEL_H_
#define PORTFLEET_WORKER_SDK_CONTROL_CHANNEL_H_

#include <cstddef>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/message_lite.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/fd.h"

namespace portfleet {

class ControlChannel {
 public:
  // Largest packet either side sends or accepts.
  static constexpr size_t kMaxMessageSize = 64 * 1024;
  // Environment variable naming the worker's end of the channel.
  static constexpr const char kEnvVar[] = "PORTFLEET_CONTROL_FD";

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

  // Sends one message as one packet without blocking. InvalidArgument for an
  // empty or too large message, ResourceExhausted when the socket buffer is
  // full (the peer does not read), Unavailable when the peer is gone.
  absl::Status Send(const google::protobuf::MessageLite& message);

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
  // `message`, false when nothing is pending.
  absl::StatusOr<bool> ReceiveInto(google::protobuf::MessageLite* message);

  // For registering with epoll/poll only; the channel keeps ownership.
  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }
  // Closes the channel.
  void Close() { fd_.Reset(); }
  // Gives up the socket (e.g. to pass it to a child process).
  Fd Release() { return std::move(fd_); }

 private:
  Fd fd_;
};

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_CONTROL_CHANNEL_H_
