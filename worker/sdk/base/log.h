// Minimal leveled logging to stderr (bookworm's abseil has no absl/log).
//
//   PF_LOG(INFO) << "listener " << name << ": started";
//
// Lines look like "2026-11-27T21:54:55.123Z INFO  agent: message" (text).
// When stderr is the journal's stream (JOURNAL_STREAM names its device and
// inode, as systemd sets it) a line carries its syslog priority instead of
// the time: "<6>INFO  agent: message" (journald strips the prefix and files
// the line at that priority). SetLogFormat(kJson) writes one JSON object a
// line: {"time":"...","level":"info","tag":"agent","msg":"message"}.
#ifndef PORTFLEET_WORKER_SDK_BASE_LOG_H_
#define PORTFLEET_WORKER_SDK_BASE_LOG_H_

#include <sstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace portfleet {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Process-wide settings; call once at start-up.
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
void SetLogTag(std::string tag);  // e.g. "agent", "worker web/2"
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);

enum class LogFormat {
  kText,     // time, level, tag, message
  kJournal,  // "<N>" syslog priority, level, tag, message (no time)
  kJson,     // one JSON object a line
};
// kText is the default; the first line written switches it to kJournal when
// stderr is JOURNAL_STREAM, unless SetLogFormat was called before.
void SetLogFormat(LogFormat format);
// "text" or "json" (the journal format is chosen by itself).
absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view name);
// Whether `journal_stream` ("DEV:INODE", from $JOURNAL_STREAM) names the
// file behind `fd`.
bool IsJournalStream(int fd, const char* journal_stream);
// One line, newline included, as LogMessage writes it.
std::string FormatLogLine(LogFormat format, LogLevel level,
                          absl::string_view tag, absl::string_view message,
                          absl::Time time);

class LogMessage {
 public:
  explicit LogMessage(LogLevel level) : level_(level) {}
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

// Limits log lines caused by input from outside (a peer's junk, a flood of
// connections) to `burst` per `window`, per source: each source owns one.
// When lines were dropped, the next allowed one says how many.
//
//   if (uint64_t dropped; limiter.Allow(now, &dropped)) {
//     PF_LOG(WARNING) << "junk from pid " << pid << SuppressedNote(dropped);
//   }
class LogRateLimiter {
 public:
  explicit LogRateLimiter(int burst = 5,
                          absl::Duration window = absl::Seconds(10))
      : burst_(burst), window_(window) {}
  // True when a line may be written; `*dropped` gets the number dropped
  // since the last allowed one.
  bool Allow(absl::Time now, uint64_t* dropped);

 private:
  const int burst_;
  const absl::Duration window_;
  absl::Time window_start_ = absl::InfinitePast();
  int used_ = 0;
  uint64_t dropped_ = 0;
};
// " (N similar lines suppressed)", or "" for 0.
std::string SuppressedNote(uint64_t dropped);

// Turns a stream expression into void so that PF_LOG fits in a ternary.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace portfleet

#define PF_LOG_LEVEL_DEBUG ::portfleet::LogLevel::kDebug
#define PF_LOG_LEVEL_INFO ::portfleet::LogLevel::kInfo
#define PF_LOG_LEVEL_WARNING ::portfleet::LogLevel::kWarning
#define PF_LOG_LEVEL_ERROR ::portfleet::LogLevel::kError

// The ternary keeps `if (x) PF_LOG(INFO) << y; else ...` unambiguous.
#define PF_LOG(level)                                 \
  (PF_LOG_LEVEL_##level < ::portfleet::GetLogLevel()) \
      ? (void)0                                       \
      : ::portfleet::LogVoidify() &                   \
            ::portfleet::LogMessage(PF_LOG_LEVEL_##level).stream()

#endif  // PORTFLEET_WORKER_SDK_BASE_LOG_H_
