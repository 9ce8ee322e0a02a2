#include "agent/spec/spec.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/spec/enum_names.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

// Collects text-format parse errors with their positions (1-based).
class FirstErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (!has_error_) {
      has_error_ = true;
      message_ = absl::StrCat(line + 1, ":", column + 1, ": ", message);
    }
  }
  void AddWarning(int line, google::protobuf::io::ColumnNumber column,
                  const std::string& message) override {}
  bool has_error() const { return has_error_; }
  const std::string& message() const { return message_; }

 private:
  bool has_error_ = false;
  std::string message_;
};

std::string ListenerRef(int index, const v1::Listener& l) {
  if (l.name().empty()) return absl::StrCat("listeners[", index, "]");
  return absl::StrCat("listeners[", index, "] (\"", l.name(), "\")");
}

}  // namespace

bool IsDnsLabel(absl::string_view name) {
  if (name.empty() || name.size() > 63) return false;
  if (name.front() == '-' || name.back() == '-') return false;
  for (char c : name) {
    if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '-')) {
      return false;
    }
  }
  return true;
}

namespace {

// No NUL bytes (an exec'd argv or environment would cut them short) and
// bounded sizes.
absl::Status ValidateWorkerStrings(const v1::WorkerSpec& w) {
  auto check = [](absl::string_view field, const std::string& value) {
    if (value.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": contains a NUL byte"));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check("worker.command", w.command()));
  RETURN_IF_ERROR(check("worker.user", w.user()));
  RETURN_IF_ERROR(check("worker.group", w.group()));
  size_t bytes = w.command().size();
  for (int i = 0; i < w.args_size(); ++i) {
    RETURN_IF_ERROR(check(absl::StrCat("worker.args[", i, "]"), w.args(i)));
    bytes += w.args(i).size();
  }
  for (int i = 0; i < w.env_size(); ++i) {
    RETURN_IF_ERROR(check(absl::StrCat("worker.env[", i, "]"), w.env(i)));
    bytes += w.env(i).size();
  }
  if (w.args_size() > kMaxWorkerArgs || w.env_size() > kMaxWorkerArgs) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker: ", w.args_size(), " args and ", w.env_size(),
                     " env entries; at most ", kMaxWorkerArgs, " of each"));
  }
  if (bytes > kMaxWorkerSpecBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker: command, args and env take ", bytes,
                     " bytes; at most ", kMaxWorkerSpecBytes));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// Messages name the field relative to RebalanceSpec ("period_seconds: ...").
absl::Status ValidateRebalance(const v1::RebalanceSpec& r) {
  if (!v1::RebalanceMode_IsValid(r.mode())) {
    return absl::InvalidArgumentError(
        absl::StrCat("mode: unknown value ", r.mode()));
  }
  if (!v1::RebalanceMetric_IsValid(r.metric())) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric: unknown value ", r.metric()));
  }
  if (r.threshold_percent() != 0 &&
      (r.threshold_percent() < kMinRebalanceThresholdPercent ||
       r.threshold_percent() > kMaxRebalancePercent)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "threshold_percent: ", r.threshold_percent(), " is out of range (",
        kMinRebalanceThresholdPercent, "-", kMaxRebalancePercent,
        "; 0 = default ", kDefaultRebalanceThresholdPercent, ")"));
  }
  if (r.target_percent() != 0 &&
      (r.target_percent() < kMinRebalanceTargetPercent ||
       r.target_percent() > kMaxRebalancePercent)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "target_percent: ", r.target_percent(), " is out of range (",
        kMinRebalanceTargetPercent, "-", kMaxRebalancePercent, "; 0 = default ",
        kDefaultRebalanceTargetPercent, ")"));
  }
  const uint32_t threshold = r.threshold_percent() > 0
                                 ? r.threshold_percent()
                                 : kDefaultRebalanceThresholdPercent;
  if (r.target_percent() > threshold) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_percent: ", r.target_percent(),
                     " is above the threshold (threshold_percent ", threshold,
                     "): a rebalance must stop at or below where it starts"));
  }
  if (r.period_seconds() != 0 &&
      (r.period_seconds() < kMinRebalancePeriodSeconds ||
       r.period_seconds() > kMaxRebalancePeriodSeconds)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "period_seconds: ", r.period_seconds(), " is out of range (",
        kMinRebalancePeriodSeconds, "-", kMaxRebalancePeriodSeconds,
        "; 0 = default ", kDefaultRebalancePeriodSeconds, ")"));
  }
  if (r.max_moves_per_period() > kMaxRebalanceMaxMoves) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_moves_per_period: ", r.max_moves_per_period(),
                     " is out of range (0-", kMaxRebalanceMaxMoves,
                     "; 0 = default ", kDefaultRebalanceMaxMoves, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateListener(const v1::Listener& l) {
  if (l.name().empty()) {
    return absl::InvalidArgumentError("name: required");
  }
  if (!IsDnsLabel(l.name())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "name: '", l.name(),
        "' is not a DNS label (1-63 characters of a-z, 0-9 and '-', not "
        "starting or ending with '-')"));
  }
  if (l.address().empty()) {
    return absl::InvalidArgumentError(
        "address: required (host:port, e.g. 127.0.0.1:8080 or [::1]:8080)");
  }
  absl::StatusOr<SocketAddress> addr = SocketAddress::Parse(l.address());
  if (!addr.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("address: ", addr.status().message()));
  }
  if (addr->family() == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(addr->get());
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
      char v4[INET_ADDRSTRLEN] = {};
      ::inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], v4, sizeof(v4));
      return absl::InvalidArgumentError(absl::StrCat(
          "address: ", l.address(),
          " is an IPv4-mapped IPv6 address, which IPv6-only shard sockets "
          "cannot bind; write it as ",
          v4, ":", addr->port()));
    }
  }
  if (l.shards() > kMaxShards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shards: ", l.shards(), " is out of range (0-", kMaxShards,
                     "; 0 = one per online CPU)"));
  }
  if (!l.has_worker() || l.worker().command().empty()) {
    return absl::InvalidArgumentError(
        "worker.command: required (the program to run per shard, e.g. "
        "\"portfleet-worker\")");
  }
  RETURN_IF_ERROR(ValidateWorkerStrings(l.worker()));
  if (!v1::SocketMode_IsValid(l.worker().socket_mode())) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker.socket_mode: ", l.worker().socket_mode(),
                     " is not a SocketMode (SOCKET_MODE_INHERITED or "
                     "SOCKET_MODE_SELF_BOUND)"));
  }
  for (const std::string& e : l.worker().env()) {
    size_t eq = e.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker.env: '", e, "' is not of the form NAME=value"));
    }
  }
  if (l.drain_timeout_seconds() > kMaxDrainTimeoutSeconds) {
    return absl::InvalidArgumentError(
        absl::StrCat("drain_timeout_seconds: ", l.drain_timeout_seconds(),
                     " is out of range (0-", kMaxDrainTimeoutSeconds,
                     "; 0 = default ", kDefaultDrainTimeoutSeconds, ")"));
  }
  if (l.backlog() > kMaxBacklog) {
    return absl::InvalidArgumentError(
        absl::StrCat("backlog: ", l.backlog(), " is out of range (0-",
                     kMaxBacklog, "; 0 = default ", kDefaultBacklog, ")"));
  }
  if (l.defer_accept_seconds() > kMaxDeferAcceptSeconds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "defer_accept_seconds: ", l.defer_accept_seconds(),
        " is out of range (0-", kMaxDeferAcceptSeconds, "; 0 = off)"));
  }
  const v1::HealthSpec& health = l.health();
  if (health.stall_window_ms() != 0 &&
      (health.stall_window_ms() < kMinStallWindowMs ||
       health.stall_window_ms() > kMaxStallWindowMs)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "health.stall_window_ms: ", health.stall_window_ms(),
        " is out of range (", kMinStallWindowMs, "-", kMaxStallWindowMs,
        "; 0 = default ", kDefaultStallWindowMs, ")"));
  }
  if (health.stall_grace_seconds() > kMaxStallGraceSeconds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "health.stall_grace_seconds: ", health.stall_grace_seconds(),
        " is out of range (0-", kMaxStallGraceSeconds, "; 0 = default ",
        kDefaultStallGraceSeconds, ")"));
  }
  if (absl::Status s = ValidateRebalance(l.rebalance()); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("rebalance.", s.message()));
  }
  if (l.steering().weights_size() > 0 && l.shards() == 0) {
    return absl::InvalidArgumentError(
        "steering.weights: needs an explicit shard count (shards: 0 means "
        "one per CPU, which varies by host)");
  }
  absl::Status steering = ValidateSteering(l.steering(), l.shards());
  if (steering.ok()) return steering;
  return absl::Status(steering.code(),
                      absl::StrCat("steering.", steering.message()));
}

absl::Status ValidateSteering(const v1::Steering& s,
                              std::optional<uint32_t> shards) {
  if (!v1::SteeringPolicy_IsValid(s.policy())) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy: unknown value ", s.policy()));
  }
  if (s.weights_size() == 0) return absl::OkStatus();
  if (s.policy() == v1::STEERING_POLICY_CPU) {
    return absl::InvalidArgumentError(
        "weights: weights apply to STEERING_POLICY_HASH and "
        "STEERING_POLICY_LEAST_CONNECTIONS only");
  }
  if (s.weights_size() > static_cast<int>(kMaxShards)) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: ", s.weights_size(), " weights for at most ",
                     kMaxShards, " shards"));
  }
  if (shards.has_value() &&
      static_cast<uint32_t>(s.weights_size()) != *shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: ", s.weights_size(), " weights for ", *shards,
                     " shards (want one each)"));
  }
  bool any = false;
  for (uint32_t w : s.weights()) {
    if (w > kMaxWeight) {
      return absl::InvalidArgumentError(
          absl::StrCat("weights: ", w, " is too large (max ", kMaxWeight, ")"));
    }
    any = any || w > 0;
  }
  if (!any) {
    return absl::InvalidArgumentError(
        "weights: all weights are 0 (at least one shard must take new "
        "connections)");
  }
  return absl::OkStatus();
}

absl::Status ValidateFleetSpec(const v1::FleetSpec& spec,
                               absl::string_view source) {
  if (spec.listeners_size() > kMaxListeners) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": ", spec.listeners_size(),
                     " listeners; at most ", kMaxListeners, " per agent"));
  }
  std::map<std::string, int> names;
  std::map<std::string, int> addresses;  // canonical address -> index
  for (int i = 0; i < spec.listeners_size(); ++i) {
    const v1::Listener& l = spec.listeners(i);
    std::string ref = ListenerRef(i, l);
    if (absl::Status s = ValidateListener(l); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": ", ref, ": ", s.message()));
    }
    if (auto [it, inserted] = names.emplace(l.name(), i); !inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": ", ref, ": name: duplicate name '", l.name(),
                       "' (also listeners[", it->second, "])"));
    }
    std::string canonical = SocketAddress::Parse(l.address())->ToString();
    if (auto [it, inserted] = addresses.emplace(canonical, i); !inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": ", ref, ": address: duplicate address ",
                       canonical, " (also listeners[", it->second, "] \"",
                       spec.listeners(it->second).name(), "\")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::FleetSpec> ParseFleetSpec(absl::string_view text,
                                             SpecFormat format,
                                             absl::string_view source) {
  v1::FleetSpec spec;
  std::string input(text);
  if (format == SpecFormat::kJson) {
    google::protobuf::util::JsonParseOptions options;
    options.ignore_unknown_fields = false;
    auto status =
        google::protobuf::util::JsonStringToMessage(input, &spec, options);
    if (!status.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": ", status.message().as_string()));
    }
  } else {
    google::protobuf::TextFormat::Parser parser;
    FirstErrorCollector errors;
    parser.RecordErrorsTo(&errors);
    if (!parser.ParseFromString(input, &spec)) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ":",
          errors.has_error() ? errors.message() : " cannot be parsed"));
    }
  }
  RETURN_IF_ERROR(ValidateFleetSpec(spec, source));
  return spec;
}

absl::StatusOr<v1::FleetSpec> LoadFleetSpecFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return ErrnoError(absl::StrCat("cannot read fleet spec ", path));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return ErrnoError(absl::StrCat("reading fleet spec ", path));
  std::string lower = absl::AsciiStrToLower(path);
  SpecFormat format;
  if (absl::EndsWith(lower, ".json")) {
    format = SpecFormat::kJson;
  } else if (absl::EndsWith(lower, ".textproto") ||
             absl::EndsWith(lower, ".txtpb") ||
             absl::EndsWith(lower, ".pbtxt") || absl::EndsWith(lower, ".txt")) {
    format = SpecFormat::kTextproto;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        ": unknown spec format (want a .textproto, .txtpb or .json file)"));
  }
  return ParseFleetSpec(ss.str(), format, path);
}

void MakeCommandAbsolute(v1::WorkerSpec* worker) {
  const std::string& command = worker->command();
  if (command.empty() || command[0] == '/' ||
      command.find('/') == std::string::npos) {
    return;
  }
  std::error_code ec;
  std::filesystem::path absolute = std::filesystem::absolute(command, ec);
  if (!ec) {
    worker->set_command(absolute.lexically_normal().string());
  }
}

uint32_t EffectiveShards(const v1::Listener& l, int online_cpus) {
  if (l.shards() > 0) return l.shards();
  uint32_t n = online_cpus > 0 ? static_cast<uint32_t>(online_cpus) : 1;
  return n > kMaxShards ? kMaxShards : n;
}

uint32_t EffectiveBacklog(const v1::Listener& l) {
  return l.backlog() > 0 ? l.backlog() : kDefaultBacklog;
}

uint32_t EffectiveDrainTimeoutSeconds(const v1::Listener& l) {
  return l.drain_timeout_seconds() > 0 ? l.drain_timeout_seconds()
                                       : kDefaultDrainTimeoutSeconds;
}

uint32_t EffectiveStallWindowMs(const v1::Listener& l) {
  return l.health().stall_window_ms() > 0 ? l.health().stall_window_ms()
                                          : kDefaultStallWindowMs;
}

uint32_t EffectiveStallGraceSeconds(const v1::Listener& l) {
  return l.health().stall_grace_seconds() > 0 ? l.health().stall_grace_seconds()
                                              : kDefaultStallGraceSeconds;
}

EffectiveRebalance EffectiveRebalanceOf(const v1::Listener& l) {
  const v1::RebalanceSpec& r = l.rebalance();
  EffectiveRebalance e;
  e.automatic = r.mode() == v1::REBALANCE_MODE_AUTO;
  if (r.metric() != v1::REBALANCE_METRIC_UNSPECIFIED) e.metric = r.metric();
  const uint32_t threshold = r.threshold_percent() > 0
                                 ? r.threshold_percent()
                                 : kDefaultRebalanceThresholdPercent;
  const uint32_t target =
      r.target_percent() > 0
          ? r.target_percent()
          : std::min(kDefaultRebalanceTargetPercent, threshold);
  e.threshold = threshold / 100.0;
  e.target = target / 100.0;
  if (r.period_seconds() > 0) e.period_seconds = r.period_seconds();
  if (r.max_moves_per_period() > 0) e.max_moves = r.max_moves_per_period();
  e.move_connections =
      !r.steering_only() && e.metric == v1::REBALANCE_METRIC_CONNECTIONS;
  return e;
}

std::string DescribeRebalance(const v1::Listener& l) {
  const EffectiveRebalance r = EffectiveRebalanceOf(l);
  if (!r.automatic) return "off";
  return absl::StrFormat(
      "auto %s %.2f->%.2f every %us, %s", ShortName(r.metric), r.threshold,
      r.target, r.period_seconds,
      r.move_connections ? absl::StrCat(r.max_moves, " moves")
                         : std::string("steering only"));
}

}  // namespace portfleet
