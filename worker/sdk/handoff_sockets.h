// Checks of the sockets that travel with a connection hand-off
// (HandOffConnection in control.proto): whoever receives them (the agent
// from a releasing worker, a worker from the agent) checks them before use.
#ifndef PORTFLEET_WORKER_SDK_HANDOFF_SOCKETS_H_
#define PORTFLEET_WORKER_SDK_HANDOFF_SOCKETS_H_

#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "portfleet/v1/control.pb.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {

// Sockets a HandOffConnection carries: 2 for a proxied pair (client, then
// upstream), else 1.
inline size_t HandOffSocketCount(const v1::HandOffConnection& handoff) {
  return handoff.upstream_attached() ? 2 : 1;
}

// OK when `fds` holds exactly `expected` descriptors, each a connected TCP
// socket (IPv4 or IPv6, not listening, with a peer). InvalidArgument
// otherwise, naming the first one that is wrong ("socket 2 of 2 (the
// upstream): not connected"). Touches nothing.
absl::Status CheckHandOffSockets(const std::vector<Fd>& fds, size_t expected);

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_HANDOFF_SOCKETS_H_
