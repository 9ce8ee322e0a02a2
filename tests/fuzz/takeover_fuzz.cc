// Fuzzes the new agent's side of a takeover: whatever the other end of the
// control socket sends (messages, descriptors, garbage), the receiver
// returns a grant or an error, never crashes, and leaks no descriptor.
// Packets are framed as [flags, length high, length low, bytes...]; flag bit
// 0 attaches a descriptor to the packet.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "agent/takeover.h"
#include "worker/sdk/base/log.h"

namespace {

void SendRaw(int fd, const uint8_t* data, size_t len, bool with_fd) {
  iovec iov{const_cast<uint8_t*>(data), len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  int attached = -1;
  if (with_fd) {
    attached = ::eventfd(0, EFD_CLOEXEC);
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &attached, sizeof(int));
  }
  ::sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (attached >= 0) ::close(attached);
}

int OpenFds() {
  int n = 0;
  for (int fd = 0; fd < 1024; ++fd) {
    if (::fcntl(fd, F_GETFD) >= 0) n++;
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  portfleet::SetLogLevel(portfleet::LogLevel::kError);
  const int baseline = OpenFds();
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    return 0;
  }
  size_t i = 0;
  while (i + 3 <= size) {
    bool with_fd = data[i] & 1;
    size_t len = (static_cast<size_t>(data[i + 1]) << 8) | data[i + 2];
    i += 3;
    len = std::min(len, size - i);
    SendRaw(pair[1], data + i, len, with_fd);
    i += len;
  }
  {
    auto receiver = portfleet::TakeoverReceiver::Request(
        portfleet::ControlChannel(portfleet::Fd(pair[0])),
        absl::Milliseconds(2));
    if (receiver.ok()) {
      portfleet::TakeoverGrant grant = (*receiver)->TakeGrant();
      for (const portfleet::Adoptee& a : grant.sockets) {
        if (!a.socket.valid()) std::abort();
      }
    }
  }
  ::close(pair[1]);
  if (OpenFds() != baseline) std::abort();  // every descriptor closed
  return 0;
}
