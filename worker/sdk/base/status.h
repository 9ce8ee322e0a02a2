// absl::Status helpers: the small macros bookworm's abseil lacks, and errno
// conversion at the syscall line.
#ifndef PORTFLEET_WORKER_SDK_BASE_STATUS_H_
#define PORTFLEET_WORKER_SDK_BASE_STATUS_H_

#include <cerrno>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace portfleet {

// Status for a failed syscall: "<what>: <strerror>", coded from errno by
// absl::ErrnoToStatus (EPERM -> PermissionDenied, EADDRINUSE ->
// FailedPrecondition,
// ...).
absl::Status ErrnoError(int err, absl::string_view what);
inline absl::Status ErrnoError(absl::string_view what) {
  return ErrnoError(errno, what);
}

// Prefixes a status message with context, keeping its code:
// Annotate(s, "listener web") -> "listener web: <message>".
absl::Status Annotate(const absl::Status& status, absl::string_view context);

}  // namespace portfleet

#define PF_CONCAT_INNER_(a, b) a##b
#define PF_CONCAT_(a, b) PF_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status pf_status_ = (expr);      \
    if (!pf_status_.ok()) return pf_status_; \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(PF_CONCAT_(pf_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                           \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()

#endif  // PORTFLEET_WORKER_SDK_BASE_STATUS_H_
