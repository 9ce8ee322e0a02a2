#include "worker/sdk/base/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet {

absl::Status ReplaceFileAtomically(const std::string& dir,
                                   const std::string& name,
                                   absl::string_view data, mode_t mode,
                                   Durability durability) {
  const std::string path = absl::StrCat(dir, "/", name);
  std::string tmp = absl::StrCat(path, ".tmp.XXXXXX");
  Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (!fd) return ErrnoError(absl::StrCat("create temp file for ", path));
  auto fail = [&tmp](absl::Status status) {
    ::unlink(tmp.c_str());
    return status;
  };
  if (::fchmod(fd.get(), mode) != 0) {
    return fail(ErrnoError(absl::StrCat("chmod ", tmp)));
  }
  while (!data.empty()) {
    ssize_t n = ::write(fd.get(), data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail(ErrnoError(absl::StrCat("write ", tmp)));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  if (durability == Durability::kPowerLoss && ::fsync(fd.get()) != 0) {
    return fail(ErrnoError(absl::StrCat("fsync ", tmp)));
  }
  fd.Reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return fail(ErrnoError(absl::StrCat("rename ", tmp, " to ", path)));
  }
  if (durability == Durability::kPowerLoss) {
    Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!d || ::fsync(d.get()) != 0) {
      return ErrnoError(absl::StrCat("fsync ", dir));
    }
  }
  return absl::OkStatus();
}

}  // namespace portfleet
