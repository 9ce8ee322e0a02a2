// Minimal leveled logging to stderr (bookworm's abseil has no absl/log).
//
//   PF_LOG(INFO) << "listener " << name << ": started";
//
// Lines look like "2026-11-27T21:54:55.123Z INFO  agent: message".
#ifndef PORTFLEET_WORKER_SDK_BASE_LOG_H_
#define PORTFLEET_WORKER_SDK_BASE_LOG_H_

#include <sstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace portfleet {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Process-wide settings; call once at start-up.
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
void SetLogTag(std::string tag);  // e.g. "agent", "worker web/2"
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);

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
