#include "agent/worker_registry.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <tuple>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "agent/procfs.h"
#include "worker/sdk/base/atomic_file.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

std::string RegistryPath(const std::string& state_dir) {
  return absl::StrCat(state_dir, "/", kWorkerRegistryFileName);
}

auto Key(const v1::WorkerRecord& r) {
  return std::make_tuple(r.listener(), r.shard(), r.pid(), r.uid(),
                         r.start_time(), r.socket_inode());
}

bool SameRecords(const std::vector<v1::WorkerRecord>& a,
                 const std::vector<v1::WorkerRecord>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (Key(a[i]) != Key(b[i])) return false;
  }
  return true;
}

}  // namespace

std::string BootId() {
  return std::string(absl::StripAsciiWhitespace(
      ReadProcFile("/proc/sys/kernel/random/boot_id")));
}

absl::Status SaveWorkerRegistry(const std::string& state_dir,
                                const std::vector<v1::WorkerRecord>& records) {
  v1::WorkerRegistry registry;
  registry.set_boot_id(BootId());
  for (const v1::WorkerRecord& r : records) *registry.add_workers() = r;
  std::string bytes = registry.SerializeAsString();
  if (::mkdir(state_dir.c_str(), 0750) != 0 && errno != EEXIST) {
    return ErrnoError(absl::StrCat("mkdir ", state_dir));
  }
  // No fsync: a power loss takes the workers with it.
  return ReplaceFileAtomically(state_dir, kWorkerRegistryFileName, bytes, 0600,
                               Durability::kProcessCrash);
}

bool StillRunning(const v1::WorkerRecord& record) {
  pid_t pid = static_cast<pid_t>(record.pid());
  std::optional<ProcIds> ids = ProcessIds(pid);
  if (!ids || ids->state == 'Z' || ids->start_time != record.start_time()) {
    return false;
  }
  std::optional<uid_t> uid = ProcessEffectiveUid(pid);
  return uid && *uid == record.uid();
}

std::vector<v1::WorkerRecord> LoadLiveWorkers(const std::string& state_dir) {
  std::vector<v1::WorkerRecord> out;
  const std::string path = RegistryPath(state_dir);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) {
    if (errno != ENOENT) {
      PF_LOG(WARNING) << "worker records " << path << ": " << strerror(errno)
                      << " (workers of another user left by a previous agent "
                         "are replaced, not re-adopted)";
    }
    return out;
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) ||
      st.st_uid != ::geteuid() || (st.st_mode & 022) != 0) {
    PF_LOG(WARNING) << "worker records " << path
                    << ": not a regular file of this agent's uid that only it "
                       "can write; ignored";
    return out;
  }
  std::string bytes;
  char chunk[16384];
  for (;;) {
    ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      PF_LOG(WARNING) << "worker records " << path
                      << ": read: " << strerror(errno) << "; ignored";
      return out;
    }
    if (n == 0) break;
    bytes.append(chunk, static_cast<size_t>(n));
    if (bytes.size() > (16u << 20)) {
      PF_LOG(WARNING) << "worker records " << path
                      << ": larger than 16 MiB; ignored";
      return out;
    }
  }
  v1::WorkerRegistry registry;
  if (!registry.ParseFromString(bytes)) {
    PF_LOG(WARNING) << "worker records " << path
                    << ": not a WorkerRegistry; ignored";
    return out;
  }
  if (registry.boot_id() != BootId()) {
    PF_LOG(INFO) << "worker records " << path
                 << " are of another boot; ignored";
    return out;
  }
  for (const v1::WorkerRecord& r : registry.workers()) {
    if (r.pid() > 0 && StillRunning(r)) out.push_back(r);
  }
  PF_LOG(INFO) << "worker records " << path << ": " << out.size() << " of "
               << registry.workers_size() << " recorded worker(s) still run";
  return out;
}

KnownWorkers::KnownWorkers(std::vector<v1::WorkerRecord> records)
    : records_(std::move(records)) {}

const v1::WorkerRecord* KnownWorkers::Find(pid_t pid) const {
  for (const v1::WorkerRecord& r : records_) {
    if (static_cast<pid_t>(r.pid()) == pid) {
      return StillRunning(r) ? &r : nullptr;
    }
  }
  return nullptr;
}

const v1::WorkerRecord* KnownWorkers::FindBySocket(uint64_t inode) const {
  for (const v1::WorkerRecord& r : records_) {
    if (r.socket_inode() == inode && StillRunning(r)) return &r;
  }
  return nullptr;
}

bool KnownWorkers::HasUid(uid_t uid) const {
  return std::any_of(
      records_.begin(), records_.end(),
      [uid](const v1::WorkerRecord& r) { return r.uid() == uid; });
}

WorkerRegistryWriter::WorkerRegistryWriter(std::string state_dir)
    : state_dir_(std::move(state_dir)) {}

void WorkerRegistryWriter::Update(std::vector<v1::WorkerRecord> workers) {
  std::map<pid_t, uint64_t> seen;
  std::vector<v1::WorkerRecord> next;
  next.reserve(workers.size());
  for (v1::WorkerRecord& r : workers) {
    pid_t pid = static_cast<pid_t>(r.pid());
    auto cached = start_times_.find(pid);
    uint64_t start_time;
    if (cached != start_times_.end()) {
      start_time = cached->second;
    } else {
      std::optional<ProcIds> ids = ProcessIds(pid);
      if (!ids) continue;  // gone already
      start_time = ids->start_time;
    }
    seen[pid] = start_time;
    r.set_start_time(start_time);
    next.push_back(std::move(r));
  }
  start_times_ = std::move(seen);
  std::sort(next.begin(), next.end(),
            [](const v1::WorkerRecord& a, const v1::WorkerRecord& b) {
              return Key(a) < Key(b);
            });
  if (written_ && !failing_ && SameRecords(next, current_)) return;
  current_ = std::move(next);
  absl::Status s = SaveWorkerRegistry(state_dir_, current_);
  if (!s.ok()) {
    if (!failing_) {
      PF_LOG(WARNING) << "saving the worker records: " << s.message()
                      << " (retried on every change; until then an agent "
                         "restart replaces workers of another user instead "
                         "of re-adopting them)";
    }
    failing_ = true;
    return;
  }
  if (failing_) PF_LOG(INFO) << "worker records saved again";
  failing_ = false;
  written_ = true;
}

}  // namespace portfleet
