#include "agent/api/state_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "agent/spec/spec.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "worker/sdk/base/atomic_file.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// Collects the parser's first error with its line.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (!error_.empty()) return;
    error_ = absl::StrCat(line + 1, ":", column + 1, ": ", message);
  }
  void AddWarning(int, google::protobuf::io::ColumnNumber,
                  const std::string&) override {}
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

absl::Status EnsureDir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0750) == 0) return absl::OkStatus();
  if (errno != EEXIST) return ErrnoError(absl::StrCat("mkdir ", dir));
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    return ErrnoError(absl::StrCat("stat ", dir));
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, ": state directory is not a directory"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string FleetStatePath(const std::string& state_dir) {
  return absl::StrCat(state_dir, "/", kFleetStateFileName);
}

absl::Status SaveFleetState(const std::string& state_dir,
                            const v1::FleetSpec& spec) {
  RETURN_IF_ERROR(ValidateFleetSpec(spec, "fleet state"));
  RETURN_IF_ERROR(EnsureDir(state_dir));

  std::string body;
  google::protobuf::TextFormat::Printer printer;
  if (!printer.PrintToString(spec, &body)) {
    return absl::InternalError("cannot print the fleet state");
  }
  std::string text =
      absl::StrCat(kFleetStateHeader, "\n", body, kFleetStateEndMarker, "\n");

  return ReplaceFileAtomically(state_dir, kFleetStateFileName, text, 0640,
                               Durability::kPowerLoss);
}

absl::StatusOr<std::optional<v1::FleetSpec>> LoadFleetState(
    const std::string& state_dir) {
  const std::string path = FleetStatePath(state_dir);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return std::optional<v1::FleetSpec>();
    return ErrnoError(absl::StrCat("open ", path));
  }
  std::string text;
  char chunk[16384];
  for (;;) {
    ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(absl::StrCat("read ", path));
    }
    if (n == 0) break;
    text.append(chunk, static_cast<size_t>(n));
  }
  ASSIGN_OR_RETURN(v1::FleetSpec spec, ParseFleetState(text, path));
  return std::optional<v1::FleetSpec>(std::move(spec));
}

absl::StatusOr<v1::FleetSpec> ParseFleetState(absl::string_view text,
                                              const std::string& path) {
  // The last non-empty line must be the end marker; otherwise the file was
  // cut short (or edited into something we did not write).
  std::vector<absl::string_view> lines = absl::StrSplit(text, '\n');
  int last = static_cast<int>(lines.size()) - 1;
  while (last >= 0 && absl::StripAsciiWhitespace(lines[last]).empty()) --last;
  if (last < 0) {
    return absl::DataLossError(
        absl::StrCat(path, ":1: empty fleet state file (truncated?)"));
  }
  if (absl::StripAsciiWhitespace(lines[last]) != kFleetStateEndMarker) {
    return absl::DataLossError(absl::StrCat(
        path, ":", last + 1, ": fleet state file is truncated: missing '",
        kFleetStateEndMarker, "' line"));
  }

  v1::FleetSpec spec;
  ErrorCollector errors;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &spec)) {
    return absl::DataLossError(absl::StrCat(
        path, ":",
        errors.error().empty() ? "corrupt fleet state" : errors.error()));
  }
  if (absl::Status s = ValidateFleetSpec(spec, path); !s.ok()) {
    return absl::DataLossError(s.message());
  }
  return spec;
}

}  // namespace portfleet
