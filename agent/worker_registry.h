// The agent's record of the workers it runs (WorkerRegistry in
// control.proto), kept in <state_dir>/workers. A restarted agent reads it to
// know, without CAP_SYS_PTRACE, which running processes are workers of its
// listeners (to wait for their reconnect, or to drain them) and whether a
// process of another uid that connects to the control socket is one of them.
#ifndef PORTFLEET_AGENT_WORKER_REGISTRY_H_
#define PORTFLEET_AGENT_WORKER_REGISTRY_H_

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "portfleet/v1/control.pb.h"

namespace portfleet {

inline constexpr char kWorkerRegistryFileName[] = "workers";

// This boot's id (/proc/sys/kernel/random/boot_id), "" if unreadable.
std::string BootId();

// Replaces <state_dir>/workers with `records` (mode 0600; temp file and
// rename, no fsync: a power loss takes the workers with it).
absl::Status SaveWorkerRegistry(const std::string& state_dir,
                                const std::vector<v1::WorkerRecord>& records);

// True if the process `record` names still runs: same pid, start time and
// effective uid.
bool StillRunning(const v1::WorkerRecord& record);

// The records of <state_dir>/workers whose process still runs (this boot,
// StillRunning). A missing file gives none; an unreadable or corrupt one
// gives none and a warning (the records only help: without them such
// workers are replaced rather than re-adopted).
std::vector<v1::WorkerRecord> LoadLiveWorkers(const std::string& state_dir);

// Workers of a previous agent, by pid (LoadLiveWorkers).
class KnownWorkers {
 public:
  KnownWorkers() = default;
  explicit KnownWorkers(std::vector<v1::WorkerRecord> records);

  // The record of `pid` if its process still runs as recorded, else null.
  const v1::WorkerRecord* Find(pid_t pid) const;
  // The record of a worker serving socket `inode` that still runs.
  const v1::WorkerRecord* FindBySocket(uint64_t inode) const;
  // Whether `uid` is the uid of any record.
  bool HasUid(uid_t uid) const;
  const std::vector<v1::WorkerRecord>& records() const { return records_; }

 private:
  std::vector<v1::WorkerRecord> records_;
};

// Keeps <state_dir>/workers equal to the fleet's workers: Update() with the
// current ones (listener, shard, pid, uid, socket_inode) fills in their
// start time from /proc and writes the file when the set changed. The uid is
// the caller's (the one the worker is started as): a worker just forked
// still runs as the agent. A failed write is logged once and retried on the
// next Update.
class WorkerRegistryWriter {
 public:
  explicit WorkerRegistryWriter(std::string state_dir);

  void Update(std::vector<v1::WorkerRecord> workers);
  // The records as last written (or to be written).
  const std::vector<v1::WorkerRecord>& current() const { return current_; }

 private:
  const std::string state_dir_;
  std::map<pid_t, uint64_t> start_times_;  // cache: /proc read once per pid
  std::vector<v1::WorkerRecord> current_;
  bool written_ = false;
  bool failing_ = false;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_WORKER_REGISTRY_H_
