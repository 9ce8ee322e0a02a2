// Fakes behind the fleet's seams, for unit tests of the fleet logic without
// processes, BPF or privileges:
//   FakeLauncher   ProcessLauncher: "processes" are eventfds that become
//                  readable when the test (or a signal) ends them; the
//                  worker end of each control channel stays with the test.
//   FakeSteering   SteeringBackend: records the tables and socket slots of
//                  each listener; can be told to fail the next write.
//   FakeObserver   ShardObserver: queue depths by socket fd and process
//                  states by pid, as the test sets them (default: empty
//                  queue, running).
// With a ManualClock the event loop runs no real timers: tests advance time.
#ifndef PORTFLEET_TESTS_UNIT_FLEET_FAKES_H_
#define PORTFLEET_TESTS_UNIT_FLEET_FAKES_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "agent/fleet/observer.h"
#include "agent/launcher.h"
#include "agent/steering/steering.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/control_channel.h"

namespace portfleet::testing {

// A loopback port nothing listens on (the kernel's choice, then released).
inline int FreePort() {
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

class FakeLauncher : public ProcessLauncher {
 public:
  struct Process {
    pid_t pid = 0;
    LaunchSpec spec;
    int eventfd = -1;  // the pidfd we handed out (owned by the fleet)
    std::optional<int> wait_status;
    std::vector<int> signals;
    std::vector<std::vector<int>> affinity;  // every SetAffinity, in order
    std::optional<ControlChannel> channel;   // the worker's end
    bool Exited() const { return wait_status.has_value(); }
    std::string Arg(size_t i) const {
      return i < spec.argv.size() ? spec.argv[i] : "";
    }
  };

  // What a new worker does by itself.
  bool auto_ready = true;    // sends hello + ready at once
  bool exit_on_term = true;  // SIGTERM (or AgentDrain) ends it with 0
  // The next Launch fails with this.
  std::optional<absl::Status> fail_next_launch;
  // SetAffinity fails with this for these pids.
  std::map<pid_t, absl::Status> affinity_errors;

  absl::StatusOr<LaunchedProcess> Launch(const LaunchSpec& spec) override {
    if (fail_next_launch) {
      absl::Status s = *fail_next_launch;
      fail_next_launch.reset();
      return s;
    }
    auto p = std::make_unique<Process>();
    p->pid = next_pid_++;
    p->spec = spec;
    int efd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) return absl::InternalError("eventfd");
    p->eventfd = efd;
    if (spec.control_fd >= 0) {
      p->channel.emplace(Fd(::fcntl(spec.control_fd, F_DUPFD_CLOEXEC, 0)));
      if (auto_ready) {
        SendHello(*p);
        SendReady(*p);
      }
    }
    LaunchedProcess out;
    out.pid = p->pid;
    out.pidfd = Fd(efd);
    order_.push_back(p->pid);
    processes_[p->pid] = std::move(p);
    return out;
  }

  bool Signal(const LaunchedProcess& process, int sig) override {
    Process* p = Find(process.pid);
    if (p == nullptr || p->Exited()) return false;
    p->signals.push_back(sig);
    if (sig == SIGKILL) Exit(p->pid, W_EXITCODE(0, SIGKILL));
    if (sig == SIGTERM && exit_on_term) Exit(p->pid, W_EXITCODE(0, 0));
    return true;
  }

  // Process groups that outlive their leader (a pre-fork worker's children):
  // alive until SIGKILL, or SIGTERM with exit_on_term.
  std::set<pid_t> surviving_groups;
  std::vector<std::pair<pid_t, int>> group_signals;
  bool GroupAlive(pid_t pgid) override {
    Process* p = Find(pgid);
    if (p != nullptr && !p->Exited()) return true;
    return surviving_groups.count(pgid) > 0;
  }
  std::vector<pid_t> killed_processes;
  bool KillProcess(pid_t pid) override {
    killed_processes.push_back(pid);
    return true;
  }
  bool SignalGroup(pid_t pgid, int sig) override {
    group_signals.emplace_back(pgid, sig);
    if (!GroupAlive(pgid)) return false;
    if (sig == SIGKILL || (sig == SIGTERM && exit_on_term)) {
      surviving_groups.erase(pgid);
    }
    return true;
  }

  absl::StatusOr<std::optional<int>> Reap(
      const LaunchedProcess& process) override {
    Process* p = Find(process.pid);
    if (p == nullptr) return absl::NotFoundError("no such fake process");
    return p->wait_status;
  }

  absl::Status SetAffinity(const LaunchedProcess& process,
                           const std::vector<int>& cpus) override {
    Process* p = Find(process.pid);
    if (p == nullptr || p->Exited()) return absl::NotFoundError("gone");
    if (auto it = affinity_errors.find(process.pid);
        it != affinity_errors.end()) {
      return it->second;
    }
    p->affinity.push_back(cpus);
    return absl::OkStatus();
  }

  // Ends a process: its pidfd becomes readable; the fleet reaps it on the
  // next loop turn.
  void Exit(pid_t pid, int wait_status) {
    Process* p = Find(pid);
    if (p == nullptr || p->Exited()) return;
    p->wait_status = wait_status;
    uint64_t one = 1;
    ssize_t unused = ::write(p->eventfd, &one, sizeof(one));
    (void)unused;
  }
  void ExitWith(pid_t pid, int code) { Exit(pid, W_EXITCODE(code, 0)); }

  void SendHello(Process& p) {
    v1::WorkerMessage m;
    m.mutable_hello()->set_pid(p.pid);
    p.channel->Send(m).IgnoreError();
  }
  void SendReady(Process& p) {
    v1::WorkerMessage m;
    m.mutable_ready();
    p.channel->Send(m).IgnoreError();
  }
  // Messages the agent sent to the worker (AgentDrain...).
  std::vector<v1::AgentMessage> Received(pid_t pid) {
    std::vector<v1::AgentMessage> out;
    Process* p = Find(pid);
    if (p == nullptr || !p->channel) return out;
    for (;;) {
      auto got = p->channel->Receive<v1::AgentMessage>();
      if (!got.ok() || !got->has_value()) return out;
      out.push_back(**got);
    }
  }

  Process* Find(pid_t pid) {
    auto it = processes_.find(pid);
    return it == processes_.end() ? nullptr : it->second.get();
  }
  // Every process launched, oldest first.
  std::vector<Process*> All() {
    std::vector<Process*> out;
    for (pid_t pid : order_) out.push_back(processes_[pid].get());
    return out;
  }
  std::vector<Process*> Running() {
    std::vector<Process*> out;
    for (Process* p : All()) {
      if (!p->Exited()) out.push_back(p);
    }
    return out;
  }
  size_t launches() const { return order_.size(); }

 private:
  pid_t next_pid_ = 1000;
  std::vector<pid_t> order_;
  std::map<pid_t, std::unique_ptr<Process>> processes_;
};

// Shared by the fake backend and every listener it opened.
struct FakeSteeringState {
  struct Listener {
    bool attached = false;
    std::map<uint32_t, int> sockets;      // slot -> fd
    std::vector<SteeringTables> applied;  // every successful write
    // Every SetConnectionCounts (LEAST_CONNECTIONS).
    std::vector<std::vector<uint64_t>> counts;
    bool pins_removed = false;
  };
  std::map<std::string, Listener> listeners;
  // The next table write fails with this.
  std::optional<absl::Status> fail_next_apply;
};

class FakeListenerSteering : public ListenerSteering {
 public:
  FakeListenerSteering(FakeSteeringState* state, std::string name)
      : state_(state), name_(std::move(name)) {}
  absl::Status AttachTo(int) override {
    me().attached = true;
    return absl::OkStatus();
  }
  absl::Status SetShardSocket(uint32_t shard, int fd) override {
    if (me().sockets.count(shard) > 0) {
      return absl::AlreadyExistsError(absl::StrCat("slot ", shard, " is set"));
    }
    me().sockets[shard] = fd;
    return absl::OkStatus();
  }
  absl::Status ClearShardSocket(uint32_t shard) override {
    me().sockets.erase(shard);
    return absl::OkStatus();
  }
  absl::Status Apply(const SteeringTables& tables) override {
    if (state_->fail_next_apply) {
      absl::Status s = *state_->fail_next_apply;
      state_->fail_next_apply.reset();
      return s;
    }
    me().applied.push_back(tables);
    return absl::OkStatus();
  }
  absl::Status SetConnectionCounts(
      const std::vector<uint64_t>& counts) override {
    me().counts.push_back(counts);
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<ShardCounters>> ReadCounters() override {
    return std::vector<ShardCounters>(64);
  }
  absl::StatusOr<ShardCounters> ReadUnattributedCounters() override {
    return ShardCounters{};
  }
  absl::Status RemovePins() override {
    me().pins_removed = true;
    return absl::OkStatus();
  }

 private:
  FakeSteeringState::Listener& me() { return state_->listeners[name_]; }
  FakeSteeringState* state_;
  std::string name_;
};

class FakeSteering : public SteeringBackend {
 public:
  absl::StatusOr<std::unique_ptr<ListenerSteering>> OpenListener(
      absl::string_view listener) override {
    return std::unique_ptr<ListenerSteering>(
        new FakeListenerSteering(&state, std::string(listener)));
  }
  FakeSteeringState state;
};

class FakeObserver : public ShardObserver {
 public:
  std::map<int, uint32_t> queue_depth;  // by socket fd
  std::map<pid_t, ProcessState> state;  // by pid
  absl::StatusOr<QueueInfo> Queue(int socket_fd) override {
    auto it = queue_depth.find(socket_fd);
    return QueueInfo{.depth = it == queue_depth.end() ? 0 : it->second,
                     .backlog = 1024};
  }
  std::map<uint64_t, std::vector<SocketHolder>> holders;  // by inode
  std::map<uint64_t, std::vector<SocketHolder>> SocketHolders(
      const std::set<uint64_t>& inodes) override {
    std::map<uint64_t, std::vector<SocketHolder>> out;
    for (const auto& [inode, list] : holders) {
      if (inodes.count(inode) > 0) out[inode] = list;
    }
    return out;
  }
  ProcessInfo Process(pid_t pid) override {
    auto it = state.find(pid);
    return ProcessInfo{.state = it == state.end() ? ProcessState::kRunning
                                                  : it->second};
  }
};

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_UNIT_FLEET_FAKES_H_
