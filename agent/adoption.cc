#include "agent/adoption.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {

absl::StatusOr<Fd> ListenControlSocket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "control socket path '", path, "' is empty or longer than ",
        sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!dir.empty() && !std::filesystem::exists(dir, ec)) {
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("creating ", dir.string(),
                       " for the control socket: ", ec.message()));
    }
    ::chmod(dir.c_str(), 0751);
  } else if (struct stat ds; !dir.empty() && ::stat(dir.c_str(), &ds) == 0 &&
                             ds.st_uid == ::geteuid() &&
                             (ds.st_mode & S_IXOTH) == 0) {
    // Workers of another user pass through to the socket by its name.
    if (::chmod(dir.c_str(), (ds.st_mode & 07777) | S_IXOTH) != 0) {
      return ErrnoError(absl::StrCat("chmod o+x ", dir.string(),
                                     " (the control socket's directory)"));
    }
  }
  // A live agent answers on an existing socket; a stale file does not.
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " exists and is not a socket"));
    }
    Fd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (probe && ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr),
                           sizeof(addr)) == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("another agent is listening on the control socket ",
                       path, " (use --takeover to take over from it)"));
    }
    ::unlink(path.c_str());
  }
  Fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return ErrnoError("control socket");
  mode_t old = ::umask(0177);
  int rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  ::umask(old);
  if (rc != 0) return ErrnoError(err, absl::StrCat("bind ", path));
  // Bound 0600 (no window in which it is wider than meant), then opened to
  // every user: peers are checked per connection.
  if (::chmod(path.c_str(), 0666) != 0) {
    return ErrnoError(absl::StrCat("chmod 0666 ", path));
  }
  if (::listen(fd.get(), 128) != 0) {
    return ErrnoError(absl::StrCat("listen ", path));
  }
  return fd;
}

bool AdmitControlPeer(pid_t pid, uid_t uid, const KnownWorkers& known) {
  if (uid == ::geteuid()) return true;
  const v1::WorkerRecord* r = known.Find(pid);
  return r != nullptr && r->uid() == uid;
}

absl::StatusOr<std::optional<ControlConnection>> AcceptControlConnection(
    int listen_fd, absl::Duration wait,
    const std::function<bool(pid_t, uid_t)>& admit) {
  Fd conn(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
  if (!conn) {
    if (errno == EAGAIN || errno == EINTR) {
      return std::optional<ControlConnection>();
    }
    return ErrnoError("accept on the control socket");
  }
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return ErrnoError("SO_PEERCRED of a control connection");
  }
  if (admit && !admit(cred.pid, cred.uid)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "control connection from pid ", cred.pid, " (uid ", cred.uid,
        ") closed: neither this agent's uid nor a worker its records name"));
  }
  pollfd p{conn.get(), POLLIN, 0};
  ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(wait)));
  absl::StatusOr<ControlChannel> channel =
      ControlChannel::Adopt(std::move(conn));
  if (!channel.ok()) return channel.status();
  absl::StatusOr<std::optional<std::pair<v1::WorkerMessage, Fd>>> got =
      channel->ReceiveWithFd<v1::WorkerMessage>();
  if (!got.ok()) {
    return Annotate(got.status(),
                    absl::StrCat("control connection from pid ", cred.pid));
  }
  if (!got->has_value()) {
    return absl::DeadlineExceededError(
        absl::StrCat("control connection from pid ", cred.pid,
                     " sent nothing within ", absl::FormatDuration(wait)));
  }
  ControlConnection out;
  out.message = std::move((*got)->first);
  out.fd = std::move((*got)->second);
  out.control = std::move(*channel).ReleaseFd();
  out.peer_pid = cred.pid;
  out.peer_uid = cred.uid;
  return std::optional<ControlConnection>(std::move(out));
}

absl::StatusOr<Adoptee> CheckReconnect(ControlConnection& c,
                                       const KnownWorkers& known) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat("reconnect from pid ", c.peer_pid, ": ", why));
  };
  if (!c.message.has_hello() || !c.message.hello().reconnect()) {
    return bad("first message is not a reconnect hello");
  }
  const v1::WorkerHello& hello = c.message.hello();
  if (static_cast<pid_t>(hello.pid()) != c.peer_pid) {
    return bad(absl::StrCat("hello names pid ", hello.pid()));
  }
  if (!c.fd) return bad("no listening socket attached");
  int accepting = 0, type = 0;
  socklen_t len = sizeof(int);
  ::getsockopt(c.fd.get(), SOL_SOCKET, SO_ACCEPTCONN, &accepting, &len);
  len = sizeof(int);
  ::getsockopt(c.fd.get(), SOL_SOCKET, SO_TYPE, &type, &len);
  if (!accepting || type != SOCK_STREAM) {
    return bad("the attached descriptor is not a listening TCP socket");
  }
  struct stat st;
  if (::fstat(c.fd.get(), &st) != 0 ||
      static_cast<uint64_t>(st.st_ino) != hello.socket_inode()) {
    return bad("the attached socket is not the one the hello names");
  }
  if (c.peer_uid != ::geteuid()) {
    const v1::WorkerRecord* r = known.Find(c.peer_pid);
    if (r == nullptr || r->uid() != c.peer_uid) {
      return bad(absl::StrCat("it runs as uid ", c.peer_uid,
                              " and is not a worker this agent's records name "
                              "(pid, uid and start time)"));
    }
    if (r->listener() != hello.listener() || r->shard() != hello.shard() ||
        r->socket_inode() != hello.socket_inode()) {
      return bad(absl::StrCat(
          "its hello (listener ", hello.listener(), " shard ", hello.shard(),
          " socket inode ", hello.socket_inode(),
          ") is not what the records say it ran (listener ", r->listener(),
          " shard ", r->shard(), " socket inode ", r->socket_inode(), ")"));
    }
  }
  Adoptee out;
  out.hello = hello;
  out.socket = std::move(c.fd);
  out.control = std::move(c.control);
  out.peer_pid = c.peer_pid;
  return out;
}

bool ControlSocketAnswers(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) return false;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  Fd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  return probe && ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr),
                            sizeof(addr)) == 0;
}

void SendDrain(int control, uint32_t deadline_ms) {
  v1::AgentMessage msg;
  msg.mutable_drain()->set_deadline_ms(deadline_ms);
  std::string bytes = msg.SerializeAsString();
  ssize_t unused =
      ::send(control, bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  (void)unused;
}

std::vector<Adoptee> CollectReconnects(int listen_fd, size_t want,
                                       absl::Duration timeout,
                                       const std::set<std::string>& listeners,
                                       const KnownWorkers& known) {
  auto admit = [&known](pid_t pid, uid_t uid) {
    return AdmitControlPeer(pid, uid, known);
  };
  std::vector<Adoptee> out;
  absl::Time deadline = absl::Now() + timeout;
  while (out.size() < want) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) break;
    pollfd p{listen_fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1) <=
        0) {
      continue;
    }
    absl::StatusOr<std::optional<ControlConnection>> conn =
        AcceptControlConnection(listen_fd, absl::Milliseconds(500), admit);
    if (!conn.ok()) {
      PF_LOG(WARNING) << conn.status().message();
      continue;
    }
    if (!conn->has_value()) continue;
    absl::StatusOr<Adoptee> adoptee = CheckReconnect(**conn, known);
    if (!adoptee.ok()) {
      PF_LOG(WARNING) << adoptee.status().message() << "; asked to drain";
      SendDrain((*conn)->control.get(), 0);
      continue;
    }
    if (listeners.count(adoptee->hello.listener()) == 0) {
      PF_LOG(WARNING) << "worker pid " << adoptee->peer_pid
                      << " reconnected for listener "
                      << adoptee->hello.listener()
                      << ", which is not in the desired state; asked to drain";
      SendDrain(adoptee->control.get(), kDefaultDrainTimeoutSeconds * 1000);
      continue;
    }
    out.push_back(std::move(*adoptee));
  }
  return out;
}

}  // namespace portfleet
