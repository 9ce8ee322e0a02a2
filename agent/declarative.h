// Declarative mode (--config-mode=declarative): the --config file is the
// source of truth for the fleet.
//
// ConfigReconciler watches the file (ConfigFileWatcher) and, when its bytes
// change, reconciles the fleet to it through the same controller calls as
// the API, so every change keeps the usual lifecycle (drains, rollouts,
// scale, steering):
//   1. read and parse the file; an invalid file is rejected (the fleet is
//      kept, the error names the file, line and field);
//   2. plan every change as a dry run (validate_only): created, updated and
//      deleted listeners; a listener whose address changes is deleted and
//      created again. If any change would be refused the file is rejected
//      and nothing changes;
//   3. delete the listeners the file no longer has (drained);
//   4. create and update the others (an update rolls out a changed worker
//      shard by shard).
// A file that changes while a reconcile runs is reconciled once that one
// ends. A missing or unreadable file is an error, never an empty fleet.
//
// ConfigModeController sits between the API and the real controller: in
// declarative mode it refuses every call that changes the desired state
// (FAILED_PRECONDITION naming the file and mode) and lets reads, shard
// maintenance and pausing a rollout through. GetStatus carries the config
// source.
#ifndef PORTFLEET_AGENT_DECLARATIVE_H_
#define PORTFLEET_AGENT_DECLARATIVE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "agent/config_watch.h"
#include "agent/controller.h"
#include "agent/event_loop.h"
#include "portfleet/v1/agent.pb.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

enum class ConfigMode { kSeed, kDeclarative };

// FNV-1a 64 of `bytes` as 16 hex digits (the config's hash in GetStatus).
std::string ConfigHash(const std::string& bytes);

struct ConfigReconcilerHooks {
  // The controller the changes go through (not owned).
  FleetController* controller = nullptr;
  // The fleet's desired spec (called on the loop thread).
  std::function<v1::FleetSpec()> desired{};
  // Where events go (any thread).
  std::function<void(const FleetEvent&)> publish{};
};

class ConfigReconciler {
 public:
  ConfigReconciler(EventLoop* loop, std::string path,
                   ConfigReconcilerHooks hooks,
                   ConfigWatchOptions watch = ConfigWatchOptions());
  ~ConfigReconciler();
  ConfigReconciler(const ConfigReconciler&) = delete;
  ConfigReconciler& operator=(const ConfigReconciler&) = delete;

  // Loop thread: watches the file and reconciles to it at once. An error
  // says the file cannot be watched; it is reconciled anyway (and on
  // Reload).
  absl::Status Start();
  // Loop thread: no new change starts (one in flight finishes in the
  // fleet); the watch ends. Start may be called again (a takeover that was
  // given up).
  void Stop();
  // Loop thread: reads the file again even if its bytes did not change
  // (SIGHUP: retries a failed apply). Nothing before Start or after Stop.
  void Reload();

  // Any thread.
  v1::ConfigSource Status() const;

 private:
  struct Change {
    enum Kind { kCreate, kUpdate, kDelete } kind;
    std::string name;
    v1::Listener spec;  // create/update
  };
  using Op = std::function<void(MutationCall)>;

  void Check(bool force);
  void Reconcile(const std::string& bytes, const std::string& hash);
  void Planned(std::string hash, std::vector<Change> changes,
               std::vector<absl::Status> results,
               std::vector<v1::ListenerPlan> plans);
  // Deletions, then creations and updates; then Finish.
  void Apply(std::string hash, std::vector<Change> todo, std::string summary);
  void Finish(const std::string& hash, const std::vector<std::string>& names,
              const std::string& summary,
              const std::vector<absl::Status>& results);
  // The controller calls of changes[from, to).
  std::vector<Op> Ops(const std::vector<Change>& changes, size_t from,
                      size_t to);
  static std::vector<std::string> Names(const std::vector<Change>& changes);
  void Reject(v1::EventType type, const std::string& hash,
              const std::string& error);
  void Done();
  // Runs `ops` at once; `then` gets their statuses in order, on the loop.
  void RunAll(std::vector<Op> ops,
              std::function<void(std::vector<absl::Status>)> then);
  void Publish(v1::EventType type, const std::string& message);

  EventLoop* loop_;
  const std::string path_;
  ConfigReconcilerHooks hooks_;
  ConfigWatchOptions watch_options_;
  std::unique_ptr<ConfigFileWatcher> watcher_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  bool stopped_ = true;  // until Start
  bool running_ = false;
  bool again_ = false;        // the file changed while running
  bool again_force_ = false;  // ... or a reload was asked for

  mutable std::mutex mu_;
  v1::ConfigSource status_;  // guarded by mu_
};

// The controller the API talks to: the real one, with the config mode's
// rules in front of it.
class ConfigModeController : public FleetController {
 public:
  // `inner` and `reconciler` (null in seed mode) are not owned.
  ConfigModeController(FleetController* inner, ConfigMode mode,
                       std::string config_file,
                       const ConfigReconciler* reconciler);

  absl::StatusOr<std::vector<ListenerStatus>> ListListeners() override {
    return inner_->ListListeners();
  }
  absl::StatusOr<ListenerStatus> GetListener(const std::string& name) override {
    return inner_->GetListener(name);
  }
  AgentStatus GetStatus() override;
  void CreateListener(const v1::Listener& spec, MutationCall call) override;
  void UpdateListener(const v1::Listener& spec, MutationCall call) override;
  void DeleteListener(const std::string& name, MutationCall call) override;
  void ScaleListener(const std::string& name, uint32_t shards,
                     MutationCall call) override;
  void DrainShard(const std::string& name, uint32_t index,
                  MutationCall call) override;
  void SetSteering(const std::string& name, const v1::Steering& steering,
                   MutationCall call) override;
  void RollOut(const std::string& name, const RollOutOptions& options,
               MutationCall call) override;
  absl::StatusOr<std::vector<v1::RollOut>> ListRollOuts(
      const std::string& name) override {
    return inner_->ListRollOuts(name);
  }
  absl::StatusOr<v1::RollOut> PauseRollOut(const std::string& name,
                                           bool paused) override {
    return inner_->PauseRollOut(name, paused);
  }
  void SetShardMaintenance(const std::string& name, uint32_t index,
                           bool maintenance, MutationCall call) override {
    inner_->SetShardMaintenance(name, index, maintenance, std::move(call));
  }
  // Adopting adds shards to the listener (the desired state): refused in
  // declarative mode like a scale.
  void AdoptListener(const std::string& name, pid_t pid,
                     std::shared_ptr<std::vector<uint32_t>> indexes,
                     MutationCall call) override;
  // A rebalance is runtime state (not in the file): allowed in both modes.
  absl::StatusOr<v1::RebalanceListenerResponse> RebalanceListener(
      const v1::RebalanceListenerRequest& request) override {
    return inner_->RebalanceListener(request);
  }
  uint64_t Subscribe(std::function<void(const FleetEvent&)> sink,
                     absl::Time since) override {
    return inner_->Subscribe(std::move(sink), since);
  }
  std::vector<FleetEvent> Events(absl::Time since) override {
    return inner_->Events(since);
  }
  void Unsubscribe(uint64_t id) override { inner_->Unsubscribe(id); }

 private:
  // OK in seed mode; else the refusal of `method` on `listener`.
  absl::Status Refusal(const char* method, const std::string& listener) const;

  FleetController* inner_;
  const ConfigMode mode_;
  const std::string config_file_;
  const ConfigReconciler* reconciler_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_DECLARATIVE_H_
