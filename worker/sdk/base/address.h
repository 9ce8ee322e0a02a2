// IPv4/IPv6 socket addresses written as "host:port" or "[v6]:port".
#ifndef PORTFLEET_WORKER_SDK_BASE_ADDRESS_H_
#define PORTFLEET_WORKER_SDK_BASE_ADDRESS_H_

#include <sys/socket.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace portfleet {

struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  int family() const { return storage.ss_family; }
  uint16_t port() const;
  const sockaddr* get() const {
    return reinterpret_cast<const sockaddr*>(&storage);
  }
  // Canonical "127.0.0.1:8080" / "[::1]:8080".
  std::string ToString() const;

  // Numeric literals only (no name lookup): "127.0.0.1:8080", "[::1]:80",
  // "0.0.0.0:443", "[::]:443". Port 1-65535 is required unless
  // `allow_port_zero`.
  static absl::StatusOr<SocketAddress> Parse(absl::string_view text,
                                             bool allow_port_zero = false);
  // From a kernel-filled sockaddr (getsockname, accept).
  static SocketAddress FromSockaddr(const sockaddr* addr, socklen_t length);
};

bool operator==(const SocketAddress& a, const SocketAddress& b);

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_BASE_ADDRESS_H_
