#include "agent/takeover.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/version.h"

namespace portfleet {

// --- Receiver (new agent) ---------------------------------------------------

absl::StatusOr<std::unique_ptr<TakeoverReceiver>> TakeoverReceiver::Request(
    const std::string& control_path, absl::Duration timeout) {
  auto fail = [&](const absl::Status& s) {
    return Annotate(s, absl::StrCat("takeover via ", control_path));
  };
  absl::StatusOr<ControlChannel> channel =
      ControlChannel::Connect(control_path);
  if (!channel.ok()) return fail(channel.status());
  absl::Time deadline = absl::Now() + timeout;
  while (channel->connecting()) {
    absl::StatusOr<bool> done = channel->FinishConnect();
    if (!done.ok()) return fail(done.status());
    if (*done) break;
    if (absl::Now() > deadline) {
      return fail(absl::DeadlineExceededError("connect timed out"));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  // Only an agent of our own uid may hand us sockets and a fleet spec to
  // run (as us): anyone who can bind a socket at that path could answer.
  ucred peer{};
  socklen_t len = sizeof(peer);
  if (::getsockopt(channel->fd(), SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0) {
    return fail(ErrnoError("getsockopt(SO_PEERCRED)"));
  }
  if (peer.uid != ::geteuid()) {
    return fail(absl::PermissionDeniedError(absl::StrCat(
        "the process answering there (pid ", peer.pid, ") runs as uid ",
        peer.uid, ", not as this agent's uid ", ::geteuid(),
        ": refusing to take sockets and a fleet spec from it")));
  }
  absl::StatusOr<std::unique_ptr<TakeoverReceiver>> receiver =
      Request(std::move(*channel), timeout);
  if (!receiver.ok()) return fail(receiver.status());
  return receiver;
}

absl::StatusOr<std::unique_ptr<TakeoverReceiver>> TakeoverReceiver::Request(
    ControlChannel channel, absl::Duration timeout) {
  std::unique_ptr<TakeoverReceiver> receiver(
      new TakeoverReceiver(std::move(channel)));
  v1::WorkerMessage request;
  request.mutable_takeover_request()->set_pid(::getpid());
  request.mutable_takeover_request()->set_version(kVersion);
  RETURN_IF_ERROR(receiver->channel_.Send(request));
  RETURN_IF_ERROR(receiver->ReceiveGrant(timeout));
  return receiver;
}

absl::Status TakeoverReceiver::ReceiveGrant(absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  std::map<std::string, int> listener_index;
  for (;;) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(
          "the running agent did not send its sockets in time");
    }
    pollfd p{channel_.fd(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    ASSIGN_OR_RETURN(auto got, channel_.ReceiveWithFd<v1::AgentMessage>());
    if (!got.has_value()) continue;
    v1::AgentMessage& msg = got->first;
    if (msg.has_takeover_end()) {
      if (msg.takeover_end().shards() != grant_.sockets.size()) {
        return absl::DataLossError(
            absl::StrCat("expected ", msg.takeover_end().shards(),
                         " sockets, got ", grant_.sockets.size()));
      }
      return absl::OkStatus();
    }
    if (!msg.has_takeover_shard() || !got->second) {
      return absl::InvalidArgumentError(
          "unexpected message from the running agent");
    }
    const v1::Listener& l = msg.takeover_shard().listener();
    if (listener_index.count(l.name()) == 0) {
      listener_index[l.name()] = grant_.spec.listeners_size();
      *grant_.spec.add_listeners() = l;
    }
    Adoptee a;
    a.hello.set_listener(l.name());
    a.hello.set_shard(msg.takeover_shard().shard());
    a.socket = std::move(got->second);
    struct stat st;
    if (::fstat(a.socket.get(), &st) == 0) a.hello.set_socket_inode(st.st_ino);
    grant_.sockets.push_back(std::move(a));
  }
}

absl::Status TakeoverReceiver::Watch(
    EventLoop* loop, std::function<bool()> ready,
    std::function<void(bool ready_sent)> released) {
  loop_ = loop;
  ready_ = std::move(ready);
  released_ = std::move(released);
  RETURN_IF_ERROR(
      loop_->AddFd(channel_.fd(), [this](uint32_t) { OnReadable(); }));
  poll_timer_ = loop_->AddTimer(absl::ZeroDuration(), [this] { PollReady(); });
  return absl::OkStatus();
}

void TakeoverReceiver::PollReady() {
  poll_timer_.reset();
  if (!channel_.valid()) return;
  if (!ready_()) {
    poll_timer_ =
        loop_->AddTimer(absl::Milliseconds(20), [this] { PollReady(); });
    return;
  }
  v1::WorkerMessage ready;
  ready.mutable_takeover_ready();
  if (absl::Status s = channel_.Send(ready); !s.ok()) {
    PF_LOG(ERROR) << "takeover: telling the old agent we are ready: " << s;
    return;  // the close that follows resumes us on our own
  }
  ready_sent_ = true;
  PF_LOG(INFO) << "takeover: every new worker is ready; the old agent "
                  "drains its workers";
}

void TakeoverReceiver::OnReadable() {
  v1::AgentMessage msg;
  absl::StatusOr<bool> got = channel_.ReceiveInto(&msg);
  if (got.ok()) return;  // nothing is expected; wait for the close
  loop_->RemoveFd(channel_.fd());
  if (poll_timer_) loop_->CancelTimer(*poll_timer_);
  poll_timer_.reset();
  channel_.Close();
  if (!ready_sent_) {
    PF_LOG(ERROR) << "takeover: the old agent went away before our workers "
                     "were ready; serving on our own";
  }
  released_(ready_sent_);
}

// --- Donor (running agent) --------------------------------------------------

TakeoverDonor::TakeoverDonor(EventLoop* loop, Hooks hooks)
    : loop_(loop), hooks_(std::move(hooks)) {}

TakeoverDonor::~TakeoverDonor() {
  if (channel_) loop_->RemoveFd(channel_->fd());
}

absl::Status TakeoverDonor::SendSockets(
    ControlChannel& channel, const std::vector<SharedShard>& shards) {
  auto send = [&](const v1::AgentMessage& msg, int fd) -> absl::Status {
    for (int attempt = 0;; ++attempt) {
      absl::Status s =
          fd >= 0 ? channel.SendWithFd(msg, fd) : channel.Send(msg);
      if (!absl::IsResourceExhausted(s) || attempt == 50) return s;
      // The new agent reads as we write; wait for room (bounded).
      pollfd p{channel.fd(), POLLOUT, 0};
      ::poll(&p, 1, 100);
    }
  };
  for (const SharedShard& s : shards) {
    v1::AgentMessage msg;
    *msg.mutable_takeover_shard()->mutable_listener() = s.listener;
    msg.mutable_takeover_shard()->set_shard(s.shard);
    RETURN_IF_ERROR(
        Annotate(send(msg, s.fd),
                 absl::StrCat("sending listener ", s.listener.name(), " shard ",
                              s.shard, " to the new agent")));
  }
  v1::AgentMessage end;
  end.mutable_takeover_end()->set_shards(static_cast<uint32_t>(shards.size()));
  return Annotate(send(end, -1), "sending the end of the takeover");
}

void TakeoverDonor::OnRequest(ControlConnection request) {
  if (in_progress()) {
    PF_LOG(WARNING) << "takeover request from pid " << request.peer_pid
                    << " refused: a takeover is already in progress";
    return;
  }
  PF_LOG(INFO) << "takeover requested by agent pid " << request.peer_pid
               << ": handing over the shard sockets";
  hooks_.pause();
  ControlChannel channel(std::move(request.control));
  if (absl::Status s = SendSockets(channel, hooks_.sockets()); !s.ok()) {
    PF_LOG(ERROR) << "takeover: " << s << "; resuming service";
    hooks_.resume();
    return;
  }
  channel_.emplace(std::move(channel));
  absl::Status watched =
      loop_->AddFd(channel_->fd(), [this](uint32_t) { OnReadable(); });
  if (!watched.ok()) {
    PF_LOG(ERROR) << "takeover: " << watched << "; resuming service";
    channel_.reset();
    hooks_.resume();
  }
}

void TakeoverDonor::OnReadable() {
  v1::WorkerMessage msg;
  absl::StatusOr<bool> got = channel_->ReceiveInto(&msg);
  if (got.ok() && !*got) return;
  if (got.ok() && !msg.has_takeover_ready()) return;  // ignore others
  loop_->RemoveFd(channel_->fd());
  if (!got.ok()) {
    PF_LOG(ERROR) << "takeover: the new agent went away before it was "
                     "ready; resuming service";
    channel_.reset();
    hooks_.resume();
    return;
  }
  PF_LOG(INFO) << "takeover: the new agent's workers are ready; releasing "
                  "the API and draining our workers";
  handed_over_ = true;
  // The connection closes once the hook says the API is down.
  auto connection = std::make_shared<ControlChannel>(std::move(*channel_));
  channel_.reset();
  hooks_.hand_over([connection] { connection->Close(); });
}

}  // namespace portfleet
