// Messages as scripts see them: one reflection walk turns any protobuf
// message into a Value (numbers as numbers, enums by their short lower-case
// names, every field present), which prints as JSON or YAML. The raw proto3
// JSON (-o proto-json) and text format come from protobuf itself.
#ifndef PORTFLEET_CTL_RENDER_H_
#define PORTFLEET_CTL_RENDER_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"

namespace portfleet::ctl {

// A JSON-shaped value. Numbers keep their literal text, so 64-bit integers
// print exactly.
class Value {
 public:
  enum class Kind { kNull, kBool, kNumber, kString, kList, kMap };

  static Value Null() { return Value(Kind::kNull, ""); }
  static Value Bool(bool b) { return Value(Kind::kBool, b ? "true" : "false"); }
  static Value Number(std::string literal) {
    return Value(Kind::kNumber, std::move(literal));
  }
  static Value String(std::string s) {
    return Value(Kind::kString, std::move(s));
  }
  static Value List() { return Value(Kind::kList, ""); }
  static Value Map() { return Value(Kind::kMap, ""); }

  Kind kind() const { return kind_; }
  // The literal of a bool or number, the text of a string.
  const std::string& text() const { return text_; }
  const std::vector<Value>& items() const { return items_; }
  const std::vector<std::pair<std::string, Value>>& entries() const {
    return entries_;
  }

  void Append(Value v) { items_.push_back(std::move(v)); }
  // Keys keep their insertion (field) order.
  void Set(std::string key, Value v) {
    entries_.emplace_back(std::move(key), std::move(v));
  }

 private:
  Value(Kind kind, std::string text) : kind_(kind), text_(std::move(text)) {}

  Kind kind_;
  std::string text_;
  std::vector<Value> items_;
  std::vector<std::pair<std::string, Value>> entries_;
};

struct RenderOptions {
  // Enum values by ShortEnumName ("running") rather than their proto names
  // ("SHARD_STATE_RUNNING").
  bool short_enums = true;
  // Keys as the fields' declared names ("drain_timeout_seconds") rather than
  // their lowerCamelCase JSON names ("drainTimeoutSeconds").
  bool proto_field_names = false;
  // Every field, at its default value when unset (scripts find every key);
  // false = only the fields that are set, as a spec file is written.
  bool include_defaults = true;
};

Value ToValue(const google::protobuf::Message& message,
              const RenderOptions& options = {});

// JSON text. multiline: two-space indentation, one field a line; otherwise
// one line without spaces (JSON Lines for streams). No trailing newline.
std::string ToJson(const Value& value, bool multiline);
// YAML 1.2 block style (also read correctly by YAML 1.1 parsers: strings
// that could be read as anything else are quoted). Ends with a newline.
std::string ToYaml(const Value& value);

// The short name of an enum value, used everywhere the CLI shows or reads
// one: the value's name without its type's prefix, lower case, '_' -> '-'
// (SHARD_STATE_RUNNING -> "running", EVENT_TYPE_SHARD_RESTARTED ->
// "shard-restarted", ServingStatus NOT_SERVING -> "not-serving").
std::string ShortEnumName(const google::protobuf::EnumValueDescriptor* value);
// ShortEnumName of the value `number` of `type`; the number as text when the
// type has no such value (an agent newer than this client).
std::string ShortEnumName(const google::protobuf::EnumDescriptor* type,
                          int number);
// The value whose ShortEnumName is `name`; null when none.
const google::protobuf::EnumValueDescriptor* FindEnumValueByShortName(
    const google::protobuf::EnumDescriptor* type, absl::string_view name);
// The short names of every value but the zero (UNSPECIFIED) one.
std::vector<std::string> ShortEnumNames(
    const google::protobuf::EnumDescriptor* type);

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_RENDER_H_
