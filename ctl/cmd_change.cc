// The verbs on one listener: delete, scale, drain, maint, ready, steer
// (rollouts are in cmd_rollout.cc).
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "ctl/command.h"
#include "ctl/render.h"

namespace portfleet::ctl {
namespace {

absl::StatusOr<uint32_t> Count(const Context& ctx, const std::string& flag) {
  const std::string value = ctx.Flag(flag).value_or("");
  uint32_t v;
  if (!absl::SimpleAtoi(value, &v)) {
    return UsageError(absl::StrCat("--", flag, ": '", value,
                                   "' is not a non-negative integer"));
  }
  return v;
}

// Prints the result of a verb on listener `name`: the sentence as text, the
// name for -o name, else the response message.
void PrintDone(const Context& ctx, const std::string& name,
               const std::string& sentence,
               const google::protobuf::Message& resp) {
  ctx.Print(resp, [&](Format format, std::ostream& out) {
    out << (format == Format::kName ? ListenerName(name)
                                    : ListenerName(name) + " " + sentence)
        << "\n";
  });
}

absl::Status RunDeleteListener(Context& ctx) {
  v1::DeleteListenerRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<v1::DeleteListenerResponse> resp =
      ctx.Call(&v1::FleetService::Stub::DeleteListener, req);
  if (!resp.ok()) return resp.status();
  PrintDone(ctx, req.name(), "deleted", *resp);
  return absl::OkStatus();
}

absl::Status RunScale(Context& ctx) {
  v1::ScaleListenerRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<uint32_t> shards = Count(ctx, "shards");
  if (!shards.ok()) return shards.status();
  req.set_shards(*shards);
  absl::StatusOr<v1::ScaleListenerResponse> resp =
      ctx.Call(&v1::FleetService::Stub::ScaleListener, req);
  if (!resp.ok()) return resp.status();
  PrintDone(ctx, req.name(),
            absl::StrCat("scaled to ", req.shards(), " shards"), *resp);
  return absl::OkStatus();
}

absl::Status RunDrain(Context& ctx) {
  v1::DrainShardRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<uint32_t> index = Count(ctx, "shard");
  if (!index.ok()) return index.status();
  req.set_index(*index);
  absl::StatusOr<v1::DrainShardResponse> resp =
      ctx.Call(&v1::FleetService::Stub::DrainShard, req);
  if (!resp.ok()) return resp.status();
  PrintDone(ctx, req.name(), absl::StrCat("shard ", req.index(), " drained"),
            *resp);
  return absl::OkStatus();
}

absl::Status RunAdopt(Context& ctx) {
  v1::AdoptListenerRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<uint32_t> pid = Count(ctx, "pid");
  if (!pid.ok()) return pid.status();
  if (*pid == 0 || *pid > static_cast<uint32_t>(INT32_MAX)) {
    return UsageError(absl::StrCat("--pid: ", *pid, " is not a process id"));
  }
  req.set_pid(static_cast<int32_t>(*pid));
  absl::StatusOr<v1::AdoptListenerResponse> resp =
      ctx.Call(&v1::FleetService::Stub::AdoptListener, req);
  if (!resp.ok()) return resp.status();
  std::vector<std::string> shards;
  for (uint32_t i : resp->indexes()) shards.push_back(absl::StrCat(i));
  PrintDone(
      ctx, req.name(),
      absl::StrCat("adopted pid ", req.pid(), " as shard",
                   shards.size() == 1 ? " " : "s ", absl::StrJoin(shards, ",")),
      *resp);
  return absl::OkStatus();
}

// maint / ready: a shard out of rotation by hand, or back.
absl::Status RunMaintenance(Context& ctx, bool maintenance) {
  v1::SetShardMaintenanceRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<uint32_t> index = Count(ctx, "shard");
  if (!index.ok()) return index.status();
  req.set_index(*index);
  req.set_maintenance(maintenance);
  absl::StatusOr<v1::SetShardMaintenanceResponse> resp =
      ctx.Call(&v1::FleetService::Stub::SetShardMaintenance, req);
  if (!resp.ok()) return resp.status();
  PrintDone(ctx, req.name(),
            absl::StrCat("shard ", req.index(),
                         maintenance ? " out of rotation (maintenance)"
                                     : " back in rotation"),
            *resp);
  return absl::OkStatus();
}

absl::Status RunMaint(Context& ctx) { return RunMaintenance(ctx, true); }
absl::Status RunReady(Context& ctx) { return RunMaintenance(ctx, false); }

absl::Status RunSteer(Context& ctx) {
  v1::SetSteeringRequest req;
  req.set_name(ctx.arg(0));
  // --policy was checked against its choices, the short enum names.
  const google::protobuf::EnumValueDescriptor* policy =
      FindEnumValueByShortName(v1::SteeringPolicy_descriptor(),
                               *ctx.Flag("policy"));
  req.mutable_steering()->set_policy(
      static_cast<v1::SteeringPolicy>(policy->number()));
  if (std::optional<std::string> weights = ctx.Flag("weights")) {
    for (absl::string_view part : absl::StrSplit(*weights, ',')) {
      uint32_t v;
      if (!absl::SimpleAtoi(part, &v)) {
        return UsageError(absl::StrCat("--weights: '", part,
                                       "' is not a non-negative integer"));
      }
      req.mutable_steering()->add_weights(v);
    }
  }
  absl::StatusOr<v1::SetSteeringResponse> resp =
      ctx.Call(&v1::FleetService::Stub::SetSteering, req);
  if (!resp.ok()) return resp.status();
  PrintDone(ctx, req.name(),
            absl::StrCat("steering set to ", SteeringText(req.steering())),
            *resp);
  return absl::OkStatus();
}

std::vector<Format> ChangeFormats() {
  return {Format::kTable, Format::kJson, Format::kYaml, Format::kName,
          Format::kProtoJson};
}

}  // namespace

void AddChangeCommands(std::vector<CommandSpec>* commands) {
  commands->push_back({
      .name = "delete listener",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kChange,
      .summary = "drain every shard, then remove the listener",
      .description =
          "Drains every shard of a listener (its workers finish their\n"
          "connections), then removes it.\n",
      .formats = ChangeFormats(),
      .examples = {{"", "portfleetctl delete listener web"}},
      .run = RunDeleteListener,
  });
  commands->push_back({
      .name = "scale",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kChange,
      .summary = "change the shard count",
      .description =
          "Changes the number of shards of a listener. New shards enter the\n"
          "steering tables once their workers are ready; removed shards are\n"
          "drained and their queues migrate to the others.\n",
      .flags = {{.name = "shards",
                 .value = "N",
                 .help = "new shard count (1-64)",
                 .required = true}},
      .formats = ChangeFormats(),
      .examples = {{"", "portfleetctl scale web --shards 8"}},
      .run = RunScale,
  });
  commands->push_back({
      .name = "drain",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kChange,
      .summary = "drain one shard and remove it",
      .description =
          "Drains one shard of a listener and removes it: it leaves the\n"
          "steering tables, its queue migrates to the other shards, its\n"
          "worker finishes its connections.\n",
      .flags = {{.name = "shard",
                 .value = "I",
                 .help = "shard index",
                 .required = true}},
      .formats = ChangeFormats(),
      .examples = {{"", "portfleetctl drain web --shard 3"}},
      .run = RunDrain,
  });
  commands->push_back({
      .name = "adopt",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kChange,
      .summary = "take a running server's sockets into a listener",
      .description =
          "Takes the SO_REUSEPORT listening sockets on the listener's address\n"
          "held by a running process (with its process group and children)\n"
          "into the listener, one new shard per socket, without restarting\n"
          "it; from then on they are steered and drained like any shard.\n"
          "A socket of another user, on another address or without\n"
          "SO_REUSEPORT is refused with the reason. The process is not\n"
          "restarted when it exits: its shard is removed.\n",
      .flags = {{.name = "pid",
                 .value = "PID",
                 .help = "the running server's process id",
                 .required = true}},
      .formats = ChangeFormats(),
      .examples = {{"a server started by hand on web's address",
                    "portfleetctl adopt web --pid 4242"},
                   {"then drain it like any shard",
                    "portfleetctl drain web --shard 2"}},
      .run = RunAdopt,
  });
  for (bool maint : {true, false}) {
    commands->push_back({
        .name = maint ? "maint" : "ready",
        .args = "NAME",
        .min_args = 1,
        .max_args = 1,
        .arg_complete = Complete::kListener,
        .section = Section::kChange,
        .summary = maint ? "take one shard out of rotation (maintenance)"
                         : "put a shard in maintenance back in rotation",
        .description =
            maint
                ? "Takes one shard out of the steering tables by hand: no new\n"
                  "connections reach it; its worker keeps running and "
                  "finishes\n"
                  "what is queued and open. The last shard in rotation stays.\n"
                  "Not persisted: an agent restart puts it back.\n"
                : "Puts a shard taken out with maint back into the steering\n"
                  "tables.\n",
        .flags = {{.name = "shard",
                   .value = "I",
                   .help = "shard index",
                   .required = true}},
        .formats = ChangeFormats(),
        .examples = {{"", maint ? "portfleetctl maint web --shard 1"
                                : "portfleetctl ready web --shard 1"}},
        .run = maint ? RunMaint : RunReady,
    });
  }
  commands->push_back({
      .name = "steer",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kChange,
      .summary = "set how new connections spread over the shards",
      .description =
          "Sets how new connections are spread over a listener's shards:\n"
          "cpu sends each to the shard pinned to the CPU that received the\n"
          "SYN; hash uses the flow hash, optionally weighted;\n"
          "least-connections sends each to the shard with the fewest open\n"
          "connections (per weight), for long-lived connections.\n",
      .flags = {{.name = "policy",
                 .value = "POLICY",
                 .help = "cpu, hash or least-connections",
                 .choices = ShortEnumNames(v1::SteeringPolicy_descriptor()),
                 .required = true},
                {.name = "weights",
                 .value = "W1,W2,...",
                 .help = "one weight per shard (hash and\n"
                         "least-connections; 0 = no new connections)"}},
      .formats = ChangeFormats(),
      .examples = {{"",
                    "portfleetctl steer web --policy hash --weights 1,1,2,2"},
                   {"", "portfleetctl steer web --policy cpu"},
                   {"", "portfleetctl steer web --policy least-connections"}},
      .run = RunSteer,
  });
}

}  // namespace portfleet::ctl
