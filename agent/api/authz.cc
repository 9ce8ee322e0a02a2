#include "agent/api/authz.h"

#include <fcntl.h>
#include <grpc/grpc_security_constants.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

using google::protobuf::ListValue;
using google::protobuf::Struct;
using google::protobuf::Value;

// Largest policy file we read.
constexpr size_t kMaxPolicyBytes = 1 << 20;

const char* KindName(const Value& v) {
  switch (v.kind_case()) {
    case Value::kNullValue:
      return "null";
    case Value::kNumberValue:
      return "a number";
    case Value::kStringValue:
      return "a string";
    case Value::kBoolValue:
      return "a boolean";
    case Value::kStructValue:
      return "an object";
    case Value::kListValue:
      return "an array";
    default:
      return "nothing";
  }
}

absl::Status Bad(absl::string_view source, absl::string_view where,
                 absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("authorization policy ", source, ": ", where,
                   where.empty() ? "" : ": ", what));
}

absl::Status CheckKnownFields(const Struct& s, absl::string_view source,
                              absl::string_view where,
                              const std::set<std::string>& known) {
  for (const auto& [key, value] : s.fields()) {
    if (known.count(key)) continue;
    std::string all;
    for (const std::string& k : known) {
      absl::StrAppend(&all, all.empty() ? "" : ", ", "\"", k, "\"");
    }
    return Bad(source, where,
               absl::StrCat("unknown or unsupported field \"", key,
                            "\" (expected ", all, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> NonEmptyString(const Struct& s,
                                           absl::string_view source,
                                           const std::string& where,
                                           const std::string& key) {
  auto it = s.fields().find(key);
  const std::string field = where.empty() ? key : where + "." + key;
  if (it == s.fields().end()) return Bad(source, field, "required");
  if (it->second.kind_case() != Value::kStringValue) {
    return Bad(source, field,
               absl::StrCat("expected a string, got ", KindName(it->second)));
  }
  if (it->second.string_value().empty()) {
    return Bad(source, field, "must not be empty");
  }
  return it->second.string_value();
}

// Reads s[key] (optional) as an object holding one optional list of patterns
// named `list`.
absl::Status PatternList(const Struct& s, absl::string_view source,
                         const std::string& where, const std::string& key,
                         const std::string& list,
                         std::vector<std::string>* out) {
  auto it = s.fields().find(key);
  if (it == s.fields().end()) return absl::OkStatus();
  const std::string field = absl::StrCat(where, ".", key);
  if (it->second.kind_case() != Value::kStructValue) {
    return Bad(source, field,
               absl::StrCat("expected an object, got ", KindName(it->second)));
  }
  const Struct& obj = it->second.struct_value();
  if (absl::Status st = CheckKnownFields(obj, source, field, {list});
      !st.ok()) {
    return st;
  }
  auto l = obj.fields().find(list);
  if (l == obj.fields().end()) return absl::OkStatus();
  const std::string list_field = absl::StrCat(field, ".", list);
  if (l->second.kind_case() != Value::kListValue) {
    return Bad(source, list_field,
               absl::StrCat("expected an array of strings, got ",
                            KindName(l->second)));
  }
  const ListValue& values = l->second.list_value();
  for (int i = 0; i < values.values_size(); ++i) {
    const Value& v = values.values(i);
    const std::string item = absl::StrCat(list_field, "[", i, "]");
    if (v.kind_case() != Value::kStringValue) {
      return Bad(source, item,
                 absl::StrCat("expected a string, got ", KindName(v)));
    }
    const std::string& p = v.string_value();
    if (p.empty()) return Bad(source, item, "must not be empty");
    if (size_t star = p.find('*');
        star != std::string::npos && star != p.size() - 1) {
      return Bad(source, item,
                 absl::StrCat("'", p,
                              "': '*' is only allowed at the end (\"*\" or "
                              "\"prefix*\")"));
    }
    out->push_back(p);
  }
  return absl::OkStatus();
}

absl::Status Rules(const Struct& top, absl::string_view source,
                   const std::string& key, bool required,
                   std::vector<AuthzRule>* out) {
  auto it = top.fields().find(key);
  if (it == top.fields().end()) {
    if (required) return Bad(source, key, "required");
    return absl::OkStatus();
  }
  if (it->second.kind_case() != Value::kListValue) {
    return Bad(
        source, key,
        absl::StrCat("expected an array of rules, got ", KindName(it->second)));
  }
  const ListValue& rules = it->second.list_value();
  if (required && rules.values_size() == 0) {
    return Bad(source, key, "must hold at least one rule");
  }
  std::set<std::string> names;
  for (int i = 0; i < rules.values_size(); ++i) {
    const Value& v = rules.values(i);
    const std::string where = absl::StrCat(key, "[", i, "]");
    if (v.kind_case() != Value::kStructValue) {
      return Bad(source, where,
                 absl::StrCat("expected a rule object, got ", KindName(v)));
    }
    const Struct& r = v.struct_value();
    if (absl::Status st =
            CheckKnownFields(r, source, where, {"name", "source", "request"});
        !st.ok()) {
      return st;
    }
    AuthzRule rule;
    absl::StatusOr<std::string> name = NonEmptyString(r, source, where, "name");
    if (!name.ok()) return name.status();
    rule.name = *name;
    if (!names.insert(rule.name).second) {
      return Bad(source, where + ".name",
                 absl::StrCat("duplicate rule name \"", rule.name, "\""));
    }
    if (absl::Status st = PatternList(r, source, where, "source", "principals",
                                      &rule.principals);
        !st.ok()) {
      return st;
    }
    if (absl::Status st =
            PatternList(r, source, where, "request", "paths", &rule.paths);
        !st.ok()) {
      return st;
    }
    out->push_back(std::move(rule));
  }
  return absl::OkStatus();
}

bool AnyMatches(const std::vector<std::string>& patterns,
                absl::string_view value) {
  if (patterns.empty()) return true;
  for (const std::string& p : patterns) {
    if (AuthzPatternMatches(p, value)) return true;
  }
  return false;
}

bool RuleMatches(const AuthzRule& rule,
                 const std::vector<std::string>& principals,
                 absl::string_view path) {
  if (!AnyMatches(rule.paths, path)) return false;
  if (rule.principals.empty()) return true;
  for (const std::string& p : principals) {
    if (AnyMatches(rule.principals, p)) return true;
  }
  // "*" matches a caller with no name at all, as in gRPC.
  if (principals.empty()) {
    for (const std::string& p : rule.principals) {
      if (p == "*") return true;
    }
  }
  return false;
}

}  // namespace

bool AuthzPatternMatches(absl::string_view pattern, absl::string_view value) {
  if (pattern == "*") return true;
  if (absl::EndsWith(pattern, "*")) {
    return absl::StartsWith(value, pattern.substr(0, pattern.size() - 1));
  }
  return pattern == value;
}

std::vector<std::string> PeerPrincipals(const grpc::AuthContext& auth) {
  std::vector<std::string> out;
  for (const char* property :
       {GRPC_PEER_URI_PROPERTY_NAME, GRPC_PEER_DNS_PROPERTY_NAME}) {
    for (const grpc::string_ref& v : auth.FindPropertyValues(property)) {
      out.emplace_back(v.data(), v.size());
    }
  }
  if (out.empty()) {
    for (const grpc::string_ref& v :
         auth.FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME)) {
      out.emplace_back(v.data(), v.size());
    }
  }
  return out;
}

absl::StatusOr<AuthzPolicy> ParseAuthzPolicy(absl::string_view json,
                                             absl::string_view source) {
  Struct top;
  google::protobuf::util::JsonParseOptions options;
  auto parsed = google::protobuf::util::JsonStringToMessage(std::string(json),
                                                            &top, options);
  if (!parsed.ok()) {
    return Bad(
        source, "",
        absl::StrCat("not a JSON object: ", std::string(parsed.message())));
  }
  if (absl::Status st = CheckKnownFields(top, source, "",
                                         {"name", "allow_rules", "deny_rules"});
      !st.ok()) {
    return st;
  }
  AuthzPolicy policy;
  absl::StatusOr<std::string> name = NonEmptyString(top, source, "", "name");
  if (!name.ok()) return name.status();
  policy.name = *name;
  if (absl::Status st =
          Rules(top, source, "deny_rules", false, &policy.deny_rules);
      !st.ok()) {
    return st;
  }
  if (absl::Status st =
          Rules(top, source, "allow_rules", true, &policy.allow_rules);
      !st.ok()) {
    return st;
  }
  return policy;
}

absl::StatusOr<AuthzPolicy> LoadAuthzPolicyFile(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    return ErrnoError(absl::StrCat("open authorization policy ", path));
  }
  std::string json;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(absl::StrCat("read authorization policy ", path));
    }
    if (n == 0) break;
    json.append(buf, static_cast<size_t>(n));
    if (json.size() > kMaxPolicyBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("authorization policy ", path, ": larger than ",
                       kMaxPolicyBytes, " bytes"));
    }
  }
  if (json.find_first_not_of(" \t\r\n") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("authorization policy ", path, ": file is empty"));
  }
  return ParseAuthzPolicy(json, path);
}

AuthzDecision EvaluateAuthzPolicy(const AuthzPolicy& policy,
                                  const std::vector<std::string>& principals,
                                  absl::string_view path) {
  for (const AuthzRule& r : policy.deny_rules) {
    if (RuleMatches(r, principals, path)) return {false, r.name};
  }
  for (const AuthzRule& r : policy.allow_rules) {
    if (RuleMatches(r, principals, path)) return {true, r.name};
  }
  return {false, ""};
}

bool AuthzPolicyFile::FileVersion::operator==(const FileVersion& o) const {
  return exists == o.exists && mtime.tv_sec == o.mtime.tv_sec &&
         mtime.tv_nsec == o.mtime.tv_nsec && size == o.size && inode == o.inode;
}

AuthzPolicyFile::FileVersion AuthzPolicyFile::Stat() const {
  FileVersion v;
  struct stat st;
  if (::stat(path_.c_str(), &st) != 0) return v;
  v.exists = true;
  v.mtime = st.st_mtim;
  v.size = st.st_size;
  v.inode = st.st_ino;
  return v;
}

absl::StatusOr<std::unique_ptr<AuthzPolicyFile>> AuthzPolicyFile::Load(
    const std::string& path, absl::Duration recheck_interval) {
  std::unique_ptr<AuthzPolicyFile> file(
      new AuthzPolicyFile(path, recheck_interval));
  // Stat before reading: a change during the read is seen at the next check.
  file->version_ = file->Stat();
  absl::StatusOr<AuthzPolicy> policy = LoadAuthzPolicyFile(path);
  if (!policy.ok()) return policy.status();
  file->policy_ = std::make_shared<const AuthzPolicy>(*std::move(policy));
  file->last_check_ = absl::Now();
  return file;
}

void AuthzPolicyFile::MaybeReloadLocked() {
  absl::Time now = absl::Now();
  if (now - last_check_ < recheck_interval_) return;
  last_check_ = now;
  FileVersion v = Stat();
  if (v == version_) return;
  version_ = v;
  absl::StatusOr<AuthzPolicy> policy = LoadAuthzPolicyFile(path_);
  if (!policy.ok()) {
    last_reload_status_ = policy.status();
    PF_LOG(ERROR) << "keeping authorization policy \"" << policy_->name
                  << "\": reload failed: " << policy.status().message();
    return;
  }
  last_reload_status_ = absl::OkStatus();
  policy_ = std::make_shared<const AuthzPolicy>(*std::move(policy));
  PF_LOG(INFO) << "authorization policy \"" << policy_->name
               << "\" reloaded from " << path_;
}

AuthzDecision AuthzPolicyFile::Check(const std::vector<std::string>& principals,
                                     absl::string_view path) {
  std::shared_ptr<const AuthzPolicy> policy;
  {
    std::lock_guard<std::mutex> lock(mu_);
    MaybeReloadLocked();
    policy = policy_;
  }
  return EvaluateAuthzPolicy(*policy, principals, path);
}

std::string AuthzPolicyFile::policy_name() {
  std::lock_guard<std::mutex> lock(mu_);
  return policy_->name;
}

absl::Status AuthzPolicyFile::last_reload_status() {
  std::lock_guard<std::mutex> lock(mu_);
  return last_reload_status_;
}

}  // namespace portfleet
