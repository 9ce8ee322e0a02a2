#include "worker/sdk/base/address.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace portfleet {

uint16_t SocketAddress::port() const {
  if (family() == AF_INET) {
    return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  }
  if (family() == AF_INET6) {
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  }
  return 0;
}

std::string SocketAddress::ToString() const {
  char buf[INET6_ADDRSTRLEN] = {};
  if (family() == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(&storage);
    ::inet_ntop(AF_INET, &in->sin_addr, buf, sizeof(buf));
    return absl::StrCat(buf, ":", port());
  }
  if (family() == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof(buf));
    return absl::StrCat("[", buf, "]:", port());
  }
  return "<unknown address family>";
}

absl::StatusOr<SocketAddress> SocketAddress::Parse(absl::string_view text,
                                                   bool allow_port_zero) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid address '", text, "': ", why));
  };
  absl::string_view host;
  absl::string_view port_text;
  bool v6 = false;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == absl::string_view::npos) return bad("missing ']'");
    host = text.substr(1, close - 1);
    if (close + 1 >= text.size() || text[close + 1] != ':') {
      return bad("want [ipv6]:port");
    }
    port_text = text.substr(close + 2);
    v6 = true;
  } else {
    size_t colon = text.rfind(':');
    if (colon == absl::string_view::npos) return bad("want host:port");
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (host.find(':') != absl::string_view::npos) {
      return bad("IPv6 addresses are written in brackets: [::1]:8080");
    }
  }
  if (host.empty()) return bad("missing host (use 0.0.0.0 or [::] for any)");
  uint32_t port = 0;
  if (port_text.empty() || !absl::SimpleAtoi(port_text, &port) ||
      port > 65535 ||
      port_text.find_first_not_of("0123456789") != absl::string_view::npos) {
    return bad("port must be a number from 1 to 65535");
  }
  if (port == 0 && !allow_port_zero) {
    return bad("port must be a number from 1 to 65535");
  }
  SocketAddress out;
  std::string host_str(host);
  if (v6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
    if (::inet_pton(AF_INET6, host_str.c_str(), &in6->sin6_addr) != 1) {
      return bad(absl::StrCat("'", host, "' is not an IPv6 address"));
    }
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(static_cast<uint16_t>(port));
    out.length = sizeof(sockaddr_in6);
  } else {
    auto* in = reinterpret_cast<sockaddr_in*>(&out.storage);
    if (::inet_pton(AF_INET, host_str.c_str(), &in->sin_addr) != 1) {
      return bad(absl::StrCat("'", host,
                              "' is not an IPv4 address (host names are not "
                              "resolved)"));
    }
    in->sin_family = AF_INET;
    in->sin_port = htons(static_cast<uint16_t>(port));
    out.length = sizeof(sockaddr_in);
  }
  return out;
}

SocketAddress SocketAddress::FromSockaddr(const sockaddr* addr,
                                          socklen_t length) {
  SocketAddress out;
  if (length > sizeof(out.storage)) length = sizeof(out.storage);
  std::memcpy(&out.storage, addr, length);
  out.length = length;
  return out;
}

bool operator==(const SocketAddress& a, const SocketAddress& b) {
  return a.length == b.length &&
         std::memcmp(&a.storage, &b.storage, a.length) == 0;
}

}  // namespace portfleet
