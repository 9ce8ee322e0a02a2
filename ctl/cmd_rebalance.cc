// rebalance: one-shot rebalance of a listener's shards by a load metric.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "ctl/command.h"
#include "ctl/render.h"
#include "ctl/table.h"

namespace portfleet::ctl {
namespace {

std::string Load(double v, v1::RebalanceMetric metric) {
  switch (metric) {
    case v1::REBALANCE_METRIC_CPU:
      return absl::StrFormat("%.2f", v);
    case v1::REBALANCE_METRIC_BYTES:
      return absl::StrFormat("%.0f/s", v);
    default:
      return absl::StrFormat("%.0f", v);
  }
}

std::string Signed(int64_t v) {
  return v > 0 ? absl::StrCat("+", v) : absl::StrCat(v);
}

void PrintResult(const Context& ctx, const std::string& name,
                 const v1::RebalanceListenerResponse& resp, Format format,
                 std::ostream& out) {
  if (format == Format::kName) {
    out << ListenerName(name) << "\n";
    return;
  }
  const std::string metric =
      ShortEnumName(v1::RebalanceMetric_descriptor(), resp.metric());
  Table table({"SHARD", absl::StrCat("LOAD (", metric, ")"), "EXPECTED",
               "SLOTS", "BASELINE", "MOVED CONNS"});
  for (const v1::RebalanceShard& s : resp.shards()) {
    std::string slots =
        s.slots_after() == s.slots_before()
            ? absl::StrCat(s.slots_after())
            : absl::StrCat(s.slots_before(), " -> ", s.slots_after());
    table.AddRow({absl::StrCat(s.index(), s.eligible() ? "" : " (not ready)"),
                  Load(s.load_before(), resp.metric()),
                  Load(s.expected_after(), resp.metric()), slots,
                  absl::StrCat(s.baseline_slots()),
                  Signed(s.connections_moved())});
  }
  table.Print(out, ctx.headers());
  if (resp.spills_size() > 0) {
    // CPU steering: what each CPU sends to the indirection table.
    Table spills({"CPU", "SHARDS", absl::StrCat("LOAD (", metric, ")"),
                  "TARGET", "SPILL (of 256)"});
    for (const v1::RebalanceSpill& c : resp.spills()) {
      std::string share =
          c.share_after() == c.share_before()
              ? absl::StrCat(c.share_after())
              : absl::StrCat(c.share_before(), " -> ", c.share_after());
      absl::StrAppend(
          &share, absl::StrFormat(" (%.0f%%)", 100.0 * c.share_after() / 256));
      spills.AddRow({absl::StrCat(c.cpu()), absl::StrJoin(c.shards(), ","),
                     Load(c.load(), resp.metric()),
                     Load(c.target(), resp.metric()), share});
    }
    out << "\n";
    spills.Print(out, ctx.headers());
  }
  out << absl::StrFormat(
      "%s %s by %s: imbalance (max/mean) %.2f, expected %.2f; %u table slots "
      "moved, %u connections moved%s\n",
      ListenerName(name), resp.dry_run() ? "plan (dry run)" : "rebalanced",
      metric, resp.imbalance_before(), resp.expected_imbalance_after(),
      resp.slots_moved(), resp.connections_moved(),
      resp.steering_only() ? " (steering only: new connections)" : "");
  for (const v1::RebalanceRefusal& r : resp.refusals()) {
    out << "  not done"
        << (r.shard() < 0 ? std::string()
                          : absl::StrCat(" (shard ", r.shard(), ")"))
        << ": " << r.reason() << "\n";
  }
}

absl::Status RunRebalance(Context& ctx) {
  v1::RebalanceListenerRequest req;
  req.set_name(ctx.arg(0));
  const std::string metric = ctx.Flag("metric").value_or("connections");
  // --metric was checked against its choices, the short enum names.
  const google::protobuf::EnumValueDescriptor* value =
      FindEnumValueByShortName(v1::RebalanceMetric_descriptor(), metric);
  req.set_metric(static_cast<v1::RebalanceMetric>(value->number()));
  req.set_dry_run(ctx.Switch("dry-run"));
  req.set_move_connections(!ctx.Switch("no-move"));
  absl::StatusOr<v1::RebalanceListenerResponse> resp =
      ctx.Call(&v1::FleetService::Stub::RebalanceListener, req);
  if (!resp.ok()) return resp.status();
  ctx.Print(*resp, [&](Format format, std::ostream& out) {
    PrintResult(ctx, req.name(), *resp, format, out);
  });
  return absl::OkStatus();
}

}  // namespace

void AddRebalanceCommands(std::vector<CommandSpec>* commands) {
  std::vector<std::string> metrics =
      ShortEnumNames(v1::RebalanceMetric_descriptor());
  commands->push_back({
      .name = "rebalance",
      .args = "NAME",
      .min_args = 1,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kChange,
      .summary = "even the load of a listener's shards (one shot)",
      .description =
          "Measures the load of a listener's ready shards by a metric and\n"
          "evens it: idle open connections are handed from workers above\n"
          "the mean to workers below it (metric connections, workers that\n"
          "support hand-off, such as portfleet-worker); a connection with a\n"
          "request or response in flight never moves. Steering-table slots\n"
          "(HASH steering) move from hot to cold shards so that new\n"
          "connections follow; an even listener goes back to the weights of\n"
          "its spec. Prints the load before, the expected load after, the\n"
          "slots and connections moved per shard and what was not done\n"
          "(e.g. a worker without hand-off: steering only), and returns\n"
          "when the workers have answered. Under CPU steering every shard\n"
          "stays on its CPU (locality): a CPU whose shards are above their\n"
          "share of the load spills only the share of its new connections\n"
          "above it to the indirection table, which then favours the cold\n"
          "shards (the SPILL table: of every 256 new connections of the\n"
          "CPU); an even listener spills nothing. The slot and spill\n"
          "adjustment is not persisted and is dropped by steer, scale and\n"
          "apply.\n",
      .flags = {{.name = "metric",
                 .value = "METRIC",
                 .help = "connections (default), cpu or bytes",
                 .choices = metrics},
                {.name = "dry-run", .help = "print the plan; change nothing"},
                {.name = "no-move",
                 .help = "do not ask workers to hand off open connections"}},
      .formats = {Format::kTable, Format::kJson, Format::kYaml, Format::kName,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl rebalance web"},
                   {"new connections only",
                    "portfleetctl rebalance web --no-move"},
                   {"what it would do, by CPU time",
                    "portfleetctl rebalance web --metric cpu --dry-run"}},
      .run = RunRebalance,
  });
}

}  // namespace portfleet::ctl
