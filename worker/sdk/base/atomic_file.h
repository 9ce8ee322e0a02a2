// Replacing a file so that readers see the old contents or the new, never a
// part: a temp file beside it, written whole, then renamed over it.
#ifndef PORTFLEET_WORKER_SDK_BASE_ATOMIC_FILE_H_
#define PORTFLEET_WORKER_SDK_BASE_ATOMIC_FILE_H_

#include <sys/types.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace portfleet {

enum class Durability {
  // Survives a crash of the process only (the page cache keeps it).
  kProcessCrash,
  // Survives a power loss too: the file and its directory are fsynced.
  kPowerLoss,
};

// Replaces `dir`/`name` with `data`, mode `mode`. On error the old file is
// untouched and no temp file is left; the message names the step and path.
absl::Status ReplaceFileAtomically(const std::string& dir,
                                   const std::string& name,
                                   absl::string_view data, mode_t mode,
                                   Durability durability);

}  // namespace portfleet

#endif  // PORTFLEET_WORKER_SDK_BASE_ATOMIC_FILE_H_
