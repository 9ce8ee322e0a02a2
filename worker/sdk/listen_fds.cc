#include "worker/sdk/listen_fds.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// Name taken from LISTEN_FDNAMES by the last successful TakeListenFd().
std::string& TakenName() {
  static std::string* name = new std::string();
  return *name;
}

std::string FirstName(const char* names) {
  if (names == nullptr) return "";
  std::vector<std::string> parts = absl::StrSplit(names, ':');
  return parts.empty() ? "" : parts.front();
}

absl::StatusOr<int> GetIntSockopt(int fd, int option, absl::string_view name) {
  int value = 0;
  socklen_t length = sizeof(value);
  if (::getsockopt(fd, SOL_SOCKET, option, &value, &length) != 0) {
    return ErrnoError(absl::StrCat("getsockopt(fd ", fd, ", ", name, ")"));
  }
  return value;
}

std::string DomainName(int domain) {
  switch (domain) {
    case AF_UNIX:
      return "a Unix-domain";
    case AF_NETLINK:
      return "a netlink";
    case AF_PACKET:
      return "a packet";
    default:
      return absl::StrCat("an address family ", domain);
  }
}

// Checks that `fd` is a listening TCP socket.
absl::Status ValidateListeningTcp(int fd) {
  if (::fcntl(fd, F_GETFD) < 0) {
    if (errno == EBADF) {
      return absl::FailedPreconditionError(absl::StrCat(
          "fd ", fd, " is not open although LISTEN_FDS=1 says it was passed"));
    }
    return ErrnoError(absl::StrCat("fcntl(fd ", fd, ", F_GETFD)"));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError(absl::StrCat("fstat fd ", fd));
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fd ", fd, " is not a socket; want a listening TCP socket"));
  }
  ASSIGN_OR_RETURN(int domain, GetIntSockopt(fd, SO_DOMAIN, "SO_DOMAIN"));
  ASSIGN_OR_RETURN(int type, GetIntSockopt(fd, SO_TYPE, "SO_TYPE"));
  ASSIGN_OR_RETURN(int protocol, GetIntSockopt(fd, SO_PROTOCOL, "SO_PROTOCOL"));
  if (domain != AF_INET && domain != AF_INET6) {
    return absl::FailedPreconditionError(
        absl::StrCat("fd ", fd, " is ", DomainName(domain),
                     " socket; want an AF_INET or AF_INET6 TCP socket"));
  }
  if (type == SOCK_DGRAM) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fd ", fd, " is a ", protocol == IPPROTO_UDP ? "UDP" : "datagram",
        " socket; want TCP"));
  }
  if (type != SOCK_STREAM) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fd ", fd, " has socket type ", type, "; want SOCK_STREAM (TCP)"));
  }
  if (protocol != IPPROTO_TCP) {
    return absl::FailedPreconditionError(
        absl::StrCat("fd ", fd, " is a stream socket of protocol ", protocol,
                     "; want TCP (", IPPROTO_TCP, ")"));
  }
  ASSIGN_OR_RETURN(int accepting,
                   GetIntSockopt(fd, SO_ACCEPTCONN, "SO_ACCEPTCONN"));
  if (accepting != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fd ", fd,
        " is not a listening socket (a TCP socket on which listen() was not "
        "called)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Fd> TakeListenFd() {
  const char* fds = std::getenv("LISTEN_FDS");
  if (fds == nullptr) {
    return absl::FailedPreconditionError(
        "LISTEN_FDS is not set: portfleet-worker must be started by "
        "portfleet-agent or another socket-activation manager (systemd)");
  }
  if (const char* pid_text = std::getenv("LISTEN_PID"); pid_text != nullptr) {
    int64_t pid = 0;
    if (!absl::SimpleAtoi(pid_text, &pid) || pid <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LISTEN_PID='", pid_text, "' is not a process id"));
    }
    if (pid != ::getpid()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "LISTEN_PID=", pid, " is not this process (pid ", ::getpid(),
          "): the sockets were passed to another process"));
    }
  }
  int count = 0;
  if (!absl::SimpleAtoi(fds, &count) || count < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LISTEN_FDS='", fds, "' is not a number of fds"));
  }
  if (count != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("LISTEN_FDS=", count,
                     ": want exactly one listening socket (LISTEN_FDS=1)"));
  }
  RETURN_IF_ERROR(ValidateListeningTcp(kListenFdsStart));

  // O_NONBLOCK is left as it is: it belongs to the open file description,
  // which the manager and any other process serving the same socket share.
  int fd_flags = ::fcntl(kListenFdsStart, F_GETFD);
  if (fd_flags < 0 ||
      ::fcntl(kListenFdsStart, F_SETFD, fd_flags | FD_CLOEXEC) != 0) {
    return ErrnoError("set FD_CLOEXEC on fd 3");
  }
  TakenName() = FirstName(std::getenv("LISTEN_FDNAMES"));
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDNAMES");
  return Fd(kListenFdsStart);
}

std::string ListenFdName() {
  if (const char* names = std::getenv("LISTEN_FDNAMES"); names != nullptr) {
    return FirstName(names);
  }
  return TakenName();
}

}  // namespace portfleet
