#include "worker/sdk/handoff_sockets.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace portfleet {
namespace {

// What is wrong with `fd` as a handed-off connection, or "".
std::string Problem(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    return absl::StrCat("fstat: ", std::strerror(errno));
  }
  if (!S_ISSOCK(st.st_mode)) return "not a socket";
  auto get = [fd](int option, int* value) {
    socklen_t length = sizeof(*value);
    return ::getsockopt(fd, SOL_SOCKET, option, value, &length) == 0;
  };
  int domain = 0, type = 0, protocol = 0, listening = 0;
  if (!get(SO_DOMAIN, &domain) || !get(SO_TYPE, &type) ||
      !get(SO_PROTOCOL, &protocol) || !get(SO_ACCEPTCONN, &listening)) {
    return absl::StrCat("getsockopt: ", std::strerror(errno));
  }
  if ((domain != AF_INET && domain != AF_INET6) || type != SOCK_STREAM ||
      protocol != IPPROTO_TCP) {
    return absl::StrCat("not a TCP socket (domain ", domain, ", type ", type,
                        ", protocol ", protocol, ")");
  }
  if (listening != 0) return "a listening socket, not a connection";
  sockaddr_storage peer{};
  socklen_t length = sizeof(peer);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) != 0) {
    return errno == ENOTCONN
               ? std::string("not connected")
               : absl::StrCat("getpeername: ", std::strerror(errno));
  }
  return "";
}

}  // namespace

absl::Status CheckHandOffSockets(const std::vector<Fd>& fds, size_t expected) {
  if (fds.size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(fds.size(), " sockets attached, expected ", expected,
                     expected == 2 ? " (a proxied pair: client and upstream)"
                                   : " (one connection)"));
  }
  for (size_t i = 0; i < fds.size(); ++i) {
    if (!fds[i].valid()) {
      return absl::InvalidArgumentError(
          absl::StrCat("socket ", i + 1, " of ", fds.size(), " is missing"));
    }
    std::string problem = Problem(fds[i].get());
    if (!problem.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "socket ", i + 1, " of ", fds.size(),
          fds.size() == 2 ? (i == 0 ? " (the client)" : " (the upstream)") : "",
          ": ", problem));
    }
  }
  return absl::OkStatus();
}

}  // namespace portfleet
