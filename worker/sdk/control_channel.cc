#include "worker/sdk/control_channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/sdk/base/status.h"

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

absl::StatusOr<ControlChannel> ControlChannel::Connect(absl::string_view path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  socklen_t addr_len = 0;
  if (path.empty() || path == "@") {
    return absl::InvalidArgumentError("agent socket path is empty");
  }
  if (path[0] == '@') {
    // Abstract namespace: a leading NUL, the name, no terminator.
    absl::string_view name = path.substr(1);
    if (name.size() + 1 > sizeof(addr.sun_path)) {
      return absl::InvalidArgumentError(
          absl::StrCat("abstract socket name '", path, "' is too long"));
    }
    std::memcpy(addr.sun_path + 1, name.data(), name.size());
    addr_len = offsetof(sockaddr_un, sun_path) + 1 + name.size();
  } else {
    if (path.size() >= sizeof(addr.sun_path)) {
      return absl::InvalidArgumentError(
          absl::StrCat("socket path '", path, "' is longer than ",
                       sizeof(addr.sun_path) - 1, " bytes"));
    }
    std::memcpy(addr.sun_path, path.data(), path.size());
    addr_len = offsetof(sockaddr_un, sun_path) + path.size() + 1;
  }
  Fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError("socket(AF_UNIX, SOCK_SEQPACKET)");
  ControlChannel channel(std::move(fd));
  for (;;) {
    if (::connect(channel.fd(), reinterpret_cast<sockaddr*>(&addr), addr_len) ==
        0) {
      return channel;
    }
    if (errno == EINTR) continue;
    break;
  }
  switch (errno) {
    case EINPROGRESS:
      channel.connecting_ = true;
      return channel;
    case EAGAIN:
      // A Unix listener whose backlog is full refuses non-blocking connects.
      return absl::UnavailableError(absl::StrCat(
          "connect to ", path, ": the listener's backlog is full"));
    default:
      return ErrnoError(absl::StrCat("connect to ", path));
  }
}

absl::StatusOr<bool> ControlChannel::FinishConnect() {
  if (!fd_.valid())
    return absl::FailedPreconditionError("control channel is closed");
  if (!connecting_) return true;
  int err = 0;
  socklen_t length = sizeof(err);
  if (::getsockopt(fd_.get(), SOL_SOCKET, SO_ERROR, &err, &length) != 0) {
    return ErrnoError("getsockopt(SO_ERROR)");
  }
  if (err != 0) {
    connecting_ = false;
    return ErrnoError(err, "connect");
  }
  sockaddr_un peer{};
  socklen_t peer_len = sizeof(peer);
  if (::getpeername(fd_.get(), reinterpret_cast<sockaddr*>(&peer), &peer_len) !=
      0) {
    if (errno == ENOTCONN) return false;  // still in progress
    return ErrnoError("getpeername");
  }
  connecting_ = false;
  return true;
}

absl::Status ControlChannel::Send(
    const google::protobuf::MessageLite& message) {
  return SendPacket(message, {});
}

absl::Status ControlChannel::SendWithFd(
    const google::protobuf::MessageLite& message, int fd) {
  if (fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot attach file descriptor ", fd));
  }
  return SendPacket(message, {fd});
}

absl::Status ControlChannel::SendWithFds(
    const google::protobuf::MessageLite& message, absl::Span<const int> fds) {
  if (fds.size() > static_cast<size_t>(kMaxFdsPerPacket)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot attach ", fds.size(),
        " file descriptors to one packet (at most ", kMaxFdsPerPacket, ")"));
  }
  for (int fd : fds) {
    if (fd < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot attach file descriptor ", fd));
    }
  }
  return SendPacket(message, fds);
}

absl::Status ControlChannel::SendPacket(
    const google::protobuf::MessageLite& message,
    absl::Span<const int> attached) {
  if (!fd_.valid())
    return absl::FailedPreconditionError("control channel is closed");
  if (connecting_) {
    return absl::UnavailableError("control channel is still connecting");
  }
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
  iovec iov{bytes.data(), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(
      cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerPacket)] = {};
  if (!attached.empty()) {
    const size_t size = sizeof(int) * attached.size();
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(size);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(size);
    std::memcpy(CMSG_DATA(c), attached.data(), size);
  }
  for (;;) {
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
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
    if (!attached.empty() && errno == EBADF) {
      return ErrnoError(absl::StrCat("send on control channel with fd ",
                                     absl::StrJoin(attached, ", fd ")));
    }
    return ErrnoError("send on control channel");
  }
}

absl::StatusOr<bool> ControlChannel::ReceiveInto(
    google::protobuf::MessageLite* message) {
  return ReceivePacket(message, nullptr);
}

absl::StatusOr<bool> ControlChannel::ReceiveIntoWithFd(
    google::protobuf::MessageLite* message, Fd* fd) {
  fd->Reset();
  std::vector<Fd> fds;
  absl::StatusOr<bool> got = ReceivePacket(message, &fds);
  // Only the first is handed out; the others close here.
  if (got.ok() && *got && !fds.empty()) *fd = std::move(fds.front());
  return got;
}

absl::StatusOr<bool> ControlChannel::ReceiveIntoWithFds(
    google::protobuf::MessageLite* message, std::vector<Fd>* fds) {
  fds->clear();
  return ReceivePacket(message, fds);
}

absl::StatusOr<bool> ControlChannel::ReceivePacket(
    google::protobuf::MessageLite* message, std::vector<Fd>* fds_out) {
  if (!fd_.valid())
    return absl::FailedPreconditionError("control channel is closed");
  if (connecting_) return false;
  // One byte more than the limit so that an oversized packet is detectable
  // even if MSG_TRUNC reporting were not available.
  std::string buffer(kMaxMessageSize + 1, '\0');
  // Room for kMaxFdsPerPacket descriptors and, should the socket have
  // SO_PASSCRED set, the sender's credentials.
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerPacket) +
                                CMSG_SPACE(sizeof(ucred))];
  for (;;) {
    iovec iov{buffer.data(), buffer.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    // MSG_CMSG_CLOEXEC: received descriptors never leak into children.
    ssize_t n =
        ::recvmsg(fd_.get(), &msg, MSG_DONTWAIT | MSG_TRUNC | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      if (errno == ECONNRESET) {
        return absl::UnavailableError(
            "control channel: connection reset by peer");
      }
      return ErrnoError("recv on control channel");
    }
    // Own every descriptor that arrived before anything else, so that each
    // return below closes those it does not hand out.
    std::vector<Fd> fds;
    if (msg.msg_controllen > 0) {
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr;
           c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char* data = CMSG_DATA(c);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
          fds.emplace_back(fd);
        }
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
      return absl::InvalidArgumentError(absl::StrCat(
          "control packet with truncated ancillary data (more than ",
          kMaxFdsPerPacket, " file descriptors?); dropped with the ",
          fds.size(), " descriptors received"));
    }
    if (fds.size() > static_cast<size_t>(kMaxFdsPerPacket)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "control packet with ", fds.size(), " file descriptors (more than ",
          kMaxFdsPerPacket, "); dropped with its descriptors"));
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
    if (fds_out != nullptr) *fds_out = std::move(fds);
    return true;
  }
}

}  // namespace portfleet
