#include "ctl/errors.h"

#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "ctl/ctl.h"
#include "worker/sdk/base/fd.h"

namespace portfleet::ctl {
namespace {

constexpr char kExitCodeUrl[] = "type.portfleet.dev/portfleetctl.ExitCode";

std::string Dir(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// "group 'portfleet'" for the group of `path`, if it can be stat'ed.
std::optional<std::string> GroupOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  if (const group* g = ::getgrgid(st.st_gid); g != nullptr) {
    return std::string(g->gr_name);
  }
  return absl::StrCat(st.st_gid);
}

absl::Status PermissionDenied(const std::string& path,
                              absl::string_view server) {
  // The socket is 0660 in a 0751 directory, both owned by the agent's
  // --api-group; the directory can usually be stat'ed when the socket cannot.
  std::optional<std::string> group = GroupOf(path);
  if (!group.has_value()) group = GroupOf(Dir(path));
  std::string how =
      group.has_value() && *group != "root"
          ? absl::StrCat("run portfleetctl as root or as a member of group '",
                         *group, "' (usermod -aG ", *group,
                         " USER, then log in again)")
          : "run portfleetctl as root, or start the agent with --api-group "
            "GROUP and add the user to GROUP (usermod -aG GROUP USER, then "
            "log in again)";
  return WithExitCode(absl::PermissionDeniedError(absl::StrCat(
                          "permission denied on the agent's API socket ", path,
                          " (", server, "): ", how)),
                      kExitPermissionDenied);
}

}  // namespace

absl::Status WithExitCode(absl::Status status, int exit_code) {
  status.SetPayload(kExitCodeUrl, absl::Cord(absl::StrCat(exit_code)));
  return status;
}

int ExitCodeOf(const absl::Status& status) {
  if (status.ok()) return kExitOk;
  const auto code = status.GetPayload(kExitCodeUrl);
  int value;
  if (code.has_value() && absl::SimpleAtoi(std::string(*code), &value)) {
    return value;
  }
  return kExitAgentError;
}

absl::Status WithPrefix(const absl::Status& status, absl::string_view prefix) {
  absl::Status out(status.code(), absl::StrCat(prefix, ": ", status.message()));
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) {
    out.SetPayload(url, payload);
  });
  return out;
}

absl::Status UsageError(absl::string_view message) {
  return WithExitCode(absl::InvalidArgumentError(message), kExitUsage);
}

bool IsUsageError(const absl::Status& status) {
  return ExitCodeOf(status) == kExitUsage;
}

absl::Status FromGrpc(const grpc::Status& status) {
  static_assert(static_cast<int>(absl::StatusCode::kUnavailable) ==
                grpc::StatusCode::UNAVAILABLE);
  static_assert(static_cast<int>(absl::StatusCode::kUnauthenticated) ==
                grpc::StatusCode::UNAUTHENTICATED);
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::Status RpcError(const grpc::Status& status, absl::string_view server) {
  absl::Status s = FromGrpc(status);
  if (s.code() == absl::StatusCode::kUnavailable) {
    if (absl::StrContains(absl::AsciiStrToLower(s.message()),
                          "shutting down")) {
      return WithExitCode(
          absl::UnavailableError(absl::StrCat(
              "the agent at ", server, " is shutting down (", s.message(),
              "); retry once it, or the agent taking over from it, serves")),
          kExitShuttingDown);
    }
    return WithExitCode(
        absl::UnavailableError(absl::StrCat("lost the connection to the agent "
                                            "at ",
                                            server, ": ", s.message())),
        kExitUnreachable);
  }
  std::string hint;
  if (s.code() == absl::StatusCode::kDeadlineExceeded) {
    hint = "; raise --timeout";
  }
  return absl::Status(
      s.code(), absl::StrCat(s.message(), " (",
                             absl::StatusCodeToString(s.code()), hint, ")"));
}

std::string UnixSocketPath(absl::string_view target) {
  if (!absl::ConsumePrefix(&target, "unix:")) return "";
  // unix:///abs -> /abs; unix:/abs and unix:rel stay as they are.
  if (absl::StartsWith(target, "//")) target.remove_prefix(2);
  return std::string(target);
}

absl::Status ProbeUnixSocket(const std::string& path,
                             absl::string_view server) {
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return UsageError(
        absl::StrCat("--server ", server, ": not a usable unix socket path"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    return WithExitCode(
        absl::InternalError(absl::StrCat("socket: ", std::strerror(errno))),
        kExitUnreachable);
  }
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr),
                sizeof(addr)) == 0) {
    return absl::OkStatus();
  }
  const int err = errno;
  const std::string hint =
      "is portfleet-agent running? set --server or PORTFLEET_SERVER";
  switch (err) {
    case EACCES:
    case EPERM:
      return PermissionDenied(path, server);
    case ENOENT:
      return WithExitCode(absl::UnavailableError(absl::StrCat(
                              "cannot reach the agent at ", server,
                              ": no socket at ", path, " (", hint, ")")),
                          kExitUnreachable);
    case ECONNREFUSED:
      return WithExitCode(
          absl::UnavailableError(absl::StrCat(
              "cannot reach the agent at ", server, ": nothing listens on ",
              path, " (connection refused: a socket left by a stopped agent; ",
              hint, ")")),
          kExitUnreachable);
    default:
      return WithExitCode(
          absl::UnavailableError(
              absl::StrCat("cannot reach the agent at ", server, ": connect ",
                           path, ": ", std::strerror(err), " (", hint, ")")),
          kExitUnreachable);
  }
}

}  // namespace portfleet::ctl
