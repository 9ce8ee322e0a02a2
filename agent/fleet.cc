#include "agent/fleet.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/time.h"

extern char** environ;

namespace portfleet {

struct Fleet::Worker {
  LaunchedProcess process;
  Fd control;  // agent end of the control socketpair; may be closed
  absl::Time started;
  bool hello = false;    // said hello on its control channel
  bool adopted = false;  // started by a previous agent; not our child
  bool ready = false;
  // Rollout candidate: called once with (true, "") when it is ready, or
  // (false, why) when it cannot become ready.
  std::function<void(bool, std::string)> on_ready;
  std::vector<EventLoop::TimerId> timers;  // cancelled when it goes away
  uint64_t active_connections = 0;
  uint64_t accepted_total = 0;
};

struct Fleet::Shard {
  enum class State {
    kStarting,
    kRunning,
    kBackoff,
    kStopping,
    kStopped,
    kDraining
  };
  uint32_t index = 0;
  Fd socket;
  uint64_t inode = 0;
  int cpu = -1;
  State state = State::kStarting;
  std::unique_ptr<Worker> worker;
  uint32_t restarts = 0;
  absl::Duration backoff;
  std::optional<EventLoop::TimerId> restart_timer;
  std::optional<EventLoop::TimerId> drain_timer;
  std::vector<Fleet::Done> drain_done;  // callbacks when the drain completes
  // In the steering tables. A shard added by a scale-up joins them once its
  // worker is ready.
  bool in_service = true;
  // The worker program of this shard (the listener's, or a rollout's).
  v1::WorkerSpec worker_spec;
  std::string command_path;
  // A rollout's new worker, not serving yet; old workers finishing their
  // connections after a rollout.
  std::unique_ptr<Worker> candidate;
  std::vector<std::unique_ptr<Worker>> retiring;
};

struct Fleet::Listener {
  v1::Listener spec;
  SocketAddress address;
  std::string command_path;
  std::vector<std::unique_ptr<Shard>> shards;  // in index order
  std::unique_ptr<ListenerSteering> steering;  // null without BPF
  bool deleting = false;
  bool rolling = false;  // a rollout is in progress
  std::vector<Fleet::Done> delete_done;

  // Shards that take new connections (not draining).
  std::vector<Shard*> Live() const {
    std::vector<Shard*> out;
    for (const auto& s : shards) {
      if (s->state != Shard::State::kDraining) out.push_back(s.get());
    }
    return out;
  }

  std::string Name(const Shard& shard) const {
    return absl::StrCat("listener ", spec.name(), " shard ", shard.index);
  }
};

namespace {

const char* StateName(int state) {
  static const char* kNames[] = {"starting", "running", "backoff",
                                 "stopping", "stopped", "draining"};
  return kNames[state];
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
      if (shard->drain_timer) loop_->CancelTimer(*shard->drain_timer);
      DetachWorker(*shard);
      if (shard->candidate) ForgetWorker(*shard->candidate);
      for (auto& old : shard->retiring) ForgetWorker(*old);
    }
  }
  if (kill_timer_) loop_->CancelTimer(*kill_timer_);
  for (auto& [pid, orphan] : orphans_) {
    loop_->RemoveFd(orphan.pidfd.get());
    loop_->CancelTimer(orphan.kill_timer);
  }
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
        for (auto& shard : listeners_[name]->shards) KillAndReap(*shard);
        listeners_.erase(name);
      }
      return s;
    }
    added.push_back(l.name());
  }
  return absl::OkStatus();
}

void Fleet::SetSteeringBackend(SteeringBackend* backend, std::string reason) {
  steering_ = backend;
  steering_reason_ = backend ? "" : std::move(reason);
}

void Fleet::KillAndReap(Shard& shard) {
  if (!shard.worker) return;
  launcher_->Signal(shard.worker->process, SIGKILL);
  for (int i = 0; i < 500; ++i) {
    auto r = launcher_->Reap(shard.worker->process);
    if (!r.ok() || r->has_value()) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  DetachWorker(shard);
}

absl::StatusOr<std::unique_ptr<Fleet::Shard>> Fleet::NewShard(
    Listener& listener, uint32_t index) {
  auto shard = std::make_unique<Shard>();
  shard->index = index;
  shard->backoff = options_.restart_backoff_initial;
  shard->worker_spec = listener.spec.worker();
  shard->command_path = listener.command_path;
  bool pin = listener.spec.steering().policy() == v1::STEERING_POLICY_CPU;
  shard->cpu = pin ? options_.cpus[index % options_.cpus.size()] : -1;
  ShardSocketOptions socket_options{
      .backlog = static_cast<int>(EffectiveBacklog(listener.spec))};
  absl::StatusOr<Fd> sock = CreateShardSocket(listener.address, socket_options);
  if (!sock.ok()) {
    return Annotate(sock.status(), absl::StrCat("shard ", index));
  }
  shard->socket = std::move(*sock);
  shard->inode = SocketInodeOf(shard->socket.get()).value_or(0);
  return shard;
}

absl::Status Fleet::ApplySteering(Listener& listener) {
  if (!listener.steering) return absl::OkStatus();
  const v1::Steering& st = listener.spec.steering();
  SteeringTables tables;
  tables.policy = st.policy() == v1::STEERING_POLICY_CPU
                      ? v1::STEERING_POLICY_CPU
                      : v1::STEERING_POLICY_HASH;
  uint32_t n = listener.shards.empty() ? 0 : listener.shards.back()->index + 1;
  tables.num_shards = n;
  tables.weights.assign(n, 0);
  tables.shard_cpus.assign(n, -1);
  // Weights in the spec apply to the live shards in index order.
  int live = 0;
  for (const auto& shard : listener.shards) {
    if (shard->state == Shard::State::kDraining || !shard->in_service) {
      continue;
    }
    uint32_t w = 1;
    if (st.weights_size() > 0) {
      w = live < st.weights_size() ? st.weights(live) : 0;
    }
    tables.weights[shard->index] = w;
    tables.shard_cpus[shard->index] = shard->cpu;
    live++;
  }
  if (live == 0) return absl::OkStatus();  // nothing to steer to (deleting)
  return Annotate(listener.steering->Apply(tables),
                  absl::StrCat("listener ", listener.spec.name(),
                               ": writing steering tables"));
}

absl::Status Fleet::AddListener(const v1::Listener& spec) {
  RETURN_IF_ERROR(
      Annotate(ValidateListener(spec), absl::StrCat("listener ", spec.name())));
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
  if (!spec.worker().user().empty() || !spec.worker().group().empty()) {
    absl::StatusOr<Credentials> creds = ResolveCredentials(
        spec.worker().user().empty() ? std::to_string(::geteuid())
                                     : spec.worker().user(),
        spec.worker().group());
    if (!creds.ok()) return fail(creds.status());
  }

  // Workers left by a previous agent of this listener are replaced (our
  // sockets join their reuseport group; they drain once ours serve). Any
  // other holder of the address is an error.
  std::set<uint64_t> handed_back;
  for (const Adoptee& a : adoptees_) {
    if (a.hello.listener() == name) handed_back.insert(a.hello.socket_inode());
  }
  std::vector<ForeignListener> orphans;
  for (ForeignListener& foreign :
       FindForeignListeners(listener->address, handed_back)) {
    if (foreign.pid > 0 && IsOrphanedWorkerOf(foreign.pid, name)) {
      orphans.push_back(std::move(foreign));
      continue;
    }
    std::string who =
        foreign.pid > 0
            ? absl::StrCat("pid ", foreign.pid, " (", foreign.process_name, ")")
            : absl::StrCat("socket inode ", foreign.inode);
    return absl::AlreadyExistsError(absl::StrCat(
        "listener ", name, ": address ", listener->address.ToString(),
        " is already in use by another process: ", who));
  }
  bool wants_steering = spec.steering().policy() == v1::STEERING_POLICY_CPU ||
                        spec.steering().weights_size() > 0;
  if (steering_ == nullptr && wants_steering) {
    PF_LOG(WARNING) << "listener " << name
                    << ": steering in the spec is not applied: BPF steering is "
                       "unavailable ("
                    << steering_reason_
                    << "); using the kernel's reuseport hash";
  }

  uint32_t n = EffectiveShards(spec, static_cast<int>(options_.cpus.size()));
  // Reconnected workers of this listener, by shard index.
  std::map<uint32_t, Adoptee> adopt;
  for (auto it = adoptees_.begin(); it != adoptees_.end();) {
    if (it->hello.listener() != name) {
      ++it;
      continue;
    }
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    ::getsockname(it->socket.get(), reinterpret_cast<sockaddr*>(&local), &len);
    bool same_address =
        SocketAddress::FromSockaddr(reinterpret_cast<sockaddr*>(&local), len) ==
        listener->address;
    if (it->hello.shard() < n && same_address &&
        adopt.count(it->hello.shard()) == 0) {
      adopt.emplace(it->hello.shard(), std::move(*it));
    } else {
      PF_LOG(WARNING) << "listener " << name << ": reconnected worker pid "
                      << it->hello.pid() << " (shard " << it->hello.shard()
                      << ") does not match the desired state; draining it";
      SendDrain(it->control.get(), EffectiveDrainTimeoutSeconds(spec) * 1000);
    }
    it = adoptees_.erase(it);
  }
  std::set<uint64_t> adopted_inodes;
  for (uint32_t i = 0; i < n; ++i) {
    if (auto a = adopt.find(i); a != adopt.end()) {
      auto shard = std::make_unique<Shard>();
      shard->index = i;
      shard->backoff = options_.restart_backoff_initial;
      shard->worker_spec = listener->spec.worker();
      shard->command_path = listener->command_path;
      bool pin = spec.steering().policy() == v1::STEERING_POLICY_CPU;
      shard->cpu = pin ? options_.cpus[i % options_.cpus.size()] : -1;
      shard->socket = std::move(a->second.socket);
      shard->inode = SocketInodeOf(shard->socket.get()).value_or(0);
      adopted_inodes.insert(shard->inode);
      listener->shards.push_back(std::move(shard));
      continue;
    }
    absl::StatusOr<std::unique_ptr<Shard>> shard = NewShard(*listener, i);
    if (!shard.ok()) return fail(shard.status());
    listener->shards.push_back(std::move(*shard));
  }
  if (steering_ != nullptr) {
    absl::StatusOr<std::unique_ptr<ListenerSteering>> steering =
        steering_->OpenListener(name);
    if (!steering.ok()) return fail(steering.status());
    listener->steering = std::move(*steering);
    RETURN_IF_ERROR(fail(
        listener->steering->AttachTo(listener->shards.front()->socket.get())));
    for (auto& shard : listener->shards) {
      if (adopt.count(shard->index) > 0) {
        // A handed-back socket is normally still in its slot, and the map
        // refuses a socket twice: clear the slot, then set it (for those
        // microseconds a SYN for this slot falls back to the kernel's hash).
        listener->steering->ClearShardSocket(shard->index).IgnoreError();
      }
      RETURN_IF_ERROR(fail(listener->steering->SetShardSocket(
          shard->index, shard->socket.get())));
    }
    RETURN_IF_ERROR(ApplySteering(*listener));
  }

  for (auto& shard : listener->shards) {
    absl::Status s;
    if (auto a = adopt.find(shard->index);
        a != adopt.end() && a->second.control.valid()) {
      s = AdoptWorker(*listener, *shard, std::move(a->second));
    } else {
      s = StartWorker(*listener, *shard);
    }
    if (!s.ok()) {
      for (auto& started : listener->shards) KillAndReap(*started);
      return s;
    }
  }
  PF_LOG(INFO) << "listener " << name << ": serving "
               << listener->address.ToString() << " with " << n << " shard"
               << (n == 1 ? "" : "s") << " (worker " << listener->command_path
               << ", backlog " << EffectiveBacklog(spec) << ", steering "
               << (listener->steering
                       ? v1::SteeringPolicy_Name(
                             spec.steering().policy() ==
                                     v1::STEERING_POLICY_UNSPECIFIED
                                 ? v1::STEERING_POLICY_HASH
                                 : spec.steering().policy())
                       : std::string("kernel reuseport hash"))
               << ")";
  listener->spec.set_shards(n);
  uint32_t drain_timeout = EffectiveDrainTimeoutSeconds(spec);
  listeners_[name] = std::move(listener);
  for (const ForeignListener& orphan : orphans) {
    DrainOrphan(name, orphan.pid, orphan.inode, drain_timeout);
  }
  return absl::OkStatus();
}

void Fleet::DrainOrphan(const std::string& listener, pid_t pid, uint64_t inode,
                        uint32_t timeout_seconds) {
  if (orphans_.count(pid) > 0) return;
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) {
    PF_LOG(WARNING) << "listener " << listener << ": worker pid " << pid
                    << " left by a previous agent: pidfd_open: "
                    << strerror(errno);
    return;
  }
  PF_LOG(INFO) << "listener " << listener << ": draining worker pid " << pid
               << " left by a previous agent (socket inode " << inode
               << "); its queue migrates to the new shards when it closes";
  ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGTERM, nullptr, 0);
  int fd = pidfd.get();
  EventLoop::TimerId timer =
      loop_->AddTimer(absl::Seconds(timeout_seconds), [this, pid, listener] {
        auto it = orphans_.find(pid);
        if (it == orphans_.end()) return;
        PF_LOG(WARNING) << "listener " << listener << ": old worker pid " << pid
                        << " still running after the drain timeout; SIGKILL";
        ::syscall(SYS_pidfd_send_signal, it->second.pidfd.get(), SIGKILL,
                  nullptr, 0);
      });
  absl::Status watched = loop_->AddFd(fd, [this, pid, listener](uint32_t) {
    auto it = orphans_.find(pid);
    if (it == orphans_.end()) return;
    PF_LOG(INFO) << "listener " << listener << ": old worker pid " << pid
                 << " exited";
    loop_->RemoveFd(it->second.pidfd.get());
    loop_->CancelTimer(it->second.kill_timer);
    orphans_.erase(it);
  });
  if (!watched.ok()) {
    loop_->CancelTimer(timer);
    return;
  }
  orphans_.emplace(pid, Orphan{pid, std::move(pidfd), timer});
}

absl::Status Fleet::GrowListener(Listener& listener, uint32_t target,
                                 Done done) {
  // Add shard: socket, worker, await its readiness, sockarray, then table
  // slots. Until then the new shard is in no table.
  auto added = std::make_shared<std::vector<Shard*>>();
  Listener* l = &listener;
  auto undo = [this, l, added](const absl::Status& s) {
    for (Shard* shard : *added) {
      if (l->steering)
        l->steering->ClearShardSocket(shard->index).IgnoreError();
      if (shard->restart_timer) {
        loop_->CancelTimer(*shard->restart_timer);
        shard->restart_timer.reset();
      }
      KillAndReap(*shard);
      auto it = std::find_if(
          l->shards.begin(), l->shards.end(),
          [&](const std::unique_ptr<Shard>& p) { return p.get() == shard; });
      if (it != l->shards.end()) l->shards.erase(it);
    }
    added->clear();
    return Annotate(s, absl::StrCat("listener ", l->spec.name()));
  };
  while (listener.Live().size() < target) {
    uint32_t index = 0;  // lowest free index
    for (const auto& s : listener.shards) {
      if (s->index == index) index++;
    }
    if (index >= kMaxShards) {
      return undo(absl::ResourceExhaustedError(
          absl::StrCat("no free shard index below ", kMaxShards)));
    }
    absl::StatusOr<std::unique_ptr<Shard>> shard = NewShard(listener, index);
    if (!shard.ok()) return undo(shard.status());
    Shard* raw = shard->get();
    raw->in_service = false;
    auto pos = std::find_if(
        listener.shards.begin(), listener.shards.end(),
        [&](const std::unique_ptr<Shard>& p) { return p->index > index; });
    listener.shards.insert(pos, std::move(*shard));
    added->push_back(raw);
    if (absl::Status s = StartWorker(listener, *raw); !s.ok()) return undo(s);
  }
  // Wait for every new worker; then put the shards in service together.
  auto waiting = std::make_shared<size_t>(added->size());
  auto failed = std::make_shared<absl::Status>();
  auto shared_done = std::make_shared<Done>(std::move(done));
  auto complete = [this, l, added, failed, shared_done, undo]() {
    absl::Status s = *failed;
    if (s.ok()) {
      for (Shard* shard : *added) {
        if (l->steering) {
          s = l->steering->SetShardSocket(shard->index, shard->socket.get());
          if (!s.ok()) break;
        }
        shard->in_service = true;
      }
    }
    if (s.ok()) s = ApplySteering(*l);
    if (!s.ok()) {
      s = undo(s);
      l->spec.set_shards(static_cast<uint32_t>(l->Live().size()));
      (*shared_done)(s);
      return;
    }
    PF_LOG(INFO) << "listener " << l->spec.name() << ": scaled up to "
                 << l->Live().size() << " shards";
    (*shared_done)(absl::OkStatus());
  };
  for (Shard* shard : *added) {
    Worker* w = shard->worker.get();
    w->on_ready = [waiting, failed, complete, shard, l](bool ok,
                                                        std::string why) {
      if (!ok && failed->ok()) {
        *failed =
            absl::UnavailableError(absl::StrCat(l->Name(*shard), ": ", why));
      }
      if (--*waiting == 0) complete();
    };
    w->timers.push_back(loop_->AddTimer(options_.ready_grace, [w] {
      if (!w->hello && w->on_ready) {
        auto cb = std::move(w->on_ready);
        w->on_ready = nullptr;
        cb(true, "");
      }
    }));
    w->timers.push_back(loop_->AddTimer(options_.ready_timeout, [this, w] {
      if (w->on_ready) {
        auto cb = std::move(w->on_ready);
        w->on_ready = nullptr;
        cb(false, absl::StrCat("new worker pid ", w->process.pid,
                               " was not ready within ",
                               absl::FormatDuration(options_.ready_timeout)));
      }
    }));
  }
  return absl::OkStatus();
}

absl::Status Fleet::ScaleListener(const std::string& name, uint32_t shards,
                                  Done done) {
  auto it = listeners_.find(name);
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  Listener& listener = *it->second;
  if (shards == 0 || shards > kMaxShards) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shards: ", shards, " is out of range (1-", kMaxShards, ")"));
  }
  if (listener.spec.steering().weights_size() > 0 &&
      static_cast<uint32_t>(listener.spec.steering().weights_size()) !=
          shards) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", name, " has ", listener.spec.steering().weights_size(),
        " steering weights; set weights for ", shards,
        " shards with SetSteering first, or clear them"));
  }
  std::vector<Shard*> live = listener.Live();
  if (shards > live.size()) {
    RETURN_IF_ERROR(GrowListener(listener, shards, std::move(done)));
    listener.spec.set_shards(shards);
    return absl::OkStatus();
  }
  listener.spec.set_shards(shards);
  if (shards == live.size()) {
    done(absl::OkStatus());
    return absl::OkStatus();
  }
  // Scale down: drain the highest indexes, all at once.
  auto remaining = std::make_shared<size_t>(live.size() - shards);
  auto first_error = std::make_shared<absl::Status>();
  std::vector<Shard*> victims(live.end() - (live.size() - shards), live.end());
  for (Shard* shard : victims) shard->state = Shard::State::kDraining;
  absl::Status applied = ApplySteering(listener);
  if (!applied.ok()) PF_LOG(ERROR) << applied;
  for (Shard* shard : victims) {
    BeginDrain(listener, *shard,
               [remaining, first_error, done](absl::Status s) {
                 if (!s.ok() && first_error->ok()) *first_error = s;
                 if (--*remaining == 0) done(*first_error);
               });
  }
  return absl::OkStatus();
}

absl::Status Fleet::DrainShard(const std::string& name, uint32_t index,
                               Done done) {
  auto it = listeners_.find(name);
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  Listener& listener = *it->second;
  Shard* shard = nullptr;
  for (auto& s : listener.shards) {
    if (s->index == index) shard = s.get();
  }
  if (shard == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("listener ", name, " has no shard ", index));
  }
  if (shard->state == Shard::State::kDraining) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", name, " shard ", index, " is already draining"));
  }
  if (listener.Live().size() <= 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, " shard ", index,
                     " is its last shard; delete the listener instead"));
  }
  if (listener.spec.steering().weights_size() > 0) {
    // Drop the drained shard's weight so the others keep theirs.
    int pos = 0;
    for (Shard* s : listener.Live()) {
      if (s == shard) break;
      pos++;
    }
    auto* weights = listener.spec.mutable_steering()->mutable_weights();
    std::vector<uint32_t> kept;
    for (int i = 0; i < weights->size(); ++i) {
      if (i != pos) kept.push_back(weights->Get(i));
    }
    bool any =
        std::any_of(kept.begin(), kept.end(), [](uint32_t w) { return w > 0; });
    if (!any) {
      return absl::FailedPreconditionError(absl::StrCat(
          "listener ", name, " shard ", index,
          " is the only shard with a non-zero weight; change the weights "
          "first"));
    }
    weights->Clear();
    for (uint32_t w : kept) weights->Add(w);
  }
  shard->state = Shard::State::kDraining;
  listener.spec.set_shards(static_cast<uint32_t>(listener.Live().size()));
  absl::Status applied = ApplySteering(listener);
  if (!applied.ok()) PF_LOG(ERROR) << applied;
  BeginDrain(listener, *shard, std::move(done));
  return absl::OkStatus();
}

void Fleet::BeginDrain(Listener& listener, Shard& shard, Done done) {
  shard.state = Shard::State::kDraining;
  shard.drain_done.push_back(std::move(done));
  if (shard.restart_timer) {
    loop_->CancelTimer(*shard.restart_timer);
    shard.restart_timer.reset();
  }
  uint32_t timeout = EffectiveDrainTimeoutSeconds(listener.spec);
  PF_LOG(INFO) << listener.Name(shard) << ": draining (worker pid "
               << (shard.worker ? shard.worker->process.pid : 0) << ", timeout "
               << timeout << "s)";
  Emit(FleetEvent::Type::kDrainBegun, listener, shard.index,
       shard.worker ? shard.worker->process.pid : 0, "");
  // 1. No new SYNs: the steering tables no longer name this shard (done by
  //    the caller) and its sockarray slot is emptied.
  if (listener.steering) {
    absl::Status s = listener.steering->ClearShardSocket(shard.index);
    if (!s.ok()) PF_LOG(WARNING) << listener.Name(shard) << ": " << s;
  }
  // 2. Tell the worker to stop accepting and finish its connections.
  if (shard.worker) {
    bool told = false;
    if (shard.worker->control) {
      v1::AgentMessage msg;
      msg.mutable_drain()->set_deadline_ms(timeout * 1000);
      std::string bytes = msg.SerializeAsString();
      told = ::send(shard.worker->control.get(), bytes.data(), bytes.size(),
                    MSG_DONTWAIT | MSG_NOSIGNAL) ==
             static_cast<ssize_t>(bytes.size());
    }
    if (!told) launcher_->Signal(shard.worker->process, SIGTERM);
  }
  // 3. Shut the listening socket down: the kernel hands its queued and
  //    half-open connections to the steering program's migrate path (or,
  //    without BPF, to net.ipv4.tcp_migrate_req if enabled).
  if (listener.Live().empty()) {
    // Deleting: nowhere to migrate; the worker may still accept its queue.
  } else if (::shutdown(shard.socket.get(), SHUT_RDWR) != 0) {
    PF_LOG(WARNING) << listener.Name(shard)
                    << ": shutdown of the listening socket: "
                    << strerror(errno);
  }
  // 4. Reap the worker within the drain timeout, else SIGKILL.
  Listener* l = &listener;
  Shard* s = &shard;
  shard.drain_timer = loop_->AddTimer(absl::Seconds(timeout), [this, l, s] {
    s->drain_timer.reset();
    if (s->worker) {
      PF_LOG(WARNING) << l->Name(*s) << ": worker pid "
                      << s->worker->process.pid
                      << " still running after the drain timeout; SIGKILL";
      launcher_->Signal(s->worker->process, SIGKILL);
    }
  });
  if (shard.candidate) launcher_->Signal(shard.candidate->process, SIGKILL);
  for (auto& old : shard.retiring) launcher_->Signal(old->process, SIGTERM);
  if (!shard.worker && !shard.candidate && shard.retiring.empty()) {
    FinishDrain(listener, shard);
  }
}

void Fleet::FinishDrain(Listener& listener, Shard& shard) {
  if (shard.drain_timer) {
    loop_->CancelTimer(*shard.drain_timer);
    shard.drain_timer.reset();
  }
  std::vector<Done> callbacks = std::move(shard.drain_done);
  uint32_t index = shard.index;
  PF_LOG(INFO) << listener.Name(shard) << ": drained and removed";
  Emit(FleetEvent::Type::kDrainDone, listener, index, 0, "");
  auto it = std::find_if(
      listener.shards.begin(), listener.shards.end(),
      [&](const std::unique_ptr<Shard>& p) { return p.get() == &shard; });
  if (it != listener.shards.end()) listener.shards.erase(it);  // closes fd
  for (Done& cb : callbacks) cb(absl::OkStatus());
  if (listener.deleting && listener.shards.empty()) {
    std::string name = listener.spec.name();
    std::vector<Done> deleted = std::move(listener.delete_done);
    if (listener.steering) {
      absl::Status s = listener.steering->RemovePins();
      if (!s.ok()) PF_LOG(WARNING) << "listener " << name << ": " << s;
    }
    listeners_.erase(name);
    PF_LOG(INFO) << "listener " << name << ": deleted";
    for (Done& cb : deleted) cb(absl::OkStatus());
  }
}

absl::Status Fleet::DeleteListener(const std::string& name, Done done) {
  auto it = listeners_.find(name);
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  Listener& listener = *it->second;
  listener.deleting = true;
  listener.delete_done.push_back(std::move(done));
  std::vector<Shard*> shards;
  for (auto& s : listener.shards) {
    if (s->state != Shard::State::kDraining) shards.push_back(s.get());
    s->state = Shard::State::kDraining;
  }
  for (Shard* shard : shards) BeginDrain(listener, *shard, [](absl::Status) {});
  return absl::OkStatus();
}

absl::Status Fleet::SetSteering(const std::string& name,
                                const v1::Steering& steering) {
  auto it = listeners_.find(name);
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  Listener& listener = *it->second;
  if (steering_ == nullptr || !listener.steering) {
    return absl::FailedPreconditionError(absl::StrCat(
        "BPF steering is unavailable on this host (", steering_reason_,
        "); the kernel's reuseport hash is in use"));
  }
  v1::Listener candidate = listener.spec;
  *candidate.mutable_steering() = steering;
  candidate.set_shards(static_cast<uint32_t>(listener.Live().size()));
  RETURN_IF_ERROR(ValidateListener(candidate));
  bool pin = steering.policy() == v1::STEERING_POLICY_CPU;
  v1::Listener old = listener.spec;
  std::vector<int> old_cpus;
  listener.spec = candidate;
  for (auto& shard : listener.shards) {
    old_cpus.push_back(shard->cpu);
    // Workers started from now on are pinned per the policy; running ones
    // are re-pinned in place.
    shard->cpu = pin ? options_.cpus[shard->index % options_.cpus.size()] : -1;
    if (shard->worker && shard->cpu != old_cpus.back()) {
      cpu_set_t set;
      CPU_ZERO(&set);
      if (shard->cpu >= 0) {
        CPU_SET(shard->cpu, &set);
      } else {
        for (int c : options_.cpus) CPU_SET(c, &set);
      }
      ::sched_setaffinity(shard->worker->process.pid, sizeof(set), &set);
    }
  }
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    listener.spec = old;
    for (size_t i = 0; i < listener.shards.size(); ++i) {
      listener.shards[i]->cpu = old_cpus[i];
    }
    return s;
  }
  PF_LOG(INFO) << "listener " << name << ": steering set to "
               << v1::SteeringPolicy_Name(steering.policy())
               << (steering.weights_size() > 0
                       ? absl::StrCat(" with weights ",
                                      absl::StrJoin(steering.weights(), ","))
                       : std::string());
  return absl::OkStatus();
}

void Fleet::RetireWorker(Listener& listener, Shard& shard,
                         std::unique_ptr<Worker> worker) {
  if (!worker) return;
  Worker* w = worker.get();
  uint32_t timeout = EffectiveDrainTimeoutSeconds(listener.spec);
  // Drain without touching the socket: the new worker serves it.
  bool told = false;
  if (w->control) {
    v1::AgentMessage msg;
    msg.mutable_drain()->set_deadline_ms(timeout * 1000);
    std::string bytes = msg.SerializeAsString();
    told = ::send(w->control.get(), bytes.data(), bytes.size(),
                  MSG_DONTWAIT | MSG_NOSIGNAL) ==
           static_cast<ssize_t>(bytes.size());
  }
  if (!told) launcher_->Signal(w->process, SIGTERM);
  Listener* l = &listener;
  Shard* s = &shard;
  pid_t pid = w->process.pid;
  w->timers.push_back(
      loop_->AddTimer(absl::Seconds(timeout), [this, l, s, w, pid] {
        PF_LOG(WARNING) << l->Name(*s) << ": old worker pid " << pid
                        << " still running after the drain timeout; SIGKILL";
        launcher_->Signal(w->process, SIGKILL);
      }));
  shard.retiring.push_back(std::move(worker));
}

void Fleet::RollShard(Listener& listener, Shard& shard,
                      const v1::WorkerSpec& spec, const std::string& path,
                      Done done) {
  if (shard.candidate) {
    done(absl::FailedPreconditionError(absl::StrCat(
        listener.Name(shard), ": a rollout is already in progress")));
    return;
  }
  absl::StatusOr<std::unique_ptr<Worker>> candidate =
      LaunchWorker(listener, shard, spec, path);
  if (!candidate.ok()) {
    done(candidate.status());
    return;
  }
  shard.candidate = std::move(*candidate);
  Worker* c = shard.candidate.get();
  PF_LOG(INFO) << listener.Name(shard) << ": new worker pid " << c->process.pid
               << " started beside pid "
               << (shard.worker ? shard.worker->process.pid : 0)
               << " on socket inode " << shard.inode
               << "; waiting for it to be ready";
  Listener* l = &listener;
  Shard* s = &shard;
  auto shared_done = std::make_shared<Done>(std::move(done));
  c->on_ready = [this, l, s, spec, path, shared_done](bool ok,
                                                      std::string why) {
    if (!ok) {
      // Roll back: stop the candidate; the old worker never stopped serving.
      if (s->candidate) {
        launcher_->Signal(s->candidate->process, SIGKILL);
        // Its exit is reaped by OnOtherWorkerExit.
      }
      (*shared_done)(absl::FailedPreconditionError(
          absl::StrCat(l->Name(*s), ": ", why,
                       "; rolled back, the old worker keeps "
                       "serving")));
      return;
    }
    std::unique_ptr<Worker> fresh = std::move(s->candidate);
    for (EventLoop::TimerId t : fresh->timers) loop_->CancelTimer(t);
    fresh->timers.clear();
    std::unique_ptr<Worker> old = std::move(s->worker);
    if (s->restart_timer) {
      loop_->CancelTimer(*s->restart_timer);
      s->restart_timer.reset();
    }
    pid_t pid = fresh->process.pid;
    s->worker = std::move(fresh);
    s->worker_spec = spec;
    s->command_path = path;
    s->state = Shard::State::kRunning;
    s->backoff = options_.restart_backoff_initial;
    PF_LOG(INFO) << l->Name(*s) << ": new worker pid " << pid
                 << " ready and serving"
                 << (old ? absl::StrCat("; draining old worker pid ",
                                        old->process.pid)
                         : std::string());
    Emit(FleetEvent::Type::kShardStarted, *l, s->index, pid, "rolled out");
    RetireWorker(*l, *s, std::move(old));
    (*shared_done)(absl::OkStatus());
  };
  // A worker that says hello is awaited until ready; one that says nothing
  // (no control channel) counts as ready once it has stayed up for the grace
  // period.
  c->timers.push_back(loop_->AddTimer(options_.ready_grace, [c] {
    if (!c->hello && c->on_ready) {
      auto cb = std::move(c->on_ready);
      c->on_ready = nullptr;
      cb(true, "");
    }
  }));
  c->timers.push_back(loop_->AddTimer(options_.ready_timeout, [this, c] {
    if (c->on_ready) {
      auto cb = std::move(c->on_ready);
      c->on_ready = nullptr;
      cb(false, absl::StrCat("new worker pid ", c->process.pid,
                             " was not ready within ",
                             absl::FormatDuration(options_.ready_timeout)));
    }
  }));
}

absl::Status Fleet::RollOut(const std::string& name,
                            const v1::WorkerSpec& worker, uint32_t max_surge,
                            Done done) {
  auto it = listeners_.find(name);
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  Listener& listener = *it->second;
  // Empty fields keep the current value.
  v1::WorkerSpec merged = listener.spec.worker();
  if (!worker.command().empty()) merged.set_command(worker.command());
  if (worker.args_size() > 0) *merged.mutable_args() = worker.args();
  if (worker.env_size() > 0) *merged.mutable_env() = worker.env();
  v1::Listener candidate = listener.spec;
  *candidate.mutable_worker() = merged;
  RETURN_IF_ERROR(ValidateListener(candidate));
  absl::StatusOr<std::string> resolved = ResolveCommand(merged.command());
  if (!resolved.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker.command: ", resolved.status().message()));
  }
  std::string path = *resolved;
  if (listener.rolling) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, ": a rollout is already in progress"));
  }
  std::vector<uint32_t> order;
  for (const auto& s : listener.shards) {
    if (s->state != Shard::State::kDraining) order.push_back(s->index);
  }
  if (max_surge == 0) max_surge = 1;
  struct Rollout {
    std::vector<uint32_t> order;
    size_t next = 0;
    size_t running = 0;
    std::vector<uint32_t> rolled;
    absl::Status error;
    v1::WorkerSpec old_spec;
    std::string old_path;
    Done done;
    bool finishing = false;
  };
  auto r = std::make_shared<Rollout>();
  r->order = order;
  r->old_spec = listener.spec.worker();
  r->old_path = listener.command_path;
  r->done = std::move(done);
  listener.rolling = true;
  Listener* l = &listener;
  PF_LOG(INFO) << "listener " << name << ": rolling out '" << merged.command()
               << "' to " << order.size() << " shard(s), " << max_surge
               << " at a time";
  auto find = [l](uint32_t index) -> Shard* {
    for (auto& s : l->shards) {
      if (s->index == index) return s.get();
    }
    return nullptr;
  };
  auto finish = [l, r, worker = merged, path]() {
    l->rolling = false;
    if (r->error.ok()) {
      *l->spec.mutable_worker() = worker;
      l->command_path = path;
      PF_LOG(INFO) << "listener " << l->spec.name() << ": rollout complete";
      r->done(absl::OkStatus());
      return;
    }
    PF_LOG(ERROR) << "listener " << l->spec.name()
                  << ": rollout failed: " << r->error.message();
    r->done(r->error);
  };
  // Rolls shards back to the old worker one by one, then finishes. The
  // closures refer to themselves weakly; pending callbacks keep them alive.
  auto rollback = std::make_shared<std::function<void()>>();
  std::weak_ptr<std::function<void()>> weak_rollback = rollback;
  *rollback = [this, l, r, find, finish, weak_rollback]() {
    auto self = weak_rollback.lock();
    if (r->rolled.empty()) {
      finish();
      return;
    }
    uint32_t index = r->rolled.back();
    r->rolled.pop_back();
    Shard* s = find(index);
    if (s == nullptr) {
      (*self)();
      return;
    }
    PF_LOG(WARNING) << l->Name(*s) << ": rolling back to '"
                    << r->old_spec.command() << "'";
    RollShard(*l, *s, r->old_spec, r->old_path, [self, l, s](absl::Status st) {
      if (!st.ok()) {
        PF_LOG(ERROR) << l->Name(*s) << ": rollback failed: " << st.message();
      }
      (*self)();
    });
  };
  auto pump = std::make_shared<std::function<void()>>();
  std::weak_ptr<std::function<void()>> weak_pump = pump;
  *pump = [this, l, r, find, weak_pump, rollback, finish, max_surge,
           worker = merged, path]() {
    auto self = weak_pump.lock();
    while (r->error.ok() && r->running < max_surge &&
           r->next < r->order.size()) {
      uint32_t index = r->order[r->next++];
      Shard* s = find(index);
      if (s == nullptr || s->state == Shard::State::kDraining) continue;
      r->running++;
      RollShard(*l, *s, worker, path,
                [r, index, self, rollback](absl::Status st) {
                  r->running--;
                  if (st.ok()) {
                    r->rolled.push_back(index);
                  } else if (r->error.ok()) {
                    r->error = st;
                  }
                  if (r->running > 0) return;
                  if (!r->error.ok()) {
                    if (!r->finishing) {
                      r->finishing = true;
                      (*rollback)();
                    }
                  } else {
                    (*self)();
                  }
                });
    }
    if (r->running > 0 || r->finishing) return;
    if (!r->error.ok()) {
      r->finishing = true;
      (*rollback)();
    } else if (r->next >= r->order.size()) {
      r->finishing = true;
      finish();
    }
  };
  (*pump)();
  return absl::OkStatus();
}

absl::Status Fleet::UpdateListener(const v1::Listener& spec, Done done) {
  auto it = listeners_.find(spec.name());
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(
        absl::StrCat("listener ", spec.name(), " not found"));
  }
  RETURN_IF_ERROR(ValidateListener(spec));
  Listener& listener = *it->second;
  if (*SocketAddress::Parse(spec.address()) != listener.address) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", spec.name(), ": address cannot change (",
                     listener.address.ToString(), " -> ", spec.address(),
                     "); delete the listener and create it again"));
  }
  if (spec.worker().SerializeAsString() !=
      listener.spec.worker().SerializeAsString()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", spec.name(),
        ": changing the worker needs a rolling upgrade, which this agent "
        "does not support yet"));
  }
  uint32_t shards =
      EffectiveShards(spec, static_cast<int>(options_.cpus.size()));
  bool steering_changed = spec.steering().SerializeAsString() !=
                          listener.spec.steering().SerializeAsString();
  if (steering_changed && listener.steering == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "BPF steering is unavailable on this host (", steering_reason_, ")"));
  }
  listener.spec.set_drain_timeout_seconds(spec.drain_timeout_seconds());
  if (spec.backlog() != listener.spec.backlog()) {
    listener.spec.set_backlog(spec.backlog());
    for (auto& shard : listener.shards) {
      // listen() again on a listening socket only resizes its backlog.
      ::listen(shard->socket.get(), static_cast<int>(EffectiveBacklog(spec)));
    }
  }
  if (steering_changed) {
    // Weights are checked against the new shard count.
    v1::Steering st = spec.steering();
    if (st.weights_size() > 0 &&
        static_cast<uint32_t>(st.weights_size()) != shards) {
      return absl::InvalidArgumentError("steering.weights: count mismatch");
    }
    listener.spec.mutable_steering()->clear_weights();
    if (shards != listener.Live().size()) {
      RETURN_IF_ERROR(ScaleListener(spec.name(), shards, [](absl::Status) {}));
    }
    RETURN_IF_ERROR(SetSteering(spec.name(), st));
    done(absl::OkStatus());
    return absl::OkStatus();
  }
  return ScaleListener(spec.name(), shards, std::move(done));
}

absl::StatusOr<std::unique_ptr<Fleet::Worker>> Fleet::LaunchWorker(
    Listener& listener, Shard& shard, const v1::WorkerSpec& worker_spec,
    const std::string& command_path) {
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
  launch.path = command_path;
  launch.argv.push_back(worker_spec.command());
  for (const std::string& a : worker_spec.args()) launch.argv.push_back(a);
  launch.env = options_.base_env;
  for (const std::string& e : worker_spec.env()) launch.env.push_back(e);
  launch.env.push_back("LISTEN_FDS=1");
  launch.env.push_back(absl::StrCat("LISTEN_FDNAMES=", spec.name()));
  launch.env.push_back(absl::StrCat("PORTFLEET_LISTENER=", spec.name()));
  launch.env.push_back(absl::StrCat("PORTFLEET_SHARD=", shard.index));
  launch.env.push_back("PORTFLEET_CONTROL_FD=4");
  if (!options_.agent_socket.empty()) {
    launch.env.push_back(
        absl::StrCat("PORTFLEET_AGENT_SOCKET=", options_.agent_socket));
  }
  launch.listen_fd = shard.socket.get();
  launch.control_fd = worker_end.get();
  launch.cpu = shard.cpu;
  if (!worker_spec.user().empty() || !worker_spec.group().empty()) {
    std::string user = worker_spec.user().empty() ? std::to_string(::geteuid())
                                                  : worker_spec.user();
    absl::StatusOr<Credentials> creds =
        ResolveCredentials(user, worker_spec.group());
    if (!creds.ok()) {
      return Annotate(creds.status(), listener.Name(shard));
    }
    std::vector<std::string> env;
    for (std::string& e : launch.env) {
      if (e.rfind("HOME=", 0) == 0 || e.rfind("USER=", 0) == 0 ||
          e.rfind("LOGNAME=", 0) == 0) {
        continue;
      }
      env.push_back(std::move(e));
    }
    env.push_back("HOME=" + creds->home);
    env.push_back("USER=" + creds->user);
    env.push_back("LOGNAME=" + creds->user);
    launch.env = std::move(env);
    launch.credentials = std::move(*creds);
  }

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
  RETURN_IF_ERROR(WatchWorker(listener, shard, *worker));
  return worker;
}

absl::Status Fleet::WatchWorker(Listener& listener, Shard& shard,
                                Worker& worker) {
  Listener* l = &listener;
  Shard* s = &shard;
  Worker* w = &worker;
  RETURN_IF_ERROR(
      loop_->AddFd(worker.process.pidfd.get(), [this, l, s, w](uint32_t) {
        if (s->worker.get() == w) {
          OnWorkerExit(*l, *s);
        } else {
          OnOtherWorkerExit(*l, *s, w);
        }
      }));
  if (worker.control) {
    if (absl::Status st = loop_->AddFd(
            worker.control.get(),
            [this, l, s, w](uint32_t) { OnControlReadable(*l, *s, w); });
        !st.ok()) {
      PF_LOG(WARNING) << listener.Name(shard)
                      << ": control channel not watched: " << st;
      worker.control.Reset();
    }
  }
  return absl::OkStatus();
}

absl::Status Fleet::AdoptWorker(Listener& listener, Shard& shard,
                                Adoptee adoptee) {
  auto worker = std::make_unique<Worker>();
  worker->process.pid = static_cast<pid_t>(adoptee.hello.pid());
  worker->process.pidfd =
      Fd(static_cast<int>(::syscall(SYS_pidfd_open, worker->process.pid, 0)));
  if (!worker->process.pidfd) {
    return ErrnoError(absl::StrCat(listener.Name(shard),
                                   ": pidfd_open of re-adopted worker pid ",
                                   worker->process.pid));
  }
  worker->control = std::move(adoptee.control);
  worker->started = absl::Now();
  worker->hello = true;
  worker->adopted = true;
  RETURN_IF_ERROR(WatchWorker(listener, shard, *worker));
  pid_t pid = worker->process.pid;
  shard.worker = std::move(worker);
  shard.state = Shard::State::kRunning;
  PF_LOG(INFO) << listener.Name(shard) << ": re-adopted worker pid " << pid
               << " on its socket inode " << shard.inode;
  Emit(FleetEvent::Type::kShardStarted, listener, shard.index, pid,
       "re-adopted");
  return absl::OkStatus();
}

void Fleet::SetAdoptees(std::vector<Adoptee> adoptees) {
  adoptees_ = std::move(adoptees);
}

void Fleet::OnControlSocketReadable(int listen_fd) {
  for (;;) {
    absl::StatusOr<std::optional<ControlConnection>> conn =
        AcceptControlConnection(listen_fd, absl::Milliseconds(200));
    if (!conn.ok()) {
      PF_LOG(WARNING) << conn.status().message();
      continue;
    }
    if (!conn->has_value()) return;
    ControlConnection& c = **conn;
    if (c.message.has_takeover_request()) {
      if (c.peer_uid != ::geteuid()) {
        PF_LOG(WARNING) << "takeover request from pid " << c.peer_pid
                        << " refused: it runs as uid " << c.peer_uid
                        << ", not as this agent's uid " << ::geteuid();
        continue;
      }
      if (takeover_handler_) {
        takeover_handler_(std::move(c));
      } else {
        PF_LOG(WARNING) << "takeover request from pid " << c.peer_pid
                        << " refused: this agent cannot hand over now";
      }
      continue;
    }
    if (c.message.has_hello()) {
      PF_LOG(INFO) << "worker pid " << c.message.hello().pid() << " (listener "
                   << c.message.hello().listener() << " shard "
                   << c.message.hello().shard()
                   << ") reconnected after its shard was replaced; asked to "
                      "drain";
      SendDrain(c.control.get(), kDefaultDrainTimeoutSeconds * 1000);
      continue;
    }
    PF_LOG(WARNING) << "control socket: unexpected first message from pid "
                    << c.peer_pid << "; connection closed";
  }
}

absl::Status Fleet::StartWorker(Listener& listener, Shard& shard) {
  ASSIGN_OR_RETURN(
      std::unique_ptr<Worker> worker,
      LaunchWorker(listener, shard, shard.worker_spec, shard.command_path));
  pid_t pid = worker->process.pid;
  shard.worker = std::move(worker);
  shard.state = Shard::State::kRunning;
  PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid
               << " started on socket inode " << shard.inode
               << (shard.cpu >= 0 ? absl::StrCat(", pinned to CPU ", shard.cpu)
                                  : std::string());
  Emit(FleetEvent::Type::kShardStarted, listener, shard.index, pid, "");
  return absl::OkStatus();
}

void Fleet::ForgetWorker(Worker& worker) {
  loop_->RemoveFd(worker.process.pidfd.get());
  if (worker.control) loop_->RemoveFd(worker.control.get());
  for (EventLoop::TimerId t : worker.timers) loop_->CancelTimer(t);
  worker.timers.clear();
}

void Fleet::OnOtherWorkerExit(Listener& listener, Shard& shard, Worker* w) {
  absl::StatusOr<std::optional<int>> status = launcher_->Reap(w->process);
  if (status.ok() && !status->has_value()) return;  // spurious wake-up
  std::string how = status.ok() ? DescribeWaitStatus(**status)
                                : std::string(status.status().message());
  ForgetWorker(*w);
  if (shard.candidate.get() == w) {
    std::unique_ptr<Worker> candidate = std::move(shard.candidate);
    PF_LOG(WARNING) << listener.Name(shard) << ": new worker pid "
                    << candidate->process.pid << " " << how;
    if (candidate->on_ready) {
      auto cb = std::move(candidate->on_ready);
      cb(false, absl::StrCat("new worker pid ", candidate->process.pid, " ",
                             how, " before it was ready"));
    }
  } else {
    for (auto it = shard.retiring.begin(); it != shard.retiring.end(); ++it) {
      if (it->get() != w) continue;
      PF_LOG(INFO) << listener.Name(shard) << ": old worker pid "
                   << w->process.pid << " " << how << " (retired)";
      shard.retiring.erase(it);
      break;
    }
  }
  if (shard.state == Shard::State::kDraining && !shard.worker &&
      !shard.candidate && shard.retiring.empty()) {
    FinishDrain(listener, shard);  // may destroy `shard`
  }
  CheckShutdownDone();
}

void Fleet::DetachWorker(Shard& shard) {
  if (!shard.worker) return;
  ForgetWorker(*shard.worker);
  shard.worker.reset();
}

void Fleet::OnControlReadable(Listener& listener, Shard& shard, Worker* w) {
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
        w->hello = true;
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
        if (w->on_ready) {
          auto cb = std::move(w->on_ready);
          w->on_ready = nullptr;
          w->ready = true;
          cb(true, "");
          return;  // `w` may have moved roles; read again on the next wake-up
        }
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
      case v1::WorkerMessage::kTakeoverRequest:
      case v1::WorkerMessage::kTakeoverReady:
        PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                        << w->process.pid
                        << " sent a takeover message on its control channel; "
                           "ignored";
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
  if (w->adopted) {
    how = "exited (re-adopted worker: its exit status went to its parent)";
  }
  absl::Duration uptime = absl::Now() - w->started;
  std::function<void(bool, std::string)> on_ready = std::move(w->on_ready);
  DetachWorker(shard);
  if (on_ready) {
    // A scale-up waits for this worker: it failed before it was ready.
    on_ready(false, absl::StrCat("worker pid ", pid, " ", how,
                                 " before it was ready"));
    return;  // the scale-up removes the shard
  }

  if (shard.state == Shard::State::kDraining) {
    PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid << " " << how
                 << " (drained)";
    if (!shard.candidate && shard.retiring.empty()) {
      FinishDrain(listener, shard);
    }
    CheckShutdownDone();
    return;
  }
  if (shutting_down_ || shard.state == Shard::State::kStopping) {
    shard.state = Shard::State::kStopped;
    PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid << " " << how
                 << " (stopping)";
    CheckShutdownDone();
    return;
  }
  std::string message = absl::StrCat("worker pid ", pid, " ", how, " after ",
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
      if (shard->candidate) {
        launcher_->Signal(shard->candidate->process, SIGTERM);
      }
      if (shard->state == Shard::State::kDraining) continue;
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
        if (shard->state != Shard::State::kDraining) {
          shard->state = Shard::State::kStopping;
        }
        launcher_->Signal(shard->worker->process, SIGKILL);
      }
      if (shard->candidate) {
        launcher_->Signal(shard->candidate->process, SIGKILL);
      }
      for (auto& old : shard->retiring) {
        launcher_->Signal(old->process, SIGKILL);
      }
    }
  }
}

void Fleet::CheckShutdownDone() {
  if (!shutting_down_) return;
  for (auto& [name, listener] : listeners_) {
    for (auto& shard : listener->shards) {
      if (shard->worker || shard->candidate || !shard->retiring.empty()) {
        return;
      }
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

std::vector<ListenerStatus> Fleet::Status() const {
  std::vector<ListenerStatus> out;
  for (const auto& [name, listener] : listeners_) {
    if (listener->deleting) continue;
    out.push_back(*ListenerStatusOf(name));
  }
  return out;
}

absl::StatusOr<ListenerStatus> Fleet::ListenerStatusOf(
    const std::string& name) const {
  auto it = listeners_.find(name);
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  const Listener& listener = *it->second;
  ListenerStatus view;
  view.spec = listener.spec;
  std::vector<ShardCounters> counters;
  if (listener.steering) {
    counters = listener.steering->ReadCounters().value_or(counters);
  }
  for (const auto& shard : listener.shards) {
    ShardStatus s;
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
    if (shard->index < counters.size()) {
      s.counters.selected = counters[shard->index].selected;
      s.counters.migrated = counters[shard->index].migrated;
      s.counters.fallback = counters[shard->index].fallback;
    }
    view.shards.push_back(std::move(s));
  }
  return view;
}

std::vector<Fleet::SharedSocket> Fleet::SharedSockets() const {
  std::vector<SharedSocket> out;
  for (const auto& [name, listener] : listeners_) {
    if (listener->deleting) continue;
    for (const auto& shard : listener->shards) {
      if (shard->state == Shard::State::kDraining) continue;
      out.push_back({listener->spec, shard->index, shard->socket.get()});
    }
  }
  return out;
}

void Fleet::LogSteeringCounters() const {
  for (const auto& [name, listener] : listeners_) {
    if (!listener->steering) continue;
    absl::StatusOr<std::vector<ShardCounters>> counters =
        listener->steering->ReadCounters();
    if (!counters.ok()) {
      PF_LOG(DEBUG) << "listener " << name
                    << ": steering counters: " << counters.status().message();
      continue;
    }
    std::string line;
    for (const auto& shard : listener->shards) {
      if (shard->index >= counters->size()) continue;
      const ShardCounters& c = (*counters)[shard->index];
      absl::StrAppend(&line, " shard ", shard->index, " selected=", c.selected,
                      " migrated=", c.migrated, " fallback=", c.fallback, ";");
    }
    PF_LOG(DEBUG) << "listener " << name << ": steering counters:" << line;
  }
}

v1::FleetSpec Fleet::DesiredSpec() const {
  v1::FleetSpec spec;
  for (const auto& [name, listener] : listeners_) {
    if (!listener->deleting) *spec.add_listeners() = listener->spec;
  }
  return spec;
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
