#include "ctl/render.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "google/protobuf/timestamp.pb.h"
#include "google/protobuf/util/time_util.h"

namespace portfleet::ctl {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::EnumDescriptor;
using google::protobuf::EnumValueDescriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// Shortest text that reads back as the same double; NaN and infinities as
// proto3 JSON spells them (strings).
Value DoubleValue(double d) {
  if (std::isnan(d)) return Value::String("NaN");
  if (std::isinf(d)) return Value::String(d > 0 ? "Infinity" : "-Infinity");
  for (int precision = 1; precision <= 17; ++precision) {
    std::string text = absl::StrFormat("%.*g", precision, d);
    if (std::strtod(text.c_str(), nullptr) == d) return Value::Number(text);
  }
  return Value::Number(absl::StrFormat("%.17g", d));
}

Value EnumValue(const EnumDescriptor* type, int number,
                const RenderOptions& options) {
  const EnumValueDescriptor* v = type->FindValueByNumber(number);
  if (v == nullptr) return Value::Number(absl::StrCat(number));
  return Value::String(options.short_enums ? ShortEnumName(v)
                                           : std::string(v->name()));
}

Value MessageValue(const Message& m, const RenderOptions& options);

// One element of a field: the field's value when it is singular, its
// `index`th element when repeated.
Value FieldValue(const Message& m, const FieldDescriptor* f, int index,
                 const RenderOptions& options) {
  const Reflection* r = m.GetReflection();
  const bool rep = f->is_repeated();
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
      return Value::Number(absl::StrCat(rep ? r->GetRepeatedInt32(m, f, index)
                                            : r->GetInt32(m, f)));
    case FieldDescriptor::CPPTYPE_INT64:
      return Value::Number(absl::StrCat(rep ? r->GetRepeatedInt64(m, f, index)
                                            : r->GetInt64(m, f)));
    case FieldDescriptor::CPPTYPE_UINT32:
      return Value::Number(absl::StrCat(rep ? r->GetRepeatedUInt32(m, f, index)
                                            : r->GetUInt32(m, f)));
    case FieldDescriptor::CPPTYPE_UINT64:
      return Value::Number(absl::StrCat(rep ? r->GetRepeatedUInt64(m, f, index)
                                            : r->GetUInt64(m, f)));
    case FieldDescriptor::CPPTYPE_DOUBLE:
      return DoubleValue(rep ? r->GetRepeatedDouble(m, f, index)
                             : r->GetDouble(m, f));
    case FieldDescriptor::CPPTYPE_FLOAT:
      return DoubleValue(rep ? r->GetRepeatedFloat(m, f, index)
                             : r->GetFloat(m, f));
    case FieldDescriptor::CPPTYPE_BOOL:
      return Value::Bool(rep ? r->GetRepeatedBool(m, f, index)
                             : r->GetBool(m, f));
    case FieldDescriptor::CPPTYPE_ENUM:
      return EnumValue(
          f->enum_type(),
          rep ? r->GetRepeatedEnumValue(m, f, index) : r->GetEnumValue(m, f),
          options);
    case FieldDescriptor::CPPTYPE_STRING: {
      std::string s =
          rep ? r->GetRepeatedString(m, f, index) : r->GetString(m, f);
      if (f->type() == FieldDescriptor::TYPE_BYTES) {
        return Value::String(absl::Base64Escape(s));
      }
      return Value::String(std::move(s));
    }
    case FieldDescriptor::CPPTYPE_MESSAGE:
      return MessageValue(
          rep ? r->GetRepeatedMessage(m, f, index) : r->GetMessage(m, f),
          options);
  }
  return Value::Null();
}

// A map field: an object keyed by the entries' keys as text.
Value MapValue(const Message& m, const FieldDescriptor* f,
               const RenderOptions& options) {
  Value map = Value::Map();
  const Reflection* r = m.GetReflection();
  const FieldDescriptor* key = f->message_type()->map_key();
  const FieldDescriptor* value = f->message_type()->map_value();
  for (int i = 0; i < r->FieldSize(m, f); ++i) {
    const Message& entry = r->GetRepeatedMessage(m, f, i);
    Value k = FieldValue(entry, key, 0, options);
    map.Set(k.text(), FieldValue(entry, value, 0, options));
  }
  return map;
}

bool IsPresent(const Message& m, const FieldDescriptor* f,
               const RenderOptions& options) {
  const Reflection* r = m.GetReflection();
  if (f->is_repeated()) return options.include_defaults || r->FieldSize(m, f);
  // Oneof members and proto3 `optional` fields have presence: print them
  // only when set. Otherwise print defaults when asked.
  if (f->has_presence()) {
    return r->HasField(m, f) ||
           (options.include_defaults && f->containing_oneof() == nullptr &&
            f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE);
  }
  return options.include_defaults || r->HasField(m, f);
}

Value MessageValue(const Message& m, const RenderOptions& options) {
  const Descriptor* d = m.GetDescriptor();
  // Timestamps print as RFC 3339 text, as in proto3 JSON.
  if (d->full_name() == "google.protobuf.Timestamp") {
    return Value::String(google::protobuf::util::TimeUtil::ToString(
        static_cast<const google::protobuf::Timestamp&>(m)));
  }
  Value out = Value::Map();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (!IsPresent(m, f, options)) continue;
    std::string key = options.proto_field_names ? std::string(f->name())
                                                : std::string(f->json_name());
    if (f->is_map()) {
      out.Set(key, MapValue(m, f, options));
    } else if (f->is_repeated()) {
      Value list = Value::List();
      const int n = m.GetReflection()->FieldSize(m, f);
      for (int j = 0; j < n; ++j) list.Append(FieldValue(m, f, j, options));
      out.Set(key, std::move(list));
    } else {
      out.Set(key, FieldValue(m, f, 0, options));
    }
  }
  return out;
}

void AppendJsonString(std::string* out, absl::string_view s) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          absl::StrAppendFormat(out, "\\u%04x", c);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

void AppendJson(std::string* out, const Value& v, bool multiline, int depth) {
  const std::string indent = multiline ? std::string(2 * (depth + 1), ' ') : "";
  const std::string close = multiline ? std::string(2 * depth, ' ') : "";
  const char* newline = multiline ? "\n" : "";
  switch (v.kind()) {
    case Value::Kind::kNull:
      out->append("null");
      return;
    case Value::Kind::kBool:
    case Value::Kind::kNumber:
      out->append(v.text());
      return;
    case Value::Kind::kString:
      AppendJsonString(out, v.text());
      return;
    case Value::Kind::kList:
      if (v.items().empty()) {
        out->append("[]");
        return;
      }
      out->push_back('[');
      for (size_t i = 0; i < v.items().size(); ++i) {
        absl::StrAppend(out, i ? "," : "", newline, indent);
        AppendJson(out, v.items()[i], multiline, depth + 1);
      }
      absl::StrAppend(out, newline, close, "]");
      return;
    case Value::Kind::kMap:
      if (v.entries().empty()) {
        out->append("{}");
        return;
      }
      out->push_back('{');
      for (size_t i = 0; i < v.entries().size(); ++i) {
        absl::StrAppend(out, i ? "," : "", newline, indent);
        AppendJsonString(out, v.entries()[i].first);
        out->append(multiline ? ": " : ":");
        AppendJson(out, v.entries()[i].second, multiline, depth + 1);
      }
      absl::StrAppend(out, newline, close, "}");
      return;
  }
}

// A string that a YAML 1.1 or 1.2 reader takes for the same string without
// quotes: starts with a letter, '_' or '/', has no character that YAML treats
// specially, and is not one of the words that read as booleans or null.
bool IsPlainYaml(absl::string_view s) {
  if (s.empty()) return false;
  const unsigned char first = s.front();
  if (!absl::ascii_isalpha(first) && first != '_' && first != '/' &&
      first < 0x80) {
    return false;
  }
  if (s.back() == ' ') return false;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) return false;
    if (absl::string_view(":#{}[],&*!|>'\"%@`\\").find(static_cast<char>(c)) !=
        absl::string_view::npos) {
      return false;
    }
  }
  static constexpr absl::string_view kWords[] = {"y",    "n",   "yes",  "no",
                                                 "on",   "off", "true", "false",
                                                 "null", "~",   ".inf", ".nan"};
  for (absl::string_view w : kWords) {
    if (absl::EqualsIgnoreCase(s, w)) return false;
  }
  return true;
}

void AppendYamlScalar(std::string* out, const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNull:
      out->append("null");
      return;
    case Value::Kind::kBool:
    case Value::Kind::kNumber:
      out->append(v.text());
      return;
    case Value::Kind::kString:
      // A JSON string is a valid YAML double-quoted scalar.
      if (IsPlainYaml(v.text())) {
        out->append(v.text());
      } else {
        AppendJsonString(out, v.text());
      }
      return;
    case Value::Kind::kList:
      out->append("[]");
      return;
    case Value::Kind::kMap:
      out->append("{}");
      return;
  }
}

bool IsBlock(const Value& v) {
  return (v.kind() == Value::Kind::kList && !v.items().empty()) ||
         (v.kind() == Value::Kind::kMap && !v.entries().empty());
}

// Appends the key/value or item lines of a non-empty collection, indented by
// `indent` spaces; with first_inline the first line continues the current
// one (after "- ").
void AppendYamlBlock(std::string* out, const Value& v, int indent,
                     bool first_inline) {
  const std::string pad(indent, ' ');
  bool first = true;
  auto line_start = [&] {
    if (!(first && first_inline)) out->append(pad);
    first = false;
  };
  if (v.kind() == Value::Kind::kMap) {
    for (const auto& [key, child] : v.entries()) {
      line_start();
      AppendYamlScalar(out, Value::String(key));
      out->push_back(':');
      if (!IsBlock(child)) {
        out->push_back(' ');
        AppendYamlScalar(out, child);
        out->push_back('\n');
      } else if (child.kind() == Value::Kind::kList) {
        // Sequences under a key are not indented (as kubectl writes them).
        out->push_back('\n');
        AppendYamlBlock(out, child, indent, false);
      } else {
        out->push_back('\n');
        AppendYamlBlock(out, child, indent + 2, false);
      }
    }
    return;
  }
  for (const Value& item : v.items()) {
    line_start();
    out->append("- ");
    if (IsBlock(item)) {
      AppendYamlBlock(out, item, indent + 2, true);
    } else {
      AppendYamlScalar(out, item);
      out->push_back('\n');
    }
  }
}

std::string UpperSnake(absl::string_view camel) {
  std::string out;
  for (size_t i = 0; i < camel.size(); ++i) {
    const char c = camel[i];
    if (absl::ascii_isupper(c) && i > 0) out.push_back('_');
    out.push_back(absl::ascii_toupper(c));
  }
  return out;
}

}  // namespace

Value ToValue(const google::protobuf::Message& message,
              const RenderOptions& options) {
  return MessageValue(message, options);
}

std::string ToJson(const Value& value, bool multiline) {
  std::string out;
  AppendJson(&out, value, multiline, 0);
  return out;
}

std::string ToYaml(const Value& value) {
  std::string out;
  if (!IsBlock(value)) {
    AppendYamlScalar(&out, value);
    out.push_back('\n');
    return out;
  }
  AppendYamlBlock(&out, value, 0, false);
  return out;
}

std::string ShortEnumName(const EnumValueDescriptor* value) {
  absl::string_view name = value->name();
  const std::string prefix = UpperSnake(value->type()->name()) + "_";
  absl::ConsumePrefix(&name, prefix);
  std::string out = absl::AsciiStrToLower(name);
  for (char& c : out) {
    if (c == '_') c = '-';
  }
  return out;
}

std::string ShortEnumName(const EnumDescriptor* type, int number) {
  const EnumValueDescriptor* v = type->FindValueByNumber(number);
  return v == nullptr ? absl::StrCat(number) : ShortEnumName(v);
}

const EnumValueDescriptor* FindEnumValueByShortName(const EnumDescriptor* type,
                                                    absl::string_view name) {
  for (int i = 0; i < type->value_count(); ++i) {
    if (ShortEnumName(type->value(i)) == name) return type->value(i);
  }
  return nullptr;
}

std::vector<std::string> ShortEnumNames(const EnumDescriptor* type) {
  std::vector<std::string> names;
  for (int i = 0; i < type->value_count(); ++i) {
    if (type->value(i)->number() != 0) {
      names.push_back(ShortEnumName(type->value(i)));
    }
  }
  return names;
}

}  // namespace portfleet::ctl
