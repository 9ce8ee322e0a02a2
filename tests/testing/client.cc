#include "tests/testing/client.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::testing {
namespace {

Reply Fail(Outcome outcome, std::string error, std::string raw = "") {
  Reply r;
  r.outcome = outcome;
  r.error = std::move(error);
  r.raw = std::move(raw);
  return r;
}

Outcome FromErrno(int err) {
  switch (err) {
    case ECONNREFUSED:
      return Outcome::kRefused;
    case ECONNRESET:
    case EPIPE:
      return Outcome::kReset;
    case ETIMEDOUT:
    case EAGAIN:
      return Outcome::kTimeout;
    default:
      return Outcome::kOtherError;
  }
}

// Waits for `events` on fd until `deadline`; returns 0, or an errno.
int WaitFd(int fd, short events, absl::Time deadline) {
  for (;;) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return ETIMEDOUT;
    pollfd p{fd, events, 0};
    int n =
        ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n > 0) return 0;
  }
}

// Connects with a deadline. Returns the socket or a failed Reply.
Fd Connect(const std::string& address, const ClientOptions& options,
           absl::Time deadline, Reply* failure) {
  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(address);
  if (!addr.ok()) {
    *failure = Fail(Outcome::kOtherError, std::string(addr.status().message()));
    return Fd();
  }
  Fd fd(
      ::socket(addr->family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    *failure =
        Fail(FromErrno(errno), absl::StrCat("socket: ", strerror(errno)));
    return Fd();
  }
  if (options.source_port != 0 || !options.source_address.empty()) {
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    std::string src = options.source_address;
    if (src.empty()) src = addr->family() == AF_INET6 ? "[::]" : "0.0.0.0";
    absl::StatusOr<SocketAddress> local = SocketAddress::Parse(
        absl::StrCat(src, ":", options.source_port), /*allow_port_zero=*/true);
    if (!local.ok() || ::bind(fd.get(), local->get(), local->length) != 0) {
      *failure = Fail(Outcome::kOtherError,
                      absl::StrCat("bind source: ", strerror(errno)));
      return Fd();
    }
  }
  if (::connect(fd.get(), addr->get(), addr->length) != 0 &&
      errno != EINPROGRESS) {
    *failure =
        Fail(FromErrno(errno), absl::StrCat("connect: ", strerror(errno)));
    return Fd();
  }
  int err = WaitFd(fd.get(), POLLOUT, deadline);
  if (err == 0) {
    socklen_t len = sizeof(err);
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  }
  if (err != 0) {
    *failure = Fail(FromErrno(err), absl::StrCat("connect: ", strerror(err)));
    return Fd();
  }
  return fd;
}

// Sends all of `data`; 0 or errno.
int SendAll(int fd, absl::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      int err = WaitFd(fd, POLLOUT, deadline);
      if (err != 0) return err;
      continue;
    }
    return errno;
  }
  return 0;
}

// Reads until EOF (until_bytes < 0) or until `until_bytes` bytes; 0 or errno.
int Receive(int fd, std::string* out, long until_bytes, absl::Time deadline) {
  char buf[16384];
  for (;;) {
    if (until_bytes >= 0 && static_cast<long>(out->size()) >= until_bytes) {
      return 0;
    }
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      out->append(buf, n);
      continue;
    }
    if (n == 0) return 0;
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      int err = WaitFd(fd, POLLIN, deadline);
      if (err != 0) return err;
      continue;
    }
    return errno;
  }
}

}  // namespace

const char* OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kOk:
      return "ok";
    case Outcome::kRefused:
      return "refused";
    case Outcome::kReset:
      return "reset";
    case Outcome::kTimeout:
      return "timeout";
    case Outcome::kShort:
      return "short";
    case Outcome::kWrong:
      return "wrong";
    case Outcome::kOtherError:
      return "error";
  }
  return "?";
}

Reply HttpGet(const std::string& address, const ClientOptions& options) {
  absl::Time deadline = absl::Now() + options.timeout;
  Reply failure;
  Fd fd = Connect(address, options, deadline, &failure);
  if (!fd) return failure;
  std::string request = absl::StrCat("GET / HTTP/1.1\r\nHost: ", address,
                                     "\r\nConnection: close\r\n\r\n");
  if (int err = SendAll(fd.get(), request, deadline); err != 0) {
    return Fail(FromErrno(err), absl::StrCat("send: ", strerror(err)));
  }
  std::string raw;
  if (int err = Receive(fd.get(), &raw, -1, deadline); err != 0) {
    return Fail(FromErrno(err), absl::StrCat("recv: ", strerror(err)), raw);
  }
  static const std::regex kStatus("^HTTP/1\\.1 200 [^\\r]*\\r\\n");
  size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos) {
    return Fail(Outcome::kShort, "no complete HTTP head", raw);
  }
  if (!std::regex_search(raw, kStatus)) {
    return Fail(Outcome::kWrong,
                absl::StrCat("not HTTP 200: ", raw.substr(0, raw.find('\r'))),
                raw);
  }
  static const std::regex kLength(
      "\\r\\n[Cc]ontent-[Ll]ength: *([0-9]+)\\r\\n");
  std::smatch m;
  std::string head = raw.substr(0, head_end + 2);
  if (!std::regex_search(head, m, kLength)) {
    return Fail(Outcome::kShort, "no Content-Length", raw);
  }
  size_t length = std::stoul(m[1].str());
  std::string body = raw.substr(head_end + 4);
  if (body.size() != length) {
    return Fail(body.size() < length ? Outcome::kShort : Outcome::kWrong,
                absl::StrCat("body has ", body.size(), " bytes, want ", length),
                raw);
  }
  Reply r;
  r.outcome = Outcome::kOk;
  r.raw = raw;
  static const std::regex kBody(
      "portfleet listener=([a-z0-9-]+) shard=([0-9]+) pid=([0-9]+)");
  if (std::regex_search(body, m, kBody)) {
    r.listener = m[1].str();
    r.shard = std::stoi(m[2].str());
    r.pid = std::stoi(m[3].str());
  }
  return r;
}

Reply EchoOnce(const std::string& address, const std::string& payload,
               const ClientOptions& options) {
  absl::Time deadline = absl::Now() + options.timeout;
  Reply failure;
  Fd fd = Connect(address, options, deadline, &failure);
  if (!fd) return failure;
  if (int err = SendAll(fd.get(), payload, deadline); err != 0) {
    return Fail(FromErrno(err), absl::StrCat("send: ", strerror(err)));
  }
  std::string raw;
  if (int err = Receive(fd.get(), &raw, payload.size(), deadline); err != 0) {
    return Fail(FromErrno(err), absl::StrCat("recv: ", strerror(err)), raw);
  }
  if (raw.size() < payload.size()) {
    return Fail(Outcome::kShort,
                absl::StrCat("echo returned ", raw.size(), " bytes, want ",
                             payload.size()),
                raw);
  }
  if (raw != payload) {
    return Fail(Outcome::kWrong, "echo differs from what was sent", raw);
  }
  Reply r;
  r.outcome = Outcome::kOk;
  r.raw = raw;
  return r;
}

void Tally::Add(const Reply& reply) {
  by_outcome[reply.outcome]++;
  if (reply.outcome == Outcome::kOk) {
    ok++;
    by_pid[reply.pid]++;
    by_shard[reply.shard]++;
  } else {
    failed++;
    if (first_error.empty()) {
      first_error = absl::StrCat(OutcomeName(reply.outcome), ": ", reply.error);
    }
  }
}

}  // namespace portfleet::testing
