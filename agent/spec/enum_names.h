// Short names of the API's enum values, converted once at the edges (logs,
// /metrics, the CLI): SHARD_STATE_RUNNING -> "running",
// STEERING_POLICY_CPU -> "cpu", EVENT_TYPE_DRAIN_BEGUN -> "drain_begun".
// The prefix is the enum's own name in UPPER_SNAKE_CASE, as the protobuf
// style guide requires of every value.
#ifndef PORTFLEET_AGENT_SPEC_ENUM_NAMES_H_
#define PORTFLEET_AGENT_SPEC_ENUM_NAMES_H_

#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "google/protobuf/generated_enum_reflection.h"

namespace portfleet {

// "unknown(7)" for a value the descriptor does not know.
std::string ShortEnumName(const google::protobuf::EnumDescriptor* type,
                          int value);
// The value whose short (or full) name is `name`, case-insensitively.
std::optional<int> ParseShortEnumName(
    const google::protobuf::EnumDescriptor* type, absl::string_view name);

template <typename E>
std::string ShortName(E value) {
  return ShortEnumName(google::protobuf::GetEnumDescriptor<E>(),
                       static_cast<int>(value));
}

template <typename E>
std::optional<E> ParseShortName(absl::string_view name) {
  std::optional<int> v =
      ParseShortEnumName(google::protobuf::GetEnumDescriptor<E>(), name);
  if (!v.has_value()) return std::nullopt;
  return static_cast<E>(*v);
}

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_SPEC_ENUM_NAMES_H_
