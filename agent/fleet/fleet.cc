#include "agent/fleet/fleet.h"

#include <unistd.h>

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/fleet/load.h"
#include "agent/fleet/rebalance.h"
#include "agent/fleet/rollout.h"
#include "agent/fleet/selfbound.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

extern char** environ;

namespace portfleet {
namespace {

// The agent's environment minus its own activation and notify state.
std::vector<std::string> InheritedEnv() {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry(*e);
    if (entry.rfind("LISTEN_", 0) == 0 ||
        entry.rfind("NOTIFY_SOCKET=", 0) == 0 ||
        entry.rfind("PORTFLEET_", 0) == 0) {
      continue;
    }
    env.push_back(std::move(entry));
  }
  return env;
}

}  // namespace

Fleet::Fleet(EventLoop* loop, ProcessLauncher* launcher, FleetOptions options)
    : supervisor_(&ctx_, [this](Listener& l, Shard& s) { WorkerGone(l, s); }),
      drainer_(&ctx_, &supervisor_, &listeners_),
      health_(&ctx_, &supervisor_, &listeners_),
      load_(&ctx_, &listeners_),
      handoffs_(&ctx_, &listeners_),
      auto_rebalance_(&ctx_, &listeners_, &handoffs_) {
  ctx_.on_handoff = [this](Listener& l, Shard& s, const v1::WorkerMessage& m,
                           std::vector<Fd> fds) {
    handoffs_.OnWorkerMessage(l, s, m, std::move(fds));
  };
  ctx_.loop = loop;
  ctx_.launcher = launcher;
  drainer_.SetBeforeClose([this] { health_.ScanOrphansNow(); });
  ctx_.options = std::move(options);
  if (ctx_.options.cpus.empty()) ctx_.options.cpus = {0};
  if (ctx_.options.base_env.empty()) ctx_.options.base_env = InheritedEnv();
}

Fleet::~Fleet() {
  // Release event-loop registrations that point into this object. Workers are
  // deliberately left running: the data path must survive the agent.
  for (auto& [name, listener] : listeners_) {
    for (auto& shard : listener->shards) {
      supervisor_.CancelRestart(*shard);
      health_.Forget(*shard);
      if (shard->drain_timer) ctx_.loop->CancelTimer(*shard->drain_timer);
      supervisor_.Detach(*shard);
      if (shard->candidate) supervisor_.Forget(*shard->candidate);
      for (auto& old : shard->retiring) supervisor_.Forget(*old);
    }
  }
}

void Fleet::RebalanceListener(
    const v1::RebalanceListenerRequest& request,
    std::function<void(absl::StatusOr<v1::RebalanceListenerResponse>)> done) {
  if (failed_.count(request.name()) > 0) {
    done(NotServing(request.name()));
    return;
  }
  absl::StatusOr<Listener*> listener = Find(request.name());
  if (!listener.ok()) {
    done(listener.status());
    return;
  }
  ::portfleet::RebalanceListener(ctx_, handoffs_, **listener, request,
                                 std::move(done));
}

void Fleet::SetSteeringBackend(SteeringBackend* backend, std::string reason) {
  ctx_.steering = backend;
  ctx_.steering_reason = backend ? "" : std::move(reason);
}

void Fleet::SetAdoptees(std::vector<Adoptee> adoptees) {
  adoptees_ = std::move(adoptees);
}

std::vector<v1::WorkerRecord> Fleet::WorkerRecords() const {
  std::vector<v1::WorkerRecord> out;
  for (const auto& entry : listeners_) {
    // Not a structured binding: clang 14 cannot capture one in a lambda.
    const std::string& name = entry.first;
    const Listener* listener = entry.second.get();
    for (const auto& shard : listener->shards) {
      if (shard->adopted) continue;
      auto add = [&](const Worker* w) {
        if (w == nullptr || w->process.pid <= 0) return;
        v1::WorkerRecord r;
        r.set_listener(name);
        r.set_shard(shard->index);
        r.set_pid(static_cast<uint32_t>(w->process.pid));
        // The uid it runs as once started (just after the fork it is
        // still the agent's).
        r.set_uid(shard->program.credentials ? shard->program.credentials->uid
                                             : ::geteuid());
        r.set_socket_inode(w->found_socket.valid() ? w->found_inode
                                                   : shard->inode);
        out.push_back(std::move(r));
      };
      add(shard->worker.get());
      add(shard->candidate.get());
      for (const auto& w : shard->retiring) add(w.get());
    }
  }
  return out;
}

void Fleet::WorkerGone(Listener& listener, Shard& shard) {
  drainer_.OnWorkerGone(listener, shard);
}

absl::StatusOr<Listener*> Fleet::Find(const std::string& name) const {
  auto it = listeners_.find(name);
  if (it == listeners_.end() && failed_.count(name) > 0) {
    return NotServing(name);
  }
  if (it == listeners_.end() || it->second->deleting) {
    return absl::NotFoundError(absl::StrCat("listener ", name, " not found"));
  }
  return it->second.get();
}

absl::Status Fleet::Commit(const std::string& name, const v1::Listener* spec) {
  if (!ctx_.commit || starting_) return absl::OkStatus();
  v1::FleetSpec intended;
  bool placed = false;
  const v1::FleetSpec current = DesiredSpec();
  for (const v1::Listener& l : current.listeners()) {
    if (!placed && spec != nullptr && l.name() >= name) {
      *intended.add_listeners() = *spec;
      placed = true;
    }
    if (l.name() != name) *intended.add_listeners() = l;
  }
  if (!placed && spec != nullptr) *intended.add_listeners() = *spec;
  return ctx_.commit(intended);
}

size_t Fleet::Start(const v1::FleetSpec& spec) {
  for (const v1::Listener& l : spec.listeners()) {
    starting_ = true;
    absl::Status s = AddListener(l);
    starting_ = false;
    if (!s.ok()) RecordFailure(l, std::move(s));
  }
  return failed_.size();
}

// --- AddListener, step by step ----------------------------------------------

absl::Status Fleet::AddListener(const v1::Listener& spec) {
  ASSIGN_OR_RETURN(std::unique_ptr<Listener> listener, PrepareListener(spec));
  std::vector<ForeignListener> orphans;
  RETURN_IF_ERROR(CheckAddressFree(*listener, &orphans));
  uint32_t n =
      EffectiveShards(spec, static_cast<int>(ctx_.options.cpus.size()));
  v1::Listener intended = listener->spec;
  intended.set_shards(n);
  RETURN_IF_ERROR(Commit(spec.name(), &intended));
  std::vector<Adoptee> mismatched;
  std::map<uint32_t, Adoptee> adopt = ClaimAdoptees(*listener, n, &mismatched);
  absl::Status s = CreateShards(*listener, n, adopt);
  if (s.ok()) s = AttachSteering(*listener, adopt);
  if (s.ok()) s = StartWorkers(*listener, adopt);
  for (Adoptee& a : mismatched) {
    if (a.control) {
      SendDrain(a.control.get(), EffectiveDrainTimeoutSeconds(spec) * 1000);
    }
  }
  if (!s.ok()) {
    // Workers that reconnected keep serving and wait for a retry (their
    // sockets are still theirs: only the ones not yet used go back).
    for (auto& [index, a] : adopt) {
      if (a.control.valid() && a.socket.valid()) {
        adoptees_.push_back(std::move(a));
      }
    }
    return s;
  }
  listener->spec.set_shards(n);
  LogServing(*listener);
  uint32_t drain_timeout = EffectiveDrainTimeoutSeconds(spec);
  std::string name = spec.name();
  listeners_[name] = std::move(listener);
  for (const ForeignListener& orphan : orphans) {
    drainer_.DrainOrphan(name, orphan.pid, orphan.inode, drain_timeout);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Listener>> Fleet::PrepareListener(
    const v1::Listener& spec) {
  const std::string& name = spec.name();
  RETURN_IF_ERROR(Annotate(ValidateListener(spec), "listener " + name));
  if (listeners_.size() + failed_.size() >= kMaxListeners) {
    return absl::ResourceExhaustedError(
        absl::StrCat("listener ", name, ": the agent already has ",
                     kMaxListeners, " listeners (the most it runs)"));
  }
  if (listeners_.count(name) > 0 || (!starting_ && failed_.count(name) > 0)) {
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
  for (const auto& [other_name, other] : failed_) {
    if (other_name != name &&
        SocketAddress::Parse(other.spec.address()).value_or(SocketAddress()) ==
            listener->address) {
      return absl::AlreadyExistsError(
          absl::StrCat("listener ", name, ": address ",
                       listener->address.ToString(), " belongs to listener ",
                       other_name, " (not serving; delete it first)"));
    }
  }
  absl::StatusOr<ResolvedWorker> program =
      ResolveWorker(spec.worker(), ctx_.options.worker_allowlist);
  if (!program.ok()) return Annotate(program.status(), "listener " + name);
  listener->program = std::move(*program);
  bool wants_steering =
      spec.steering().policy() == v1::STEERING_POLICY_CPU ||
      spec.steering().policy() == v1::STEERING_POLICY_LEAST_CONNECTIONS ||
      spec.steering().weights_size() > 0;
  if (ctx_.steering == nullptr && wants_steering) {
    PF_LOG(WARNING) << "listener " << name
                    << ": steering in the spec is not applied: BPF steering is "
                       "unavailable ("
                    << ctx_.steering_reason
                    << "); using the kernel's reuseport hash";
  }
  return listener;
}

absl::Status Fleet::CheckAddressFree(const Listener& listener,
                                     std::vector<ForeignListener>* orphans) {
  // Workers left by a previous agent of this listener are replaced (our
  // sockets join their reuseport group; they drain once ours serve). Any
  // other holder of the address is an error.
  const std::string& name = listener.spec.name();
  std::set<uint64_t> handed_back;
  for (const Adoptee& a : adoptees_) {
    if (a.hello.listener() == name) handed_back.insert(a.hello.socket_inode());
  }
  for (ForeignListener& foreign :
       FindForeignListeners(listener.address, handed_back)) {
    if (foreign.pid > 0 && IsOrphanedWorkerOf(foreign.pid, name)) {
      orphans->push_back(std::move(foreign));
      continue;
    }
    // A previous worker's socket whose holder /proc does not show us
    // (another user's process): the records say whose it is.
    if (const v1::WorkerRecord* r =
            previous_workers_.FindBySocket(foreign.inode);
        r != nullptr && r->listener() == name &&
        (foreign.pid <= 0 || foreign.pid == static_cast<pid_t>(r->pid()))) {
      foreign.pid = static_cast<pid_t>(r->pid());
      orphans->push_back(std::move(foreign));
      continue;
    }
    std::string who =
        foreign.pid > 0
            ? absl::StrCat("pid ", foreign.pid, " (", foreign.process_name, ")")
            : absl::StrCat("socket inode ", foreign.inode);
    return absl::AlreadyExistsError(absl::StrCat(
        "listener ", name, ": address ", listener.address.ToString(),
        " is already in use by another process: ", who));
  }
  return absl::OkStatus();
}

std::map<uint32_t, Adoptee> Fleet::ClaimAdoptees(
    const Listener& listener, uint32_t shards,
    std::vector<Adoptee>* mismatched) {
  const std::string& name = listener.spec.name();
  std::map<uint32_t, Adoptee> adopt;
  for (auto it = adoptees_.begin(); it != adoptees_.end();) {
    if (it->hello.listener() != name) {
      ++it;
      continue;
    }
    absl::StatusOr<SocketAddress> local = LocalAddressOf(it->socket.get());
    std::string mismatch;
    if (!local.ok()) {
      mismatch = std::string(local.status().message());
    } else if (*local != listener.address) {
      mismatch = absl::StrCat("its socket is on ", local->ToString());
    } else if (it->hello.shard() >= shards) {
      mismatch = absl::StrCat("the listener has ", shards, " shards");
    } else if (adopt.count(it->hello.shard()) > 0) {
      mismatch = "another worker of this shard reconnected first";
    } else if (std::optional<std::string> digest = ProcessEnvValue(
                   static_cast<pid_t>(it->hello.pid()), kWorkerSpecEnvVar);
               digest.has_value() &&
               *digest != WorkerSpecDigest(listener.program.spec)) {
      // E.g. the agent died in a rollout: this worker runs the other version.
      mismatch = "it runs another worker program than the desired one";
    }
    if (mismatch.empty()) {
      adopt.emplace(it->hello.shard(), std::move(*it));
    } else {
      PF_LOG(WARNING) << "listener " << name << ": reconnected worker pid "
                      << it->hello.pid() << " (shard " << it->hello.shard()
                      << ") does not match the desired state (" << mismatch
                      << "); a new worker replaces it and it drains";
      mismatched->push_back(std::move(*it));
    }
    it = adoptees_.erase(it);
  }
  return adopt;
}

absl::StatusOr<std::unique_ptr<Shard>> Fleet::NewShard(Listener& listener,
                                                       uint32_t index) {
  auto shard = std::make_unique<Shard>();
  shard->index = index;
  shard->backoff = ctx_.options.restart_backoff_initial;
  shard->program = listener.program;
  shard->cpu = PinnedCpu(listener.spec.steering(), index, ctx_.options.cpus);
  if (IsSelfBound(listener.program.spec)) {
    // Its worker binds the socket; the shard takes it into service once it
    // is found (see Supervisor::TakeSocket).
    shard->in_service = false;
    return shard;
  }
  absl::StatusOr<Fd> sock = CreateListenerSocket(listener);
  if (!sock.ok()) {
    return Annotate(sock.status(), absl::StrCat("shard ", index));
  }
  shard->socket = std::move(*sock);
  shard->inode = SocketInodeOf(shard->socket.get()).value_or(0);
  return shard;
}

absl::Status Fleet::CreateShards(Listener& listener, uint32_t n,
                                 std::map<uint32_t, Adoptee>& adopt) {
  for (uint32_t i = 0; i < n; ++i) {
    if (auto a = adopt.find(i); a != adopt.end()) {
      auto shard = std::make_unique<Shard>();
      shard->index = i;
      shard->backoff = ctx_.options.restart_backoff_initial;
      shard->program = listener.program;
      shard->cpu = PinnedCpu(listener.spec.steering(), i, ctx_.options.cpus);
      shard->socket = std::move(a->second.socket);
      shard->inode = SocketInodeOf(shard->socket.get()).value_or(0);
      // A takeover's socket: the old agent's worker serves it too until it
      // drains.
      shard->health.shared_socket = !a->second.control.valid();
      listener.shards.push_back(std::move(shard));
      continue;
    }
    absl::StatusOr<std::unique_ptr<Shard>> shard = NewShard(listener, i);
    if (!shard.ok()) {
      return Annotate(shard.status(), "listener " + listener.spec.name());
    }
    listener.shards.push_back(std::move(*shard));
  }
  return absl::OkStatus();
}

absl::Status Fleet::AttachSteering(Listener& listener,
                                   const std::map<uint32_t, Adoptee>& adopt) {
  if (ctx_.steering == nullptr) return absl::OkStatus();
  const std::string context = "listener " + listener.spec.name();
  absl::StatusOr<std::unique_ptr<ListenerSteering>> steering =
      ctx_.steering->OpenListener(listener.spec.name());
  if (!steering.ok()) return Annotate(steering.status(), context);
  listener.steering = std::move(*steering);
  // Self-bound shards have no socket yet: the program is attached to the
  // first one found.
  if (listener.shards.front()->socket.valid()) {
    RETURN_IF_ERROR(Annotate(
        listener.steering->AttachTo(listener.shards.front()->socket.get()),
        context));
  }
  for (auto& shard : listener.shards) {
    if (!shard->socket.valid()) continue;
    if (adopt.count(shard->index) > 0) {
      // A handed-back socket is normally still in its slot, and the map
      // refuses a socket twice: clear the slot, then set it (for those
      // microseconds a SYN for this slot falls back to the kernel's hash).
      listener.steering->ClearShardSocket(shard->index).IgnoreError();
    }
    RETURN_IF_ERROR(Annotate(
        listener.steering->SetShardSocket(shard->index, shard->socket.get()),
        context));
  }
  return ApplySteering(listener);
}

absl::Status Fleet::StartWorkers(Listener& listener,
                                 std::map<uint32_t, Adoptee>& adopt) {
  for (auto& shard : listener.shards) {
    absl::Status s;
    if (auto a = adopt.find(shard->index);
        a != adopt.end() && a->second.control.valid()) {
      s = supervisor_.Adopt(listener, *shard, std::move(a->second));
      adopt.erase(a);
    } else if (starting_) {
      supervisor_.StartOrRetry(listener, *shard);
    } else {
      s = supervisor_.Start(listener, *shard);
    }
    if (!s.ok()) {
      for (auto& started : listener.shards) supervisor_.KillAndReap(*started);
      return s;
    }
  }
  return absl::OkStatus();
}

void Fleet::LogServing(const Listener& listener) const {
  const v1::Listener& spec = listener.spec;
  uint32_t n = static_cast<uint32_t>(listener.shards.size());
  std::string steering = "kernel reuseport hash";
  if (listener.steering) {
    steering = v1::SteeringPolicy_Name(spec.steering().policy() ==
                                               v1::STEERING_POLICY_UNSPECIFIED
                                           ? v1::STEERING_POLICY_HASH
                                           : spec.steering().policy());
  }
  PF_LOG(INFO) << "listener " << spec.name() << ": serving "
               << listener.address.ToString() << " with " << n << " shard"
               << (n == 1 ? "" : "s") << " (worker " << listener.program.path
               << ", backlog " << EffectiveBacklog(spec) << ", steering "
               << steering << ")";
}

// --- Lifecycle operations ---------------------------------------------------

absl::Status Fleet::DrainShard(const std::string& name, uint32_t index,
                               Done done) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  Shard* shard = listener->Find(index);
  if (shard == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("listener ", name, " has no shard ", index));
  }
  if (shard->draining()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listener ", name, " shard ", index, " is already draining"));
  }
  std::vector<Shard*> live = listener->Live();
  if (live.size() <= 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, " shard ", index,
                     " is its last shard; delete the listener instead"));
  }
  v1::Steering steering = listener->spec.steering();
  if (steering.weights_size() > 0) {
    // Drop the drained shard's weight so the others keep theirs.
    int pos = static_cast<int>(std::find(live.begin(), live.end(), shard) -
                               live.begin());
    steering.mutable_weights()->erase(steering.mutable_weights()->begin() +
                                      pos);
    if (!ValidateSteering(steering, live.size() - 1).ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "listener ", name, " shard ", index,
          " is the only shard with a non-zero weight; change the weights "
          "first"));
    }
  }
  v1::Listener intended = listener->spec;
  *intended.mutable_steering() = steering;
  intended.set_shards(static_cast<uint32_t>(live.size() - 1));
  RETURN_IF_ERROR(Commit(name, &intended));
  listener->spec = intended;
  shard->state = v1::SHARD_STATE_DRAINING;
  if (absl::Status s = ApplySteering(*listener); !s.ok()) PF_LOG(ERROR) << s;
  drainer_.Begin(*listener, *shard, std::move(done));
  return absl::OkStatus();
}

absl::Status Fleet::DeleteListener(const std::string& name, Done done) {
  if (failed_.count(name) > 0) return DeleteFailed(name, std::move(done));
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  RETURN_IF_ERROR(Commit(name, nullptr));
  if (listener->rollout) {
    listener->rollout->Abort(
        absl::AbortedError("the listener is being deleted"));
  }
  listener->deleting = true;
  listener->delete_done.push_back(std::move(done));
  std::vector<Shard*> shards;
  for (auto& s : listener->shards) {
    if (!s->draining()) shards.push_back(s.get());
    s->state = v1::SHARD_STATE_DRAINING;
  }
  if (shards.empty() && listener->shards.empty()) {
    // Nothing to drain (cannot normally happen): remove it now.
    std::vector<Done> deleted = std::move(listener->delete_done);
    if (listener->steering) listener->steering->RemovePins().IgnoreError();
    listeners_.erase(name);
    for (Done& cb : deleted) cb(absl::OkStatus());
    return absl::OkStatus();
  }
  for (Shard* shard : shards) {
    drainer_.Begin(*listener, *shard, [](absl::Status) {});
  }
  return absl::OkStatus();
}

absl::Status Fleet::SetSteering(const std::string& name,
                                const v1::Steering& steering) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  if (ctx_.steering == nullptr || !listener->steering) {
    return absl::FailedPreconditionError(absl::StrCat(
        "BPF steering is unavailable on this host (", ctx_.steering_reason,
        "); the kernel's reuseport hash is in use"));
  }
  v1::Listener candidate = listener->spec;
  *candidate.mutable_steering() = steering;
  candidate.set_shards(static_cast<uint32_t>(listener->Live().size()));
  RETURN_IF_ERROR(ValidateListener(candidate));
  RETURN_IF_ERROR(Commit(name, &candidate));
  return ChangeSteering(*listener, steering);
}

absl::Status Fleet::ChangeSteering(Listener& listener,
                                   const v1::Steering& steering) {
  v1::Steering old = listener.spec.steering();
  std::vector<int> old_cpus;
  for (auto& shard : listener.shards) {
    old_cpus.push_back(shard->cpu);
    // Workers started from now on are pinned per the policy; running ones
    // are re-pinned in place.
    shard->cpu = PinnedCpu(steering, shard->index, ctx_.options.cpus);
  }
  *listener.spec.mutable_steering() = steering;
  // New steering starts from the operator's weights (fleet/rebalance.h).
  listener.rebalance_slots.clear();
  listener.rebalance_spill.clear();
  auto restore = [&] {
    *listener.spec.mutable_steering() = old;
    for (size_t i = 0; i < listener.shards.size(); ++i) {
      listener.shards[i]->cpu = old_cpus[i];
    }
  };
  if (absl::Status s = ApplySteering(listener); !s.ok()) {
    restore();
    return s;
  }
  if (absl::Status s = RepinWorkers(listener, old_cpus); !s.ok()) {
    restore();
    if (absl::Status back = ApplySteering(listener); !back.ok()) {
      PF_LOG(ERROR) << "listener " << listener.spec.name()
                    << ": putting the steering tables back: " << back;
    }
    return s;
  }
  PF_LOG(INFO) << "listener " << listener.spec.name() << ": steering set to "
               << v1::SteeringPolicy_Name(steering.policy())
               << (steering.weights_size() > 0
                       ? absl::StrCat(" with weights ",
                                      absl::StrJoin(steering.weights(), ","))
                       : std::string());
  return absl::OkStatus();
}

absl::Status Fleet::RepinWorkers(Listener& listener,
                                 const std::vector<int>& old_cpus) {
  auto cpus_for = [this](int cpu) {
    return cpu >= 0 ? std::vector<int>{cpu} : ctx_.options.cpus;
  };
  // Every process on a shard's socket follows the shard's CPU.
  auto processes = [](Shard& shard) {
    std::vector<Worker*> out;
    if (shard.worker) out.push_back(shard.worker.get());
    if (shard.candidate) out.push_back(shard.candidate.get());
    for (auto& old : shard.retiring) out.push_back(old.get());
    return out;
  };
  for (size_t i = 0; i < listener.shards.size(); ++i) {
    Shard& shard = *listener.shards[i];
    if (shard.cpu == old_cpus[i]) continue;
    for (Worker* w : processes(shard)) {
      absl::Status s =
          ctx_.launcher->SetAffinity(w->process, cpus_for(shard.cpu));
      if (s.ok() || absl::IsNotFound(s)) continue;  // gone: reaped soon
      // Put back the workers already moved (this shard's included).
      for (size_t j = 0; j <= i; ++j) {
        Shard& moved = *listener.shards[j];
        if (moved.cpu == old_cpus[j]) continue;
        for (Worker* back : processes(moved)) {
          ctx_.launcher->SetAffinity(back->process, cpus_for(old_cpus[j]))
              .IgnoreError();
        }
      }
      return Annotate(s, absl::StrCat(listener.Name(shard),
                                      ": pinning worker pid ", w->process.pid));
    }
  }
  return absl::OkStatus();
}

absl::Status Fleet::RollOut(const std::string& name,
                            const v1::WorkerSpec& worker, uint32_t max_surge,
                            Done done) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  // Empty fields keep the current value.
  v1::WorkerSpec merged = listener->spec.worker();
  if (!worker.command().empty()) merged.set_command(worker.command());
  if (worker.args_size() > 0) *merged.mutable_args() = worker.args();
  if (worker.env_size() > 0) *merged.mutable_env() = worker.env();
  v1::Listener candidate = listener->spec;
  *candidate.mutable_worker() = merged;
  RETURN_IF_ERROR(ValidateListener(candidate));
  RETURN_IF_ERROR(
      CheckRollOutSocketMode(name, listener->spec.worker(), merged));
  absl::StatusOr<ResolvedWorker> program =
      ResolveWorker(merged, ctx_.options.worker_allowlist);
  if (!program.ok()) {
    if (absl::IsPermissionDenied(program.status())) return program.status();
    return absl::InvalidArgumentError(program.status().message());
  }
  if (listener->rollout) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, ": a rollout is already in progress"));
  }
  RETURN_IF_ERROR(Commit(name, &candidate));
  auto rollout = std::make_shared<Rollout>(&ctx_, &supervisor_, *listener,
                                           std::move(*program), max_surge,
                                           std::move(done));
  listener->rollout = rollout;
  rollout->Start();
  return absl::OkStatus();
}

absl::Status Fleet::RollOutPrevious(const std::string& name, uint32_t max_surge,
                                    Done done) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  for (const v1::RollOut& r : listener->rollout_history) {
    if (r.state() != v1::ROLL_OUT_STATE_SUCCEEDED) continue;
    // The previous worker whole: an empty field is not "keep".
    v1::Listener candidate = listener->spec;
    *candidate.mutable_worker() = r.previous_worker();
    RETURN_IF_ERROR(ValidateListener(candidate));
    RETURN_IF_ERROR(CheckRollOutSocketMode(name, listener->spec.worker(),
                                           r.previous_worker()));
    absl::StatusOr<ResolvedWorker> program =
        ResolveWorker(r.previous_worker(), ctx_.options.worker_allowlist);
    if (!program.ok()) {
      return Annotate(program.status(),
                      absl::StrCat("listener ", name, ": undo to rollout ",
                                   r.id(), "'s previous worker"));
    }
    if (listener->rollout) {
      return absl::FailedPreconditionError(absl::StrCat(
          "listener ", name, ": a rollout is already in progress"));
    }
    RETURN_IF_ERROR(Commit(name, &candidate));
    auto rollout = std::make_shared<Rollout>(&ctx_, &supervisor_, *listener,
                                             std::move(*program), max_surge,
                                             std::move(done));
    rollout->set_undo(true);
    listener->rollout = rollout;
    rollout->Start();
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat("listener ", name,
                   ": nothing to undo (no rollout succeeded since the agent "
                   "started)"));
}

absl::StatusOr<std::vector<v1::RollOut>> Fleet::RollOuts(
    const std::string& name) const {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  std::vector<v1::RollOut> out;
  if (listener->rollout) out.push_back(listener->rollout->Record());
  out.insert(out.end(), listener->rollout_history.begin(),
             listener->rollout_history.end());
  return out;
}

absl::StatusOr<v1::RollOut> Fleet::PauseRollOut(const std::string& name,
                                                bool paused) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  if (!listener->rollout ||
      listener->rollout->phase() != Rollout::Phase::kRolling) {
    return absl::FailedPreconditionError(
        absl::StrCat("listener ", name, ": no rollout in progress to ",
                     paused ? "pause" : "resume"));
  }
  if (paused) {
    listener->rollout->Pause();
  } else {
    listener->rollout->Resume();
  }
  return listener->rollout->Record();
}

absl::StatusOr<std::optional<v1::RollOut>> Fleet::UndoRollOutInProgress(
    const std::string& name) {
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  if (!listener->rollout) return std::nullopt;
  listener->rollout->Undo();
  return listener->rollout->Record();
}

absl::StatusOr<ListenerUpdate> Fleet::PlanListenerUpdate(
    const v1::Listener& spec) const {
  ASSIGN_OR_RETURN(Listener * listener, Find(spec.name()));
  return PlanUpdate(*listener, spec, ctx_);
}

absl::Status Fleet::UpdateListener(const v1::Listener& spec, Done done) {
  if (failed_.count(spec.name()) > 0)
    return UpdateFailed(spec, std::move(done));
  ASSIGN_OR_RETURN(Listener * listener, Find(spec.name()));
  ASSIGN_OR_RETURN(ListenerUpdate update, PlanUpdate(*listener, spec, ctx_));
  if (update.empty()) {
    done(absl::OkStatus());
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(Commit(spec.name(), &update.to));
  return ApplyUpdate(*listener, std::move(update), std::move(done));
}

void Fleet::Shutdown(std::function<void()> done) {
  drainer_.Shutdown(std::move(done));
}

void Fleet::KillAll() { drainer_.KillAll(); }

// --- Views ------------------------------------------------------------------

std::vector<ListenerStatus> Fleet::Status() const {
  std::vector<ListenerStatus> out;
  for (const auto& [name, listener] : listeners_) {
    if (listener->deleting) continue;
    out.push_back(*ListenerStatusOf(name));
  }
  for (const auto& [name, failed] : failed_) {
    out.push_back(*ListenerStatusOf(name));
  }
  std::sort(out.begin(), out.end(),
            [](const ListenerStatus& a, const ListenerStatus& b) {
              return a.spec.name() < b.spec.name();
            });
  return out;
}

absl::StatusOr<ListenerStatus> Fleet::ListenerStatusOf(
    const std::string& name) const {
  if (auto f = failed_.find(name); f != failed_.end()) {
    ListenerStatus view;
    view.spec = f->second.spec;
    view.error = std::string(f->second.error.message());
    return view;
  }
  ASSIGN_OR_RETURN(Listener * listener, Find(name));
  ListenerStatus view;
  view.spec = listener->spec;
  const std::vector<uint32_t> slots = SlotCounts(PlanTables(*listener));
  const std::vector<uint32_t> baseline =
      SlotCounts(PlanBaselineTables(*listener));
  std::vector<ShardCounters> counters;
  if (listener->steering) {
    counters = listener->steering->ReadCounters().value_or(counters);
  }
  for (const auto& shard : listener->shards) {
    ShardStatus s;
    s.index = shard->index;
    s.state = shard->state;
    s.cpu = shard->cpu;
    s.restarts = shard->restarts;
    s.socket_inode = shard->inode;
    s.self_bound = OwnsItsSocket(*shard);
    s.adopted = shard->adopted;
    if (shard->worker) {
      s.pid = shard->worker->process.pid;
      s.ready = shard->worker->ready;
      s.active_connections = shard->worker->active_connections;
      s.accepted_total = shard->worker->accepted_total;
    }
    s.queue_depth = AcceptQueueDepth(shard->socket.get()).value_or(0);
    s.health = shard->health.health;
    s.health_reason = shard->health.reason;
    s.ejections = shard->health.ejections;
    s.replacements = shard->health.replacements;
    for (const OrphanHolder& o : shard->orphans) {
      s.orphans.push_back(ShardStatus::Orphan{
          .pid = o.pid, .command = o.command, .leftover = o.leftover});
    }
    s.orphans_killed = shard->orphans_killed;
    s.load = shard->load;
    // As of the workers' last reports, not the last load measurement.
    FillHandOffPauses(shard->handoff_pauses, s.load.mutable_handoff_pauses());
    if (listener->steering && shard->index < slots.size()) {
      s.steering_slots = slots[shard->index];
      s.rebalance_slot_delta = static_cast<int32_t>(slots[shard->index]) -
                               static_cast<int32_t>(baseline[shard->index]);
    }
    if (shard->index < counters.size()) {
      s.counters.selected = counters[shard->index].selected;
      s.counters.migrated = counters[shard->index].migrated;
      s.counters.fallback = counters[shard->index].fallback;
    }
    view.shards.push_back(std::move(s));
  }
  std::vector<double> ready;
  for (const ShardStatus& s : view.shards) {
    if (s.ready) ready.push_back(static_cast<double>(s.load.connections()));
  }
  view.imbalance = Imbalance(ready);
  view.rebalances = listener->rebalances;
  view.rebalance_slots_moved = listener->rebalance_slots_moved;
  view.rebalance_refusals = listener->rebalance_refusals;
  view.rebalance_connections_moved = listener->rebalance_connections_moved;
  view.auto_rebalance_steps = listener->auto_rebalance_steps;
  view.handoff_pauses = listener->handoff_pauses;
  view.auto_rebalancing = auto_rebalance_.Active(name);
  if (listener->spec.steering().policy() == v1::STEERING_POLICY_CPU) {
    for (const auto& shard : listener->shards) {
      if (shard->cpu < 0) continue;
      auto it = listener->rebalance_spill.find(shard->cpu);
      view.spill[shard->cpu] =
          it == listener->rebalance_spill.end() ? 0 : it->second;
    }
  }
  return view;
}

std::vector<Fleet::SharedSocket> Fleet::SharedSockets() const {
  std::vector<SharedSocket> out;
  for (const auto& [name, listener] : listeners_) {
    if (listener->deleting) continue;
    for (const auto& shard : listener->shards) {
      // Self-bound sockets are their workers': not handed over.
      if (shard->draining() || OwnsItsSocket(*shard)) continue;
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
  std::map<std::string, const v1::Listener*> all;
  for (const auto& [name, listener] : listeners_) {
    if (!listener->deleting) all[name] = &listener->spec;
  }
  for (const auto& [name, failed] : failed_) all[name] = &failed.spec;
  v1::FleetSpec spec;
  for (const auto& [name, l] : all) *spec.add_listeners() = *l;
  return spec;
}

bool Fleet::AllReady() const {
  if (!failed_.empty()) return false;
  for (const auto& [name, listener] : listeners_) {
    for (const auto& shard : listener->shards) {
      if (!shard->worker || !shard->worker->ready) return false;
    }
  }
  return true;
}

}  // namespace portfleet
