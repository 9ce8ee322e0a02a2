// get: listeners, one listener, the shards of a listener (optionally
// watched), and the desired fleet spec.
#include <chrono>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "agent/spec/spec.h"
#include "ctl/command.h"
#include "ctl/render.h"
#include "ctl/table.h"
#include "google/protobuf/util/message_differencer.h"

namespace portfleet::ctl {
namespace {

std::string WorkerText(const v1::WorkerSpec& w) {
  std::string text = w.command();
  if (w.args_size() > 0)
    absl::StrAppend(&text, " ", absl::StrJoin(w.args(), " "));
  return text;
}

void PrintListeners(const Context& ctx, Format format, std::ostream& out,
                    const std::vector<const v1::ListenerState*>& listeners) {
  if (format == Format::kName) {
    for (const v1::ListenerState* l : listeners) {
      out << ListenerName(l->spec().name()) << "\n";
    }
    return;
  }
  const bool wide = format == Format::kWide;
  std::vector<std::string> headers = {"NAME",  "ADDRESS",  "SHARDS",
                                      "READY", "STEERING", "WORKER"};
  if (wide) {
    headers.insert(headers.end() - 1,
                   {"BACKLOG", "DRAIN-TIMEOUT", "REBALANCE", "USER"});
  }
  Table t(headers);
  for (const v1::ListenerState* l : listeners) {
    const v1::Listener& spec = l->spec();
    int ready = 0;
    for (const v1::Shard& s : l->shards()) ready += s.ready() ? 1 : 0;
    std::vector<std::string> row = {
        spec.name(),
        spec.address(),
        spec.shards() == 0 ? "auto" : absl::StrCat(spec.shards()),
        absl::StrCat(ready, "/", l->shards_size()),
        SteeringText(spec.steering()),
        WorkerText(spec.worker())};
    if (wide) {
      std::string user =
          spec.worker().user().empty() ? "-" : spec.worker().user();
      if (!spec.worker().group().empty()) {
        absl::StrAppend(&user, ":", spec.worker().group());
      }
      row.insert(row.end() - 1,
                 {absl::StrCat(EffectiveBacklog(spec)),
                  absl::StrCat(EffectiveDrainTimeoutSeconds(spec), "s"),
                  DescribeRebalance(spec), user});
    }
    t.AddRow(row);
  }
  t.Print(out, ctx.headers());
}

absl::Status RunGetListeners(Context& ctx) {
  absl::StatusOr<v1::ListListenersResponse> resp = ctx.Call(
      &v1::FleetService::Stub::ListListeners, v1::ListListenersRequest());
  if (!resp.ok()) return resp.status();
  ctx.Print(*resp, [&](Format format, std::ostream& out) {
    if (resp->listeners_size() == 0 && format != Format::kName) {
      out << "No listeners.\n";
      return;
    }
    std::vector<const v1::ListenerState*> all;
    for (const v1::ListenerState& l : resp->listeners()) all.push_back(&l);
    PrintListeners(ctx, format, out, all);
  });
  return absl::OkStatus();
}

absl::Status RunGetListener(Context& ctx) {
  v1::GetListenerRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<v1::GetListenerResponse> resp =
      ctx.Call(&v1::FleetService::Stub::GetListener, req);
  if (!resp.ok()) return resp.status();
  ctx.Print(*resp, [&](Format format, std::ostream& out) {
    PrintListeners(ctx, format, out, {&resp->listener()});
  });
  return absl::OkStatus();
}

std::string ShardName(const std::string& listener, const v1::Shard& s) {
  return absl::StrCat(ListenerName(listener), "/shard/", s.index());
}

Table ShardTable(bool wide) {
  std::vector<std::string> headers = {
      "INDEX",    "STATE",    "READY",  "HEALTH",      "PID",
      "CPU",      "RESTARTS", "QUEUE",  "CONNECTIONS", "SELECTED",
      "MIGRATED", "FALLBACK", "ORPHANS"};
  if (wide) {
    headers.insert(headers.end(),
                   {"ACCEPTED", "INODE", "KILLED", "ADOPTED", "PAUSE P50/P99"});
  }
  headers.push_back("REASON");
  return Table(headers);
}

void AddShardRow(Table& t, const v1::Shard& s, bool wide) {
  std::vector<std::string> row = {absl::StrCat(s.index()),
                                  ShardStateText(s.state()),
                                  s.ready() ? "yes" : "no",
                                  ShardHealthText(s.health()),
                                  s.pid() > 0 ? absl::StrCat(s.pid()) : "-",
                                  s.cpu() >= 0 ? absl::StrCat(s.cpu()) : "-",
                                  absl::StrCat(s.restarts()),
                                  absl::StrCat(s.queue_depth()),
                                  absl::StrCat(s.active_connections()),
                                  absl::StrCat(s.counters().selected()),
                                  absl::StrCat(s.counters().migrated()),
                                  absl::StrCat(s.counters().fallback()),
                                  absl::StrCat(s.orphans_size())};
  if (wide) {
    row.push_back(absl::StrCat(s.accepted_total()));
    row.push_back(s.socket_inode() > 0 ? absl::StrCat(s.socket_inode()) : "-");
    row.push_back(absl::StrCat(s.orphans_killed()));
    // Connections adopted in hand-offs and their pauses (ShardLoad).
    const v1::HandOffPauses& pauses = s.load().handoff_pauses();
    row.push_back(absl::StrCat(pauses.adopted()));
    row.push_back(
        pauses.adopted() > 0
            ? absl::StrFormat("%.0f/%.0fus", pauses.p50_us(), pauses.p99_us())
            : "-");
  }
  // Processes outside the worker's tree that hold the socket are named.
  std::vector<std::string> reasons;
  if (!s.health_reason().empty()) reasons.push_back(s.health_reason());
  for (const v1::ShardOrphan& o : s.orphans()) {
    reasons.push_back(absl::StrCat("orphan pid ", o.pid(), " (", o.command(),
                                   o.leftover() ? ", killed)" : ")"));
  }
  row.push_back(reasons.empty() ? "-" : absl::StrJoin(reasons, "; "));
  t.AddRow(row);
}

absl::Status ListShards(Context& ctx, v1::ListShardsResponse* resp) {
  v1::ListShardsRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<v1::ListShardsResponse> r =
      ctx.Call(&v1::FleetService::Stub::ListShards, req);
  if (!r.ok()) return r.status();
  *resp = *std::move(r);
  return absl::OkStatus();
}

// --watch: the shards, then every shard that changed, was added or went away
// (shown once as stopped), polled every --interval until Ctrl-C.
absl::Status WatchShards(Context& ctx, absl::Duration interval) {
  std::map<uint32_t, v1::Shard> last;
  std::vector<size_t> widths;  // of the first table, so that rows line up
  bool first = true;
  while (!ctx.Interrupted()) {
    v1::ListShardsResponse resp;
    absl::Status s = ListShards(ctx, &resp);
    if (!s.ok()) return s;
    std::vector<v1::Shard> changed;
    std::map<uint32_t, v1::Shard> now;
    for (const v1::Shard& shard : resp.shards()) {
      now[shard.index()] = shard;
      auto it = last.find(shard.index());
      if (it == last.end() ||
          !google::protobuf::util::MessageDifferencer::Equals(it->second,
                                                              shard)) {
        changed.push_back(shard);
      }
    }
    for (const auto& [index, shard] : last) {
      if (now.count(index) == 0) {
        v1::Shard gone = shard;
        gone.set_state(v1::SHARD_STATE_STOPPED);
        gone.set_ready(false);
        gone.set_pid(0);
        gone.set_health(v1::SHARD_HEALTH_UNSPECIFIED);
        gone.clear_health_reason();
        changed.push_back(gone);
      }
    }
    last = std::move(now);
    if (!changed.empty() || first) {
      v1::ListShardsResponse update;
      for (v1::Shard& shard : changed) *update.add_shards() = std::move(shard);
      if (ctx.format() == Format::kJson || ctx.format() == Format::kYaml ||
          ctx.format() == Format::kProtoJson) {
        for (const v1::Shard& shard : update.shards()) {
          ctx.PrintItem(shard, nullptr);
        }
      } else {
        ctx.PrintItem(update, [&](Format format, std::ostream& out) {
          if (format == Format::kName) {
            for (const v1::Shard& shard : update.shards()) {
              out << ShardName(ctx.arg(0), shard) << "\n";
            }
            return;
          }
          Table t = ShardTable(format == Format::kWide);
          for (const v1::Shard& shard : update.shards()) {
            AddShardRow(t, shard, format == Format::kWide);
          }
          t.SetMinWidths(widths);
          const bool headers = first && ctx.headers();
          if (first) widths = t.Widths(headers);
          t.Print(out, headers);
        });
      }
    }
    first = false;
    const absl::Time next = absl::Now() + interval;
    while (absl::Now() < next && !ctx.Interrupted()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return absl::OkStatus();
}

absl::Status RunGetShards(Context& ctx) {
  absl::StatusOr<absl::Duration> interval = ctx.IntervalFlag();
  if (!interval.ok()) return interval.status();
  if (ctx.Switch("watch")) return WatchShards(ctx, *interval);
  v1::ListShardsResponse resp;
  absl::Status s = ListShards(ctx, &resp);
  if (!s.ok()) return s;
  ctx.Print(resp, [&](Format format, std::ostream& out) {
    if (format == Format::kName) {
      for (const v1::Shard& shard : resp.shards()) {
        out << ShardName(ctx.arg(0), shard) << "\n";
      }
      return;
    }
    Table t = ShardTable(format == Format::kWide);
    for (const v1::Shard& shard : resp.shards()) {
      AddShardRow(t, shard, format == Format::kWide);
    }
    t.Print(out, ctx.headers());
  });
  return absl::OkStatus();
}

// The desired FleetSpec in a form `apply -f` reads back unchanged.
absl::Status RunGetSpec(Context& ctx) {
  v1::FleetSpec spec;
  if (ctx.args().empty()) {
    absl::StatusOr<v1::ListListenersResponse> resp = ctx.Call(
        &v1::FleetService::Stub::ListListeners, v1::ListListenersRequest());
    if (!resp.ok()) return resp.status();
    for (const v1::ListenerState& l : resp->listeners()) {
      *spec.add_listeners() = l.spec();
    }
  } else {
    v1::GetListenerRequest req;
    req.set_name(ctx.arg(0));
    absl::StatusOr<v1::GetListenerResponse> resp =
        ctx.Call(&v1::FleetService::Stub::GetListener, req);
    if (!resp.ok()) return resp.status();
    *spec.add_listeners() = resp->listener().spec();
  }
  switch (ctx.format()) {
    case Format::kJson:
    case Format::kYaml: {
      // As a spec file is written: field names as in the proto, enum values
      // by their full names, only the fields that are set. apply reads the
      // JSON (proto3 JSON) back.
      const Value value = ToValue(spec, {.short_enums = false,
                                         .proto_field_names = true,
                                         .include_defaults = false});
      if (ctx.format() == Format::kJson) {
        ctx.out() << ToJson(value, /*multiline=*/true) << "\n";
      } else {
        ctx.out() << ToYaml(value);
      }
      break;
    }
    default:
      ctx.Print(spec, nullptr);  // textproto
  }
  return absl::OkStatus();
}

std::vector<Format> ListFormats() {
  return {Format::kTable, Format::kWide, Format::kJson,
          Format::kYaml,  Format::kName, Format::kProtoJson};
}

}  // namespace

void AddGetCommands(std::vector<CommandSpec>* commands) {
  commands->push_back({
      .name = "get listeners",
      .section = Section::kRead,
      .summary = "every listener",
      .description =
          "Lists every listener with its address, shard count, ready shards,\n"
          "steering and worker. -o wide adds the effective backlog, drain\n"
          "timeout, rebalance mode (\"off\", or \"auto METRIC\n"
          "THRESHOLD->TARGET every PERIOD, N moves\") and worker user.\n",
      .formats = ListFormats(),
      .examples = {{"", "portfleetctl get listeners"},
                   {"the names only", "portfleetctl get listeners -o name"}},
      .run = RunGetListeners,
  });
  commands->push_back({
      .name = "get listener",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kRead,
      .summary = "one listener",
      .description = "Shows one listener, as get listeners does.\n",
      .formats = ListFormats(),
      .examples = {{"", "portfleetctl get listener web"},
                   {"", "portfleetctl get listener web -o yaml"}},
      .run = RunGetListener,
  });
  commands->push_back({
      .name = "get shards",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kRead,
      .summary = "the shards of a listener (--watch: follow changes)",
      .description =
          "Lists the shards of a listener: state, worker pid, CPU, restarts,\n"
          "accept queue depth, active connections and steering counters.\n"
          "-o wide adds connections accepted, the socket inode, orphans\n"
          "killed, and connections adopted in hand-offs with their pause\n"
          "(median/p99, µs).\n\n"
          "With --watch, prints the shards, then each shard that changes, is\n"
          "added, or goes away (shown once as stopped), polling every\n"
          "--interval until Ctrl-C; with -o json each shard is one line.\n",
      .flags = {{.name = "watch",
                 .short_name = 'w',
                 .help = "keep printing shards as they change"},
                {.name = "interval",
                 .value = "DURATION",
                 .help = "--watch poll period (default 2s, at least 100ms)"}},
      .formats = ListFormats(),
      .examples = {{"", "portfleetctl get shards web"},
                   {"watch a scale-up", "portfleetctl get shards web --watch"}},
      .run = RunGetShards,
  });
  commands->push_back({
      .name = "get spec",
      .args = "[NAME]",
      .min_args = 0,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kRead,
      .summary = "the desired fleet spec, as apply -f reads it",
      .description =
          "Prints the desired fleet spec (portfleet.v1.FleetSpec: every\n"
          "listener as last applied, or just NAME) as text format (default)\n"
          "or JSON, in a form that apply -f reads back unchanged: save it,\n"
          "edit it, apply it. -o yaml prints the same for reading (apply does\n"
          "not read YAML).\n",
      .formats = {Format::kTextproto, Format::kJson, Format::kYaml},
      .examples = {{"save the running configuration",
                    "portfleetctl get spec > fleet.textproto"},
                   {"", "portfleetctl get spec web -o json > web.json"},
                   {"copy the fleet to the agent at $OTHER",
                    "portfleetctl get spec -o json | portfleetctl --server "
                    "$OTHER apply -f -"}},
      .run = RunGetSpec,
  });
}

}  // namespace portfleet::ctl
