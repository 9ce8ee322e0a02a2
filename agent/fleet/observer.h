// ShardObserver: what the agent reads about a shard from the kernel, for any
// worker, cooperative or not: the accept queue of its socket (TCP_INFO on the
// agent's own copy) and the worker's process state and CPU time (/proc). The
// health monitor adds the steering program's counters and the worker's load
// reports. A seam: unit tests use a fake.
#ifndef PORTFLEET_AGENT_FLEET_OBSERVER_H_
#define PORTFLEET_AGENT_FLEET_OBSERVER_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "agent/fleet/health.h"
#include "agent/procfs.h"

namespace portfleet {

struct QueueInfo {
  uint32_t depth = 0;    // connections waiting to be accepted
  uint32_t backlog = 0;  // the listen() backlog
};

struct ProcessInfo {
  ProcessState state = ProcessState::kUnknown;
  uint64_t cpu_ticks = 0;  // utime + stime, clock ticks
};

// A process that holds a shard socket, as /proc shows it.
struct SocketHolder {
  pid_t pid = 0;
  pid_t pgid = 0;
  // Its parent, the parent's parent, ... up to (not including) pid 1.
  std::vector<pid_t> ancestors;
  std::string command;   // comm
  std::string listener;  // PORTFLEET_LISTENER of its environment, if any
  std::string shard;     // PORTFLEET_SHARD of its environment, if any
};

class ShardObserver {
 public:
  virtual ~ShardObserver() = default;
  // The accept queue of a listening socket.
  virtual absl::StatusOr<QueueInfo> Queue(int socket_fd) = 0;
  // A process's state; kUnknown when it cannot be read (gone).
  virtual ProcessInfo Process(pid_t pid) = 0;
  // Every process with an fd on one of the sockets `inodes`, by inode: one
  // walk of /proc/*/fd (the kernel keeps no socket -> process index).
  virtual std::map<uint64_t, std::vector<SocketHolder>> SocketHolders(
      const std::set<uint64_t>& inodes) = 0;
};

// The real one: getsockopt(TCP_INFO) and /proc/PID/stat.
std::unique_ptr<ShardObserver> MakeKernelShardObserver();

// Parses the text of /proc/PID/stat (the command may contain spaces and
// parentheses). Public for tests.
ProcessInfo ParseProcStat(const std::string& text);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_FLEET_OBSERVER_H_
