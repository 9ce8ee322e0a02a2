#include "worker/sdk/agent_link.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/version.h"
#include "worker/sdk/handoff_pauses.h"

namespace portfleet {

absl::StatusOr<AgentLinkOptions> AgentLinkOptionsFromEnv() {
  AgentLinkOptions options;
  if (const char* path = std::getenv(ControlChannel::kAgentSocketEnvVar);
      path != nullptr && *path != '\0') {
    options.agent_socket = path;
  }
  if (const char* text = std::getenv(kAgentUidEnvVar);
      text != nullptr && *text != '\0') {
    uint32_t uid = 0;
    if (!absl::SimpleAtoi(text, &uid) || text[0] == '-' || text[0] == '+' ||
        uid == static_cast<uint32_t>(-1)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kAgentUidEnvVar, "='", text,
                       "' is not a user id (a decimal number)"));
    }
    options.agent_uid = static_cast<uid_t>(uid);
  }
  return options;
}

AgentLink::AgentLink(WorkerIdentity identity, AgentLinkOptions options)
    : identity_(std::move(identity)), options_(std::move(options)) {}

AgentLink::~AgentLink() = default;

absl::StatusOr<std::unique_ptr<AgentLink>> AgentLink::Create(
    WorkerIdentity identity, const Fd& listen_fd,
    std::optional<ControlChannel> control, AgentLinkOptions options) {
  std::unique_ptr<AgentLink> link(
      new AgentLink(std::move(identity), std::move(options)));
  RETURN_IF_ERROR(link->Init(listen_fd, std::move(control)));
  return link;
}

absl::Status AgentLink::Init(const Fd& listen_fd,
                             std::optional<ControlChannel> control) {
  struct stat st {};
  if (::fstat(listen_fd.get(), &st) != 0) {
    return ErrnoError("fstat listening socket");
  }
  socket_inode_ = st.st_ino;
  listen_ = Fd(::fcntl(listen_fd.get(), F_DUPFD_CLOEXEC, 0));
  if (!listen_) return ErrnoError("duplicate the listening socket");
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) return ErrnoError("epoll_create1");
  timer_ = Fd(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!timer_) return ErrnoError("timerfd_create");
  RETURN_IF_ERROR(Watch(timer_.get()));
  if (control) {
    RETURN_IF_ERROR(Watch(control->fd()));
    control_ = std::move(control);
  }
  return absl::OkStatus();
}

absl::Status AgentLink::Watch(int fd) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return ErrnoError(absl::StrCat("epoll_ctl(ADD, fd ", fd, ")"));
  }
  return absl::OkStatus();
}

v1::WorkerMessage AgentLink::Hello(bool reconnect) const {
  v1::WorkerMessage message;
  v1::WorkerHello* hello = message.mutable_hello();
  hello->set_pid(::getpid());
  hello->set_listener(identity_.listener);
  hello->set_shard(identity_.shard);
  hello->set_version(kVersion);
  hello->set_socket_inode(socket_inode_);
  hello->set_reconnect(reconnect);
  hello->set_handoff(identity_.handoff);
  hello->set_handoff_pairs(identity_.handoff && identity_.handoff_pairs);
  return message;
}

void AgentLink::SendHello() { Send(Hello(/*reconnect=*/false)); }

void AgentLink::SendReady() {
  ready_ = true;
  v1::WorkerMessage ready;
  ready.mutable_ready();
  Send(ready);
}

void AgentLink::Send(const v1::WorkerMessage& message) {
  if (!control_) return;
  if (message.has_load() && handoff_pauses_.count() > 0) {
    v1::WorkerMessage load = message;
    HistogramToProto(handoff_pauses_,
                     load.mutable_load()->mutable_handoff_pauses());
    return SendNow(load);
  }
  SendNow(message);
}

void AgentLink::SendNow(const v1::WorkerMessage& message) {
  absl::Status s = control_->Send(message);
  if (s.ok()) return;
  if (absl::IsResourceExhausted(s)) {
    PF_LOG(DEBUG) << s.message();
    return;
  }
  LoseControl(s.message(), /*on_send=*/true);
}

absl::Status AgentLink::HandOffConnection(
    uint64_t id, int fd, absl::string_view buffered,
    std::optional<uint64_t> released_mono_ns) {
  if (!control_) {
    return absl::UnavailableError("hand-off: no control channel");
  }
  v1::WorkerMessage message;
  v1::HandOffConnection* handoff = message.mutable_handoff_connection();
  handoff->set_id(id);
  handoff->set_buffered(std::string(buffered));
  handoff->set_released_mono_ns(released_mono_ns.value_or(MonotonicNowNs()));
  return control_->SendWithFd(message, fd);
}

absl::Status AgentLink::HandOffPair(uint64_t id, int client_fd, int upstream_fd,
                                    std::optional<uint64_t> released_mono_ns) {
  if (!control_) {
    return absl::UnavailableError("hand-off: no control channel");
  }
  v1::WorkerMessage message;
  v1::HandOffConnection* handoff = message.mutable_handoff_connection();
  handoff->set_id(id);
  handoff->set_upstream_attached(true);
  handoff->set_released_mono_ns(released_mono_ns.value_or(MonotonicNowNs()));
  const int fds[] = {client_fd, upstream_fd};
  return control_->SendWithFds(message, fds);
}

void AgentLink::AdoptedConnection(const v1::HandOffConnection& handoff) {
  if (std::optional<uint64_t> pause =
          HandOffPauseNs(handoff.released_mono_ns(), MonotonicNowNs())) {
    handoff_pauses_.Record(*pause);
  }
}

void AgentLink::HandOffDone(uint64_t id, uint32_t released, uint32_t busy,
                            double bytes_per_second) {
  v1::WorkerMessage message;
  v1::HandOffDone* done = message.mutable_handoff_done();
  done->set_id(id);
  done->set_released(released);
  done->set_busy(busy);
  done->set_bytes_per_second(static_cast<uint64_t>(bytes_per_second));
  Send(message);
}

void AgentLink::Dispatch(
    absl::FunctionRef<void(const v1::AgentMessage&)> on_message) {
  DispatchWithFds(
      [&](const v1::AgentMessage& message, Fd) { on_message(message); });
}

void AgentLink::DispatchWithFds(
    absl::FunctionRef<void(const v1::AgentMessage&, Fd)> on_message) {
  DispatchWithAllFds([&](const v1::AgentMessage& message, std::vector<Fd> fds) {
    // Only the first is handed over; the others close here.
    on_message(message, fds.empty() ? Fd() : std::move(fds.front()));
  });
}

void AgentLink::DispatchWithAllFds(
    absl::FunctionRef<void(const v1::AgentMessage&, std::vector<Fd>)>
        on_message) {
  while (control_) {
    absl::StatusOr<std::optional<std::pair<v1::AgentMessage, std::vector<Fd>>>>
        got = control_->ReceiveWithFds<v1::AgentMessage>();
    if (!got.ok()) {
      if (absl::IsInvalidArgument(got.status())) {
        // Whatever the peer sends, one line per log_interval.
        absl::Time now = absl::Now();
        if (now - last_bad_message_log_ >= options_.log_interval) {
          PF_LOG(WARNING) << got.status().message() << " ("
                          << bad_messages_suppressed_
                          << " more since the last warning)";
          last_bad_message_log_ = now;
          bad_messages_suppressed_ = 0;
        } else {
          ++bad_messages_suppressed_;
        }
        continue;
      }
      LoseControl(got.status().message(), /*on_send=*/false);
      break;
    }
    if (!got->has_value()) break;
    // May call StopReadoption() or Send().
    on_message((*got)->first, std::move((*got)->second));
  }
  uint64_t expirations = 0;
  if (::read(timer_.get(), &expirations, sizeof(expirations)) ==
          static_cast<ssize_t>(sizeof(expirations)) &&
      reconnect_armed_) {
    reconnect_armed_ = false;
    TryReconnect();
  }
}

void AgentLink::StopReadoption() {
  listen_.Reset();
  pending_.reset();
  reconnect_armed_ = false;
  itimerspec off{};
  ::timerfd_settime(timer_.get(), 0, &off, nullptr);
}

void AgentLink::LoseControl(absl::string_view why, bool on_send) {
  // Closing the fd takes it out of the epoll set.
  control_.reset();
  if (!CanReconnect()) {
    if (on_send) {
      PF_LOG(WARNING) << why << "; serving on without the agent";
    } else {
      PF_LOG(WARNING) << why << "; the agent is gone, serving on without it";
    }
    return;
  }
  PF_LOG(WARNING) << why << "; the agent is gone, serving on and reconnecting "
                  << "to " << options_.agent_socket << " every "
                  << options_.reconnect_interval;
  lost_at_ = absl::Now();
  failures_ = 0;
  last_failure_log_ = absl::InfinitePast();
  pending_.reset();
  // The first attempt at once, unless the connection this one replaced was
  // itself a reconnect that the agent dropped at once (e.g. it does not want
  // this worker): then wait, so that worker and agent do not spin.
  const bool dropped_at_once =
      lost_at_ - reconnected_at_ < options_.reconnect_interval;
  ArmReconnect(dropped_at_once ? options_.reconnect_interval
                               : absl::ZeroDuration());
}

void AgentLink::ArmReconnect(absl::Duration after) {
  itimerspec spec{};
  // A zero it_value disarms: the earliest expiry is 1 ns.
  spec.it_value = absl::ToTimespec(std::max(after, absl::Nanoseconds(1)));
  if (::timerfd_settime(timer_.get(), 0, &spec, nullptr) != 0) {
    // Cannot happen with a valid timerfd and value.
    PF_LOG(ERROR) << "timerfd_settime: " << std::strerror(errno);
    std::abort();
  }
  reconnect_armed_ = true;
}

void AgentLink::TryReconnect() {
  if (control_ || !CanReconnect()) {
    pending_.reset();
    return;
  }
  absl::Time now = absl::Now();
  // A connect that was in progress, or a new one. Neither blocks: a Unix
  // connect completes or fails at once, and one still in progress is polled
  // on the timer rather than waited for.
  std::optional<ControlChannel> channel;
  if (pending_) {
    absl::StatusOr<bool> done = pending_->FinishConnect();
    if (done.ok() && !*done && now < pending_deadline_) {
      return ArmReconnect(options_.reconnect_interval);
    }
    channel = std::move(pending_);
    pending_.reset();
    if (!done.ok() || !*done) {
      return ReconnectFailed(
          done.ok() ? absl::DeadlineExceededError("connect timed out")
                    : done.status());
    }
  } else {
    absl::StatusOr<ControlChannel> connected =
        ControlChannel::Connect(options_.agent_socket);
    if (!connected.ok()) return ReconnectFailed(connected.status());
    if (connected->connecting()) {
      pending_ = std::move(*connected);
      pending_deadline_ = now + options_.connect_timeout;
      return ArmReconnect(options_.reconnect_interval);
    }
    channel = std::move(*connected);
  }
  if (absl::Status s = CheckPeer(*channel); !s.ok()) {
    ++refused_peers_;
    return ReconnectFailed(s);  // closes the connection, sends nothing
  }
  if (absl::Status s = HandOver(std::move(*channel)); !s.ok()) {
    return ReconnectFailed(s);
  }
}

absl::Status AgentLink::CheckPeer(const ControlChannel& channel) const {
  ucred cred{};
  socklen_t length = sizeof(cred);
  if (::getsockopt(channel.fd(), SOL_SOCKET, SO_PEERCRED, &cred, &length) !=
      0) {
    return ErrnoError("getsockopt(SO_PEERCRED) on the agent socket");
  }
  // uids are compared, not pids: across PID namespaces the peer's pid reads
  // as 0.
  const uid_t self = ::geteuid();
  bool trusted = options_.agent_uid ? cred.uid == *options_.agent_uid
                                    : cred.uid == 0 || cred.uid == self;
  if (trusted) return absl::OkStatus();
  std::string want = options_.agent_uid
                         ? absl::StrCat("uid ", *options_.agent_uid, " (",
                                        kAgentUidEnvVar, ")")
                         : absl::StrCat("uid 0 or this worker's uid ", self);
  return absl::PermissionDeniedError(
      absl::StrCat("refusing to hand the listening socket to the process at ",
                   options_.agent_socket, ": it runs as uid ", cred.uid,
                   " (pid ", cred.pid, "), want ", want));
}

absl::Status AgentLink::HandOver(ControlChannel channel) {
  // The hello and the listening socket in one packet: the new agent checks
  // the socket against its state before it adopts the worker.
  RETURN_IF_ERROR(
      Annotate(channel.SendWithFd(Hello(/*reconnect=*/true), listen_.get()),
               "sending hello"));
  RETURN_IF_ERROR(Watch(channel.fd()));
  control_ = std::move(channel);
  ++reconnects_;
  reconnected_at_ = absl::Now();
  PF_LOG(INFO) << "reconnected to the agent at " << options_.agent_socket
               << " after " << failures_ << " failed attempts ("
               << absl::Trunc(absl::Now() - lost_at_, absl::Milliseconds(1))
               << " without an agent); sent hello with the listening socket";
  failures_ = 0;
  if (ready_) {
    v1::WorkerMessage ready;
    ready.mutable_ready();
    Send(ready);
  }
  return absl::OkStatus();
}

void AgentLink::ReconnectFailed(const absl::Status& status) {
  ++failures_;
  absl::Time now = absl::Now();
  // The first failure, then at most one line per log_interval: the agent
  // may stay away for long.
  if (failures_ == 1) {
    PF_LOG(WARNING) << "cannot reconnect to the agent: " << status.message()
                    << "; retrying every " << options_.reconnect_interval;
    last_failure_log_ = now;
  } else if (now - last_failure_log_ >= options_.log_interval) {
    PF_LOG(WARNING) << "still cannot reconnect to the agent: "
                    << status.message() << " (" << failures_ << " attempts in "
                    << absl::Trunc(now - lost_at_, absl::Seconds(1)) << ")";
    last_failure_log_ = now;
  }
  ArmReconnect(options_.reconnect_interval);
}

}  // namespace portfleet
