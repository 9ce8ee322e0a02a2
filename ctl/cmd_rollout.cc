// Rollouts as resources: rollout start, status [--watch], pause, resume,
// undo, history (and `rollout NAME`, the blocking form of start).
#include <chrono>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "ctl/command.h"
#include "ctl/render.h"
#include "ctl/table.h"

namespace portfleet::ctl {
namespace {

std::string WorkerText(const v1::WorkerSpec& w) {
  std::string out = w.command();
  for (const std::string& a : w.args()) absl::StrAppend(&out, " ", a);
  return out;
}

std::string StateText(v1::RollOutState state) {
  return ShortEnumName(v1::RollOutState_descriptor(), state);
}

bool InProgress(const v1::RollOut& r) {
  return r.state() == v1::ROLL_OUT_STATE_ROLLING ||
         r.state() == v1::ROLL_OUT_STATE_PAUSED ||
         r.state() == v1::ROLL_OUT_STATE_ROLLING_BACK;
}

// "web/3 rolling: 1 of 4 shards rolled"
std::string Summary(const v1::RollOut& r) {
  std::string out = absl::StrCat(
      "rollout ", r.id(), r.undo() ? " (undo)" : "", " ", StateText(r.state()),
      ": ", r.shards_rolled(), " of ", r.shards(), " shards rolled");
  if (!r.message().empty()) absl::StrAppend(&out, " (", r.message(), ")");
  return out;
}

void PrintRollOutText(const v1::RollOut& r, std::ostream& out) {
  out << Summary(r) << "\n"
      << "  worker:   " << WorkerText(r.worker()) << "\n"
      << "  previous: " << WorkerText(r.previous_worker()) << "\n";
}

absl::StatusOr<uint32_t> MaxSurge(const Context& ctx) {
  const std::string value = ctx.Flag("max-surge").value_or("0");
  uint32_t v;
  if (!absl::SimpleAtoi(value, &v)) {
    return UsageError(absl::StrCat("--max-surge: '", value,
                                   "' is not a non-negative integer"));
  }
  return v;
}

// start (async unless --wait), the old blocking `rollout NAME`, and undo.
absl::Status StartRollOut(Context& ctx, bool wait, bool undo) {
  v1::RollOutListenerRequest req;
  req.set_name(ctx.arg(0));
  req.set_undo(undo);
  req.set_async(!wait);
  if (std::optional<std::string> cmd = ctx.Flag("worker-command")) {
    if (cmd->empty()) return UsageError("--worker-command: empty");
    req.mutable_worker()->set_command(*cmd);
  }
  if (std::optional<std::string> args = ctx.Flag("worker-args")) {
    for (absl::string_view a :
         absl::StrSplit(*args, ' ', absl::SkipWhitespace())) {
      req.mutable_worker()->add_args(std::string(a));
    }
  }
  absl::StatusOr<uint32_t> surge = MaxSurge(ctx);
  if (!surge.ok()) return surge.status();
  req.set_max_surge(*surge);
  absl::StatusOr<v1::RollOutListenerResponse> resp =
      ctx.Call(&v1::FleetService::Stub::RollOutListener, req);
  if (!resp.ok()) return resp.status();
  const v1::RollOut& r = resp->rollout();
  // Started (not waited for): the result is the rollout alone.
  const google::protobuf::Message& result =
      wait ? static_cast<const google::protobuf::Message&>(*resp) : r;
  ctx.Print(result, [&](Format format, std::ostream& out) {
    out << ListenerName(req.name());
    if (format == Format::kName) {
      out << "\n";
      return;
    }
    if (r.state() == v1::ROLL_OUT_STATE_ROLLING_BACK ||
        r.state() == v1::ROLL_OUT_STATE_ROLLED_BACK) {
      // An undo of the rollout in progress.
      out << " rollout " << r.id() << " " << StateText(r.state()) << "\n";
    } else if (!wait) {
      out << " rollout " << r.id() << " started (" << WorkerText(r.worker())
          << ")\n";
    } else {
      out << " rolled out (" << WorkerText(resp->listener().spec().worker())
          << ")\n";
    }
  });
  return absl::OkStatus();
}

absl::Status RunStart(Context& ctx) {
  return StartRollOut(ctx, ctx.Switch("wait"), /*undo=*/false);
}
absl::Status RunBlocking(Context& ctx) {
  return StartRollOut(ctx, /*wait=*/true, /*undo=*/false);
}
absl::Status RunUndo(Context& ctx) {
  return StartRollOut(ctx, ctx.Switch("wait"), /*undo=*/true);
}

absl::StatusOr<v1::RollOut> Get(Context& ctx, const std::string& name) {
  v1::GetRollOutRequest req;
  req.set_name(name);
  absl::StatusOr<v1::GetRollOutResponse> resp =
      ctx.Call(&v1::FleetService::Stub::GetRollOut, req);
  if (!resp.ok()) return resp.status();
  return resp->rollout();
}

// The exit status of a rollout that ended: rolled back or aborted is an
// error, as in kubectl rollout status.
absl::Status Ended(const v1::RollOut& r) {
  if (r.state() == v1::ROLL_OUT_STATE_SUCCEEDED || InProgress(r)) {
    return absl::OkStatus();
  }
  return absl::AbortedError(Summary(r));
}

absl::Status RunStatus(Context& ctx) {
  absl::StatusOr<v1::RollOut> r = Get(ctx, ctx.arg(0));
  if (!r.ok()) return r.status();
  if (!ctx.Switch("watch")) {
    ctx.Print(*r,
              [&](Format, std::ostream& out) { PrintRollOutText(*r, out); });
    return absl::OkStatus();
  }
  absl::StatusOr<absl::Duration> interval = ctx.IntervalFlag();
  if (!interval.ok()) return interval.status();
  // One line per change until it ends (or Ctrl-C).
  std::string last;
  for (;;) {
    const std::string now = r->ShortDebugString();
    if (now != last) {
      ctx.PrintItem(
          *r, [&](Format, std::ostream& out) { out << Summary(*r) << "\n"; });
      last = now;
    }
    if (!InProgress(*r) || ctx.Interrupted()) break;
    const absl::Time until = absl::Now() + *interval;
    while (absl::Now() < until && !ctx.Interrupted()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const std::string id = r->id();
    r = Get(ctx, ctx.arg(0));
    if (!r.ok()) return r.status();
    if (r->id() != id) break;  // a newer rollout: this one has ended
  }
  return Ended(*r);
}

absl::Status Pause(Context& ctx, bool paused) {
  v1::PauseRollOutRequest req;
  req.set_name(ctx.arg(0));
  req.set_paused(paused);
  absl::StatusOr<v1::PauseRollOutResponse> resp =
      ctx.Call(&v1::FleetService::Stub::PauseRollOut, req);
  if (!resp.ok()) return resp.status();
  ctx.Print(*resp, [&](Format format, std::ostream& out) {
    if (format == Format::kName) {
      out << ListenerName(req.name()) << "\n";
      return;
    }
    out << ListenerName(req.name()) << " " << Summary(resp->rollout()) << "\n";
  });
  return absl::OkStatus();
}
absl::Status RunPause(Context& ctx) { return Pause(ctx, true); }
absl::Status RunResume(Context& ctx) { return Pause(ctx, false); }

std::string MicrosText(int64_t micros) {
  if (micros == 0) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixMicros(micros),
                          absl::UTCTimeZone());
}

absl::Status RunHistory(Context& ctx) {
  v1::ListRollOutsRequest req;
  req.set_name(ctx.arg(0));
  absl::StatusOr<v1::ListRollOutsResponse> resp =
      ctx.Call(&v1::FleetService::Stub::ListRollOuts, req);
  if (!resp.ok()) return resp.status();
  ctx.Print(*resp, [&](Format format, std::ostream& out) {
    if (format == Format::kName) {
      for (const v1::RollOut& r : resp->rollouts()) {
        out << "rollout/" << r.id() << "\n";
      }
      return;
    }
    Table t({"ROLLOUT", "STATE", "SHARDS", "STARTED", "ENDED", "WORKER"});
    for (const v1::RollOut& r : resp->rollouts()) {
      t.AddRow({r.id() + (r.undo() ? " (undo)" : ""), StateText(r.state()),
                absl::StrCat(r.shards_rolled(), "/", r.shards()),
                MicrosText(r.start_time_unix_micros()),
                MicrosText(r.end_time_unix_micros()), WorkerText(r.worker())});
    }
    t.Print(out, ctx.headers());
  });
  return absl::OkStatus();
}

std::vector<Format> Formats() {
  return {Format::kTable, Format::kJson, Format::kYaml, Format::kName,
          Format::kProtoJson};
}

std::vector<FlagSpec> WorkerFlags() {
  return {{.name = "worker-command",
           .value = "CMD",
           .help = "new worker program (default: the current one)",
           .complete = Complete::kFile},
          {.name = "worker-args",
           .value = "\"A B\"",
           .help = "its arguments, split on spaces (default: the\n"
                   "current ones)"},
          {.name = "max-surge",
           .value = "N",
           .help = "shards rolled at the same time (default 1)"}};
}

CommandSpec OneListener(std::string name, std::string summary,
                        std::string description, absl::Status (*run)(Context&),
                        std::vector<Example> examples) {
  return {.name = std::move(name),
          .args = "NAME",
          .min_args = 1,
          .max_args = 1,
          .arg_complete = Complete::kListener,
          .section = Section::kChange,
          .summary = std::move(summary),
          .description = std::move(description),
          .formats = Formats(),
          .examples = std::move(examples),
          .run = run};
}

}  // namespace

void AddRollOutCommands(std::vector<CommandSpec>* commands) {
  const FlagSpec wait = {.name = "wait",
                         .help =
                             "return when the rollout has ended (exit 1\n"
                             "if it was rolled back)"};
  CommandSpec start = OneListener(
      "rollout start", "start a rolling upgrade of the workers",
      "Starts a rolling upgrade: per shard, the new worker starts on the\n"
      "same socket, becomes ready, then the old one drains. A new worker\n"
      "that does not become ready is stopped and the shards already rolled\n"
      "go back to the old worker; no connection is refused either way.\n"
      "Returns once the rollout started and prints its id; follow it with\n"
      "`rollout status --watch`, or give --wait. (`rollout NAME` is the\n"
      "blocking form, as before.) Other changes of the listener wait until\n"
      "the rollout has ended; pause, resume and undo do not.\n",
      RunStart,
      {{"",
        "portfleetctl rollout start web --worker-command /opt/web/v2/server"},
       {"restart every worker in place, and wait",
        "portfleetctl rollout start web --wait"}});
  start.flags = WorkerFlags();
  start.flags.push_back(wait);
  commands->push_back(start);

  CommandSpec blocking = start;
  blocking.name = "rollout";
  blocking.summary = "rolling upgrade, waiting for it (rollout start --wait)";
  blocking.description =
      "The blocking form of `rollout start`: returns when every shard runs\n"
      "the new worker, or fails (exit 1) when it was rolled back.\n";
  blocking.flags = WorkerFlags();
  blocking.examples = {{"",
                        "portfleetctl rollout web --worker-args "
                        "\"--mode=http\""}};
  blocking.run = RunBlocking;
  commands->push_back(blocking);

  CommandSpec status = OneListener(
      "rollout status", "where a listener's rollout is",
      "Prints the listener's rollout in progress, else its last one: its\n"
      "state (rolling, paused, rolling-back, succeeded, rolled-back,\n"
      "aborted), the shards rolled and the workers. --watch prints a line\n"
      "per change until it ends, and exits 1 if it was rolled back or\n"
      "aborted.\n",
      RunStatus, {{"", "portfleetctl rollout status web --watch"}});
  status.section = Section::kRead;
  status.flags = {
      {.name = "watch", .short_name = 'w', .help = "follow it until it ends"},
      {.name = "interval",
       .value = "DURATION",
       .help = "poll period with --watch (default 2s)"}};
  commands->push_back(status);

  commands->push_back(OneListener(
      "rollout pause", "pause the rollout in progress",
      "No further shard starts rolling; shards in flight finish. The\n"
      "listener keeps serving with both workers until resume or undo.\n",
      RunPause, {{"", "portfleetctl rollout pause web"}}));
  commands->push_back(OneListener("rollout resume", "resume a paused rollout",
                                  "Goes on rolling.\n", RunResume,
                                  {{"", "portfleetctl rollout resume web"}}));

  CommandSpec undo = OneListener(
      "rollout undo", "roll back to the previous worker",
      "With a rollout in progress (or paused): stops it and rolls the shards\n"
      "it already rolled back to the previous worker. Otherwise rolls out\n"
      "the worker the listener ran before its last successful rollout (a\n"
      "new rollout, marked undo in the history). Returns once started unless\n"
      "--wait.\n",
      RunUndo, {{"", "portfleetctl rollout undo web --wait"}});
  undo.flags = {{.name = "max-surge",
                 .value = "N",
                 .help = "shards rolled at the same time (default 1)"},
                wait};
  commands->push_back(undo);

  CommandSpec history = OneListener(
      "rollout history", "a listener's last rollouts",
      "The rollout in progress and the last 10 finished ones, newest first,\n"
      "with the worker each rolled out. Kept by the agent since it started\n"
      "(not persisted).\n",
      RunHistory, {{"", "portfleetctl rollout history web"}});
  history.section = Section::kRead;
  commands->push_back(history);
}

}  // namespace portfleet::ctl
