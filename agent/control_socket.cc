#include "agent/control_socket.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {

ControlSocketServer::ControlSocketServer(EventLoop* loop, Fd listen_fd,
                                         TakeoverHandler handler,
                                         ControlSocketOptions options)
    : loop_(loop),
      listen_fd_(std::move(listen_fd)),
      handler_(std::move(handler)),
      options_(options) {}

ControlSocketServer::~ControlSocketServer() {
  if (watching_) loop_->RemoveFd(listen_fd_.get());
  if (retry_timer_) loop_->CancelTimer(*retry_timer_);
  for (auto& [fd, p] : pending_) {
    loop_->RemoveFd(fd);
    loop_->CancelTimer(p.timer);
  }
}

absl::Status ControlSocketServer::Start() {
  RETURN_IF_ERROR(
      loop_->AddFd(listen_fd_.get(), [this](uint32_t) { OnAcceptable(); }));
  watching_ = true;
  return absl::OkStatus();
}

void ControlSocketServer::OnAcceptable() {
  for (;;) {
    Fd conn(::accept4(listen_fd_.get(), nullptr, nullptr,
                      SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!conn) {
      if (errno == EAGAIN || errno == EINTR) return;
      // EMFILE, ENFILE, ENOBUFS...: the connection stays queued. Stop
      // watching for a moment instead of spinning on a readable socket.
      if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
        PF_LOG(WARNING) << "control socket: accept: " << strerror(errno)
                        << "; retrying in "
                        << absl::FormatDuration(options_.accept_retry)
                        << SuppressedNote(dropped);
      }
      loop_->RemoveFd(listen_fd_.get());
      watching_ = false;
      retry_timer_ = loop_->AddTimer(options_.accept_retry, [this] {
        retry_timer_.reset();
        if (Start().ok()) OnAcceptable();
      });
      return;
    }
    if (pending_.size() >= options_.max_pending) {
      if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
        PF_LOG(WARNING) << "control socket: " << pending_.size()
                        << " connections already wait for their first message; "
                           "closing a new one"
                        << SuppressedNote(dropped);
      }
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    ::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len);
    if (options_.admit && !options_.admit(cred.pid, cred.uid)) {
      if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
        PF_LOG(WARNING) << "control socket: connection from pid " << cred.pid
                        << " (uid " << cred.uid
                        << ") closed: neither this agent's uid nor one of its "
                           "workers"
                        << SuppressedNote(dropped);
      }
      continue;
    }
    int fd = conn.get();
    absl::Status watched =
        loop_->AddFd(fd, [this, fd](uint32_t) { OnFirstPacket(fd); });
    if (!watched.ok()) {
      if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
        PF_LOG(WARNING) << "control socket: " << watched
                        << SuppressedNote(dropped);
      }
      continue;
    }
    pid_t pid = cred.pid;
    EventLoop::TimerId timer =
        loop_->AddTimer(options_.first_packet_timeout, [this, fd, pid] {
          if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
            PF_LOG(WARNING)
                << "control socket: connection from pid " << pid
                << " sent nothing within "
                << absl::FormatDuration(options_.first_packet_timeout)
                << "; closed" << SuppressedNote(dropped);
          }
          Drop(fd);
        });
    pending_[fd] = Pending{std::move(conn), cred.pid, cred.uid, timer};
  }
}

void ControlSocketServer::Drop(int fd) {
  auto it = pending_.find(fd);
  if (it == pending_.end()) return;
  loop_->RemoveFd(fd);
  loop_->CancelTimer(it->second.timer);
  pending_.erase(it);
}

void ControlSocketServer::OnFirstPacket(int fd) {
  auto it = pending_.find(fd);
  if (it == pending_.end()) return;
  Pending p = std::move(it->second);
  loop_->RemoveFd(fd);
  loop_->CancelTimer(p.timer);
  pending_.erase(it);
  ControlChannel channel(std::move(p.conn));
  absl::StatusOr<std::optional<std::pair<v1::WorkerMessage, Fd>>> got =
      channel.ReceiveWithFd<v1::WorkerMessage>();
  if (!got.ok() || !got->has_value()) {
    if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
      PF_LOG(WARNING) << "control socket: connection from pid " << p.pid << ": "
                      << (got.ok() ? "no message"
                                   : std::string(got.status().message()))
                      << "; closed" << SuppressedNote(dropped);
    }
    return;
  }
  ControlConnection c;
  c.message = std::move((*got)->first);
  c.fd = std::move((*got)->second);
  c.control = channel.Release();
  c.peer_pid = p.pid;
  c.peer_uid = p.uid;
  Dispatch(std::move(c));
}

void ControlSocketServer::Dispatch(ControlConnection c) {
  if (c.message.has_takeover_request()) {
    if (c.peer_uid != ::geteuid()) {
      if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
        PF_LOG(WARNING) << "takeover request from pid " << c.peer_pid
                        << " refused: it runs as uid " << c.peer_uid
                        << ", not as this agent's uid " << ::geteuid()
                        << SuppressedNote(dropped);
      }
      return;
    }
    handler_(std::move(c));
    return;
  }
  if (c.message.has_hello()) {
    PF_LOG(INFO) << "worker pid " << c.message.hello().pid() << " (listener "
                 << c.message.hello().listener() << " shard "
                 << c.message.hello().shard()
                 << ") reconnected after its shard was replaced; asked to "
                    "drain";
    SendDrain(c.control.get(), kDefaultDrainTimeoutSeconds * 1000);
    return;
  }
  if (uint64_t dropped; complaints_.Allow(absl::Now(), &dropped)) {
    PF_LOG(WARNING) << "control socket: unexpected first message from pid "
                    << c.peer_pid << "; connection closed"
                    << SuppressedNote(dropped);
  }
}

}  // namespace portfleet
