// Context: flags, output and the connection to the agent for one command.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "ctl/command.h"
#include "ctl/render.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"

namespace portfleet::ctl {
namespace {

constexpr absl::string_view kFormatNames[] = {
    "table", "wide", "json", "yaml", "name", "proto-json", "textproto"};

// The whole PEM file named by a --tls-* flag.
absl::StatusOr<std::string> ReadPemFile(const std::string& flag,
                                        const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return UsageError(
        absl::StrCat(flag, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream data;
  data << in.rdbuf();
  if (data.str().find("-----BEGIN ") == std::string::npos) {
    return UsageError(absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return data.str();
}

// Plain for unix: sockets; TLS (with a client certificate when given) when
// any --tls-* setting is present.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(
    const std::string& server, GlobalOptions opts, const CtlEnv& env,
    bool* tls) {
  *tls = false;
  if (absl::StartsWith(server, "unix:") ||
      absl::StartsWith(server, "unix-abstract:")) {
    return grpc::InsecureChannelCredentials();
  }
  auto from_env = [&](std::string& value, const char* name) {
    if (value.empty() && env.getenv) value = env.getenv(name).value_or("");
  };
  from_env(opts.tls_cert, "PORTFLEET_TLS_CERT");
  from_env(opts.tls_key, "PORTFLEET_TLS_KEY");
  from_env(opts.tls_ca, "PORTFLEET_TLS_CA");
  if (opts.tls_cert.empty() && opts.tls_key.empty() && opts.tls_ca.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  if (opts.tls_cert.empty() != opts.tls_key.empty()) {
    return UsageError(
        "--tls-cert and --tls-key go together (or PORTFLEET_TLS_CERT and "
        "PORTFLEET_TLS_KEY)");
  }
  grpc::SslCredentialsOptions ssl;
  if (!opts.tls_cert.empty()) {
    absl::StatusOr<std::string> cert = ReadPemFile("--tls-cert", opts.tls_cert);
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPemFile("--tls-key", opts.tls_key);
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
  }
  if (!opts.tls_ca.empty()) {
    absl::StatusOr<std::string> ca = ReadPemFile("--tls-ca", opts.tls_ca);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
  }
  *tls = true;
  return grpc::SslCredentials(ssl);
}

// Waits for one connection attempt: true once READY; false when it failed
// (TRANSIENT_FAILURE) or the deadline passed.
bool Connect(grpc::Channel* channel, absl::Time deadline) {
  grpc_connectivity_state state = channel->GetState(/*try_to_connect=*/true);
  while (state != GRPC_CHANNEL_READY) {
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE ||
        state == GRPC_CHANNEL_SHUTDOWN) {
      return false;
    }
    if (!channel->WaitForStateChange(state, absl::ToChronoTime(deadline))) {
      return false;
    }
    state = channel->GetState(/*try_to_connect=*/true);
  }
  return true;
}

std::string ProtoJson(const google::protobuf::Message& m, bool multiline) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = multiline;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace

std::string FormatName(Format format) {
  return std::string(kFormatNames[static_cast<int>(format)]);
}

std::optional<Format> ParseFormat(absl::string_view name) {
  for (size_t i = 0; i < std::size(kFormatNames); ++i) {
    if (kFormatNames[i] == name) return static_cast<Format>(i);
  }
  return std::nullopt;
}

Context::Context(const CtlEnv& env, Invocation invocation)
    : env_(env), inv_(std::move(invocation)), server_(inv_.global.server) {
  if (server_.empty() && env_.getenv) {
    server_ = env_.getenv("PORTFLEET_SERVER").value_or("");
  }
  if (server_.empty()) server_ = kDefaultServer;
}

Context::~Context() = default;

std::string Context::arg(size_t i) const {
  return i < inv_.args.size() ? inv_.args[i] : "";
}

std::optional<std::string> Context::Flag(const std::string& name) const {
  auto it = inv_.flags.find(name);
  if (it == inv_.flags.end() || it->second.empty()) return std::nullopt;
  return it->second.back();
}

std::vector<std::string> Context::FlagList(const std::string& name) const {
  std::vector<std::string> out;
  auto it = inv_.flags.find(name);
  if (it == inv_.flags.end()) return out;
  for (const std::string& v : it->second) {
    for (absl::string_view part : absl::StrSplit(v, ',', absl::SkipEmpty())) {
      out.emplace_back(part);
    }
  }
  return out;
}

bool Context::Switch(const std::string& name) const {
  return Flag(name).value_or("false") == "true";
}

absl::StatusOr<absl::Duration> Context::IntervalFlag() const {
  absl::Duration interval = absl::Seconds(2);
  if (std::optional<std::string> v = Flag("interval")) {
    if (!absl::ParseDuration(*v, &interval) ||
        interval < absl::Milliseconds(100)) {
      return UsageError(
          absl::StrCat("--interval: bad duration '", *v, "' (at least 100ms)"));
    }
  }
  return interval;
}

Format Context::format() const {
  if (inv_.global.output.has_value()) return *inv_.global.output;
  return command().formats.empty() ? Format::kTable : command().formats[0];
}

absl::Duration Context::timeout() const {
  if (inv_.global.timeout.has_value()) return *inv_.global.timeout;
  return command().section == Section::kChange ? absl::Minutes(2)
                                               : absl::Seconds(10);
}

bool Context::Interrupted() const {
  return env_.interrupted != nullptr && env_.interrupted->load();
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Context::Channel() {
  if (channel_ != nullptr) return channel_;
  if (std::string path = UnixSocketPath(server_); !path.empty()) {
    absl::Status probe = ProbeUnixSocket(path, server_);
    if (!probe.ok()) return probe;
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      Credentials(server_, inv_.global, env_, &tls_);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(64 << 20);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(server_, *credentials, channel_args);
  const absl::Duration connect = std::min(timeout(), absl::Seconds(10));
  if (!Connect(channel.get(), absl::Now() + connect)) {
    return WithExitCode(
        absl::UnavailableError(absl::StrCat(
            "cannot reach the agent at ", server_,
            " (is portfleet-agent running? set --server or PORTFLEET_SERVER",
            tls_ ? "; with TLS, check that the agent accepts the --tls-cert "
                   "and that --tls-ca signed its certificate"
                 : "",
            ")")),
        kExitUnreachable);
  }
  channel_ = std::move(channel);
  return channel_;
}

absl::StatusOr<v1::FleetService::Stub*> Context::Fleet() {
  if (fleet_ == nullptr) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Channel();
    if (!channel.ok()) return channel.status();
    fleet_ = v1::FleetService::NewStub(*channel);
  }
  return fleet_.get();
}

void Context::SetDeadline(grpc::ClientContext* ctx) const {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout()));
}

absl::Status Context::RpcError(const grpc::Status& status) const {
  absl::Status s = ::portfleet::ctl::RpcError(status, server_);
  if (tls_ && ExitCodeOf(s) == kExitUnreachable) {
    s = WithExitCode(
        absl::Status(s.code(),
                     absl::StrCat(s.message(),
                                  " (with TLS, check that the agent accepts "
                                  "the --tls-cert and that --tls-ca signed its "
                                  "certificate)")),
        kExitUnreachable);
  }
  return s;
}

void Context::Print(const google::protobuf::Message& message,
                    const TextPrinter& text) const {
  switch (format()) {
    case Format::kJson:
      out() << ToJson(ToValue(message), /*multiline=*/true) << "\n";
      return;
    case Format::kYaml:
      out() << ToYaml(ToValue(message));
      return;
    case Format::kProtoJson:
      out() << ProtoJson(message, /*multiline=*/true) << "\n";
      return;
    case Format::kTextproto: {
      std::string textproto;
      google::protobuf::TextFormat::PrintToString(message, &textproto);
      out() << textproto;
      return;
    }
    case Format::kTable:
    case Format::kWide:
    case Format::kName:
      text(format(), out());
      return;
  }
}

void Context::PrintItem(const google::protobuf::Message& message,
                        const TextPrinter& text) const {
  switch (format()) {
    case Format::kJson:
      out() << ToJson(ToValue(message), /*multiline=*/false) << "\n";
      break;
    case Format::kYaml:
      out() << "---\n" << ToYaml(ToValue(message));
      break;
    case Format::kProtoJson:
      out() << ProtoJson(message, /*multiline=*/false) << "\n";
      break;
    default:
      text(format(), out());
  }
  out().flush();
}

std::string ShardStateText(v1::ShardState state) {
  return ShortEnumName(v1::ShardState_descriptor(), state);
}

std::string ShardHealthText(v1::ShardHealth health) {
  if (health == v1::SHARD_HEALTH_UNSPECIFIED) return "-";
  return ShortEnumName(v1::ShardHealth_descriptor(), health);
}

std::string SteeringText(const v1::Steering& steering) {
  // UNSPECIFIED means HASH (fleet.proto).
  v1::SteeringPolicy policy =
      steering.policy() == v1::STEERING_POLICY_UNSPECIFIED
          ? v1::STEERING_POLICY_HASH
          : steering.policy();
  std::string text = ShortEnumName(v1::SteeringPolicy_descriptor(), policy);
  if (steering.weights_size() > 0) {
    absl::StrAppend(&text, " (", absl::StrJoin(steering.weights(), ","), ")");
  }
  return text;
}

std::string ListenerName(absl::string_view name) {
  return absl::StrCat("listener/", name);
}

}  // namespace portfleet::ctl
