#include "agent/api/server.h"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "worker/sdk/base/fd.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

absl::StatusOr<std::string> ReadSmallFile(const std::string& path,
                                          const char* what) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return ErrnoError(absl::StrCat("open ", what, " ", path));
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(absl::StrCat("read ", what, " ", path));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

absl::StatusOr<gid_t> LookUpGroup(const std::string& group) {
  uint32_t gid;
  if (absl::SimpleAtoi(group, &gid)) return static_cast<gid_t>(gid);
  errno = 0;
  struct group* g = ::getgrnam(group.c_str());
  if (g == nullptr) {
    if (errno != 0) return ErrnoError(absl::StrCat("look up group ", group));
    return absl::InvalidArgumentError(
        absl::StrCat("socket group '", group, "': no such group"));
  }
  return g->gr_gid;
}

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Whether `dir` holds nothing but sockets (*.sock) and our temporary bind
// directories (.api-*): a socket directory made for us (a hostPath, a
// RuntimeDirectory), not a directory the operator shares with other files.
bool OnlySocketsIn(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return false;
  bool only = true;
  while (dirent* e = ::readdir(d)) {
    absl::string_view name(e->d_name);
    if (name == "." || name == ".." || absl::EndsWith(name, ".sock") ||
        absl::StartsWith(name, ".api-")) {
      continue;
    }
    only = false;
    break;
  }
  ::closedir(d);
  return only;
}

// Creates `dir` 0751 (and its group) if missing: the group may list it,
// others may only pass through to a socket whose name they know (the
// control socket beside the API socket, which workers running as another
// user reconnect to; the API socket itself is 0660). An existing directory
// of ours that holds only sockets loses any permission beyond 0751 (a
// hostPath or RuntimeDirectory is created 0755): the promise is "directory
// 0751" however it came to exist. A directory shared with other files is
// left as it is (the socket itself is 0660).
absl::Status EnsureSocketDir(const std::string& dir, gid_t gid) {
  if (::mkdir(dir.c_str(), 0751) != 0) {
    if (errno == EEXIST) {
      struct stat st;
      if (::stat(dir.c_str(), &st) != 0) {
        return ErrnoError(absl::StrCat("stat ", dir));
      }
      if (!S_ISDIR(st.st_mode)) {
        return absl::FailedPreconditionError(
            absl::StrCat("API socket directory ", dir, " is not a directory"));
      }
      const mode_t mode = st.st_mode & 07777;
      if (st.st_uid == ::geteuid() && (mode & ~0751) != 0 &&
          OnlySocketsIn(dir) && ::chmod(dir.c_str(), mode & 0751) != 0) {
        return ErrnoError(absl::StrFormat("chmod %04o %s", mode & 0751, dir));
      }
      return absl::OkStatus();
    }
    return ErrnoError(absl::StrCat("create API socket directory ", dir));
  }
  // mkdir honours the umask; say what we mean.
  if (::chmod(dir.c_str(), 0751) != 0) {
    return ErrnoError(absl::StrCat("chmod 0751 ", dir));
  }
  if (gid != static_cast<gid_t>(-1) &&
      ::chown(dir.c_str(), static_cast<uid_t>(-1), gid) != 0) {
    return ErrnoError(absl::StrCat("chown group of ", dir));
  }
  return absl::OkStatus();
}

// Removes a socket file nobody listens on; refuses when an agent answers.
absl::Status ClearStaleSocket(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return ErrnoError(absl::StrCat("stat ", path));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, " exists and is not a socket; refusing to replace it"));
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("API socket path too long: ", path));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError("socket(AF_UNIX)");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) ==
      0) {
    return absl::FailedPreconditionError(
        absl::StrCat("another agent is serving the API on ", path,
                     "; stop it first or choose another --api address"));
  }
  if (errno != ECONNREFUSED && errno != ENOENT) {
    return ErrnoError(absl::StrCat("probe existing socket ", path));
  }
  PF_LOG(INFO) << "removing stale API socket " << path;
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoError(absl::StrCat("remove stale socket ", path));
  }
  return absl::OkStatus();
}

void CommonOptions(grpc::ServerBuilder& builder,
                   const ApiServerOptions& options) {
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             options.max_concurrent_streams);
}

// Reads a PEM file and checks that it holds a `kind` block ("CERTIFICATE",
// "PRIVATE KEY").
absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what,
                                    const char* flag, const char* kind) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS API listener needs ", what, " (", flag, ")"));
  }
  ASSIGN_OR_RETURN(std::string pem, ReadSmallFile(path, what));
  if (pem.find("-----BEGIN ") == std::string::npos ||
      pem.find(absl::StrCat(kind, "-----")) == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", path, ": no PEM ", kind,
                     " block (-----BEGIN ...", kind, "-----) found"));
  }
  return pem;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TlsCredentials(
    const ApiServerOptions& options) {
  ASSIGN_OR_RETURN(std::string cert,
                   ReadPem(options.tls_cert, "TLS certificate",
                           "--api-tls-cert", "CERTIFICATE"));
  ASSIGN_OR_RETURN(std::string key, ReadPem(options.tls_key, "TLS key",
                                            "--api-tls-key", "PRIVATE KEY"));
  ASSIGN_OR_RETURN(std::string ca,
                   ReadPem(options.tls_client_ca, "TLS client CA",
                           "--api-tls-client-ca", "CERTIFICATE"));
  if (options.authz_policy_file.empty()) {
    return absl::InvalidArgumentError(
        "TLS API listener needs an authorization policy file "
        "(--api-authz-policy)");
  }
  grpc::SslServerCredentialsOptions ssl(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = ca;
  ssl.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(ssl);
}

// The authorizer of the TLS listener's FleetService.
grpc::Status Authorize(AuthzPolicyFile& authz, grpc::CallbackServerContext* ctx,
                       const std::string& method) {
  std::vector<std::string> principals;
  if (std::shared_ptr<const grpc::AuthContext> auth = ctx->auth_context()) {
    principals = PeerPrincipals(*auth);
  }
  AuthzDecision d = authz.Check(principals, method);
  if (d.allowed) return grpc::Status::OK;
  const std::string who =
      principals.empty()
          ? std::string("a client without a name")
          : absl::StrCat("\"", absl::StrJoin(principals, "\", \""), "\"");
  std::string message = absl::StrCat(
      "permission denied: ", who, " may not call ", method,
      " (authorization policy \"", authz.policy_name(), "\": ",
      d.rule.empty() ? std::string("no allow rule matches")
                     : absl::StrCat("denied by rule \"", d.rule, "\""),
      ")");
  PF_LOG(INFO) << "API: " << message << " [peer " << ctx->peer() << "]";
  return grpc::Status(grpc::PERMISSION_DENIED, message);
}

}  // namespace

absl::StatusOr<std::string> UnixSocketPath(const std::string& address) {
  std::string path;
  if (absl::StartsWith(address, "unix://")) {
    path = address.substr(7);
  } else if (absl::StartsWith(address, "unix:")) {
    path = address.substr(5);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "API address '", address, "': expected unix:///path/to/api.sock"));
  }
  if (path.empty() || path.back() == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("API address '", address, "': no socket file name"));
  }
  if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("API address '", address, "': path longer than ",
                     sizeof(sockaddr_un{}.sun_path) - 1, " bytes"));
  }
  return path;
}

absl::StatusOr<std::unique_ptr<ApiServer>> ApiServer::Start(
    const ApiServerOptions& options, FleetController* controller) {
  if (options.address.empty() && options.tls_address.empty()) {
    return absl::InvalidArgumentError("API server: no address to serve on");
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  std::unique_ptr<ApiServer> server(new ApiServer());

  // Everything the TLS listener needs is read before anything is served, so
  // that a bad file fails Start cleanly.
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> tls_credentials;
  FleetServiceOptions tls_service_options = options.service;
  if (!options.tls_address.empty()) {
    tls_credentials = TlsCredentials(options);
    if (!tls_credentials.ok()) return tls_credentials.status();
    ASSIGN_OR_RETURN(server->authz_,
                     AuthzPolicyFile::Load(options.authz_policy_file));
    PF_LOG(INFO) << "authorization policy \"" << server->authz_->policy_name()
                 << "\" loaded from " << options.authz_policy_file;
    tls_service_options.authorize = [authz = server->authz_.get()](
                                        grpc::CallbackServerContext* ctx,
                                        const std::string& method) {
      return Authorize(*authz, ctx, method);
    };
  }

  if (!options.address.empty()) {
    ASSIGN_OR_RETURN(std::string path, UnixSocketPath(options.address));
    gid_t gid = static_cast<gid_t>(-1);
    if (!options.socket_group.empty()) {
      ASSIGN_OR_RETURN(gid, LookUpGroup(options.socket_group));
    }
    const std::string dir = Dirname(path);
    RETURN_IF_ERROR(EnsureSocketDir(dir, gid));
    RETURN_IF_ERROR(ClearStaleSocket(path));

    // Bind in a private directory so that no one can connect before the
    // socket has its final mode, then move it into place.
    std::string private_dir = absl::StrCat(dir, "/.api-XXXXXX");
    if (::mkdtemp(private_dir.data()) == nullptr) {
      return ErrnoError(absl::StrCat("create temp directory in ", dir));
    }
    const std::string tmp_path = absl::StrCat(private_dir, "/s");
    auto cleanup = [&] {
      ::unlink(tmp_path.c_str());
      ::rmdir(private_dir.c_str());
    };
    if (tmp_path.size() >= sizeof(sockaddr_un{}.sun_path)) {
      cleanup();
      return absl::InvalidArgumentError(
          absl::StrCat("API socket directory path too long: ", dir));
    }

    server->service_ =
        std::make_unique<FleetServiceImpl>(controller, options.service);
    grpc::ServerBuilder builder;
    CommonOptions(builder, options);
    builder.AddListeningPort(absl::StrCat("unix:", tmp_path),
                             grpc::InsecureServerCredentials());
    builder.RegisterService(server->service_.get());
    server->server_ = builder.BuildAndStart();
    if (server->server_ == nullptr) {
      cleanup();
      return absl::UnavailableError(
          absl::StrCat("cannot serve the API on ", tmp_path));
    }
    server->server_->GetHealthCheckService()->SetServingStatus(false);
    if (::chmod(tmp_path.c_str(), 0660) != 0) {
      absl::Status s = ErrnoError(absl::StrCat("chmod 0660 ", tmp_path));
      server->Shutdown();
      cleanup();
      return s;
    }
    if (gid != static_cast<gid_t>(-1) &&
        ::chown(tmp_path.c_str(), static_cast<uid_t>(-1), gid) != 0) {
      absl::Status s = ErrnoError(absl::StrCat("chown group of ", tmp_path));
      server->Shutdown();
      cleanup();
      return s;
    }
    if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
      absl::Status s =
          ErrnoError(absl::StrCat("rename ", tmp_path, " to ", path));
      server->Shutdown();
      cleanup();
      return s;
    }
    ::rmdir(private_dir.c_str());
    server->socket_path_ = path;
    PF_LOG(INFO) << "API serving on unix:" << path;
  }

  if (!options.tls_address.empty()) {
    grpc::ServerBuilder builder;
    CommonOptions(builder, options);
    builder.AddListeningPort(options.tls_address, *std::move(tls_credentials),
                             &server->tls_port_);
    server->tls_service_ =
        std::make_unique<FleetServiceImpl>(controller, tls_service_options);
    builder.RegisterService(server->tls_service_.get());
    server->tls_server_ = builder.BuildAndStart();
    if (server->tls_server_ == nullptr || server->tls_port_ == 0) {
      return absl::UnavailableError(absl::StrCat(
          "cannot serve the TLS API on ", options.tls_address,
          " (address in use or not local, or the key in ", options.tls_key,
          " does not match the certificate in ", options.tls_cert, ")"));
    }
    server->tls_server_->GetHealthCheckService()->SetServingStatus(false);
    PF_LOG(INFO) << "API serving with mutual TLS on " << options.tls_address
                 << " (port " << server->tls_port_ << "), authorization policy "
                 << options.authz_policy_file;
  }
  return server;
}

ApiServer::~ApiServer() { Shutdown(); }

void ApiServer::SetServing(bool serving) {
  for (grpc::Server* s : {server_.get(), tls_server_.get()}) {
    if (s == nullptr || s->GetHealthCheckService() == nullptr) continue;
    s->GetHealthCheckService()->SetServingStatus("", serving);
    s->GetHealthCheckService()->SetServingStatus(kFleetServiceName, serving);
  }
}

void ApiServer::SetHealth(const AgentHealth& health) {
  std::vector<std::pair<std::string, bool>> statuses;
  std::vector<std::string> names;
  for (const ListenerHealthStatus& l : health.listeners) {
    bool serving = l.state == v1::HEALTH_STATE_SERVING ||
                   l.state == v1::HEALTH_STATE_DEGRADED;
    std::string name = absl::StrCat(kListenerServicePrefix, l.name);
    statuses.emplace_back(name, serving);
    names.push_back(name);
  }
  for (const std::string& old : listener_services_) {
    if (std::find(names.begin(), names.end(), old) == names.end()) {
      statuses.emplace_back(old, false);
    }
  }
  listener_services_ = std::move(names);
  for (grpc::Server* s : {server_.get(), tls_server_.get()}) {
    if (s == nullptr || s->GetHealthCheckService() == nullptr) continue;
    for (const auto& [name, serving] : statuses) {
      s->GetHealthCheckService()->SetServingStatus(name, serving);
    }
  }
  SetServing(health.ready());
}

void ApiServer::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  if (service_ != nullptr) service_->StopWatchers();
  if (tls_service_ != nullptr) tls_service_->StopWatchers();
  auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(5);
  for (grpc::Server* s : {server_.get(), tls_server_.get()}) {
    if (s == nullptr) continue;
    if (s->GetHealthCheckService() != nullptr) {
      s->GetHealthCheckService()->Shutdown();
    }
    s->Shutdown(deadline);
  }
  for (grpc::Server* s : {server_.get(), tls_server_.get()}) {
    if (s != nullptr) s->Wait();
  }
  // Controller calls still queued finish (cancelled) before the services go.
  service_.reset();
  tls_service_.reset();
  if (!socket_path_.empty()) ::unlink(socket_path_.c_str());
}

}  // namespace portfleet
