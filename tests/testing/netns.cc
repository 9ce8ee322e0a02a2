#include "tests/testing/netns.h"

#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet::testing {

bool PrivilegedRequired() {
  const char* v = std::getenv("PORTFLEET_REQUIRE_PRIVILEGED");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool PythonDepsRequired() {
  const char* v = std::getenv("PORTFLEET_REQUIRE_PYTHON_DEPS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool HasIpv6Loopback() {
  int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_loopback;
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  ::close(fd);
  return ok;
}

namespace {
bool g_in_private_netns = false;
}  // namespace

bool InPrivateNetns() { return g_in_private_netns; }

absl::Status EnterPrivateNetns() {
  if (::unshare(CLONE_NEWNET) != 0) {
    return ErrnoError("unshare(CLONE_NEWNET)");
  }
  g_in_private_netns = true;
  Fd sock(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!sock) return ErrnoError("socket for SIOCSIFFLAGS");
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  if (::ioctl(sock.get(), SIOCGIFFLAGS, &ifr) != 0) {
    return ErrnoError("SIOCGIFFLAGS lo");
  }
  ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
  if (::ioctl(sock.get(), SIOCSIFFLAGS, &ifr) != 0) {
    return ErrnoError("SIOCSIFFLAGS lo up");
  }
  return absl::OkStatus();
}

}  // namespace portfleet::testing
