#include "agent/fleet.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/sockets.h"
#include "agent/spec.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/log.h"
#include "worker/sdk/status.h"

extern char** environ;

namespace portfleet {

struct Fleet::Worker {
  LaunchedProcess process;
  Fd control;  // agent end of the control socketpair; may be closed
  absl::Time started;
  bool ready = false;
  uint64_t active_connections = 0;
  uint64_t accepted_total = 0;
};

struct Fleet::Shard {
  enum class State { kStarting, kRunning, kBackoff, kStopping, kStopped };
  uint32_t index = 0;
  Fd socket;
  uint64_t inode = 0;
  int cpu = -1;
  State state = State::kStarting;
  std::unique_ptr<Worker> worker;
  uint32_t restarts = 0;
  absl::Duration backoff;
  std::optional<EventLoop::TimerId> restart_timer;
};

struct Fleet::Listener {
  v1::Listener spec;
  SocketAddress address;
  std::string command_path;
  std::vector<std::unique_ptr<Shard>> shards;

  std::string Name(const Shard& shard) const {
    return absl::StrCat("listener ", spec.name(), " shard ", shard.index);
  }
};

namespace {

const char* StateName(int state) {
  static const char* kNames[] = {"starting", "running", "backoff", "stopping",
                                 "stopped"};
  return kNames[state];
}

std::string HumanDuration(absl::Duration d) {
  if (d < absl::Seconds(1)) {
    return absl::StrCat(absl::ToInt64Milliseconds(d), "ms");
  }
  return absl::FormatDuration(absl::Trunc(d, absl::Milliseconds(100)));
}

}  // namespace

Fleet::Fleet(EventLoop* loop, ProcessLauncher* launcher, FleetOptions options)
    : loop_(loop), launcher_(launcher), options_(std::move(options)) {
  if (options_.cpus.empty()) options_.cpus = {0};
  if (options_.base_env.empty()) {
    for (char** e = environ; *e != nullptr; ++e) {
      std::string entry(*e);
      // Never leak our own activation or notify state into workers.
      if (entry.rfind("LISTEN_", 0) == 0 ||
          entry.rfind("NOTIFY_SOCKET=", 0) == 0 ||
          entry.rfind("PORTFLEET_", 0) == 0) {
        continue;
      }
      options_.base_env.push_back(std::move(entry));
    }
  }
}

Fleet::~Fleet() {
  // Release event-loop registrations that point into this object. Workers are
  // deliberately left running: the data path must survive the agent.
  for (auto& [name, listener] : listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->restart_timer) loop_->CancelTimer(*shard->restart_timer);
      DetachWorker(*shard);
    }
  }
  if (kill_timer_) loop_->CancelTimer(*kill_timer_);
}

void Fleet::Emit(FleetEvent::Type type, const Listener& listener, int shard,
                 pid_t pid, std::string message) {
  if (!sink_) return;
  FleetEvent event;
  event.type = type;
  event.listener = listener.spec.name();
  event.shard = shard;
  event.pid = pid;
  event.message = std::move(message);
  sink_(event);
}

absl::Status Fleet::Start(const v1::FleetSpec& spec) {
  std::vector<std::string> added;
  for (const v1::Listener& l : spec.listeners()) {
    absl::Status s = AddListener(l);
    if (!s.ok()) {
      // Nothing half-applied: undo the listeners created so far.
      for (const std::string& name : added) {
        Listener& done = *listeners_[name];
        for (auto& shard : done.shards) {
          if (shard->worker) {
            launcher_->Signal(shard->worker->process, SIGKILL);
            for (int i = 0; i < 500; ++i) {
              auto r = launcher_->Reap(shard->worker->process);
              if (!r.ok() || r->has_value()) break;
              absl::SleepFor(absl::Milliseconds(10));
            }
            DetachWorker(*shard);
          }
        }
        listeners_.erase(name);
      }
      return s;
    }
    added.push_back(l.name());
  }
  return absl::OkStatus();
}

absl::Status Fleet::AddListener(const v1::Listener& spec) {
  RETURN_IF_ERROR(Annotate(ValidateListener(spec),
                           absl::StrCat("listener ", spec.name())));
  const std::string& name = spec.name();
  auto fail = [&](const absl::Status& s) {
    return Annotate(s, absl::StrCat("listener ", name));
  };
  if (listeners_.count(name) > 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("listener ", name, ": a listener of this name exists"));
  }
  auto listener = std::make_unique<Listener>();
  listener->spec = spec;
  listener->address = *SocketAddress::Parse(spec.address());
  for (const auto& [other_name, other] : listeners_) {
    if (other->address == listener->address) {
      return absl::AlreadyExistsError(absl::StrCat(
          "listener ", name, ": address ", listener->address.ToString(),
          " is already served by listener ", other_name));
    }
  }
  absl::StatusOr<std::string> command = ResolveCommand(spec.worker().command());
  if (!command.ok()) return fail(command.status());
  listener->command_path = *command;

  if (auto foreign = FindForeignListener(listener->address, {})) {
    std::string who =
        foreign->pid > 0
            ? absl::StrCat("pid ", foreign->pid, " (", foreign->process_name,
                           ")")
            : absl::StrCat("socket inode ", foreign->inode);
    return absl::AlreadyExistsError(
        absl::StrCat("listener ", name, ": address ",
                     listener->address.ToString(),
                     " is already in use by another process: ", who));
  }

  uint32_t n = EffectiveShards(spec, static_cast<int>(options_.cpus.size()));
  bool pin = spec.steering().policy() == v1::STEERING_POLICY_CPU;
  ShardSocketOptions socket_options{
      .backlog = static_cast<int>(EffectiveBacklog(spec))};
  for (uint32_t i = 0; i < n; ++i) {
    auto shard = std::make_unique<Shard>();
    shard->index = i;
    shard->backoff = options_.restart_backoff_initial;
    shard->cpu = pin ? options_.cpus[i % options_.cpus.size()] : -1;
    absl::StatusOr<Fd> sock =
        CreateShardSocket(listener->address, socket_options);
    if (!sock.ok()) {
      return fail(Annotate(sock.status(), absl::StrCat("shard ", i)));
    }
    shard->socket = std::move(*sock);
    shard->inode = SocketInodeOf(shard->socket.get()).value_or(0);
    listener->shards.push_back(std::move(shard));
  }

  for (auto& shard : listener->shards) {
    absl::Status s = StartWorker(*listener, *shard);
    if (!s.ok()) {
      for (auto& started : listener->shards) {
        if (!started->worker) continue;
        launcher_->Signal(started->worker->process, SIGKILL);
        for (int i = 0; i < 500; ++i) {
          auto r = launcher_->Reap(started->worker->process);
          if (!r.ok() || r->has_value()) break;
          absl::SleepFor(absl::Milliseconds(10));
        }
        DetachWorker(*started);
      }
      return s;
    }
  }
  PF_LOG(INFO) << "listener " << name << ": serving "
               << listener->address.ToString() << " with " << n << " shard"
               << (n == 1 ? "" : "s") << " (worker " << listener->command_path
               << ", backlog " << socket_options.backlog << ")";
  listeners_[name] = std::move(listener);
  return absl::OkStatus();
}

absl::Status Fleet::StartWorker(Listener& listener, Shard& shard) {
  const v1::Listener& spec = listener.spec;
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    return ErrnoError(
        absl::StrCat(listener.Name(shard), ": control socketpair"));
  }
  Fd agent_end(pair[0]);
  Fd worker_end(pair[1]);
  ::fcntl(agent_end.get(), F_SETFL, O_NONBLOCK);

  LaunchSpec launch;
  launch.path = listener.command_path;
  launch.argv.push_back(spec.worker().command());
  for (const std::string& a : spec.worker().args()) launch.argv.push_back(a);
  launch.env = options_.base_env;
  for (const std::string& e : spec.worker().env()) launch.env.push_back(e);
  launch.env.push_back("LISTEN_FDS=1");
  launch.env.push_back(absl::StrCat("LISTEN_FDNAMES=", spec.name()));
  launch.env.push_back(absl::StrCat("PORTFLEET_LISTENER=", spec.name()));
  launch.env.push_back(absl::StrCat("PORTFLEET_SHARD=", shard.index));
  launch.env.push_back("PORTFLEET_CONTROL_FD=4");
  launch.listen_fd = shard.socket.get();
  launch.control_fd = worker_end.get();
  launch.cpu = shard.cpu;

  absl::StatusOr<LaunchedProcess> process = launcher_->Launch(launch);
  if (!process.ok()) {
    return Annotate(process.status(),
                    absl::StrCat(listener.Name(shard), ": starting worker"));
  }
  worker_end.Reset();
  auto worker = std::make_unique<Worker>();
  worker->process = std::move(*process);
  worker->control = std::move(agent_end);
  worker->started = absl::Now();
  pid_t pid = worker->process.pid;
  Listener* l = &listener;
  Shard* s = &shard;
  RETURN_IF_ERROR(loop_->AddFd(worker->process.pidfd.get(),
                               [this, l, s](uint32_t) { OnWorkerExit(*l, *s); }));
  if (absl::Status st = loop_->AddFd(
          worker->control.get(),
          [this, l, s](uint32_t) { OnControlReadable(*l, *s); });
      !st.ok()) {
    PF_LOG(WARNING) << listener.Name(shard)
                    << ": control channel not watched: " << st;
    worker->control.Reset();
  }
  shard.worker = std::move(worker);
  shard.state = Shard::State::kRunning;
  PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid
               << " started on socket inode " << shard.inode
               << (shard.cpu >= 0 ? absl::StrCat(", pinned to CPU ", shard.cpu)
                                  : std::string());
  Emit(FleetEvent::Type::kShardStarted, listener, shard.index, pid, "");
  return absl::OkStatus();
}

void Fleet::DetachWorker(Shard& shard) {
  if (!shard.worker) return;
  loop_->RemoveFd(shard.worker->process.pidfd.get());
  if (shard.worker->control) loop_->RemoveFd(shard.worker->control.get());
  shard.worker.reset();
}

void Fleet::OnControlReadable(Listener& listener, Shard& shard) {
  Worker* w = shard.worker.get();
  if (w == nullptr || !w->control) return;
  char buf[65536];
  for (;;) {
    ssize_t n = ::recv(w->control.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      // The worker closed its channel (or exited): supervision goes on
      // through the pidfd.
      loop_->RemoveFd(w->control.get());
      w->control.Reset();
      return;
    }
    v1::WorkerMessage msg;
    if (!msg.ParseFromArray(buf, static_cast<int>(n))) {
      PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                      << w->process.pid << " sent a malformed control message ("
                      << n << " bytes); ignored";
      continue;
    }
    switch (msg.msg_case()) {
      case v1::WorkerMessage::kHello:
        if (msg.hello().socket_inode() != 0 &&
            msg.hello().socket_inode() != shard.inode) {
          PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                          << w->process.pid << " reports socket inode "
                          << msg.hello().socket_inode() << ", expected "
                          << shard.inode;
        }
        PF_LOG(DEBUG) << listener.Name(shard) << ": worker pid "
                      << w->process.pid << " hello (version "
                      << msg.hello().version() << ")";
        break;
      case v1::WorkerMessage::kReady:
        if (!w->ready) {
          w->ready = true;
          PF_LOG(INFO) << listener.Name(shard) << ": worker pid "
                       << w->process.pid << " ready";
          Emit(FleetEvent::Type::kWorkerReady, listener, shard.index,
               w->process.pid, "");
        }
        break;
      case v1::WorkerMessage::kLoad:
        w->active_connections = msg.load().active_connections();
        w->accepted_total = msg.load().accepted_total();
        break;
      case v1::WorkerMessage::kDrained:
        PF_LOG(DEBUG) << listener.Name(shard) << ": worker pid "
                      << w->process.pid << " drained";
        break;
      case v1::WorkerMessage::MSG_NOT_SET:
        PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                        << w->process.pid
                        << " sent an empty control message; ignored";
        break;
    }
  }
}

void Fleet::OnWorkerExit(Listener& listener, Shard& shard) {
  Worker* w = shard.worker.get();
  if (w == nullptr) return;
  absl::StatusOr<std::optional<int>> status = launcher_->Reap(w->process);
  if (status.ok() && !status->has_value()) return;  // spurious wake-up
  pid_t pid = w->process.pid;
  std::string how = status.ok() ? DescribeWaitStatus(**status)
                                : std::string(status.status().message());
  absl::Duration uptime = absl::Now() - w->started;
  DetachWorker(shard);

  if (shutting_down_ || shard.state == Shard::State::kStopping) {
    shard.state = Shard::State::kStopped;
    PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid << " "
                 << how << " (stopping)";
    CheckShutdownDone();
    return;
  }
  std::string message =
      absl::StrCat("worker pid ", pid, " ", how, " after ",
                   HumanDuration(uptime));
  if (uptime < options_.exit_at_once) {
    absl::StrAppend(&message,
                    " (exited at once: check the worker command, its "
                    "arguments and its output above)");
  }
  Emit(FleetEvent::Type::kWorkerExited, listener, shard.index, pid, message);
  if (uptime >= options_.restart_stable_after) {
    shard.backoff = options_.restart_backoff_initial;
  }
  PF_LOG(WARNING) << listener.Name(shard) << ": " << message
                  << "; restarting in " << HumanDuration(shard.backoff)
                  << " on the same socket (inode " << shard.inode
                  << "), restarts=" << shard.restarts + 1;
  ScheduleRestart(listener, shard);
}

void Fleet::ScheduleRestart(Listener& listener, Shard& shard) {
  shard.state = Shard::State::kBackoff;
  absl::Duration delay = shard.backoff;
  shard.backoff = std::min(shard.backoff * 2, options_.restart_backoff_max);
  Listener* l = &listener;
  Shard* s = &shard;
  shard.restart_timer = loop_->AddTimer(delay, [this, l, s] {
    s->restart_timer.reset();
    if (shutting_down_) {
      s->state = Shard::State::kStopped;
      CheckShutdownDone();
      return;
    }
    s->restarts++;
    absl::Status st = StartWorker(*l, *s);
    if (!st.ok()) {
      PF_LOG(ERROR) << st << "; retrying in " << HumanDuration(s->backoff);
      Emit(FleetEvent::Type::kError, *l, s->index, 0,
           std::string(st.message()));
      ScheduleRestart(*l, *s);
      return;
    }
    Emit(FleetEvent::Type::kWorkerRestarted, *l, s->index,
         s->worker->process.pid, absl::StrCat("restarts=", s->restarts));
  });
}

void Fleet::Shutdown(std::function<void()> done) {
  shutdown_done_ = std::move(done);
  if (shutting_down_) return;
  shutting_down_ = true;
  uint32_t drain_seconds = 0;
  int signalled = 0;
  for (auto& [name, listener] : listeners_) {
    drain_seconds =
        std::max(drain_seconds, EffectiveDrainTimeoutSeconds(listener->spec));
    for (auto& shard : listener->shards) {
      if (shard->restart_timer) {
        loop_->CancelTimer(*shard->restart_timer);
        shard->restart_timer.reset();
      }
      if (shard->worker) {
        shard->state = Shard::State::kStopping;
        launcher_->Signal(shard->worker->process, SIGTERM);
        signalled++;
      } else {
        shard->state = Shard::State::kStopped;
      }
    }
  }
  PF_LOG(INFO) << "shutting down: SIGTERM sent to " << signalled
               << " worker(s); waiting up to " << drain_seconds
               << "s for them to finish their connections";
  kill_timer_ = loop_->AddTimer(absl::Seconds(drain_seconds), [this] {
    kill_timer_.reset();
    PF_LOG(WARNING) << "drain timeout reached: killing remaining workers";
    KillAll();
  });
  CheckShutdownDone();
}

void Fleet::KillAll() {
  for (auto& [name, listener] : listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->worker) {
        PF_LOG(WARNING) << listener->Name(*shard) << ": SIGKILL to worker pid "
                        << shard->worker->process.pid;
        shard->state = Shard::State::kStopping;
        launcher_->Signal(shard->worker->process, SIGKILL);
      }
    }
  }
}

void Fleet::CheckShutdownDone() {
  if (!shutting_down_) return;
  for (auto& [name, listener] : listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->worker) return;
    }
  }
  if (kill_timer_) {
    loop_->CancelTimer(*kill_timer_);
    kill_timer_.reset();
  }
  listeners_.clear();  // closes every shard socket
  if (shutdown_done_) {
    auto done = std::move(shutdown_done_);
    shutdown_done_ = nullptr;
    done();
  }
}

std::vector<ListenerView> Fleet::Snapshot() const {
  std::vector<ListenerView> out;
  for (const auto& [name, listener] : listeners_) {
    ListenerView view;
    view.spec = listener->spec;
    for (const auto& shard : listener->shards) {
      ShardView s;
      s.index = shard->index;
      s.state = StateName(static_cast<int>(shard->state));
      s.cpu = shard->cpu;
      s.restarts = shard->restarts;
      s.socket_inode = shard->inode;
      if (shard->worker) {
        s.pid = shard->worker->process.pid;
        s.ready = shard->worker->ready;
        s.active_connections = shard->worker->active_connections;
        s.accepted_total = shard->worker->accepted_total;
      }
      s.queue_depth = AcceptQueueDepth(shard->socket.get()).value_or(0);
      view.shards.push_back(std::move(s));
    }
    out.push_back(std::move(view));
  }
  return out;
}

bool Fleet::AllReady() const {
  for (const auto& [name, listener] : listeners_) {
    for (const auto& shard : listener->shards) {
      if (!shard->worker || !shard->worker->ready) return false;
    }
  }
  return true;
}

}  // namespace portfleet
