#include "ctl/ctl.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/client_unary_call.h>
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/spec/spec.h"
#include "ctl/table.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "worker/sdk/base/version.h"

namespace portfleet::ctl {
namespace {

constexpr char kGlobalUsage[] =
    R"(portfleetctl controls a portfleet agent.

Usage:
  portfleetctl [--server ADDR] [-o table|json] [--timeout DURATION]
               [--tls-cert FILE --tls-key FILE [--tls-ca FILE]] COMMAND

Read-only commands:
  status                 agent version, uptime, BPF steering
  get listeners          every listener
  get listener NAME      one listener
  get shards NAME        the shards of a listener
  events                 follow fleet events (Ctrl-C to stop)
  top [NAME]             refreshing per-shard view (q or Ctrl-C to quit)
  health                 grpc.health.v1 status of the agent
  version                client and server versions

State-changing commands:
  apply -f FILE          create or update the listeners of a fleet spec
  delete listener NAME   drain and remove a listener
  scale NAME --shards N  change the shard count
  drain NAME --shard I   drain and remove one shard
  steer NAME --policy cpu|hash [--weights W1,W2,...]
  rollout NAME [--worker-command CMD] [--worker-args "A B"] [--max-surge N]
                         rolling upgrade of the workers

Global flags:
  --server ADDR          agent API address (default $PORTFLEET_SERVER or
                         unix:///run/portfleet/api.sock)
  -o, --output FORMAT    table (default) or json
  --timeout DURATION     per-call deadline, e.g. 10s, 500ms (default 10s;
                         2m for apply, delete, scale, drain, rollout)
  --tls-cert FILE        client certificate (PEM) for an agent's remote API
                         (--server HOST:PORT, mutual TLS); default
                         $PORTFLEET_TLS_CERT
  --tls-key FILE         private key (PEM) of --tls-cert; default
                         $PORTFLEET_TLS_KEY
  --tls-ca FILE          CA (PEM) that signed the agent's certificate; default
                         $PORTFLEET_TLS_CA, else the system's CAs
                         The --tls-* settings are ignored for unix: addresses.
                         Example: portfleetctl --server agent1:7443 \
                           --tls-cert me.pem --tls-key me.key --tls-ca ca.pem \
                           get listeners

Exit codes: 0 ok, 1 error from the agent, 2 usage error, 3 agent unreachable.
Run 'portfleetctl COMMAND --help' for a command's flags and an example.
)";

struct Options {
  std::string server;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  std::string output = "table";
  std::optional<absl::Duration> timeout;
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;  // command flags, by long name
  bool help = false;
};

class UsageError {
 public:
  explicit UsageError(std::string message) : message(std::move(message)) {}
  std::string message;
};

// Context handed to each command.
struct Call {
  const CtlEnv& env;
  const Options& opts;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::FleetService::Stub> stub;
  absl::Duration timeout;
  bool json() const { return opts.output == "json"; }
  std::ostream& out() const { return *env.out; }
};

struct Command {
  std::string name;  // "get listeners"
  std::string args;  // "NAME"
  int positional;    // exact count of positional arguments after the name
  std::vector<std::string> flags;  // allowed command flags
  bool mutating;
  std::string help;
  int (*run)(Call& call);
};

int Fail(const CtlEnv& env, int code, absl::string_view message) {
  *env.err << "portfleetctl: " << message << "\n";
  return code;
}

std::string CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK:
      return "OK";
    case grpc::CANCELLED:
      return "CANCELLED";
    case grpc::UNKNOWN:
      return "UNKNOWN";
    case grpc::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::ABORTED:
      return "ABORTED";
    case grpc::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::INTERNAL:
      return "INTERNAL";
    case grpc::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return absl::StrCat("code ", static_cast<int>(code));
  }
}

// Error from an RPC: UNAVAILABLE means we never reached the agent.
int RpcFail(const Call& call, const grpc::Status& status) {
  if (status.error_code() == grpc::UNAVAILABLE) {
    return Fail(call.env, kExitUnreachable,
                absl::StrCat("cannot reach the agent at ", call.opts.server,
                             ": ", status.error_message()));
  }
  return Fail(call.env, kExitAgentError,
              absl::StrCat(status.error_message(), " (",
                           CodeName(status.error_code()), ")"));
}

void SetDeadline(const Call& call, grpc::ClientContext* ctx) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + call.timeout));
}

std::string ToJson(const google::protobuf::Message& m, bool multiline) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = multiline;
  o.preserve_proto_field_names = false;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  if (!multiline) return out;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

void PrintJson(const Call& call, const google::protobuf::Message& m) {
  call.out() << ToJson(m, /*multiline=*/true) << "\n";
}

std::string PolicyName(v1::SteeringPolicy p) {
  switch (p) {
    case v1::STEERING_POLICY_CPU:
      return "cpu";
    case v1::STEERING_POLICY_HASH:
    case v1::STEERING_POLICY_UNSPECIFIED:
      return "hash";
    default:
      return absl::StrCat(static_cast<int>(p));
  }
}

std::string SteeringText(const v1::Steering& s) {
  std::string text = PolicyName(s.policy());
  if (s.weights_size() > 0) {
    absl::StrAppend(&text, " (", absl::StrJoin(s.weights(), ","), ")");
  }
  return text;
}

std::string ShardStateName(v1::ShardState s) {
  std::string name = v1::ShardState_Name(s);
  absl::string_view v = name;
  if (absl::ConsumePrefix(&v, "SHARD_STATE_")) name = std::string(v);
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  return name;
}

std::string EventTypeName(v1::EventType t) {
  std::string name = v1::EventType_Name(t);
  absl::string_view v = name;
  if (absl::ConsumePrefix(&v, "EVENT_TYPE_")) name = std::string(v);
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  std::replace(name.begin(), name.end(), '_', '-');
  return name;
}

std::string FormatUptime(int64_t seconds) {
  absl::Duration d = absl::Seconds(seconds);
  if (d >= absl::Hours(48)) return absl::StrCat(seconds / 86400, "d");
  if (d >= absl::Hours(1)) {
    return absl::StrCat(seconds / 3600, "h", (seconds % 3600) / 60, "m");
  }
  if (d >= absl::Minutes(1)) {
    return absl::StrCat(seconds / 60, "m", seconds % 60, "s");
  }
  return absl::StrCat(seconds, "s");
}

void AddListenerRow(Table& t, const v1::ListenerState& l) {
  int ready = 0;
  for (const v1::Shard& s : l.shards()) ready += s.ready() ? 1 : 0;
  std::string shards =
      l.spec().shards() == 0 ? "auto" : absl::StrCat(l.spec().shards());
  std::string worker = l.spec().worker().command();
  if (l.spec().worker().args_size() > 0) {
    absl::StrAppend(&worker, " ", absl::StrJoin(l.spec().worker().args(), " "));
  }
  t.AddRow({l.spec().name(), l.spec().address(), shards,
            absl::StrCat(ready, "/", l.shards_size()),
            SteeringText(l.spec().steering()), worker});
}

Table ListenerTable() {
  return Table({"NAME", "ADDRESS", "SHARDS", "READY", "STEERING", "WORKER"});
}

void PrintShards(const Call& call,
                 const google::protobuf::RepeatedPtrField<v1::Shard>& shards) {
  Table t({"INDEX", "STATE", "READY", "PID", "CPU", "RESTARTS", "QUEUE",
           "CONNECTIONS", "SELECTED", "MIGRATED", "FALLBACK"});
  for (const v1::Shard& s : shards) {
    t.AddRow(
        {absl::StrCat(s.index()), ShardStateName(s.state()),
         s.ready() ? "yes" : "no", s.pid() > 0 ? absl::StrCat(s.pid()) : "-",
         s.cpu() >= 0 ? absl::StrCat(s.cpu()) : "-", absl::StrCat(s.restarts()),
         absl::StrCat(s.queue_depth()), absl::StrCat(s.active_connections()),
         absl::StrCat(s.counters().selected()),
         absl::StrCat(s.counters().migrated()),
         absl::StrCat(s.counters().fallback())});
  }
  t.Print(call.out());
}

// --- read-only commands ---------------------------------------------------

int CmdStatus(Call& call) {
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::GetStatusResponse resp;
  grpc::Status s = call.stub->GetStatus(&ctx, v1::GetStatusRequest(), &resp);
  if (!s.ok()) return RpcFail(call, s);
  if (call.json()) {
    PrintJson(call, resp);
    return kExitOk;
  }
  Table t({"VERSION", "UPTIME", "LISTENERS", "SERVING", "BPF-STEERING"});
  std::string bpf =
      resp.bpf_steering_active()
          ? "active"
          : absl::StrCat("inactive: ", resp.bpf_unavailable_reason());
  t.AddRow({resp.version(), FormatUptime(resp.uptime_seconds()),
            absl::StrCat(resp.listeners()), resp.serving() ? "yes" : "no",
            bpf});
  t.Print(call.out());
  return kExitOk;
}

int CmdGetListeners(Call& call) {
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::ListListenersResponse resp;
  grpc::Status s =
      call.stub->ListListeners(&ctx, v1::ListListenersRequest(), &resp);
  if (!s.ok()) return RpcFail(call, s);
  if (call.json()) {
    PrintJson(call, resp);
    return kExitOk;
  }
  if (resp.listeners_size() == 0) {
    call.out() << "No listeners.\n";
    return kExitOk;
  }
  Table t = ListenerTable();
  for (const v1::ListenerState& l : resp.listeners()) AddListenerRow(t, l);
  t.Print(call.out());
  return kExitOk;
}

int CmdGetListener(Call& call) {
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::GetListenerRequest req;
  req.set_name(call.opts.positional[0]);
  v1::GetListenerResponse resp;
  grpc::Status s = call.stub->GetListener(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  if (call.json()) {
    PrintJson(call, resp);
    return kExitOk;
  }
  Table t = ListenerTable();
  AddListenerRow(t, resp.listener());
  t.Print(call.out());
  return kExitOk;
}

int CmdGetShards(Call& call) {
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::ListShardsRequest req;
  req.set_name(call.opts.positional[0]);
  v1::ListShardsResponse resp;
  grpc::Status s = call.stub->ListShards(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  if (call.json()) {
    PrintJson(call, resp);
    return kExitOk;
  }
  PrintShards(call, resp.shards());
  return kExitOk;
}

bool Interrupted(const CtlEnv& env) {
  return env.interrupted != nullptr && env.interrupted->load();
}

int CmdEvents(Call& call) {
  grpc::ClientContext ctx;  // no deadline: follows until stopped
  v1::WatchEventsRequest req;
  if (auto it = call.opts.flags.find("listener"); it != call.opts.flags.end()) {
    req.set_listener(it->second);
  }
  std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader =
      call.stub->WatchEvents(&ctx, req);
  // Ctrl-C cancels the stream from this thread.
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    while (!done.load()) {
      if (Interrupted(call.env)) {
        ctx.TryCancel();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  bool header = false;
  v1::WatchEventsResponse resp;
  while (reader->Read(&resp)) {
    const v1::Event& e = resp.event();
    if (call.json()) {
      call.out() << ToJson(e, /*multiline=*/false) << "\n";
    } else {
      if (!header) {
        call.out() << "TIME                       TYPE               LISTENER"
                      "         SHARD   PID      MESSAGE\n";
        header = true;
      }
      std::string time = absl::FormatTime(
          "%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMicros(e.time_unix_micros()),
          absl::UTCTimeZone());
      std::string line = absl::StrCat(
          time, std::string(27 - std::min<size_t>(27, time.size()), ' '));
      auto pad = [](std::string s, size_t w) {
        if (s.size() < w) s.append(w - s.size(), ' ');
        return s + " ";
      };
      absl::StrAppend(&line, pad(EventTypeName(e.type()), 18),
                      pad(e.listener().empty() ? "-" : e.listener(), 16),
                      pad(e.shard() >= 0 ? absl::StrCat(e.shard()) : "-", 7),
                      pad(e.pid() > 0 ? absl::StrCat(e.pid()) : "-", 8),
                      e.message());
      call.out() << line << "\n";
    }
    call.out().flush();
  }
  grpc::Status s = reader->Finish();
  done.store(true);
  watcher.join();
  if (Interrupted(call.env) && s.error_code() == grpc::CANCELLED) {
    return kExitOk;
  }
  if (!s.ok()) return RpcFail(call, s);
  return kExitOk;
}

// Raw keyboard input for `top`: restores the terminal on destruction.
class RawInput {
 public:
  explicit RawInput(int fd) : fd_(fd) {
    if (fd_ < 0 || tcgetattr(fd_, &saved_) != 0) {
      fd_ = -1;
      return;
    }
    termios raw = saved_;
    raw.c_lflag &= ~(ICANON | ECHO);
    raw.c_cc[VMIN] = 0;
    raw.c_cc[VTIME] = 0;
    tcsetattr(fd_, TCSANOW, &raw);
  }
  ~RawInput() {
    if (fd_ >= 0) tcsetattr(fd_, TCSANOW, &saved_);
  }
  // Waits up to `timeout` for a key; true when 'q' was pressed or the
  // input ended.
  bool WaitQuit(absl::Duration timeout) {
    absl::Time end = absl::Now() + timeout;
    while (absl::Now() < end) {
      int ms = static_cast<int>(
          std::min<int64_t>(100, absl::ToInt64Milliseconds(end - absl::Now())));
      if (fd_ < 0) return WaitRest(end);
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, std::max(ms, 1)) > 0) {
        char c;
        ssize_t n = read(fd_, &c, 1);
        if (n == 0) return true;
        if (n == 1 && (c == 'q' || c == 'Q')) return true;
      }
      if (interrupted_ != nullptr && interrupted_->load()) return true;
    }
    return false;
  }
  void set_interrupted(const std::atomic<bool>* i) { interrupted_ = i; }

 private:
  bool WaitRest(absl::Time end) {
    while (absl::Now() < end) {
      if (interrupted_ != nullptr && interrupted_->load()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
  int fd_;
  termios saved_{};
  const std::atomic<bool>* interrupted_ = nullptr;
};

int CmdTop(Call& call) {
  absl::Duration interval = absl::Seconds(2);
  if (auto it = call.opts.flags.find("interval"); it != call.opts.flags.end()) {
    if (!absl::ParseDuration(it->second, &interval) ||
        interval < absl::Milliseconds(100)) {
      throw UsageError(absl::StrCat("--interval: bad duration '", it->second,
                                    "' (at least 100ms)"));
    }
  }
  int iterations = 0;
  if (auto it = call.opts.flags.find("iterations");
      it != call.opts.flags.end()) {
    if (!absl::SimpleAtoi(it->second, &iterations) || iterations < 0) {
      throw UsageError(
          absl::StrCat("--iterations: bad count '", it->second, "'"));
    }
  }
  std::string only =
      call.opts.positional.empty() ? "" : call.opts.positional[0];
  RawInput input(call.env.input_fd);
  input.set_interrupted(call.env.interrupted);
  // Previous "selected" counters, to show the steering share per interval.
  std::map<std::pair<std::string, uint32_t>, uint64_t> previous;
  for (int i = 0; iterations == 0 || i < iterations; ++i) {
    grpc::ClientContext ctx;
    SetDeadline(call, &ctx);
    v1::ListListenersResponse resp;
    grpc::Status s =
        call.stub->ListListeners(&ctx, v1::ListListenersRequest(), &resp);
    if (!s.ok()) return RpcFail(call, s);
    if (call.env.terminal) call.out() << "\033[H\033[2J";
    if (call.json()) {
      call.out() << ToJson(resp, /*multiline=*/false) << "\n";
    } else {
      call.out() << "portfleet top — " << call.opts.server << " — every "
                 << absl::FormatDuration(interval) << " (q to quit)\n\n";
      Table t({"LISTENER", "SHARD", "STATE", "PID", "CONNECTIONS", "QUEUE",
               "ACCEPTED", "SHARE"});
      for (const v1::ListenerState& l : resp.listeners()) {
        if (!only.empty() && l.spec().name() != only) continue;
        uint64_t total = 0;
        std::vector<uint64_t> delta;
        for (const v1::Shard& sh : l.shards()) {
          auto key = std::make_pair(l.spec().name(), sh.index());
          uint64_t before = previous.count(key) ? previous[key] : 0;
          uint64_t now = sh.counters().selected();
          uint64_t d = now >= before ? now - before : now;
          delta.push_back(d);
          total += d;
          previous[key] = now;
        }
        for (int j = 0; j < l.shards_size(); ++j) {
          const v1::Shard& sh = l.shards(j);
          std::string share =
              total == 0 ? "-" : absl::StrCat(delta[j] * 100 / total, "%");
          t.AddRow({l.spec().name(), absl::StrCat(sh.index()),
                    ShardStateName(sh.state()),
                    sh.pid() > 0 ? absl::StrCat(sh.pid()) : "-",
                    absl::StrCat(sh.active_connections()),
                    absl::StrCat(sh.queue_depth()),
                    absl::StrCat(sh.accepted_total()), share});
        }
      }
      t.Print(call.out());
    }
    call.out().flush();
    if (iterations != 0 && i + 1 >= iterations) break;
    if (Interrupted(call.env) || input.WaitQuit(interval)) break;
  }
  return kExitOk;
}

grpc::Status HealthCheck(const Call& call, const std::string& service,
                         int* serving_status) {
  // grpc.health.v1.HealthCheckRequest { string service = 1; } by hand: the
  // health proto is not installed for C++ clients on Debian.
  std::string req;
  if (!service.empty()) {
    req.push_back(0x0a);
    for (uint64_t n = service.size();; n >>= 7) {  // varint length
      if (n < 0x80) {
        req.push_back(static_cast<char>(n));
        break;
      }
      req.push_back(static_cast<char>((n & 0x7f) | 0x80));
    }
    req += service;
  }
  grpc::Slice slice(req);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  grpc::Status s =
      grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
          call.channel.get(),
          grpc::internal::RpcMethod("/grpc.health.v1.Health/Check",
                                    grpc::internal::RpcMethod::NORMAL_RPC),
          &ctx, request, &response);
  if (!s.ok()) return s;
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const grpc::Slice& sl : slices) {
      bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
  }
  // HealthCheckResponse { ServingStatus status = 1; } -> 0x08 <varint>.
  *serving_status = 0;
  if (bytes.size() >= 2 && bytes[0] == 0x08) *serving_status = bytes[1];
  return s;
}

int CmdHealth(Call& call) {
  std::string service;
  if (auto it = call.opts.flags.find("service"); it != call.opts.flags.end()) {
    service = it->second;
  }
  int status = 0;
  grpc::Status s = HealthCheck(call, service, &status);
  if (!s.ok()) return RpcFail(call, s);
  static const char* kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING",
                                 "SERVICE_UNKNOWN"};
  std::string name = status >= 0 && status <= 3 ? kNames[status] : "UNKNOWN";
  if (call.json()) {
    call.out() << "{\n  \"status\": \"" << name << "\"\n}\n";
  } else {
    call.out() << name << "\n";
  }
  return status == 1 ? kExitOk : kExitAgentError;
}

int CmdVersion(Call& call) {
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::GetStatusResponse resp;
  grpc::Status s = call.stub->GetStatus(&ctx, v1::GetStatusRequest(), &resp);
  std::string server = s.ok() ? resp.version() : "";
  if (call.json()) {
    call.out() << "{\n  \"client\": \"" << kVersion << "\"";
    if (s.ok()) call.out() << ",\n  \"server\": \"" << server << "\"";
    call.out() << "\n}\n";
  } else {
    call.out() << "Client: " << kVersion << "\n";
    if (s.ok()) {
      call.out() << "Server: " << server << "\n";
    } else {
      call.out() << "Server: unreachable (" << s.error_message() << ")\n";
    }
  }
  return kExitOk;
}

// --- state-changing commands ---------------------------------------------

void PrintResult(const Call& call, const std::string& text,
                 const google::protobuf::Message& resp) {
  if (call.json()) {
    PrintJson(call, resp);
  } else {
    call.out() << text << "\n";
  }
}

int CmdApply(Call& call) {
  auto it = call.opts.flags.find("filename");
  if (it == call.opts.flags.end()) throw UsageError("apply: -f FILE required");
  absl::StatusOr<v1::FleetSpec> spec = LoadFleetSpecFile(it->second);
  if (!spec.ok()) {
    return Fail(call.env, kExitUsage, spec.status().message());
  }
  grpc::ClientContext list_ctx;
  SetDeadline(call, &list_ctx);
  v1::ListListenersResponse current;
  grpc::Status s =
      call.stub->ListListeners(&list_ctx, v1::ListListenersRequest(), &current);
  if (!s.ok()) return RpcFail(call, s);
  std::map<std::string, v1::Listener> existing;
  for (const v1::ListenerState& l : current.listeners()) {
    existing[l.spec().name()] = l.spec();
  }
  std::vector<std::pair<std::string, std::string>> done;  // name, action
  auto print_json = [&] {
    call.out() << "{\n  \"listeners\": [";
    for (size_t i = 0; i < done.size(); ++i) {
      call.out() << (i ? "," : "") << "\n    {\"name\": \"" << done[i].first
                 << "\", \"action\": \"" << done[i].second << "\"}";
    }
    call.out() << (done.empty() ? "]" : "\n  ]") << "\n}\n";
  };
  for (const v1::Listener& l : spec->listeners()) {
    auto found = existing.find(l.name());
    std::string action;
    grpc::ClientContext ctx;
    SetDeadline(call, &ctx);
    if (found == existing.end()) {
      v1::CreateListenerRequest req;
      *req.mutable_listener() = l;
      v1::CreateListenerResponse resp;
      s = call.stub->CreateListener(&ctx, req, &resp);
      action = "created";
    } else if (!google::protobuf::util::MessageDifferencer::Equivalent(
                   found->second, l)) {
      v1::UpdateListenerRequest req;
      *req.mutable_listener() = l;
      v1::UpdateListenerResponse resp;
      s = call.stub->UpdateListener(&ctx, req, &resp);
      action = "configured";
    } else {
      s = grpc::Status::OK;
      action = "unchanged";
    }
    if (!s.ok()) {
      if (call.json()) print_json();
      return RpcFail(call, grpc::Status(s.error_code(),
                                        absl::StrCat("listener/", l.name(),
                                                     ": ", s.error_message())));
    }
    done.emplace_back(l.name(), action);
    if (!call.json())
      call.out() << "listener/" << l.name() << " " << action << "\n";
  }
  if (call.json()) print_json();
  return kExitOk;
}

int CmdDeleteListener(Call& call) {
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::DeleteListenerRequest req;
  req.set_name(call.opts.positional[0]);
  v1::DeleteListenerResponse resp;
  grpc::Status s = call.stub->DeleteListener(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  PrintResult(call, absl::StrCat("listener/", req.name(), " deleted"), resp);
  return kExitOk;
}

uint32_t ParseCount(const Options& opts, const std::string& flag,
                    const std::string& command) {
  auto it = opts.flags.find(flag);
  if (it == opts.flags.end()) {
    throw UsageError(absl::StrCat(command, ": --", flag, " required"));
  }
  uint32_t v;
  if (!absl::SimpleAtoi(it->second, &v)) {
    throw UsageError(absl::StrCat("--", flag, ": '", it->second,
                                  "' is not a non-negative integer"));
  }
  return v;
}

int CmdScale(Call& call) {
  v1::ScaleListenerRequest req;
  req.set_name(call.opts.positional[0]);
  req.set_shards(ParseCount(call.opts, "shards", "scale"));
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::ScaleListenerResponse resp;
  grpc::Status s = call.stub->ScaleListener(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  PrintResult(call,
              absl::StrCat("listener/", req.name(), " scaled to ", req.shards(),
                           " shards"),
              resp);
  return kExitOk;
}

int CmdDrain(Call& call) {
  v1::DrainShardRequest req;
  req.set_name(call.opts.positional[0]);
  req.set_index(ParseCount(call.opts, "shard", "drain"));
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::DrainShardResponse resp;
  grpc::Status s = call.stub->DrainShard(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  PrintResult(
      call,
      absl::StrCat("listener/", req.name(), " shard ", req.index(), " drained"),
      resp);
  return kExitOk;
}

int CmdRollout(Call& call) {
  v1::RollOutListenerRequest req;
  req.set_name(call.opts.positional[0]);
  auto flag = [&](const std::string& name) -> const std::string* {
    auto it = call.opts.flags.find(name);
    return it == call.opts.flags.end() ? nullptr : &it->second;
  };
  if (const std::string* cmd = flag("worker-command")) {
    if (cmd->empty()) throw UsageError("--worker-command: empty");
    req.mutable_worker()->set_command(*cmd);
  }
  if (const std::string* args = flag("worker-args")) {
    for (absl::string_view a :
         absl::StrSplit(*args, ' ', absl::SkipWhitespace())) {
      req.mutable_worker()->add_args(std::string(a));
    }
  }
  if (flag("max-surge") != nullptr) {
    req.set_max_surge(ParseCount(call.opts, "max-surge", "rollout"));
  }
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::RollOutListenerResponse resp;
  grpc::Status s = call.stub->RollOutListener(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  PrintResult(call,
              absl::StrCat("listener/", req.name(), " rolled out (",
                           resp.listener().spec().worker().command(), ")"),
              resp);
  return kExitOk;
}

int CmdSteer(Call& call) {
  v1::SetSteeringRequest req;
  req.set_name(call.opts.positional[0]);
  auto it = call.opts.flags.find("policy");
  if (it == call.opts.flags.end()) throw UsageError("steer: --policy required");
  if (it->second == "cpu") {
    req.mutable_steering()->set_policy(v1::STEERING_POLICY_CPU);
  } else if (it->second == "hash") {
    req.mutable_steering()->set_policy(v1::STEERING_POLICY_HASH);
  } else {
    throw UsageError(
        absl::StrCat("--policy: '", it->second, "' is not one of cpu, hash"));
  }
  if (auto w = call.opts.flags.find("weights"); w != call.opts.flags.end()) {
    for (absl::string_view part : absl::StrSplit(w->second, ',')) {
      uint32_t v;
      if (!absl::SimpleAtoi(part, &v)) {
        throw UsageError(absl::StrCat("--weights: '", part,
                                      "' is not a non-negative integer"));
      }
      req.mutable_steering()->add_weights(v);
    }
  }
  grpc::ClientContext ctx;
  SetDeadline(call, &ctx);
  v1::SetSteeringResponse resp;
  grpc::Status s = call.stub->SetSteering(&ctx, req, &resp);
  if (!s.ok()) return RpcFail(call, s);
  PrintResult(call,
              absl::StrCat("listener/", req.name(), " steering set to ",
                           SteeringText(req.steering())),
              resp);
  return kExitOk;
}

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"status",
       "",
       0,
       {},
       false,
       "Shows the agent's version, uptime, listener count, whether every\n"
       "listener is serving, and whether BPF steering is active (and why "
       "not).\n\nExample:\n  portfleetctl status\n",
       CmdStatus},
      {"get listeners",
       "",
       0,
       {},
       false,
       "Lists every listener with its address, shard count, ready shards and\n"
       "steering.\n\nExample:\n  portfleetctl get listeners -o json\n",
       CmdGetListeners},
      {"get listener",
       "NAME",
       1,
       {},
       false,
       "Shows one listener.\n\nExample:\n  portfleetctl get listener web\n",
       CmdGetListener},
      {"get shards",
       "NAME",
       1,
       {},
       false,
       "Lists the shards of a listener: state, worker pid, CPU, restarts,\n"
       "accept queue depth, active connections and steering counters.\n\n"
       "Example:\n  portfleetctl get shards web\n",
       CmdGetShards},
      {"events",
       "",
       0,
       {"listener"},
       false,
       "Follows fleet events until Ctrl-C.\n\nFlags:\n"
       "  --listener NAME   only events of this listener\n\n"
       "Example:\n  portfleetctl events --listener web\n",
       CmdEvents},
      {"top",
       "[NAME]",
       -1,
       {"interval", "iterations"},
       false,
       "A refreshing per-shard view: connections, accept queue depth and the\n"
       "share of new connections steered to each shard since the last "
       "refresh.\nq or Ctrl-C quits.\n\nFlags:\n"
       "  --interval DURATION   refresh period (default 2s)\n"
       "  --iterations N        stop after N refreshes (default 0 = never)\n\n"
       "Example:\n  portfleetctl top web --interval 1s\n",
       CmdTop},
      {"health",
       "",
       0,
       {"service"},
       false,
       "Asks grpc.health.v1 whether the agent is serving; exits 1 when it is\n"
       "not.\n\nFlags:\n  --service NAME   health of one service (default "
       "\"\": the agent)\n\nExample:\n  portfleetctl health\n",
       CmdHealth},
      {"version",
       "",
       0,
       {},
       false,
       "Prints the client version and, if the agent answers, its version.\n\n"
       "Example:\n  portfleetctl version\n",
       CmdVersion},
      {"apply",
       "",
       0,
       {"filename"},
       true,
       "Creates the listeners of a fleet spec file that do not exist and\n"
       "updates those that differ. Listeners missing from the file are left\n"
       "alone.\n\nFlags:\n  -f, --filename FILE   fleet spec (.textproto or "
       ".json)\n\nExample:\n  portfleetctl apply -f fleet.textproto\n",
       CmdApply},
      {"delete listener",
       "NAME",
       1,
       {},
       true,
       "Drains every shard of a listener, then removes it.\n\nExample:\n"
       "  portfleetctl delete listener web\n",
       CmdDeleteListener},
      {"scale",
       "NAME",
       1,
       {"shards"},
       true,
       "Changes the number of shards of a listener.\n\nFlags:\n"
       "  --shards N   new shard count (1-64)\n\nExample:\n"
       "  portfleetctl scale web --shards 8\n",
       CmdScale},
      {"drain",
       "NAME",
       1,
       {"shard"},
       true,
       "Drains one shard of a listener and removes it.\n\nFlags:\n"
       "  --shard I   shard index\n\nExample:\n"
       "  portfleetctl drain web --shard 3\n",
       CmdDrain},
      {"rollout",
       "NAME",
       1,
       {"worker-command", "worker-args", "max-surge"},
       true,
       "Rolling upgrade: per shard, starts the new worker on the same socket,\n"
       "waits until it is ready, then drains the old one. A new worker that\n"
       "does not become ready is stopped and the shards already rolled go\n"
       "back to the old worker; no connection is refused either way.\n\n"
       "Flags:\n  --worker-command CMD   new worker program (default: the "
       "current one)\n  --worker-args \"A B\"    its arguments, split on "
       "spaces (default:\n                         the current ones)\n"
       "  --max-surge N          shards rolled at the same time (default "
       "1)\n\nExamples:\n  portfleetctl rollout web --worker-command "
       "/opt/web/v2/server\n  portfleetctl rollout web   # restart every "
       "worker in place\n",
       CmdRollout},
      {"steer",
       "NAME",
       1,
       {"policy", "weights"},
       true,
       "Sets how new connections are spread over a listener's shards.\n\n"
       "Flags:\n  --policy cpu|hash        cpu: the shard pinned to the SYN's "
       "CPU;\n                           hash: flow hash, optionally "
       "weighted\n  --weights W1,W2,...      one weight per shard (hash "
       "only)\n\nExample:\n  portfleetctl steer web --policy hash --weights "
       "1,1,2,2\n",
       CmdSteer},
  };
  return *commands;
}

// Flags that take a value, by every spelling -> long name.
const std::map<std::string, std::string>& ValueFlags() {
  static const auto* flags = new std::map<std::string, std::string>{
      {"--server", "server"},
      {"-o", "output"},
      {"--output", "output"},
      {"--timeout", "timeout"},
      {"--tls-cert", "tls-cert"},
      {"--tls-key", "tls-key"},
      {"--tls-ca", "tls-ca"},
      {"-f", "filename"},
      {"--filename", "filename"},
      {"--shards", "shards"},
      {"--shard", "shard"},
      {"--policy", "policy"},
      {"--weights", "weights"},
      {"--listener", "listener"},
      {"--interval", "interval"},
      {"--iterations", "iterations"},
      {"--service", "service"},
      {"--worker-command", "worker-command"},
      {"--worker-args", "worker-args"},
      {"--max-surge", "max-surge"},
  };
  return *flags;
}

Options Parse(const std::vector<std::string>& args) {
  Options opts;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      opts.help = true;
      continue;
    }
    if (a == "--") {
      for (++i; i < args.size(); ++i) opts.positional.push_back(args[i]);
      break;
    }
    if (a.size() > 1 && a[0] == '-') {
      std::string key = a, value;
      bool inline_value = false;
      if (size_t eq = a.find('='); eq != std::string::npos) {
        key = a.substr(0, eq);
        value = a.substr(eq + 1);
        inline_value = true;
      }
      auto it = ValueFlags().find(key);
      if (it == ValueFlags().end()) {
        throw UsageError(absl::StrCat("unknown flag ", key));
      }
      if (!inline_value) {
        if (i + 1 >= args.size()) {
          throw UsageError(absl::StrCat("flag ", key, " needs a value"));
        }
        value = args[++i];
      }
      const std::string& name = it->second;
      if (name == "server") {
        opts.server = value;
      } else if (name == "tls-cert") {
        opts.tls_cert = value;
      } else if (name == "tls-key") {
        opts.tls_key = value;
      } else if (name == "tls-ca") {
        opts.tls_ca = value;
      } else if (name == "output") {
        if (value != "table" && value != "json") {
          throw UsageError(
              absl::StrCat("-o: '", value, "' is not one of table, json"));
        }
        opts.output = value;
      } else if (name == "timeout") {
        absl::Duration d;
        if (!absl::ParseDuration(value, &d) || d <= absl::ZeroDuration()) {
          throw UsageError(absl::StrCat("--timeout: bad duration '", value,
                                        "' (e.g. 10s, 500ms)"));
        }
        opts.timeout = d;
      } else {
        opts.flags[name] = value;
      }
      continue;
    }
    opts.positional.push_back(a);
  }
  return opts;
}

// Finds the command named by the first one or two words.
const Command* Find(std::vector<std::string>* positional) {
  if (positional->empty()) return nullptr;
  for (const Command& c : Commands()) {
    std::vector<std::string> words = absl::StrSplit(c.name, ' ');
    if (words.size() > positional->size()) continue;
    if (std::equal(words.begin(), words.end(), positional->begin())) {
      positional->erase(positional->begin(),
                        positional->begin() + words.size());
      return &c;
    }
  }
  return nullptr;
}

// Whole file, or a usage error naming the flag and the file.
std::string ReadFlagFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw UsageError(
        absl::StrCat(flag, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream data;
  data << in.rdbuf();
  if (data.str().find("-----BEGIN ") == std::string::npos) {
    throw UsageError(absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return data.str();
}

// Credentials for `opts.server`: plain for unix: sockets, TLS (with a client
// certificate when given) when any --tls-* setting is present.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(
    Options& opts, const CtlEnv& env) {
  if (absl::StartsWith(opts.server, "unix:")) {
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
    throw UsageError(
        "--tls-cert and --tls-key go together (or PORTFLEET_TLS_CERT and "
        "PORTFLEET_TLS_KEY)");
  }
  grpc::SslCredentialsOptions ssl;
  if (!opts.tls_cert.empty()) {
    ssl.pem_cert_chain = ReadFlagFile("--tls-cert", opts.tls_cert);
    ssl.pem_private_key = ReadFlagFile("--tls-key", opts.tls_key);
  }
  if (!opts.tls_ca.empty()) {
    ssl.pem_root_certs = ReadFlagFile("--tls-ca", opts.tls_ca);
  }
  return grpc::SslCredentials(ssl);
}

void PrintCommandHelp(std::ostream& out, const Command& c) {
  out << "Usage:\n  portfleetctl [global flags] " << c.name;
  if (!c.args.empty()) out << " " << c.args;
  for (const std::string& f : c.flags) {
    if (f == "filename") out << " -f FILE";
  }
  out << "\n\n" << c.help;
}

}  // namespace

int Run(const CtlEnv& env, const std::vector<std::string>& args) {
  Options opts;
  const Command* command = nullptr;
  try {
    opts = Parse(args);
    std::vector<std::string> words = opts.positional;
    command = Find(&opts.positional);
    if (command == nullptr) {
      if (words.empty()) {
        if (opts.help) {
          *env.out << kGlobalUsage;
          return kExitOk;
        }
        *env.err << kGlobalUsage;
        return Fail(env, kExitUsage, "no command given");
      }
      if (opts.help) {
        *env.out << kGlobalUsage;
        return kExitOk;
      }
      std::string what = words[0];
      if ((what == "get" || what == "delete") && words.size() > 1) {
        what += " " + words[1];
      }
      throw UsageError(absl::StrCat("unknown command \"", what, "\""));
    }
    if (opts.help) {
      PrintCommandHelp(*env.out, *command);
      return kExitOk;
    }
    const size_t n = opts.positional.size();
    if (command->positional >= 0 &&
        n != static_cast<size_t>(command->positional)) {
      throw UsageError(absl::StrCat(
          command->name, ": expected ",
          command->args.empty() ? "no arguments" : command->args, ", got ",
          n == 0 ? "none" : absl::StrJoin(opts.positional, " ")));
    }
    if (command->positional < 0 && n > 1) {
      throw UsageError(
          absl::StrCat(command->name, ": expected ", command->args));
    }
    for (const auto& [flag, value] : opts.flags) {
      if (std::find(command->flags.begin(), command->flags.end(), flag) ==
          command->flags.end()) {
        throw UsageError(
            absl::StrCat(command->name, ": unknown flag --", flag));
      }
    }
  } catch (const UsageError& e) {
    Fail(env, kExitUsage, e.message);
    *env.err << "Run 'portfleetctl"
             << (command ? " " + command->name : std::string())
             << " --help' for usage.\n";
    return kExitUsage;
  }

  if (opts.server.empty() && env.getenv) {
    opts.server = env.getenv("PORTFLEET_SERVER").value_or("");
  }
  if (opts.server.empty()) opts.server = kDefaultServer;
  absl::Duration timeout = opts.timeout.value_or(
      command->mutating ? absl::Minutes(2) : absl::Seconds(10));

  std::shared_ptr<grpc::ChannelCredentials> credentials;
  try {
    credentials = ChannelCredentials(opts, env);
  } catch (const UsageError& e) {
    return Fail(env, kExitUsage, e.message);
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(64 << 20);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(opts.server, credentials, channel_args);
  Call call{env, opts, channel, v1::FleetService::NewStub(channel), timeout};

  // One connection attempt bounded by the timeout (and by 10 s for verbs
  // with a long deadline), so that an absent agent is reported as such.
  if (command->run != CmdVersion) {
    absl::Duration connect = std::min(timeout, absl::Seconds(10));
    if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + connect))) {
      return Fail(env, kExitUnreachable,
                  absl::StrCat("cannot reach the agent at ", opts.server,
                               " (is portfleet-agent running? set --server "
                               "or PORTFLEET_SERVER",
                               opts.tls_cert.empty() && opts.tls_ca.empty()
                                   ? ""
                                   : "; with TLS, check that the agent "
                                     "accepts the --tls-cert and that "
                                     "--tls-ca signed its certificate",
                               ")"));
    }
  }
  try {
    return command->run(call);
  } catch (const UsageError& e) {
    Fail(env, kExitUsage, e.message);
    *env.err << "Run 'portfleetctl " << command->name
             << " --help' for usage.\n";
    return kExitUsage;
  }
}

}  // namespace portfleet::ctl
