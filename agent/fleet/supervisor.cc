#include "agent/fleet/supervisor.h"

#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "agent/fleet/load.h"
#include "agent/fleet/selfbound.h"
#include "agent/sockets.h"
#include "agent/spec/spec.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"
#include "worker/sdk/base/time.h"
#include "worker/sdk/control_channel.h"

namespace portfleet {
namespace {

// The worker's environment: the base, the listener's own entries, then the
// activation variables; HOME/USER/LOGNAME follow the credentials.
std::vector<std::string> WorkerEnv(const FleetOptions& options,
                                   const Listener& listener, const Shard& shard,
                                   const ResolvedWorker& program) {
  std::vector<std::string> env;
  bool other_user = program.credentials.has_value();
  for (const std::string& e : options.base_env) {
    if (other_user && (e.rfind("HOME=", 0) == 0 || e.rfind("USER=", 0) == 0 ||
                       e.rfind("LOGNAME=", 0) == 0)) {
      continue;
    }
    env.push_back(e);
  }
  if (other_user) {
    env.push_back("HOME=" + program.credentials->home);
    env.push_back("USER=" + program.credentials->user);
    env.push_back("LOGNAME=" + program.credentials->user);
  }
  for (const std::string& e : program.spec.env()) env.push_back(e);
  const std::string& name = listener.spec.name();
  if (IsSelfBound(program.spec)) {
    // Binds its own socket: the address, no fd 3, no control channel.
    env.push_back(absl::StrCat(kSelfBoundAddressEnvVar, "=",
                               listener.address.ToString()));
    env.push_back(absl::StrCat("PORT=", listener.address.port()));
    env.push_back(absl::StrCat("PORTFLEET_LISTENER=", name));
    env.push_back(absl::StrCat("PORTFLEET_SHARD=", shard.index));
    env.push_back(
        absl::StrCat(kWorkerSpecEnvVar, "=", WorkerSpecDigest(program.spec)));
    return env;
  }
  env.push_back("LISTEN_FDS=1");
  env.push_back(absl::StrCat("LISTEN_FDNAMES=", name));
  env.push_back(absl::StrCat("PORTFLEET_LISTENER=", name));
  env.push_back(absl::StrCat("PORTFLEET_SHARD=", shard.index));
  env.push_back(absl::StrCat(ControlChannel::kEnvVar, "=4"));
  env.push_back(
      absl::StrCat(kWorkerSpecEnvVar, "=", WorkerSpecDigest(program.spec)));
  if (!options.agent_socket.empty()) {
    env.push_back(absl::StrCat(ControlChannel::kAgentSocketEnvVar, "=",
                               options.agent_socket));
    env.push_back(absl::StrCat("PORTFLEET_AGENT_UID=", ::geteuid()));
  }
  return env;
}

// Takes the pending readiness waiter of `worker`, if any.
std::function<void(absl::Status)> TakeWaiter(Worker& worker) {
  return std::exchange(worker.on_ready, nullptr);
}

}  // namespace

Supervisor::Supervisor(FleetContext* ctx, WorkerGone gone)
    : ctx_(ctx), gone_(std::move(gone)) {}

Supervisor::~Supervisor() {
  if (remnant_timer_) ctx_->loop->CancelTimer(*remnant_timer_);
}

void Supervisor::KeepRemnant(Listener& listener, Shard& shard,
                             const Worker& worker) {
  pid_t pgid = worker.process.pid;
  if (!ctx_->launcher->GroupAlive(pgid)) return;
  // SIGKILLed workers (drain timeout, replacement, second signal) lose their
  // group at once; anything else gets the server's graceful stop and the
  // listener's drain timeout.
  bool kill_now = worker.killed;
  int sig = kill_now ? SIGKILL : SIGTERM;
  ctx_->launcher->SignalGroup(pgid, sig);
  uint32_t timeout = EffectiveDrainTimeoutSeconds(listener.spec);
  PF_LOG(WARNING) << listener.Name(shard) << ": worker pid " << pgid
                  << " is gone but processes of its group remain (a pre-fork "
                     "server's children); "
                  << (kill_now ? "SIGKILL to the group"
                               : absl::StrCat("SIGTERM to the group, SIGKILL "
                                              "in ",
                                              timeout, "s"));
  Remnant r;
  r.pgid = pgid;
  r.kill_at =
      kill_now ? ctx_->Now()
               : worker.stop_by.value_or(ctx_->Now() + absl::Seconds(timeout));
  r.killed = kill_now;
  r.listener = &listener;
  r.shard = &shard;
  r.shard_alive = shard.lifetime;
  remnants_.push_back(std::move(r));
  shard.remnant_groups++;
  if (!remnant_timer_) {
    remnant_timer_ = ctx_->loop->AddTimer(absl::Milliseconds(50),
                                          [this] { PollRemnants(); });
  }
}

void Supervisor::PollRemnants() {
  remnant_timer_.reset();
  absl::Time now = ctx_->Now();
  std::vector<Remnant> gone;
  for (auto it = remnants_.begin(); it != remnants_.end();) {
    if (!ctx_->launcher->GroupAlive(it->pgid)) {
      gone.push_back(std::move(*it));
      it = remnants_.erase(it);
      continue;
    }
    if (it->killed && now >= it->kill_at + absl::Seconds(10)) {
      // SIGKILLed 10 s ago and a member still runs: stuck in the kernel
      // (uninterruptible sleep). Nothing more can be done; stop waiting.
      if (!it->shard_alive.expired()) {
        PF_LOG(ERROR) << it->listener->Name(*it->shard)
                      << ": processes of old worker group " << it->pgid
                      << " survive SIGKILL (uninterruptible?); no longer "
                         "waited for";
      }
      it->abandoned = true;
      gone.push_back(std::move(*it));
      it = remnants_.erase(it);
      continue;
    }
    if (!it->killed && now >= it->kill_at) {
      it->killed = true;
      if (!it->shard_alive.expired()) {
        PF_LOG(WARNING) << it->listener->Name(*it->shard)
                        << ": processes of old worker group " << it->pgid
                        << " still running after the drain timeout; SIGKILL";
      }
      ctx_->launcher->SignalGroup(it->pgid, SIGKILL);
    }
    ++it;
  }
  if (!remnants_.empty()) {
    remnant_timer_ = ctx_->loop->AddTimer(absl::Milliseconds(100),
                                          [this] { PollRemnants(); });
  }
  for (Remnant& r : gone) {
    if (r.shard_alive.expired()) continue;
    if (!r.abandoned) {
      PF_LOG(INFO) << r.listener->Name(*r.shard)
                   << ": every process of worker group " << r.pgid
                   << " has exited";
    }
    if (--r.shard->remnant_groups == 0) {
      gone_(*r.listener, *r.shard);  // may destroy the shard
    }
  }
}

void Supervisor::KillRemnants() {
  for (Remnant& r : remnants_) {
    if (!r.killed) r.kill_at = ctx_->Now();
    r.killed = true;
    ctx_->launcher->SignalGroup(r.pgid, SIGKILL);
  }
}

std::vector<pid_t> Supervisor::RemnantGroups(const Shard& shard) const {
  std::vector<pid_t> out;
  for (const Remnant& r : remnants_) {
    if (r.shard == &shard && !r.shard_alive.expired()) out.push_back(r.pgid);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Worker>> Supervisor::Launch(
    Listener& listener, Shard& shard, const ResolvedWorker& program,
    Fd own_socket) {
  if (IsSelfBound(program.spec)) {
    return LaunchSelfBound(listener, shard, program,
                           WorkerEnv(ctx_->options, listener, shard, program));
  }
  absl::StatusOr<std::pair<ControlChannel, ControlChannel>> pair =
      ControlChannel::Pair();
  if (!pair.ok()) {
    return Annotate(pair.status(),
                    absl::StrCat(listener.Name(shard), ": control channel"));
  }
  ControlChannel agent_end = std::move(pair->first);
  Fd worker_end = pair->second.Release();

  LaunchSpec launch;
  launch.path = program.path;
  launch.argv.push_back(program.spec.command());
  for (const std::string& a : program.spec.args()) launch.argv.push_back(a);
  launch.env = WorkerEnv(ctx_->options, listener, shard, program);
  launch.listen_fd = own_socket.valid() ? own_socket.get() : shard.socket.get();
  launch.control_fd = worker_end.get();
  launch.cpu = shard.cpu;
  launch.credentials = program.credentials;
  absl::StatusOr<LaunchedProcess> process = ctx_->launcher->Launch(launch);
  if (!process.ok()) {
    return Annotate(process.status(),
                    absl::StrCat(listener.Name(shard), ": starting worker"));
  }
  worker_end.Reset();
  auto worker = std::make_unique<Worker>();
  worker->process = std::move(*process);
  worker->control.emplace(std::move(agent_end));
  worker->started = ctx_->Now();
  if (own_socket.valid()) {
    worker->found_inode = SocketInodeOf(own_socket.get()).value_or(0);
    worker->found_uid = ::geteuid();
    worker->found_socket = std::move(own_socket);
  }
  if (absl::Status watched = Watch(listener, shard, *worker); !watched.ok()) {
    ctx_->launcher->Signal(worker->process, SIGKILL);
    return watched;
  }
  ArmReadiness(listener, shard, *worker);
  return worker;
}

absl::Status Supervisor::Start(Listener& listener, Shard& shard) {
  ASSIGN_OR_RETURN(std::unique_ptr<Worker> worker,
                   Launch(listener, shard, shard.program));
  pid_t pid = worker->process.pid;
  shard.worker = std::move(worker);
  shard.state = v1::SHARD_STATE_RUNNING;
  PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid
               << (shard.worker->self_bound
                       ? " started; it binds its own socket on " +
                             listener.address.ToString() + ", socket inode"
                       : " started on socket inode")
               << " " << shard.inode
               << (shard.cpu >= 0 ? absl::StrCat(", pinned to CPU ", shard.cpu)
                                  : std::string());
  ctx_->Emit(v1::EVENT_TYPE_SHARD_STARTED, listener, shard.index, pid, "");
  return absl::OkStatus();
}

void Supervisor::StartOrRetry(Listener& listener, Shard& shard) {
  absl::Status s = Start(listener, shard);
  if (s.ok()) return;
  PF_LOG(ERROR) << s << "; retrying in " << HumanDuration(shard.backoff);
  ctx_->Emit(v1::EVENT_TYPE_ERROR, listener, shard.index, 0,
             std::string(s.message()));
  ScheduleRestart(listener, shard);
}

absl::Status Supervisor::Adopt(Listener& listener, Shard& shard,
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
  worker->control.emplace(std::move(adoptee.control));
  worker->started = ctx_->Now();
  worker->hello = true;
  worker->adopted = true;
  worker->ready = true;  // it has been serving all along
  RETURN_IF_ERROR(Watch(listener, shard, *worker));
  pid_t pid = worker->process.pid;
  shard.worker = std::move(worker);
  shard.state = v1::SHARD_STATE_RUNNING;
  PF_LOG(INFO) << listener.Name(shard) << ": re-adopted worker pid " << pid
               << " on its socket inode " << shard.inode;
  ctx_->Emit(v1::EVENT_TYPE_SHARD_STARTED, listener, shard.index, pid,
             "re-adopted");
  return absl::OkStatus();
}

absl::Status Supervisor::Watch(Listener& listener, Shard& shard,
                               Worker& worker) {
  Listener* l = &listener;
  Shard* s = &shard;
  Worker* w = &worker;
  RETURN_IF_ERROR(
      ctx_->loop->AddFd(worker.process.pidfd.get(),
                        [this, l, s, w](uint32_t) { OnExit(*l, *s, w); }));
  if (worker.control) {
    absl::Status watched = ctx_->loop->AddFd(
        worker.control->fd(),
        [this, l, s, w](uint32_t) { OnControlReadable(*l, *s, w); });
    if (!watched.ok()) {
      PF_LOG(WARNING) << listener.Name(shard)
                      << ": control channel not watched: " << watched;
      worker.control.reset();
    }
  }
  return absl::OkStatus();
}

void Supervisor::AwaitReady(Worker& worker,
                            std::function<void(absl::Status)> done) {
  if (worker.ready) {
    done(absl::OkStatus());
    return;
  }
  worker.on_ready = std::move(done);
}

void Supervisor::ArmReadiness(Listener& listener, Shard& shard,
                              Worker& worker) {
  Listener* l = &listener;
  Shard* s = &shard;
  Worker* w = &worker;
  // A worker that says nothing (no control channel) counts as ready once it
  // has stayed up for the grace period (or, earlier, once the health monitor
  // sees it drain its queue); one that says hello is awaited until ready.
  w->timers.push_back(
      ctx_->loop->AddTimer(ctx_->options.ready_grace, [this, l, s, w] {
        if (w->hello || w->ready) return;
        MarkReady(*l, *s, *w,
                  "no control channel; "
                  "up for the ready "
                  "grace period");
      }));
  w->timers.push_back(
      ctx_->loop->AddTimer(ctx_->options.ready_timeout,
                           [this, l, s, w] { ReadyTimeout(*l, *s, w); }));
}

void Supervisor::ReadyTimeout(Listener& listener, Shard& shard, Worker* w) {
  if (w->ready) return;
  if (w->self_bound) {
    NoSocketFound(listener, shard, w);
    return;
  }
  std::string why =
      absl::StrCat("worker pid ", w->process.pid, " was not ready within ",
                   absl::FormatDuration(ctx_->options.ready_timeout));
  if (w->on_ready) {
    // A scale-up or rollout waits for it: it decides what happens.
    TakeWaiter (*w)(absl::UnavailableError(absl::StrCat(
        "new worker pid ", w->process.pid, " was not ready within ",
        absl::FormatDuration(ctx_->options.ready_timeout))));
    return;
  }
  if (shard.worker.get() != w || shard.draining()) return;
  Replace(listener, shard, why + " (it said hello but never ready)");
}

void Supervisor::MarkReady(Listener& listener, Shard& shard, Worker& worker,
                           absl::string_view how) {
  if (worker.ready) return;
  worker.ready = true;
  if (shard.worker.get() == &worker) shard.health.ever_ready = true;
  if (auto waiter = TakeWaiter(worker)) {
    waiter(absl::OkStatus());
    return;
  }
  PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << worker.process.pid
               << " ready" << (how.empty() ? "" : " (") << how
               << (how.empty() ? "" : ")");
  ctx_->Emit(v1::EVENT_TYPE_SHARD_STARTED, listener, shard.index,
             worker.process.pid,
             how.empty() ? std::string("worker ready")
                         : absl::StrCat("worker ready (", how, ")"));
}

void Supervisor::Replace(Listener& listener, Shard& shard,
                         const std::string& why) {
  if (!shard.worker) return;
  pid_t pid = shard.worker->process.pid;
  shard.health.replacing = true;
  shard.health.replacements++;
  PF_LOG(WARNING) << listener.Name(shard) << ": " << why
                  << "; SIGKILL to worker pid " << pid
                  << (OwnsItsSocket(shard)
                          ? std::string(" and a new worker (it binds a new "
                                        "socket)")
                          : absl::StrCat(" and a new worker on the same "
                                         "socket (inode ",
                                         shard.inode, ")"));
  ctx_->Emit(v1::EVENT_TYPE_SHARD_REPLACED, listener, shard.index, pid, why);
  Signal(*shard.worker, SIGKILL);
}

bool Supervisor::Signal(Worker& worker, int sig) {
  if (sig == SIGKILL) worker.killed = true;
  return ctx_->launcher->Signal(worker.process, sig);
}

void Supervisor::SendDrainOrTerm(Worker& worker, uint32_t timeout_seconds) {
  worker.stop_by = ctx_->Now() + absl::Seconds(timeout_seconds);
  bool told = false;
  // Only a worker that spoke on its control channel reads it; any other
  // (gunicorn, nginx) drains on SIGTERM.
  if (worker.control && worker.hello) {
    v1::AgentMessage msg;
    msg.mutable_drain()->set_deadline_ms(timeout_seconds * 1000);
    told = worker.control->Send(msg).ok();
  }
  if (!told) Signal(worker, SIGTERM);
}

void Supervisor::TellDrain(const Listener& listener, Worker& worker) {
  SendDrainOrTerm(worker, EffectiveDrainTimeoutSeconds(listener.spec));
}

void Supervisor::Retire(Listener& listener, Shard& shard,
                        std::unique_ptr<Worker> worker) {
  if (!worker) return;
  Worker* w = worker.get();
  uint32_t timeout = EffectiveDrainTimeoutSeconds(listener.spec);
  if (w->self_bound) {
    // Its socket was shut down (SwapInCandidateSocket): its accept() fails
    // and it may stop by itself; SIGTERM after a grace, as in a drain.
    w->stop_by = ctx_->Now() + absl::Seconds(timeout);
    w->timers.push_back(ctx_->loop->AddTimer(
        std::min(kSelfBoundTermGrace, absl::Seconds(timeout) / 2),
        [this, w] { Signal(*w, SIGTERM); }));
  } else {
    SendDrainOrTerm(*w, timeout);
  }
  Listener* l = &listener;
  Shard* s = &shard;
  pid_t pid = w->process.pid;
  w->timers.push_back(
      ctx_->loop->AddTimer(absl::Seconds(timeout), [this, l, s, w, pid] {
        PF_LOG(WARNING) << l->Name(*s) << ": old worker pid " << pid
                        << " still running after the drain timeout; SIGKILL";
        Signal(*w, SIGKILL);
      }));
  shard.retiring.push_back(std::move(worker));
}

void Supervisor::KillAndReap(Shard& shard) {
  if (!shard.worker) return;
  Signal(*shard.worker, SIGKILL);
  for (int i = 0; i < 500; ++i) {
    auto r = ctx_->launcher->Reap(shard.worker->process);
    if (!r.ok() || r->has_value()) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  Detach(shard);
}

void Supervisor::Forget(Worker& worker) {
  ctx_->loop->RemoveFd(worker.process.pidfd.get());
  if (worker.control) ctx_->loop->RemoveFd(worker.control->fd());
  for (EventLoop::TimerId t : worker.timers) ctx_->loop->CancelTimer(t);
  worker.timers.clear();
}

void Supervisor::Detach(Shard& shard) {
  if (!shard.worker) return;
  Forget(*shard.worker);
  shard.worker.reset();
}

void Supervisor::CancelRestart(Shard& shard) {
  if (!shard.restart_timer) return;
  ctx_->loop->CancelTimer(*shard.restart_timer);
  shard.restart_timer.reset();
}

void Supervisor::OnExit(Listener& listener, Shard& shard, Worker* w) {
  absl::StatusOr<std::optional<int>> status = ctx_->launcher->Reap(w->process);
  if (status.ok() && !status->has_value()) return;  // spurious wake-up
  pid_t pid = w->process.pid;
  std::string how = status.ok() ? DescribeWaitStatus(**status)
                                : std::string(status.status().message());
  if (w->adopted) {
    how = "exited (not the agent's child: its exit status went to its parent)";
  }
  absl::Duration uptime = ctx_->Now() - w->started;
  std::function<void(absl::Status)> waiter = TakeWaiter(*w);
  Forget(*w);
  KeepRemnant(listener, shard, *w);
  // Its group id marks what it leaves behind (see OrphanScanner).
  shard.past_groups.push_back(pid);
  if (shard.past_groups.size() > 16) {
    shard.past_groups.erase(shard.past_groups.begin());
  }

  // Take the worker out of the shard before anyone hears of it.
  enum class Role { kServing, kCandidate, kRetiring } role = Role::kRetiring;
  std::unique_ptr<Worker> gone;
  if (shard.worker.get() == w) {
    gone = std::move(shard.worker);
    role = Role::kServing;
  } else if (shard.candidate.get() == w) {
    gone = std::move(shard.candidate);
    role = Role::kCandidate;
  } else {
    auto it = std::find_if(
        shard.retiring.begin(), shard.retiring.end(),
        [w](const std::unique_ptr<Worker>& p) { return p.get() == w; });
    if (it != shard.retiring.end()) {
      gone = std::move(*it);
      shard.retiring.erase(it);
    }
  }
  if (waiter) {
    // Someone waited for this worker to become ready (scale-up, rollout):
    // they decide what happens to the shard, which may remove it.
    PF_LOG(WARNING) << listener.Name(shard) << ": new worker pid " << pid << " "
                    << how << " before it was ready";
    std::weak_ptr<int> alive = shard.lifetime;
    waiter(absl::UnavailableError(
        absl::StrCat("worker pid ", pid, " ", how, " before it was ready")));
    if (alive.expired()) return;
  } else if (role == Role::kServing) {
    OnServingExit(listener, shard, pid, how, uptime);
  } else {
    PF_LOG(INFO) << listener.Name(shard)
                 << (role == Role::kCandidate ? ": new worker pid "
                                              : ": old worker pid ")
                 << pid << " " << how
                 << (role == Role::kRetiring ? " (retired)" : "");
  }
  gone_(listener, shard);  // may destroy `shard`
}

void Supervisor::OnServingExit(Listener& listener, Shard& shard, int pid,
                               const std::string& how, absl::Duration uptime) {
  if (shard.draining()) {
    PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid << " " << how
                 << " (drained)";
    return;
  }
  if (ctx_->shutting_down || shard.state == v1::SHARD_STATE_STOPPING) {
    shard.state = v1::SHARD_STATE_STOPPED;
    PF_LOG(INFO) << listener.Name(shard) << ": worker pid " << pid << " " << how
                 << " (stopping)";
    return;
  }
  // A self-bound worker's socket dies with it (nobody will accept on it):
  // its queue goes to the live shards, its replacement binds a new one.
  if (OwnsItsSocket(shard)) RetireSocket(listener, shard, pid);
  if (shard.adopted) {
    // Not ours to restart: the shard goes (see Drainer::OnWorkerGone), and
    // the desired count with it (persisted with the next change).
    shard.state = v1::SHARD_STATE_DRAINING;
    listener.spec.set_shards(static_cast<uint32_t>(listener.Live().size()));
    PF_LOG(WARNING) << listener.Name(shard) << ": adopted process pid " << pid
                    << " " << how << "; the shard is removed";
    ctx_->Emit(
        v1::EVENT_TYPE_SHARD_EXITED, listener, shard.index, pid,
        absl::StrCat("adopted process pid ", pid, " ", how, "; shard removed"));
    return;
  }
  if (shard.health.replacing) {
    shard.health.replacing = false;
    PF_LOG(INFO) << listener.Name(shard) << ": replaced worker pid " << pid
                 << " " << how << "; starting its replacement";
    shard.restarts++;
    if (absl::Status st = Start(listener, shard); !st.ok()) {
      PF_LOG(ERROR) << st << "; retrying in " << HumanDuration(shard.backoff);
      ctx_->Emit(v1::EVENT_TYPE_ERROR, listener, shard.index, 0,
                 std::string(st.message()));
      ScheduleRestart(listener, shard);
    }
    return;
  }
  std::string message = absl::StrCat("worker pid ", pid, " ", how, " after ",
                                     HumanDuration(uptime));
  if (uptime < ctx_->options.exit_at_once) {
    absl::StrAppend(&message,
                    " (exited at once: check the worker command, its "
                    "arguments and its output above)");
  }
  ctx_->Emit(v1::EVENT_TYPE_SHARD_EXITED, listener, shard.index, pid, message);
  if (uptime >= ctx_->options.restart_stable_after) {
    shard.backoff = ctx_->options.restart_backoff_initial;
  }
  PF_LOG(WARNING) << listener.Name(shard) << ": " << message
                  << "; restarting in " << HumanDuration(shard.backoff)
                  << (IsSelfBound(shard.program.spec)
                          ? std::string(" (it binds a new socket)")
                          : absl::StrCat(" on the same socket (inode ",
                                         shard.inode, ")"))
                  << ", restarts=" << shard.restarts + 1;
  ScheduleRestart(listener, shard);
}

void Supervisor::ScheduleRestart(Listener& listener, Shard& shard) {
  shard.state = v1::SHARD_STATE_BACKOFF;
  absl::Duration delay = shard.backoff;
  shard.backoff =
      std::min(shard.backoff * 2, ctx_->options.restart_backoff_max);
  Listener* l = &listener;
  Shard* s = &shard;
  shard.restart_timer = ctx_->loop->AddTimer(delay, [this, l, s] {
    s->restart_timer.reset();
    if (ctx_->shutting_down) {
      s->state = v1::SHARD_STATE_STOPPED;
      gone_(*l, *s);
      return;
    }
    s->restarts++;
    absl::Status st = Start(*l, *s);
    if (!st.ok()) {
      PF_LOG(ERROR) << st << "; retrying in " << HumanDuration(s->backoff);
      ctx_->Emit(v1::EVENT_TYPE_ERROR, *l, s->index, 0,
                 std::string(st.message()));
      ScheduleRestart(*l, *s);
      return;
    }
    ctx_->Emit(v1::EVENT_TYPE_SHARD_RESTARTED, *l, s->index,
               s->worker->process.pid, absl::StrCat("restarts=", s->restarts));
  });
}

void Supervisor::OnControlReadable(Listener& listener, Shard& shard,
                                   Worker* w) {
  // Bounded per wake-up so that one chatty worker cannot starve the loop.
  for (int i = 0; i < 64 && w->control; ++i) {
    v1::WorkerMessage msg;
    // A hand-off's sockets (two for a proxied pair); closed unless routed.
    std::vector<Fd> attached;
    absl::StatusOr<bool> got = w->control->ReceiveIntoWithFds(&msg, &attached);
    if (got.ok() && !*got) return;
    if (!got.ok()) {
      if (absl::IsUnavailable(got.status())) {
        // The worker closed its channel (or exited): supervision goes on
        // through the pidfd.
        ctx_->loop->RemoveFd(w->control->fd());
        w->control.reset();
        return;
      }
      if (uint64_t dropped; w->complaints.Allow(ctx_->Now(), &dropped)) {
        PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                        << w->process.pid << ": " << got.status().message()
                        << "; ignored" << SuppressedNote(dropped);
      }
      continue;
    }
    bool was_waiting = w->on_ready != nullptr;
    if (msg.has_handoff_connection() || msg.has_handoff_done()) {
      if (ctx_->on_handoff) {
        ctx_->on_handoff(listener, shard, msg, std::move(attached));
      }
      continue;
    }
    OnControlMessage(listener, shard, w, msg);
    // A readiness waiter may have moved `w` to another role: read the rest
    // on the next wake-up.
    if (was_waiting && w->ready) return;
  }
}

void Supervisor::OnControlMessage(Listener& listener, Shard& shard, Worker* w,
                                  const v1::WorkerMessage& msg) {
  switch (msg.msg_case()) {
    case v1::WorkerMessage::kHello:
      w->hello = true;
      w->handoff = msg.hello().handoff();
      w->handoff_pairs = msg.hello().handoff() && msg.hello().handoff_pairs();
      if (msg.hello().socket_inode() != 0 &&
          msg.hello().socket_inode() != shard.inode) {
        PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                        << w->process.pid << " reports socket inode "
                        << msg.hello().socket_inode() << ", expected "
                        << shard.inode;
      }
      PF_LOG(DEBUG) << listener.Name(shard) << ": worker pid " << w->process.pid
                    << " hello (version " << msg.hello().version() << ")";
      break;
    case v1::WorkerMessage::kReady:
      MarkReady(listener, shard, *w, "");
      break;
    case v1::WorkerMessage::kLoad:
      w->active_connections = msg.load().active_connections();
      w->accepted_total = msg.load().accepted_total();
      w->bytes_in_total = msg.load().bytes_in_total();
      w->bytes_out_total = msg.load().bytes_out_total();
      w->requests_total = msg.load().requests_total();
      AddHandOffPauses(msg.load().handoff_pauses(), *w, shard, listener);
      w->reports = true;
      w->last_report = ctx_->Now();
      break;
    case v1::WorkerMessage::kDrained:
      PF_LOG(DEBUG) << listener.Name(shard) << ": worker pid " << w->process.pid
                    << " drained";
      break;
    case v1::WorkerMessage::kTakeoverRequest:
    case v1::WorkerMessage::kTakeoverReady:
      if (uint64_t dropped; w->complaints.Allow(ctx_->Now(), &dropped)) {
        PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                        << w->process.pid
                        << " sent a takeover message on its control channel; "
                           "ignored"
                        << SuppressedNote(dropped);
      }
      break;
    case v1::WorkerMessage::kHandoffConnection:
    case v1::WorkerMessage::kHandoffDone:
      break;  // routed in OnControlReadable
    case v1::WorkerMessage::MSG_NOT_SET:
      if (uint64_t dropped; w->complaints.Allow(ctx_->Now(), &dropped)) {
        PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                        << w->process.pid
                        << " sent an empty control message; ignored"
                        << SuppressedNote(dropped);
      }
      break;
  }
}

}  // namespace portfleet
