#include "worker/sdk/base/log.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace portfleet {
namespace {

std::atomic<LogLevel> g_level{LogLevel::kInfo};
std::atomic<LogFormat> g_format{LogFormat::kText};
std::once_flag g_format_once;
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

// syslog(3) priorities, as journald reads them from a "<N>" prefix.
int SyslogPriority(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return 7;
    case LogLevel::kInfo:
      return 6;
    case LogLevel::kWarning:
      return 4;
    case LogLevel::kError:
      return 3;
  }
  return 6;
}

const char* JsonLevel(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

// A JSON string literal (RFC 8259): quotes, backslashes and control
// characters escaped; other bytes as they are (messages are UTF-8 or the
// bytes a peer sent, which a JSON reader may reject but never misparses).
std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
  return out;
}

}  // namespace

void SetLogFormat(LogFormat format) {
  std::call_once(g_format_once, [] {});
  g_format.store(format);
}

absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view name) {
  std::string lower = absl::AsciiStrToLower(name);
  if (lower == "text") return LogFormat::kText;
  if (lower == "json") return LogFormat::kJson;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown log format '", name, "' (want text or json)"));
}

bool IsJournalStream(int fd, const char* journal_stream) {
  if (journal_stream == nullptr) return false;
  absl::string_view value(journal_stream);
  size_t colon = value.find(':');
  uint64_t dev = 0, ino = 0;
  if (colon == absl::string_view::npos ||
      !absl::SimpleAtoi(value.substr(0, colon), &dev) ||
      !absl::SimpleAtoi(value.substr(colon + 1), &ino)) {
    return false;
  }
  struct stat st {};
  return ::fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_dev) == dev &&
         static_cast<uint64_t>(st.st_ino) == ino;
}

std::string FormatLogLine(LogFormat format, LogLevel level,
                          absl::string_view tag, absl::string_view message,
                          absl::Time time) {
  if (format == LogFormat::kJournal) {
    return absl::StrCat("<", SyslogPriority(level), ">", LevelName(level), " ",
                        tag, ": ", message, "\n");
  }
  std::string when =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", time, absl::UTCTimeZone());
  if (format == LogFormat::kJson) {
    return absl::StrCat("{\"time\":\"", when, "\",\"level\":\"",
                        JsonLevel(level), "\",\"tag\":", JsonString(tag),
                        ",\"msg\":", JsonString(message), "}\n");
  }
  return absl::StrCat(when, " ", LevelName(level), " ", tag, ": ", message,
                      "\n");
}

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
  // The journal is detected once, unless a format was set explicitly.
  std::call_once(g_format_once, [] {
    if (IsJournalStream(STDERR_FILENO, std::getenv("JOURNAL_STREAM"))) {
      g_format.store(LogFormat::kJournal);
    }
  });
  std::string tag;
  {
    std::lock_guard<std::mutex> lock(g_tag_mu);
    tag = *g_tag;
  }
  std::string line =
      FormatLogLine(g_format.load(), level_, tag, stream_.str(), absl::Now());
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
