// The real SteeringBackend: one instance of bpf/steering.bpf.c per listener,
// its maps pinned under <bpffs_root>/<listener>/ (layout in steering.h).
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/steering/generation.h"
#include "agent/steering/steering.h"
#include "bpf/steering_shared.h"
#include "steering.skel.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

constexpr char kDefaultBpffs[] = "/sys/fs/bpf";

// A generation that was active is not rewritten until this long after the
// switch away from it, so that a program run that read the old `active` word
// has long finished reading its table (runs take well under a microsecond).
constexpr absl::Duration kGenerationHoldoff = absl::Milliseconds(2);

int LibbpfPrint(enum libbpf_print_level level, const char* format,
                va_list args) {
  char buf[1024];
  std::vsnprintf(buf, sizeof(buf), format, args);
  absl::string_view line = absl::StripTrailingAsciiWhitespace(buf);
  PF_LOG(DEBUG) << "libbpf: " << line;
  return 0;
}

void RouteLibbpfLogging() {
  static std::once_flag once;
  std::call_once(once, [] { libbpf_set_print(LibbpfPrint); });
}

// The first line of a small file, or "".
std::string ReadSmallFile(const char* path) {
  std::FILE* f = std::fopen(path, "re");
  if (f == nullptr) return "";
  char line[256] = {};
  if (std::fgets(line, sizeof(line), f) == nullptr) line[0] = '\0';
  std::fclose(f);
  return line;
}

// The value of "Name:" in /proc/self/status, or "".
std::string ProcStatusField(absl::string_view name) {
  std::FILE* f = std::fopen("/proc/self/status", "re");
  if (f == nullptr) return "";
  char line[256];
  std::string out;
  const std::string prefix = absl::StrCat(name, ":");
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    absl::string_view l(line);
    if (absl::ConsumePrefix(&l, prefix)) {
      out = std::string(absl::StripAsciiWhitespace(l));
      break;
    }
  }
  std::fclose(f);
  return out;
}

// Why bpf() was refused with EPERM or EACCES. Without CAP_BPF (or
// CAP_SYS_ADMIN) that is the reason. With it, the kernel would not refuse
// us: a probe (bpf() with an unknown command, which the kernel answers with
// EINVAL to a capable caller) tells whether bpf() itself is blocked, and
// /proc/self/status whether by a seccomp filter (a container runtime's
// default profile allows bpf() only with CAP_SYS_ADMIN) or something else.
std::string PrivilegeHint() {
  constexpr uint64_t kCapSysAdmin = 21, kCapBpf = 39;
  uint64_t eff = 0;
  if (!absl::SimpleHexAtoi(ProcStatusField("CapEff"), &eff)) {
    return " (needs CAP_BPF)";
  }
  const bool bpf = (eff >> kCapBpf) & 1, sys_admin = (eff >> kCapSysAdmin) & 1;
  if (!bpf && !sys_admin) return " (needs CAP_BPF)";
  const char* cap = bpf ? "CAP_BPF" : "CAP_SYS_ADMIN";
  std::string uid_map = ReadSmallFile("/proc/self/uid_map");
  std::vector<absl::string_view> map =
      absl::StrSplit(uid_map, ' ', absl::SkipEmpty());
  if (map.size() >= 3 && absl::StripAsciiWhitespace(map[2]) != "4294967295") {
    return absl::StrCat(" (", cap,
                        " is effective only inside a user namespace; bpf() "
                        "needs it in the initial one: run the agent rootful, "
                        "not in a rootless container)");
  }
  errno = 0;
  long probe = ::syscall(__NR_bpf, 0x7fff, nullptr, 0);
  const int probe_err = errno;
  if (probe == 0 || probe_err != EPERM) {
    return absl::StrCat(" (", cap,
                        " is effective and bpf() is allowed; the kernel "
                        "refused this operation: check kernel lockdown and "
                        "the LSM's bpf policy)");
  }
  const std::string seccomp = ProcStatusField("Seccomp");
  if (seccomp == "2") {
    return absl::StrCat(
        " (", cap,
        " is in the effective set, but a seccomp filter refused bpf(): "
        "container runtimes' default profiles allow bpf() only with "
        "CAP_SYS_ADMIN; run the agent with the seccomp profile "
        "deploy/kubernetes/seccomp/portfleet-agent.json (Localhost) or add "
        "CAP_SYS_ADMIN)");
  }
  return absl::StrCat(" (", cap,
                      " is in the effective set, but bpf() is refused for "
                      "every command: an LSM (AppArmor, SELinux) policy "
                      "denies it)");
}

// errno -> status with a hint for privilege errors.
absl::Status BpfError(int err, absl::string_view what) {
  std::string hint;
  if (err == EPERM || err == EACCES) {
    hint = PrivilegeHint();
  }
  absl::Status s = absl::ErrnoToStatus(err, "");
  return absl::Status(s.code(),
                      absl::StrCat(what, ": ", std::strerror(err), hint));
}

// Move-only owner of the generated skeleton; the destructor closes the
// program and map fds (an attached program stays with its reuseport group).
class SteeringSkeleton {
 public:
  SteeringSkeleton() = default;
  explicit SteeringSkeleton(steering_bpf* skel) : skel_(skel) {}
  ~SteeringSkeleton() {
    if (skel_ != nullptr) steering_bpf__destroy(skel_);
  }
  SteeringSkeleton(const SteeringSkeleton&) = delete;
  SteeringSkeleton& operator=(const SteeringSkeleton&) = delete;
  SteeringSkeleton(SteeringSkeleton&& o) noexcept
      : skel_(std::exchange(o.skel_, nullptr)) {}
  SteeringSkeleton& operator=(SteeringSkeleton&& o) noexcept {
    if (this != &o) {
      if (skel_ != nullptr) steering_bpf__destroy(skel_);
      skel_ = std::exchange(o.skel_, nullptr);
    }
    return *this;
  }

  static absl::StatusOr<SteeringSkeleton> Open() {
    RouteLibbpfLogging();
    errno = 0;
    steering_bpf* skel = steering_bpf__open();
    if (skel == nullptr) {
      return BpfError(errno ? errno : EINVAL, "opening steering BPF object");
    }
    return SteeringSkeleton(skel);
  }

  absl::Status Load() {
    int err = steering_bpf__load(skel_);
    if (err != 0) return BpfError(-err, "loading sk_reuseport program");
    return absl::OkStatus();
  }

  steering_bpf* get() const { return skel_; }
  steering_bpf* operator->() const { return skel_; }

 private:
  steering_bpf* skel_ = nullptr;
};

struct PinnedMap {
  const char* name;  // pin file name
  bpf_map* (*get)(steering_bpf*);
  // Pin directories of agents before this map existed lack it: reusing
  // such a directory creates the map (zeroed) and pins it beside the others.
  bool may_be_missing = false;
};

// "spill" came after the first four, "least" and "conns" after it (see
// bpf/steering_shared.h for why they are maps of their own): all zero they
// are exactly the behaviour of the program that did not know them.
const std::array<PinnedMap, 7> kPinnedMaps = {{
    {"shards", [](steering_bpf* s) { return s->maps.shards; }},
    {"generations", [](steering_bpf* s) { return s->maps.generations; }},
    {"config", [](steering_bpf* s) { return s->maps.config; }},
    {"counters", [](steering_bpf* s) { return s->maps.counters; }},
    {"spill", [](steering_bpf* s) { return s->maps.spill; },
     /*may_be_missing=*/true},
    {"least", [](steering_bpf* s) { return s->maps.least; },
     /*may_be_missing=*/true},
    {"conns", [](steering_bpf* s) { return s->maps.conns; },
     /*may_be_missing=*/true},
}};

absl::Status GetSockInt(int fd, int opt, const char* name, int* value) {
  socklen_t len = sizeof(*value);
  if (::getsockopt(fd, SOL_SOCKET, opt, value, &len) != 0) {
    return ErrnoError(absl::StrCat("getsockopt(fd ", fd, ", ", name, ")"));
  }
  return absl::OkStatus();
}

class BpfListenerSteering : public ListenerSteering {
 public:
  BpfListenerSteering(SteeringSkeleton skel, std::string dir)
      : skel_(std::move(skel)), dir_(std::move(dir)) {}

  absl::Status AttachTo(int listening_socket_fd) override {
    int prog_fd = bpf_program__fd(skel_->progs.pf_steer);
    if (::setsockopt(listening_socket_fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF,
                     &prog_fd, sizeof(prog_fd)) != 0) {
      return ErrnoError(absl::StrCat("attaching steering program to socket fd ",
                                     listening_socket_fd,
                                     " (SO_ATTACH_REUSEPORT_EBPF)"));
    }
    return absl::OkStatus();
  }

  absl::Status SetShardSocket(uint32_t shard, int socket_fd) override {
    RETURN_IF_ERROR(CheckShard(shard));
    int domain = 0, type = 0, protocol = 0, listening = 0;
    RETURN_IF_ERROR(GetSockInt(socket_fd, SO_DOMAIN, "SO_DOMAIN", &domain));
    RETURN_IF_ERROR(GetSockInt(socket_fd, SO_TYPE, "SO_TYPE", &type));
    RETURN_IF_ERROR(
        GetSockInt(socket_fd, SO_PROTOCOL, "SO_PROTOCOL", &protocol));
    RETURN_IF_ERROR(
        GetSockInt(socket_fd, SO_ACCEPTCONN, "SO_ACCEPTCONN", &listening));
    const std::string what =
        absl::StrCat("shard ", shard, " socket fd ", socket_fd, ": ");
    if (domain != AF_INET && domain != AF_INET6) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "SO_DOMAIN ", domain, ", want AF_INET(6)"));
    }
    if (type != SOCK_STREAM) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "SO_TYPE ", type, ", want SOCK_STREAM"));
    }
    if (protocol != IPPROTO_TCP) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "SO_PROTOCOL ", protocol, ", want IPPROTO_TCP"));
    }
    if (!listening) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "not listening (SO_ACCEPTCONN 0)"));
    }
    uint64_t value = static_cast<uint64_t>(socket_fd);
    int err = bpf_map_update_elem(bpf_map__fd(skel_->maps.shards), &shard,
                                  &value, BPF_ANY);
    if (err != 0) {
      return ErrnoError(-err, absl::StrCat(what, "adding to the shards map"));
    }
    return absl::OkStatus();
  }

  absl::Status ClearShardSocket(uint32_t shard) override {
    RETURN_IF_ERROR(CheckShard(shard));
    int err = bpf_map_delete_elem(bpf_map__fd(skel_->maps.shards), &shard);
    if (err != 0 && err != -ENOENT) {
      return ErrnoError(
          -err, absl::StrCat("removing shard ", shard, " from the shards map"));
    }
    return absl::OkStatus();
  }

  absl::Status Apply(const SteeringTables& tables) override {
    ASSIGN_OR_RETURN(pf_generation gen, BuildGeneration(tables));
    ASSIGN_OR_RETURN(pf_spill spill, BuildSpill(tables));
    ASSIGN_OR_RETURN(pf_least least, BuildLeast(tables));
    std::lock_guard<std::mutex> lock(mu_);
    const int config_fd = bpf_map__fd(skel_->maps.config);
    const uint32_t zero = 0;
    pf_config config{};
    int err = bpf_map_lookup_elem(config_fd, &zero, &config);
    if (err != 0) return ErrnoError(-err, "reading the steering config");
    const uint32_t next = (config.active + 1) % PF_GENERATIONS;
    const absl::Time ready = last_switch_ + kGenerationHoldoff;
    const absl::Time now = absl::Now();
    if (now < ready) absl::SleepFor(ready - now);
    // Every part of generation `next` before the flip.
    err = bpf_map_update_elem(bpf_map__fd(skel_->maps.spill), &next, &spill,
                              BPF_ANY);
    if (err != 0) {
      return ErrnoError(-err, absl::StrCat("writing spill shares ", next));
    }
    err = bpf_map_update_elem(bpf_map__fd(skel_->maps.least), &next, &least,
                              BPF_ANY);
    if (err != 0) {
      return ErrnoError(-err, absl::StrCat("writing shard weights ", next));
    }
    err = bpf_map_update_elem(bpf_map__fd(skel_->maps.generations), &next, &gen,
                              BPF_ANY);
    if (err != 0) {
      return ErrnoError(-err, absl::StrCat("writing table generation ", next));
    }
    config.active = next;
    err = bpf_map_update_elem(config_fd, &zero, &config, BPF_ANY);
    if (err != 0) {
      return ErrnoError(-err,
                        absl::StrCat("switching to table generation ", next));
    }
    last_switch_ = absl::Now();
    int spilling = 0;
    for (uint16_t share : spill.share) spilling += share > 0 ? 1 : 0;
    PF_LOG(DEBUG) << "steering " << dir_ << ": generation " << next
                  << " active, policy " << gen.policy << ", " << gen.num_shards
                  << " shards, " << spilling << " CPUs spilling";
    return absl::OkStatus();
  }

  absl::Status SetConnectionCounts(
      const std::vector<uint64_t>& counts) override {
    if (counts.size() > PF_MAX_SHARDS) {
      return absl::InvalidArgumentError(
          absl::StrCat("connection counts: ", counts.size(),
                       " shards, at most ", PF_MAX_SHARDS));
    }
    pf_conns value;
    std::memset(&value, 0, sizeof(value));
    std::copy(counts.begin(), counts.end(), value.count);
    const uint32_t zero = 0;
    int err = bpf_map_update_elem(bpf_map__fd(skel_->maps.conns), &zero, &value,
                                  BPF_ANY);
    if (err != 0) return ErrnoError(-err, "writing connection counts");
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<ShardCounters>> ReadCounters() override {
    std::vector<ShardCounters> out(PF_MAX_SHARDS);
    for (uint32_t i = 0; i < PF_MAX_SHARDS; ++i) {
      ASSIGN_OR_RETURN(out[i], ReadSlot(i));
    }
    return out;
  }

  absl::StatusOr<ShardCounters> ReadUnattributedCounters() override {
    return ReadSlot(PF_MAX_SHARDS);
  }

  absl::Status RemovePins() override {
    for (const PinnedMap& m : kPinnedMaps) {
      std::string path = absl::StrCat(dir_, "/", m.name);
      if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
        return ErrnoError(absl::StrCat("unlinking ", path));
      }
    }
    if (::rmdir(dir_.c_str()) != 0 && errno != ENOENT) {
      return ErrnoError(absl::StrCat("removing ", dir_));
    }
    return absl::OkStatus();
  }

 private:
  static absl::Status CheckShard(uint32_t shard) {
    if (shard >= PF_MAX_SHARDS) {
      return absl::InvalidArgumentError(
          absl::StrCat("shard ", shard, ": at most ", PF_MAX_SHARDS,
                       " shards (0..", PF_MAX_SHARDS - 1, ")"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<ShardCounters> ReadSlot(uint32_t key) {
    const int ncpus = libbpf_num_possible_cpus();
    if (ncpus <= 0) return ErrnoError(-ncpus, "counting possible CPUs");
    std::vector<pf_counters> values(ncpus);
    int err = bpf_map_lookup_elem(bpf_map__fd(skel_->maps.counters), &key,
                                  values.data());
    if (err != 0) {
      return ErrnoError(-err, absl::StrCat("reading counters slot ", key));
    }
    ShardCounters sum;
    for (const pf_counters& v : values) {
      sum.selected += v.selected;
      sum.migrated += v.migrated;
      sum.fallback += v.fallback;
    }
    return sum;
  }

  SteeringSkeleton skel_;
  const std::string dir_;
  std::mutex mu_;
  absl::Time last_switch_ = absl::InfinitePast();
};

// Opens `path` and checks that it matches what the program expects.
absl::StatusOr<Fd> OpenCompatibleMap(const std::string& path, const char* name,
                                     bpf_map* want) {
  errno = 0;
  int raw = bpf_obj_get(path.c_str());
  if (raw < 0) {
    const int err = -raw;
    if (err == ENOENT) {
      return absl::FailedPreconditionError(absl::StrCat(
          "pinned map '", name, "' is missing at ", path,
          " (incomplete pin directory; remove it to start afresh)"));
    }
    return ErrnoError(
        err, absl::StrCat("opening pinned map '", name, "' at ", path));
  }
  Fd fd(raw);
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  int err = bpf_obj_get_info_by_fd(fd.get(), &info, &len);
  if (err != 0) {
    // Not a map at all (e.g. a pinned program).
    return absl::FailedPreconditionError(
        absl::StrCat("pinned object '", name, "' at ", path,
                     " is not a usable BPF map: ", std::strerror(-err)));
  }
  auto mismatch = [&](const char* field, uint64_t have, uint64_t expect) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pinned map '", name, "' at ", path, " is incompatible: ", field, " ",
        have, ", this agent needs ", expect,
        " (remove the pin directory or use a compatible agent)"));
  };
  if (info.type != static_cast<uint32_t>(bpf_map__type(want))) {
    return mismatch("map type", info.type, bpf_map__type(want));
  }
  if (info.key_size != bpf_map__key_size(want)) {
    return mismatch("key size", info.key_size, bpf_map__key_size(want));
  }
  if (info.value_size != bpf_map__value_size(want)) {
    return mismatch("value size", info.value_size, bpf_map__value_size(want));
  }
  if (info.max_entries != bpf_map__max_entries(want)) {
    return mismatch("max_entries", info.max_entries,
                    bpf_map__max_entries(want));
  }
  return fd;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

void RemoveTree(const std::string& dir) {
  for (const PinnedMap& m : kPinnedMaps) {
    ::unlink(absl::StrCat(dir, "/", m.name).c_str());
  }
  ::rmdir(dir.c_str());
}

class BpfSteeringBackend : public SteeringBackend {
 public:
  explicit BpfSteeringBackend(std::string root) : root_(std::move(root)) {}

  absl::StatusOr<std::unique_ptr<ListenerSteering>> OpenListener(
      absl::string_view listener) override {
    RETURN_IF_ERROR(ValidatePinName(listener));
    auto result = OpenLocked(listener);
    if (!result.ok()) {
      return Annotate(result.status(),
                      absl::StrCat("steering for listener ", listener));
    }
    return result;
  }

 private:
  absl::StatusOr<std::unique_ptr<ListenerSteering>> OpenLocked(
      absl::string_view listener) {
    Fd lock(::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!lock) return ErrnoError(absl::StrCat("opening ", root_));
    if (::flock(lock.get(), LOCK_EX) != 0) {
      return ErrnoError(absl::StrCat("locking ", root_));
    }
    const std::string dir = absl::StrCat(root_, "/", listener);
    ASSIGN_OR_RETURN(SteeringSkeleton skel, SteeringSkeleton::Open());
    if (Exists(dir)) {
      std::vector<const PinnedMap*> missing;
      for (const PinnedMap& m : kPinnedMaps) {
        bpf_map* map = m.get(skel.get());
        const std::string path = absl::StrCat(dir, "/", m.name);
        if (m.may_be_missing && !Exists(path)) {
          missing.push_back(&m);
          continue;
        }
        ASSIGN_OR_RETURN(Fd fd, OpenCompatibleMap(path, m.name, map));
        int err = bpf_map__reuse_fd(map, fd.get());
        if (err != 0) {
          return ErrnoError(-err, absl::StrCat("reusing pinned map ", m.name));
        }
      }
      RETURN_IF_ERROR(skel.Load());
      // An older agent's directory: its maps are reused as they are; the
      // maps it did not have are created by the load (zeroed) and pinned
      // now. The program that reads them is attached by the caller.
      for (const PinnedMap* m : missing) {
        const std::string path = absl::StrCat(dir, "/", m->name);
        int err = bpf_obj_pin(bpf_map__fd(m->get(skel.get())), path.c_str());
        if (err != 0) return ErrnoError(-err, absl::StrCat("pinning ", path));
        PF_LOG(INFO) << "steering: pinned maps in " << dir
                     << " are from an older agent (no '" << m->name
                     << "' map): created and pinned it, the other maps are "
                        "reused as they are";
      }
      PF_LOG(DEBUG) << "steering: reusing pinned maps in " << dir;
      return std::unique_ptr<ListenerSteering>(
          new BpfListenerSteering(std::move(skel), dir));
    }
    RETURN_IF_ERROR(skel.Load());
    static std::atomic<uint64_t> counter{0};
    const std::string tmp = absl::StrCat(root_, "/_tmp-", listener, "-",
                                         ::getpid(), "-", counter++);
    if (::mkdir(tmp.c_str(), 0700) != 0) {
      return ErrnoError(absl::StrCat("creating ", tmp));
    }
    for (const PinnedMap& m : kPinnedMaps) {
      const std::string path = absl::StrCat(tmp, "/", m.name);
      int err = bpf_obj_pin(bpf_map__fd(m.get(skel.get())), path.c_str());
      if (err != 0) {
        absl::Status s = ErrnoError(-err, absl::StrCat("pinning ", path));
        RemoveTree(tmp);
        return s;
      }
    }
    if (::rename(tmp.c_str(), dir.c_str()) != 0) {
      absl::Status s = ErrnoError(absl::StrCat("renaming ", tmp, " to ", dir));
      RemoveTree(tmp);
      return s;
    }
    PF_LOG(DEBUG) << "steering: created pinned maps in " << dir;
    return std::unique_ptr<ListenerSteering>(
        new BpfListenerSteering(std::move(skel), dir));
  }

  const std::string root_;
};

bool OnBpffs(const std::string& path) {
  struct statfs st;
  return ::statfs(path.c_str(), &st) == 0 &&
         st.f_type == static_cast<decltype(st.f_type)>(BPF_FS_MAGIC);
}

// Makes sure `root` exists on a bpffs, mounting one at /sys/fs/bpf if that
// is where `root` lives and nothing is mounted there yet.
absl::Status EnsureBpffsRoot(const std::string& root) {
  if (root.empty() || root[0] != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("bpffs root \"", root, "\": must be an absolute path"));
  }
  // Nearest existing ancestor.
  std::string existing = root;
  while (!Exists(existing)) {
    size_t slash = existing.find_last_of('/');
    existing = slash == 0 ? "/" : existing.substr(0, slash);
  }
  if (!OnBpffs(existing)) {
    const bool under_default = absl::StartsWith(root, kDefaultBpffs) &&
                               (root.size() == sizeof(kDefaultBpffs) - 1 ||
                                root[sizeof(kDefaultBpffs) - 1] == '/');
    if (!under_default || existing != kDefaultBpffs) {
      return absl::FailedPreconditionError(absl::StrCat(
          "bpffs root ", root, ": ", existing,
          " is not on a bpf filesystem (mount one: mount -t bpf bpf ", existing,
          ")"));
    }
    if (::mount("bpf", kDefaultBpffs, "bpf", 0, "mode=0700") != 0) {
      const int err = errno;
      return absl::Status(
          absl::ErrnoToStatus(err, "").code(),
          absl::StrCat("mounting bpffs at ", kDefaultBpffs, ": ",
                       std::strerror(err),
                       err == EPERM ? " (needs CAP_SYS_ADMIN)" : ""));
    }
    PF_LOG(INFO) << "steering: mounted bpffs at " << kDefaultBpffs;
  }
  // Create the missing components.
  for (size_t pos = existing.size(); pos < root.size();) {
    size_t next = root.find('/', pos + 1);
    if (next == std::string::npos) next = root.size();
    const std::string part = root.substr(0, next);
    if (::mkdir(part.c_str(), 0700) != 0 && errno != EEXIST) {
      return ErrnoError(absl::StrCat("creating ", part));
    }
    pos = next;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SteeringBackend>> OpenBpfSteering(
    std::string bpffs_root) {
  while (bpffs_root.size() > 1 && bpffs_root.back() == '/') {
    bpffs_root.pop_back();
  }
  {
    // Probe: the program type loads here with our privileges.
    ASSIGN_OR_RETURN(SteeringSkeleton probe, SteeringSkeleton::Open());
    RETURN_IF_ERROR(probe.Load());
  }
  RETURN_IF_ERROR(EnsureBpffsRoot(bpffs_root));
  return std::unique_ptr<SteeringBackend>(
      new BpfSteeringBackend(std::move(bpffs_root)));
}

}  // namespace portfleet
