#include "worker/sdk/control_channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/sdk/status.h"

namespace portfleet {
namespace {

absl::Status ValidateSeqpacket(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    if (errno == EBADF) {
      return absl::FailedPreconditionError(
          absl::StrCat("control fd ", fd, " is not open"));
    }
    return ErrnoError(absl::StrCat("fstat control fd ", fd));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("control fd ", fd, " is not a socket"));
  }
  int domain = 0;
  int type = 0;
  socklen_t length = sizeof(int);
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) != 0) {
    return ErrnoError(
        absl::StrCat("getsockopt(control fd ", fd, ", SO_DOMAIN)"));
  }
  length = sizeof(int);
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) != 0) {
    return ErrnoError(absl::StrCat("getsockopt(control fd ", fd, ", SO_TYPE)"));
  }
  if (domain != AF_UNIX || type != SOCK_SEQPACKET) {
    return absl::FailedPreconditionError(absl::StrCat(
        "control fd ", fd, " is a socket of family ", domain, " type ", type,
        "; want an AF_UNIX SOCK_SEQPACKET socket"));
  }
  int flags = ::fcntl(fd, F_GETFD);
  if (flags < 0 || ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0) {
    return ErrnoError(absl::StrCat("set FD_CLOEXEC on control fd ", fd));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ControlChannel> ControlChannel::Adopt(Fd fd) {
  RETURN_IF_ERROR(ValidateSeqpacket(fd.get()));
  return ControlChannel(std::move(fd));
}

absl::StatusOr<std::optional<ControlChannel>> ControlChannel::FromEnv() {
  const char* text = std::getenv(kEnvVar);
  if (text == nullptr) return std::optional<ControlChannel>();
  int fd = -1;
  if (!absl::SimpleAtoi(text, &fd) || fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kEnvVar, "='", text, "' is not a file descriptor number"));
  }
  RETURN_IF_ERROR(Annotate(ValidateSeqpacket(fd), kEnvVar));
  ::unsetenv(kEnvVar);
  return std::optional<ControlChannel>(ControlChannel(Fd(fd)));
}

absl::StatusOr<std::pair<ControlChannel, ControlChannel>>
ControlChannel::Pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) {
    return ErrnoError("socketpair(AF_UNIX, SOCK_SEQPACKET)");
  }
  return std::make_pair(ControlChannel(Fd(fds[0])), ControlChannel(Fd(fds[1])));
}

absl::Status ControlChannel::Send(
    const google::protobuf::MessageLite& message) {
  if (!fd_.valid())
    return absl::FailedPreconditionError("control channel is closed");
  std::string bytes;
  if (!message.SerializeToString(&bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot serialize ", message.GetTypeName(), " (missing fields?)"));
  }
  if (bytes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("refusing to send an empty ", message.GetTypeName(),
                     " (it would read as end-of-file)"));
  }
  if (bytes.size() > kMaxMessageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat(message.GetTypeName(), " of ", bytes.size(),
                     " bytes exceeds the ", kMaxMessageSize, "-byte limit"));
  }
  for (;;) {
    ssize_t n = ::send(fd_.get(), bytes.data(), bytes.size(),
                       MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(bytes.size())) return absl::OkStatus();
    if (n >= 0) {
      return absl::InternalError(absl::StrCat("control channel: short send of ",
                                              n, " of ", bytes.size(),
                                              " bytes"));
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return absl::ResourceExhaustedError(
          "control channel is full: the peer does not read");
    }
    if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN) {
      return absl::UnavailableError(absl::StrCat(
          "control channel: peer is gone (", std::strerror(errno), ")"));
    }
    return ErrnoError("send on control channel");
  }
}

absl::StatusOr<bool> ControlChannel::ReceiveInto(
    google::protobuf::MessageLite* message) {
  if (!fd_.valid())
    return absl::FailedPreconditionError("control channel is closed");
  // One byte more than the limit so that an oversized packet is detectable
  // even if MSG_TRUNC reporting were not available.
  std::string buffer(kMaxMessageSize + 1, '\0');
  for (;;) {
    ssize_t n = ::recv(fd_.get(), buffer.data(), buffer.size(),
                       MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      if (errno == ECONNRESET) {
        return absl::UnavailableError(
            "control channel: connection reset by peer");
      }
      return ErrnoError("recv on control channel");
    }
    if (n == 0) {
      return absl::UnavailableError(
          "control channel: end of file (peer closed)");
    }
    if (static_cast<size_t>(n) > kMaxMessageSize) {
      return absl::InvalidArgumentError(
          absl::StrCat("control packet of ", n, " bytes exceeds the ",
                       kMaxMessageSize, "-byte limit; dropped"));
    }
    message->Clear();
    if (!message->ParseFromArray(buffer.data(), static_cast<int>(n))) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed control packet (", n, " bytes): not a ",
                       message->GetTypeName(), "; dropped"));
    }
    return true;
  }
}

}  // namespace portfleet
