#include "worker/sdk/base/log.h"

#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace portfleet {
namespace {

std::atomic<LogLevel> g_level{LogLevel::kInfo};
std::mutex g_tag_mu;
std::string* g_tag = new std::string("portfleet");

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO ";
    case LogLevel::kWarning:
      return "WARN ";
    case LogLevel::kError:
      return "ERROR";
  }
  return "?";
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level.store(level); }
LogLevel GetLogLevel() { return g_level.load(std::memory_order_relaxed); }

void SetLogTag(std::string tag) {
  std::lock_guard<std::mutex> lock(g_tag_mu);
  *g_tag = std::move(tag);
}

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name) {
  std::string lower = absl::AsciiStrToLower(name);
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  if (lower == "warning" || lower == "warn") return LogLevel::kWarning;
  if (lower == "error") return LogLevel::kError;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown log level '", name, "' (want debug, info, warning or error)"));
}

LogMessage::~LogMessage() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  tm utc;
  gmtime_r(&ts.tv_sec, &utc);
  std::string tag;
  {
    std::lock_guard<std::mutex> lock(g_tag_mu);
    tag = *g_tag;
  }
  std::string line = absl::StrFormat(
      "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %s %s: %s\n", utc.tm_year + 1900,
      utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec,
      static_cast<int>(ts.tv_nsec / 1000000), LevelName(level_), tag,
      stream_.str());
  // One write() per line so lines of concurrent processes do not interleave.
  ssize_t unused = ::write(STDERR_FILENO, line.data(), line.size());
  (void)unused;
}

bool LogRateLimiter::Allow(absl::Time now, uint64_t* dropped) {
  if (now - window_start_ >= window_) {
    window_start_ = now;
    used_ = 0;
  }
  if (used_ >= burst_) {
    dropped_++;
    return false;
  }
  used_++;
  *dropped = dropped_;
  dropped_ = 0;
  return true;
}

std::string SuppressedNote(uint64_t dropped) {
  if (dropped == 0) return "";
  return absl::StrCat(" (", dropped, " similar line", dropped == 1 ? "" : "s",
                      " suppressed)");
}

}  // namespace portfleet
