// Authorization of API calls on the TLS listener by a gRPC authorization
// policy file (the JSON format of gRPC proposal A43), checked in our own code
// because Debian's gRPC 1.51 ships no FileWatcherAuthorizationPolicyProvider.
//
// Supported subset:
//
//   {
//     "name": "portfleet-api",
//     "deny_rules": [ ... ],            // optional
//     "allow_rules": [                  // required
//       {
//         "name": "readers",
//         "source": {"principals": ["spiffe://example/reader", "*"]},
//         "request": {"paths": ["/portfleet.v1.FleetService/List*"]}
//       }
//     ]
//   }
//
// A rule without "source" (or with no principals) matches every principal; a
// rule without "request" (or with no paths) matches every method. Principals
// and paths are exact strings, "*" (anything) or "prefix*". A matching deny
// rule wins; otherwise a matching allow rule admits the call; otherwise the
// call is refused. Unknown fields (e.g. "headers", a misspelt "deny_rule")
// are errors, never silently ignored.
#ifndef PORTFLEET_AGENT_API_AUTHZ_H_
#define PORTFLEET_AGENT_API_AUTHZ_H_

#include <grpcpp/security/auth_context.h>
#include <sys/types.h>

#include <ctime>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace portfleet {

// Whether `value` matches `pattern`: "*" matches anything, "abc*" anything
// starting with "abc", anything else only itself.
bool AuthzPatternMatches(absl::string_view pattern, absl::string_view value);

struct AuthzRule {
  std::string name;
  std::vector<std::string> principals;  // empty = any principal
  std::vector<std::string> paths;       // empty = any method
};

struct AuthzPolicy {
  std::string name;
  std::vector<AuthzRule> deny_rules;
  std::vector<AuthzRule> allow_rules;
};

struct AuthzDecision {
  bool allowed = false;
  // The deny or allow rule that decided; empty when no rule matched.
  std::string rule;
};

// Parses a policy. `source` names it in errors ("policy.json: allow_rules[1]
// .request.paths[0]: expected a string").
absl::StatusOr<AuthzPolicy> ParseAuthzPolicy(absl::string_view json,
                                             absl::string_view source);
// Reads and parses a policy file; errors name the file.
absl::StatusOr<AuthzPolicy> LoadAuthzPolicyFile(const std::string& path);

// Decides for a caller known by `principals` (any of which may match a
// rule's principal) calling `path` ("/package.Service/Method").
AuthzDecision EvaluateAuthzPolicy(const AuthzPolicy& policy,
                                  const std::vector<std::string>& principals,
                                  absl::string_view path);

// Names of a TLS peer to match against principals: the URI and DNS entries
// of its certificate's subject alternative names or, when it has none, its
// subject's common name. Empty for a peer without a certificate.
std::vector<std::string> PeerPrincipals(const grpc::AuthContext& auth);

// A policy file that is reloaded when it changes: Check() looks at the file
// (mtime, size, inode) at most once per `recheck_interval`. A bad new version
// is logged as an error and the last good policy stays in force; the file is
// read again once it changes again.
class AuthzPolicyFile {
 public:
  // Fails (naming the file) when the file is missing or invalid.
  static absl::StatusOr<std::unique_ptr<AuthzPolicyFile>> Load(
      const std::string& path,
      absl::Duration recheck_interval = absl::Seconds(1));

  AuthzPolicyFile(const AuthzPolicyFile&) = delete;
  AuthzPolicyFile& operator=(const AuthzPolicyFile&) = delete;

  AuthzDecision Check(const std::vector<std::string>& principals,
                      absl::string_view path);

  const std::string& path() const { return path_; }
  // Name of the policy in force.
  std::string policy_name();
  // Error of the last reload attempt (OK when the last attempt succeeded).
  absl::Status last_reload_status();

 private:
  struct FileVersion {
    bool exists = false;
    timespec mtime{};
    off_t size = 0;
    ino_t inode = 0;
    bool operator==(const FileVersion& o) const;
  };

  AuthzPolicyFile(std::string path, absl::Duration recheck_interval)
      : path_(std::move(path)), recheck_interval_(recheck_interval) {}
  FileVersion Stat() const;
  void MaybeReloadLocked();

  const std::string path_;
  const absl::Duration recheck_interval_;
  std::mutex mu_;
  std::shared_ptr<const AuthzPolicy> policy_;
  FileVersion version_;
  absl::Time last_check_ = absl::InfinitePast();
  absl::Status last_reload_status_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_API_AUTHZ_H_
