// portfleetctl's errors: absl::Status throughout, with the exit code carried
// as a payload so that the one place that prints an error (Run) knows which
// code to return. A status without the payload is an error from the agent
// (exit 1).
#ifndef PORTFLEET_CTL_ERRORS_H_
#define PORTFLEET_CTL_ERRORS_H_

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace portfleet::ctl {

// `status` with `exit_code` attached (replacing any earlier one).
absl::Status WithExitCode(absl::Status status, int exit_code);
// The exit code for `status`: 0 for OK, the attached code, else 1.
int ExitCodeOf(const absl::Status& status);

// "<prefix>: <message>", keeping the code and the exit code.
absl::Status WithPrefix(const absl::Status& status, absl::string_view prefix);

// A bad command line, flag value or input file (exit 2).
absl::Status UsageError(absl::string_view message);
bool IsUsageError(const absl::Status& status);

// grpc::Status -> absl::Status. gRPC documents its codes as numerically
// identical to absl's (both are google.rpc.Code), so this is a cast.
absl::Status FromGrpc(const grpc::Status& status);

// An RPC failed: classifies it by code and says what it means for the
// operator. UNAVAILABLE is "shutting down" (exit 5) when the agent said so,
// otherwise a lost connection (exit 3); everything else came from the agent
// and reads "<message> (CODE)" (exit 1). `server` is the --server address.
absl::Status RpcError(const grpc::Status& status, absl::string_view server);

// Why a unix socket cannot be connected to, tried with connect(2): OK when
// it can; otherwise exit 3 (no socket, connection refused) or exit 4 (EACCES,
// with how to get access: the socket's group and the agent's --api-group).
absl::Status ProbeUnixSocket(const std::string& path, absl::string_view server);

// The path of a "unix:" gRPC target ("unix:///a/b", "unix:/a/b",
// "unix:a/b"); empty for other targets (including unix-abstract:).
std::string UnixSocketPath(absl::string_view target);

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_ERRORS_H_
