// The command table: every portfleetctl command is one CommandSpec (its
// words, arguments, flags, help, examples, output formats and run function).
// Parsing, --help, the man page and shell completion all read the table, so
// they cannot disagree. Each command group lives in its own cmd_*.cc with its
// help beside its code and adds its commands in Add*Commands().
#ifndef PORTFLEET_CTL_COMMAND_H_
#define PORTFLEET_CTL_COMMAND_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "ctl/ctl.h"
#include "ctl/errors.h"
#include "google/protobuf/message.h"
#include "portfleet/v1/agent.grpc.pb.h"

namespace portfleet::ctl {

// -o FORMAT. A command lists the ones it supports; the first is its default.
enum class Format {
  kTable,      // aligned columns (or a sentence, for a result)
  kWide,       // the table with more columns
  kJson,       // the result message by reflection: numbers, short enums
  kYaml,       // the same as YAML
  kName,       // resource names, one a line ("listener/web")
  kProtoJson,  // the result message as raw proto3 JSON
  kTextproto,  // protobuf text format (get spec)
};
std::string FormatName(Format format);
std::optional<Format> ParseFormat(absl::string_view name);

// What a flag's value or an argument completes to in a shell.
enum class Complete { kNone, kFile, kListener };

struct FlagSpec {
  std::string name{};                  // long name: --name
  char short_name = 0;                 // -x; 0 = none
  std::string value{};                 // placeholder ("FILE"); empty = a switch
  std::string help{};                  // one or more lines, no trailing newline
  std::vector<std::string> choices{};  // accepted values; empty = any
  Complete complete = Complete::kNone;
  bool required = false;
  // May be given more than once; each value is also split on ','.
  bool repeated = false;
};

enum class Section { kRead, kChange, kTool };

struct Example {
  std::string comment{};  // optional; printed above as "# comment"
  std::string command{};  // "portfleetctl get shards web"
};

class Context;

struct CommandSpec {
  std::string name{};  // the command's words: "get shards"
  std::string args{};  // usage of its arguments: "NAME", "[NAME]"
  int min_args = 0;
  int max_args = 0;
  std::vector<std::string> arg_choices{};  // accepted arguments; empty = any
  Complete arg_complete = Complete::kNone;
  Section section = Section::kRead;
  std::string summary{};      // one line for the command list
  std::string description{};  // paragraphs (lines end in '\n')
  std::vector<FlagSpec> flags{};
  std::vector<Format> formats{};  // supported -o values, default first
  std::vector<Example> examples{};
  bool hidden = false;  // not listed (__complete)
  absl::Status (*run)(Context& ctx) = nullptr;
};

// Every command, in the order --help lists them.
const std::vector<CommandSpec>& Commands();
// The global flags (--server, -o, ...).
const std::vector<FlagSpec>& GlobalFlags();

// The command groups (one file each).
void AddAgentCommands(std::vector<CommandSpec>* commands);    // cmd_agent.cc
void AddGetCommands(std::vector<CommandSpec>* commands);      // cmd_get.cc
void AddEventCommands(std::vector<CommandSpec>* commands);    // cmd_events.cc
void AddApplyCommands(std::vector<CommandSpec>* commands);    // cmd_apply.cc
void AddChangeCommands(std::vector<CommandSpec>* commands);   // cmd_change.cc
void AddRollOutCommands(std::vector<CommandSpec>* commands);  // cmd_rollout.cc
void AddRebalanceCommands(
    std::vector<CommandSpec>* commands);                    // cmd_rebalance.cc
void AddShellCommands(std::vector<CommandSpec>* commands);  // cmd_shell.cc

struct GlobalOptions {
  std::string server;  // empty = $PORTFLEET_SERVER or kDefaultServer
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  std::optional<Format> output;
  std::optional<absl::Duration> timeout;
  bool no_headers = false;
  bool help = false;
};

// A parsed command line.
struct Invocation {
  const CommandSpec* command = nullptr;  // null: no (complete) command
  std::vector<std::string> words;        // the command words as typed
  std::vector<std::string> args;         // arguments after the words
  std::map<std::string, std::vector<std::string>> flags;  // by long name
  GlobalOptions global;
};

// The command line against the table. Errors are usage errors; a line
// without a complete command gives an Invocation with a null command (and the
// words typed, for group help).
absl::StatusOr<Invocation> ParseArgs(const std::vector<std::string>& args);
// Checks what the parser cannot: argument counts and choices, required flags,
// flag choices, the output format.
absl::Status ValidateInvocation(const Invocation& invocation);

// Prints one result in the chosen format: json, yaml and proto-json from the
// message itself, table, wide and name through `text`.
using TextPrinter = std::function<void(Format format, std::ostream& out)>;

// What a command's run function gets: its arguments and flags, the output,
// and the connection to the agent (made on first use).
class Context {
 public:
  Context(const CtlEnv& env, Invocation invocation);
  ~Context();

  const CtlEnv& env() const { return env_; }
  std::ostream& out() const { return *env_.out; }
  const CommandSpec& command() const { return *inv_.command; }
  const std::vector<std::string>& args() const { return inv_.args; }
  // Argument `i`, or "" when absent.
  std::string arg(size_t i) const;
  // The last value of a flag.
  std::optional<std::string> Flag(const std::string& name) const;
  // Every value of a repeated flag, split on ','.
  std::vector<std::string> FlagList(const std::string& name) const;
  bool Switch(const std::string& name) const;
  // --interval of the polling commands: default 2s, at least 100ms.
  absl::StatusOr<absl::Duration> IntervalFlag() const;
  const GlobalOptions& global() const { return inv_.global; }
  Format format() const;
  bool headers() const { return !inv_.global.no_headers; }
  absl::Duration timeout() const;
  const std::string& server() const { return server_; }
  bool Interrupted() const;

  // The channel, connected: a unix socket is probed first (so that EACCES
  // and a missing socket are told apart), then one connection attempt
  // bounded by the timeout (10 s at most).
  absl::StatusOr<std::shared_ptr<grpc::Channel>> Channel();
  absl::StatusOr<v1::FleetService::Stub*> Fleet();
  // A per-call deadline from --timeout.
  void SetDeadline(grpc::ClientContext* ctx) const;
  // ::portfleet::ctl::RpcError for this server (with a TLS hint when the
  // connection was lost on a TLS channel).
  absl::Status RpcError(const grpc::Status& status) const;

  // One unary FleetService call with the deadline; errors via RpcError.
  template <typename Request, typename Response>
  absl::StatusOr<Response> Call(
      grpc::Status (v1::FleetService::Stub::*method)(grpc::ClientContext*,
                                                     const Request&, Response*),
      const Request& request) {
    absl::StatusOr<v1::FleetService::Stub*> stub = Fleet();
    if (!stub.ok()) return stub.status();
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    Response response;
    grpc::Status s = ((*stub)->*method)(&ctx, request, &response);
    if (!s.ok()) return RpcError(s);
    return response;
  }

  // A result: json/yaml/proto-json from `message`, the other formats by
  // `text`.
  void Print(const google::protobuf::Message& message,
             const TextPrinter& text) const;
  // One item of a stream (events, watches): JSON and proto-json on one line
  // each, YAML as one document each ("---").
  void PrintItem(const google::protobuf::Message& message,
                 const TextPrinter& text) const;

 private:
  const CtlEnv& env_;
  Invocation inv_;
  std::string server_;
  bool tls_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::FleetService::Stub> fleet_;
};

// Shared by the commands' text printers.
std::string ShardStateText(v1::ShardState state);        // "running"
std::string ShardHealthText(v1::ShardHealth health);     // "ejected"
std::string SteeringText(const v1::Steering& steering);  // "hash (1,2)"
// The -o name of a listener: "listener/web".
std::string ListenerName(absl::string_view name);

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_COMMAND_H_
