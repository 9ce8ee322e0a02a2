// Socket hand-over by the systemd socket-activation convention: the manager
// (portfleet-agent, or systemd) passes the listening socket as fd 3 with
// LISTEN_FDS=1, LISTEN_PID=<the worker's pid> and LISTEN_FDNAMES=<listener>.
//
//   ASSIGN_OR_RETURN(Fd listen_fd, TakeListenFd());
#ifndef PORTFLEET_WORKER_SDK_LISTEN_FDS_H_
#define PORTFLEET_WORKER_SDK_LISTEN_FDS_H_

#include <string>

#include "absl/status/statusor.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

// The first passed fd (SD_LISTEN_FDS_START).
inline constexpr int kListenFdsStart = 3;

// Takes ownership of fd 3 after checking that the environment hands exactly
// one socket to this process (LISTEN_FDS=1; LISTEN_PID, if set, equals
// getpid()) and that fd 3 is a listening TCP socket (SO_DOMAIN AF_INET or
// AF_INET6, SO_TYPE SOCK_STREAM, SO_PROTOCOL IPPROTO_TCP, SO_ACCEPTCONN 1).
// On success the fd is made FD_CLOEXEC, and LISTEN_FDS, LISTEN_PID and
// LISTEN_FDNAMES are removed from the environment so that children do not
// inherit them. O_NONBLOCK is NOT set: it is a flag of the open file
// description, which the agent and every other process serving the same
// socket share (e.g. a blocking worker rolled onto it), so setting it would
// change their accept() too. A worker that wants a non-blocking accept must
// get it without touching the flag (portfleet-worker: see worker.h). On failure
// nothing is changed and fd 3 is left alone. Errors:
//   FailedPrecondition: LISTEN_FDS missing, LISTEN_PID names another
//                       process, fd 3 not open / not a listening TCP socket;
//   InvalidArgument:    LISTEN_FDS / LISTEN_PID malformed, LISTEN_FDS != 1.
absl::StatusOr<Fd> TakeListenFd();

// The socket's name: the first entry of LISTEN_FDNAMES (colon-separated), or
// the name that the last successful TakeListenFd() removed from the
// environment; "" when there is none.
std::string ListenFdName();

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_LISTEN_FDS_H_
