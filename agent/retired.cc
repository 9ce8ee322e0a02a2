#include "agent/retired.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "worker/sdk/base/atomic_file.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

constexpr char kHeader[] =
    "# portfleet: --instance-id values that handed their sockets over to a "
    "newer agent; written by the agent";

std::string RetiredPath(const std::string& state_dir) {
  return absl::StrCat(state_dir, "/", kRetiredInstancesFileName);
}

}  // namespace

absl::Status ValidateInstanceId(absl::string_view id) {
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("instance ID '", id, "' must have 1 to 128 characters"));
  }
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' &&
        c != '_' && c != ':' && c != '-') {
      return absl::InvalidArgumentError(
          absl::StrCat("instance ID '", id,
                       "' may only contain letters, digits and . _ : -"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> LoadRetiredInstances(
    const std::string& state_dir) {
  const std::string path = RetiredPath(state_dir);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return std::vector<std::string>();
    return ErrnoError(absl::StrCat("open ", path));
  }
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError(absl::StrCat("read ", path));
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > (kMaxRetiredInstances + 2) * 256) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": too large for a list of instance IDs"));
    }
  }
  std::vector<std::string> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    if (absl::Status s = ValidateInstanceId(line); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_no, ": ", s.message()));
    }
    out.emplace_back(line);
  }
  return out;
}

absl::Status RetireInstance(const std::string& state_dir,
                            const std::string& id) {
  RETURN_IF_ERROR(ValidateInstanceId(id));
  if (::mkdir(state_dir.c_str(), 0750) != 0 && errno != EEXIST) {
    return ErrnoError(absl::StrCat("mkdir ", state_dir));
  }
  absl::StatusOr<std::vector<std::string>> ids =
      LoadRetiredInstances(state_dir);
  // A damaged list is replaced: losing old entries is safer than not
  // recording this hand-over.
  std::vector<std::string> list = ids.ok() ? *ids : std::vector<std::string>();
  list.erase(std::remove(list.begin(), list.end(), id), list.end());
  list.push_back(id);
  if (list.size() > kMaxRetiredInstances) {
    list.erase(list.begin(), list.end() - kMaxRetiredInstances);
  }
  std::string text =
      absl::StrCat(kHeader, "\n", absl::StrJoin(list, "\n"), "\n");

  return ReplaceFileAtomically(state_dir, kRetiredInstancesFileName, text, 0640,
                               Durability::kPowerLoss);
}

}  // namespace portfleet
