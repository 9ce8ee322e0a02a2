#include "agent/declarative.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "agent/spec/spec.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

SpecFormat FormatOf(const std::string& path) {
  return absl::EndsWith(absl::AsciiStrToLower(path), ".json")
             ? SpecFormat::kJson
             : SpecFormat::kTextproto;
}

absl::StatusOr<std::string> ReadConfigFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoError(absl::StrCat("cannot read config file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return ErrnoError(absl::StrCat("reading config file ", path));
  return ss.str();
}

std::string Describe(const v1::ListenerPlan& plan) {
  switch (plan.action()) {
    case v1::ListenerPlan::ACTION_CREATE:
      return absl::StrCat("created ", plan.name());
    case v1::ListenerPlan::ACTION_DELETE:
      return absl::StrCat("deleted ", plan.name());
    case v1::ListenerPlan::ACTION_UPDATE:
      return absl::StrCat("updated ", plan.name(), " (",
                          absl::StrJoin(plan.changed_fields(), ", "), ")");
    default:
      return "";
  }
}

}  // namespace

std::string ConfigHash(const std::string& bytes) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return absl::StrFormat("%016x", h);
}

ConfigReconciler::ConfigReconciler(EventLoop* loop, std::string path,
                                   ConfigReconcilerHooks hooks,
                                   ConfigWatchOptions watch)
    : loop_(loop),
      path_(std::move(path)),
      hooks_(std::move(hooks)),
      watch_options_(watch) {
  status_.set_mode(v1::CONFIG_MODE_DECLARATIVE);
  status_.set_file(path_);
}

ConfigReconciler::~ConfigReconciler() { *alive_ = false; }

absl::Status ConfigReconciler::Start() {
  stopped_ = false;
  watcher_ = std::make_unique<ConfigFileWatcher>(
      loop_, path_, watch_options_, [this] { Check(/*force=*/false); });
  absl::Status watched = watcher_->Start();
  if (watched.ok()) {
    PF_LOG(INFO) << "declarative config: watching " << path_
                 << "; the fleet follows the file";
  } else {
    watcher_.reset();  // the file is still applied now and on SIGHUP
  }
  Check(/*force=*/false);
  return watched;
}

void ConfigReconciler::Stop() {
  stopped_ = true;
  watcher_.reset();
  // What a reconcile in flight would still do is dropped (its changes
  // finish in the fleet); a later Start begins afresh.
  *alive_ = false;
  alive_ = std::make_shared<bool>(true);
  running_ = false;
  again_ = false;
  again_force_ = false;
  std::lock_guard<std::mutex> lock(mu_);
  status_.set_reconciling(false);
}

void ConfigReconciler::Reload() {
  PF_LOG(INFO) << "declarative config: reloading " << path_;
  Check(/*force=*/true);
}

v1::ConfigSource ConfigReconciler::Status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

void ConfigReconciler::Publish(v1::EventType type, const std::string& message) {
  if (!hooks_.publish) return;
  hooks_.publish(FleetEvent{.type = type,
                            .time = absl::Now(),
                            .listener = "",
                            .shard = -1,
                            .pid = 0,
                            .message = message});
}

void ConfigReconciler::Check(bool force) {
  if (stopped_) return;
  if (running_) {
    again_ = true;
    again_force_ = again_force_ || force;
    return;
  }
  absl::StatusOr<std::string> bytes = ReadConfigFile(path_);
  if (!bytes.ok()) {
    // Never an empty fleet: a file that cannot be read changes nothing.
    Reject(v1::EVENT_TYPE_CONFIG_REJECTED,
           absl::StrCat("unreadable: ", bytes.status().message()),
           absl::StrCat(bytes.status().message(),
                        " (the fleet is kept as it is)"));
    return;
  }
  std::string hash = ConfigHash(*bytes);
  if (bytes->empty()) {
    // More likely a file caught between truncate and write than a wish to
    // delete every listener (a file with only a comment says that).
    Reject(v1::EVENT_TYPE_CONFIG_REJECTED, hash,
           absl::StrCat("config file ", path_,
                        " is empty (the fleet is kept as it is; to remove "
                        "every listener, write a file with only a comment)"));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    bool seen = hash == (status_.error().empty() ? status_.applied_hash()
                                                 : status_.error_hash());
    if (seen && !force) return;
  }
  Reconcile(*bytes, hash);
}

void ConfigReconciler::Reject(v1::EventType type, const std::string& hash,
                              const std::string& error) {
  bool repeated;
  {
    std::lock_guard<std::mutex> lock(mu_);
    repeated = status_.error() == error && status_.error_hash() == hash;
    status_.set_error(error);
    status_.set_error_hash(hash);
    status_.set_reconciling(false);
  }
  if (repeated) return;
  PF_LOG(ERROR) << "declarative config "
                << (type == v1::EVENT_TYPE_CONFIG_REJECTED ? "rejected"
                                                           : "apply failed")
                << ": " << error;
  Publish(type, error);
}

void ConfigReconciler::Reconcile(const std::string& bytes,
                                 const std::string& hash) {
  absl::StatusOr<v1::FleetSpec> spec =
      ParseFleetSpec(bytes, FormatOf(path_), path_);
  if (!spec.ok()) {
    Reject(
        v1::EVENT_TYPE_CONFIG_REJECTED, hash,
        absl::StrCat(spec.status().message(), " (the fleet is kept as it is)"));
    return;
  }
  const v1::FleetSpec current = hooks_.desired();
  std::map<std::string, const v1::Listener*> now;
  for (const v1::Listener& l : current.listeners()) now[l.name()] = &l;
  std::vector<Change> changes;
  std::map<std::string, bool> in_file;
  for (v1::Listener l : spec->listeners()) {
    MakeCommandAbsolute(l.mutable_worker());
    in_file[l.name()] = true;
    auto it = now.find(l.name());
    if (it == now.end()) {
      changes.push_back({Change::kCreate, l.name(), l});
    } else if (it->second->address() != l.address()) {
      // The address of a listener cannot change in place.
      changes.push_back({Change::kDelete, l.name(), {}});
      changes.push_back({Change::kCreate, l.name(), l});
    } else {
      changes.push_back({Change::kUpdate, l.name(), l});
    }
  }
  for (const v1::Listener& l : current.listeners()) {
    if (!in_file.count(l.name())) {
      changes.push_back({Change::kDelete, l.name(), {}});
    }
  }
  // Addresses given up by listeners this file deletes: a create that takes
  // one over can only be checked on its own before the delete.
  std::map<std::string, bool> freed;
  for (const Change& c : changes) {
    if (c.kind == Change::kDelete) freed[now.at(c.name)->address()] = true;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    status_.set_reconciling(true);
  }
  running_ = true;
  auto plans = std::make_shared<std::vector<v1::ListenerPlan>>(changes.size());
  std::vector<Op> ops = Ops(changes, 0, changes.size());
  for (size_t i = 0; i < changes.size(); ++i) {
    const Change& c = changes[i];
    if (c.kind == Change::kCreate &&
        (freed.count(c.spec.address()) || now.count(c.name))) {
      // Created where a listener is deleted first: checked on its own.
      ops[i] = [spec = c.spec, plans, i](MutationCall call) {
        v1::ListenerPlan& p = (*plans)[i];
        p.set_name(spec.name());
        p.set_action(v1::ListenerPlan::ACTION_CREATE);
        *p.mutable_desired() = spec;
        absl::Status s = ValidateListener(spec);
        call.done(s.ok() ? s : Annotate(s, "listener " + spec.name()));
      };
      continue;
    }
    // The real call as a dry run (validate_only): its plan, nothing changed.
    ops[i] = [op = std::move(ops[i]), plans, i](MutationCall call) {
      call.plan = [plans, i](v1::ListenerPlan p) {
        (*plans)[i] = std::move(p);
      };
      op(std::move(call));
    };
  }
  RunAll(std::move(ops),
         [this, hash, changes, plans](std::vector<absl::Status> results) {
           Planned(hash, changes, std::move(results), *plans);
         });
}

namespace {

// "listener NAME: cause" for each failed change (`names` in the same order).
std::vector<std::string> Failures(const std::vector<absl::Status>& results,
                                  const std::vector<std::string>& names) {
  std::vector<std::string> out;
  for (size_t i = 0; i < results.size(); ++i) {
    if (results[i].ok()) continue;
    std::string message(results[i].message());
    if (!absl::StrContains(message, names[i])) {
      message = absl::StrCat("listener ", names[i], ": ", message);
    }
    out.push_back(message);
  }
  return out;
}

}  // namespace

std::vector<std::string> ConfigReconciler::Names(
    const std::vector<Change>& changes) {
  std::vector<std::string> out;
  for (const Change& c : changes) out.push_back(c.name);
  return out;
}

void ConfigReconciler::Planned(std::string hash, std::vector<Change> changes,
                               std::vector<absl::Status> results,
                               std::vector<v1::ListenerPlan> plans) {
  if (stopped_) return;
  std::vector<std::string> errors = Failures(results, Names(changes));
  if (!errors.empty()) {
    running_ = false;
    Reject(v1::EVENT_TYPE_CONFIG_REJECTED, hash,
           absl::StrCat(path_, ": refused (nothing was changed): ",
                        absl::StrJoin(errors, "; ")));
    Done();
    return;
  }
  // Deletions first (an address may move to another listener), then
  // creations and updates; unchanged listeners are left alone.
  std::vector<Change> todo;
  std::vector<std::string> summary;
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < changes.size(); ++i) {
      bool is_delete = changes[i].kind == Change::kDelete;
      if ((pass == 0) != is_delete) continue;
      if (plans[i].action() == v1::ListenerPlan::ACTION_UNCHANGED) continue;
      todo.push_back(changes[i]);
      summary.push_back(Describe(plans[i]));
    }
  }
  if (!todo.empty()) {
    PF_LOG(INFO) << "declarative config " << path_ << " (" << hash
                 << "): " << absl::StrJoin(summary, ", ");
  }
  std::string described =
      todo.empty() ? "no change" : absl::StrJoin(summary, ", ");
  Apply(std::move(hash), std::move(todo), std::move(described));
}

std::vector<ConfigReconciler::Op> ConfigReconciler::Ops(
    const std::vector<Change>& changes, size_t from, size_t to) {
  std::vector<Op> ops;
  FleetController* controller = hooks_.controller;
  for (size_t i = from; i < to; ++i) {
    const Change& c = changes[i];
    switch (c.kind) {
      case Change::kDelete:
        ops.push_back([controller, name = c.name](MutationCall call) {
          controller->DeleteListener(name, std::move(call));
        });
        break;
      case Change::kCreate:
        ops.push_back([controller, spec = c.spec](MutationCall call) {
          controller->CreateListener(spec, std::move(call));
        });
        break;
      case Change::kUpdate:
        ops.push_back([controller, spec = c.spec](MutationCall call) {
          controller->UpdateListener(spec, std::move(call));
        });
        break;
    }
  }
  return ops;
}

void ConfigReconciler::Apply(std::string hash, std::vector<Change> todo,
                             std::string summary) {
  size_t deletes = 0;
  while (deletes < todo.size() && todo[deletes].kind == Change::kDelete) {
    deletes++;
  }
  // Deletions, then the rest; both report into one list in `todo` order.
  std::vector<Op> first = Ops(todo, 0, deletes);
  RunAll(std::move(first),
         [this, hash = std::move(hash), todo = std::move(todo),
          summary = std::move(summary),
          deletes](std::vector<absl::Status> deleted) {
           if (stopped_) return;
           std::vector<Op> second = Ops(todo, deletes, todo.size());
           RunAll(std::move(second),
                  [this, hash, todo, summary, deleted = std::move(deleted)](
                      std::vector<absl::Status> rest) mutable {
                    for (absl::Status& s : rest)
                      deleted.push_back(std::move(s));
                    Finish(hash, Names(todo), summary, deleted);
                  });
         });
}

void ConfigReconciler::Finish(const std::string& hash,
                              const std::vector<std::string>& names,
                              const std::string& summary,
                              const std::vector<absl::Status>& results) {
  running_ = false;
  std::vector<std::string> errors = Failures(results, names);
  if (!errors.empty()) {
    Reject(
        v1::EVENT_TYPE_CONFIG_APPLY_FAILED, hash,
        absl::StrCat(path_, ": applying failed: ", absl::StrJoin(errors, "; "),
                     " (retried when the file changes or on SIGHUP)"));
    Done();
    return;
  }
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation = status_.applied_generation() + 1;
    status_.set_applied_generation(generation);
    status_.set_applied_hash(hash);
    status_.set_applied_time_unix_micros(absl::ToUnixMicros(absl::Now()));
    status_.clear_error();
    status_.clear_error_hash();
    status_.set_reconciling(false);
  }
  PF_LOG(INFO) << "declarative config " << path_ << " applied (generation "
               << generation << ", " << hash << "): " << summary;
  Publish(v1::EVENT_TYPE_CONFIG_APPLIED,
          absl::StrCat(path_, " generation ", generation, " (", hash,
                       "): ", summary));
  Done();
}

void ConfigReconciler::Done() {
  if (!again_ || stopped_) return;
  bool force = again_force_;
  again_ = false;
  again_force_ = false;
  Check(force);
}

void ConfigReconciler::RunAll(
    std::vector<Op> ops, std::function<void(std::vector<absl::Status>)> then) {
  struct Batch {
    std::vector<absl::Status> results;
    size_t remaining = 0;
    std::function<void(std::vector<absl::Status>)> then;
  };
  auto batch = std::make_shared<Batch>();
  batch->results.resize(ops.size());
  batch->remaining = ops.size();
  batch->then = std::move(then);
  std::weak_ptr<bool> alive = alive_;
  EventLoop* loop = loop_;
  if (ops.empty()) {
    loop->Post([alive, batch] {
      if (alive.lock() && *alive.lock()) batch->then({});
    });
    return;
  }
  for (size_t i = 0; i < ops.size(); ++i) {
    MutationCall call;
    call.done = [loop, alive, batch, i](absl::Status s) {
      // Always continued on the loop, never inside the caller's stack.
      loop->Post([alive, batch, i, s = std::move(s)]() mutable {
        std::shared_ptr<bool> a = alive.lock();
        if (!a || !*a) return;
        batch->results[i] = std::move(s);
        if (--batch->remaining == 0) batch->then(std::move(batch->results));
      });
    };
    ops[i](std::move(call));
  }
}

ConfigModeController::ConfigModeController(FleetController* inner,
                                           ConfigMode mode,
                                           std::string config_file,
                                           const ConfigReconciler* reconciler)
    : inner_(inner),
      mode_(mode),
      config_file_(std::move(config_file)),
      reconciler_(reconciler) {}

absl::Status ConfigModeController::Refusal(const char* method,
                                           const std::string& listener) const {
  if (mode_ != ConfigMode::kDeclarative) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      method, " of listener ", listener,
      " refused: the agent runs with --config-mode=declarative and the "
      "config file ",
      config_file_,
      " is the source of truth for the fleet; change the file instead (reads, "
      "shard maintenance and pausing a rollout stay allowed)"));
}

AgentStatus ConfigModeController::GetStatus() {
  AgentStatus s = inner_->GetStatus();
  if (reconciler_ != nullptr) {
    s.config = reconciler_->Status();
  } else {
    s.config.set_mode(mode_ == ConfigMode::kDeclarative
                          ? v1::CONFIG_MODE_DECLARATIVE
                          : v1::CONFIG_MODE_SEED);
    s.config.set_file(config_file_);
  }
  return s;
}

void ConfigModeController::CreateListener(const v1::Listener& spec,
                                          MutationCall call) {
  if (absl::Status s = Refusal("CreateListener", spec.name()); !s.ok()) {
    return call.done(s);
  }
  inner_->CreateListener(spec, std::move(call));
}

void ConfigModeController::UpdateListener(const v1::Listener& spec,
                                          MutationCall call) {
  if (absl::Status s = Refusal("UpdateListener", spec.name()); !s.ok()) {
    return call.done(s);
  }
  inner_->UpdateListener(spec, std::move(call));
}

void ConfigModeController::DeleteListener(const std::string& name,
                                          MutationCall call) {
  if (absl::Status s = Refusal("DeleteListener", name); !s.ok()) {
    return call.done(s);
  }
  inner_->DeleteListener(name, std::move(call));
}

void ConfigModeController::ScaleListener(const std::string& name,
                                         uint32_t shards, MutationCall call) {
  if (absl::Status s = Refusal("ScaleListener", name); !s.ok()) {
    return call.done(s);
  }
  inner_->ScaleListener(name, shards, std::move(call));
}

void ConfigModeController::DrainShard(const std::string& name, uint32_t index,
                                      MutationCall call) {
  // Draining a shard removes it from the desired state (one shard fewer).
  if (absl::Status s = Refusal("DrainShard", name); !s.ok()) {
    return call.done(s);
  }
  inner_->DrainShard(name, index, std::move(call));
}

void ConfigModeController::AdoptListener(
    const std::string& name, pid_t pid,
    std::shared_ptr<std::vector<uint32_t>> indexes, MutationCall call) {
  if (absl::Status s = Refusal("AdoptListener", name); !s.ok()) {
    return call.done(s);
  }
  inner_->AdoptListener(name, pid, std::move(indexes), std::move(call));
}

void ConfigModeController::SetSteering(const std::string& name,
                                       const v1::Steering& steering,
                                       MutationCall call) {
  if (absl::Status s = Refusal("SetSteering", name); !s.ok()) {
    return call.done(s);
  }
  inner_->SetSteering(name, steering, std::move(call));
}

void ConfigModeController::RollOut(const std::string& name,
                                   const RollOutOptions& options,
                                   MutationCall call) {
  if (absl::Status s = Refusal("RollOutListener", name); !s.ok()) {
    return call.done(s);
  }
  inner_->RollOut(name, options, std::move(call));
}

}  // namespace portfleet
