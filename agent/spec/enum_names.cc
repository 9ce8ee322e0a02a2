#include "agent/spec/enum_names.h"

#include <cctype>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"

namespace portfleet {
namespace {

// "ShardState" -> "SHARD_STATE_".
std::string ValuePrefix(const google::protobuf::EnumDescriptor* type) {
  std::string out;
  for (char c : type->name()) {
    if (std::isupper(static_cast<unsigned char>(c)) && !out.empty()) {
      out.push_back('_');
    }
    out.push_back(absl::ascii_toupper(c));
  }
  out.push_back('_');
  return out;
}

}  // namespace

std::string ShortEnumName(const google::protobuf::EnumDescriptor* type,
                          int value) {
  const google::protobuf::EnumValueDescriptor* v =
      type->FindValueByNumber(value);
  if (v == nullptr) return absl::StrCat("unknown(", value, ")");
  absl::string_view name = v->name();
  absl::ConsumePrefix(&name, ValuePrefix(type));
  return absl::AsciiStrToLower(name);
}

std::optional<int> ParseShortEnumName(
    const google::protobuf::EnumDescriptor* type, absl::string_view name) {
  std::string prefix = ValuePrefix(type);
  for (int i = 0; i < type->value_count(); ++i) {
    const google::protobuf::EnumValueDescriptor* v = type->value(i);
    absl::string_view full = v->name();
    absl::string_view short_name = full;
    absl::ConsumePrefix(&short_name, prefix);
    if (absl::EqualsIgnoreCase(name, full) ||
        absl::EqualsIgnoreCase(name, short_name)) {
      return v->number();
    }
  }
  return std::nullopt;
}

}  // namespace portfleet
