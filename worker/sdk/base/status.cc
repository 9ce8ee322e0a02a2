#include "worker/sdk/base/status.h"

#include <cstring>

namespace portfleet {

absl::Status ErrnoError(int err, absl::string_view what) {
  // ErrnoToStatus appends ": <strerror>" itself.
  return absl::ErrnoToStatus(err, what);
}

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

}  // namespace portfleet
