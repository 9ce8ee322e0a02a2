// The kernel's view of processes and TCP sockets, read the one way the agent
// reads it everywhere: /proc/PID/stat and /proc/PID/fd, and sock_diag
// (NETLINK_SOCK_DIAG) dumps of TCP sockets. Used to find which process holds
// a shard socket (observer, orphans), which worker holds which established
// connections (load), and the sockets a self-bound worker bound (selfbound).
//
// Processes come and go while they are read: a process that exits during a
// walk gives empty results, never an error. Reading another user's
// /proc/PID/fd needs CAP_SYS_PTRACE (or the same uid); without it that
// process's fds are simply not seen.
#ifndef PORTFLEET_AGENT_PROCFS_H_
#define PORTFLEET_AGENT_PROCFS_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/sdk/base/address.h"

namespace portfleet {

// The first 4 KiB of a /proc file ("" when it cannot be read): enough for
// stat, comm and status lines, read with one read() so the kernel's view is
// consistent.
std::string ReadProcFile(const std::string& path);

struct ProcIds {
  char state = '?';  // R, S, D, T, t, Z, X, ...
  pid_t ppid = 0;
  pid_t pgid = 0;
  // Field 22, when present: clock ticks after boot. With the pid it names
  // one process for the life of the boot (a reused pid has another).
  uint64_t start_time = 0;
};
// State, parent, process group and start time from the text of
// /proc/PID/stat ("pid (comm) S ppid pgrp ..."; comm may hold spaces and
// parentheses). False if malformed.
bool ParseProcStatIds(const std::string& text, ProcIds* out);
// /proc/PID/stat of one process (nullopt if it exited or is unreadable).
std::optional<ProcIds> ProcessIds(pid_t pid);
// The effective uid of `pid` (from /proc/PID/status; nullopt if gone).
std::optional<uid_t> ProcessEffectiveUid(pid_t pid);
// Every process of this pid namespace, by pid: one walk of /proc.
std::map<pid_t, ProcIds> ProcessTable();

// A socket fd of a process (/proc/PID/fd/FD -> "socket:[INODE]").
struct ProcessSocket {
  pid_t pid = 0;
  int fd = -1;
  uint64_t inode = 0;
};
// The socket fds of `pid` (empty if it exited or cannot be read).
std::vector<ProcessSocket> SocketsOfProcess(pid_t pid);

// A TCP socket as sock_diag reports it.
struct DiagSocket {
  uint64_t inode = 0;
  uid_t uid = 0;
  SocketAddress local;
};
// TCP states for DumpTcpSockets (the kernel's tcp_states.h numbering).
inline constexpr uint32_t kTcpEstablishedMask = 1u << 1;
inline constexpr uint32_t kTcpListenMask = 1u << 10;
// The TCP sockets of `family` (AF_INET or AF_INET6) in this network
// namespace whose state is in `state_mask` and, unless `port` is 0, whose
// local port is `port`. Sockets without an inode (TIME_WAIT and the like)
// are left out.
absl::StatusOr<std::vector<DiagSocket>> DumpTcpSockets(int family,
                                                       uint32_t state_mask,
                                                       uint16_t port);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_PROCFS_H_
