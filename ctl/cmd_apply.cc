// apply and diff: a fleet spec file against the running agent. The agent
// plans every change (validate_only on the mutating calls); apply then makes
// them and waits until what it started serves.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "agent/spec/spec.h"
#include "ctl/command.h"
#include "ctl/output.pb.h"
#include "ctl/render.h"
#include "google/protobuf/text_format.h"

namespace portfleet::ctl {
namespace {

// The spec from FILE, or from standard input for "-" (JSON when it starts
// with '{', else text format). A file or spec error is a usage error.
absl::StatusOr<v1::FleetSpec> ReadSpec(const Context& ctx,
                                       const std::string& file) {
  absl::StatusOr<v1::FleetSpec> spec;
  if (file == "-") {
    if (ctx.env().in == nullptr) return UsageError("-f -: no standard input");
    std::ostringstream read;
    read << ctx.env().in->rdbuf();
    const std::string text = read.str();
    absl::string_view body = absl::StripLeadingAsciiWhitespace(text);
    spec =
        ParseFleetSpec(text,
                       !body.empty() && body[0] == '{' ? SpecFormat::kJson
                                                       : SpecFormat::kTextproto,
                       "<stdin>");
  } else {
    spec = LoadFleetSpecFile(file);
  }
  if (!spec.ok()) return UsageError(spec.status().message());
  return spec;
}

// The agent's plan for every listener of `spec` (file order), then, with
// `prune`, for every running listener the file does not name (by name).
// Nothing changes; the first listener the agent would refuse is the error.
absl::StatusOr<v1::FleetPlan> PlanSpec(Context& ctx, const v1::FleetSpec& spec,
                                       bool prune) {
  absl::StatusOr<v1::ListListenersResponse> current = ctx.Call(
      &v1::FleetService::Stub::ListListeners, v1::ListListenersRequest());
  if (!current.ok()) return current.status();
  std::set<std::string> existing;
  for (const v1::ListenerState& l : current->listeners()) {
    existing.insert(l.spec().name());
  }
  v1::FleetPlan plan;
  std::set<std::string> named;
  for (const v1::Listener& l : spec.listeners()) {
    named.insert(l.name());
    absl::StatusOr<v1::ListenerPlan> one;
    if (existing.count(l.name()) == 0) {
      v1::CreateListenerRequest req;
      *req.mutable_listener() = l;
      req.set_validate_only(true);
      absl::StatusOr<v1::CreateListenerResponse> resp =
          ctx.Call(&v1::FleetService::Stub::CreateListener, req);
      if (resp.ok())
        one = resp->plan();
      else
        one = resp.status();
    } else {
      v1::UpdateListenerRequest req;
      *req.mutable_listener() = l;
      req.set_validate_only(true);
      absl::StatusOr<v1::UpdateListenerResponse> resp =
          ctx.Call(&v1::FleetService::Stub::UpdateListener, req);
      if (resp.ok())
        one = resp->plan();
      else
        one = resp.status();
    }
    if (!one.ok()) return WithPrefix(one.status(), ListenerName(l.name()));
    *plan.add_listeners() = std::move(*one);
  }
  if (!prune) return plan;
  for (const std::string& name : existing) {
    if (named.count(name) > 0) continue;
    v1::DeleteListenerRequest req;
    req.set_name(name);
    req.set_validate_only(true);
    absl::StatusOr<v1::DeleteListenerResponse> resp =
        ctx.Call(&v1::FleetService::Stub::DeleteListener, req);
    if (!resp.ok()) return WithPrefix(resp.status(), ListenerName(name));
    *plan.add_listeners() = resp->plan();
  }
  return plan;
}

std::string ActionText(v1::ListenerPlan::Action action) {
  return ShortEnumName(v1::ListenerPlan::Action_descriptor(), action);
}

// --- diff -------------------------------------------------------------------

std::vector<std::string> SpecLines(const v1::ListenerPlan& plan, bool desired) {
  const bool present = desired ? plan.has_desired() : plan.has_current();
  if (!present) return {};
  std::string text;
  google::protobuf::TextFormat::PrintToString(
      desired ? plan.desired() : plan.current(), &text);
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  return lines;
}

// A line diff of `a` to `b` (longest common subsequence; specs are short):
// " line", "-line", "+line".
std::vector<std::string> LineDiff(const std::vector<std::string>& a,
                                  const std::vector<std::string>& b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<int>> lcs(n + 1, std::vector<int>(m + 1, 0));
  for (size_t i = n; i-- > 0;) {
    for (size_t j = m; j-- > 0;) {
      lcs[i][j] = a[i] == b[j] ? lcs[i + 1][j + 1] + 1
                               : std::max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  std::vector<std::string> out;
  size_t i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] == b[j]) {
      out.push_back(" " + a[i]);
      ++i;
      ++j;
    } else if (i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1])) {
      out.push_back("-" + a[i++]);  // removals first, as diff -u
    } else {
      out.push_back("+" + b[j++]);
    }
  }
  return out;
}

void PrintPlanText(const v1::FleetPlan& plan, std::ostream& out) {
  std::map<v1::ListenerPlan::Action, int> counts;
  for (const v1::ListenerPlan& l : plan.listeners()) {
    ++counts[l.action()];
    out << ListenerName(l.name()) << ": " << ActionText(l.action());
    if (!l.changed_fields().empty()) {
      out << " (" << absl::StrJoin(l.changed_fields(), ", ") << ")";
    }
    out << "\n";
    if (l.action() == v1::ListenerPlan::ACTION_UNCHANGED) continue;
    for (const std::string& line :
         LineDiff(SpecLines(l, false), SpecLines(l, true))) {
      out << "  " << line << "\n";
    }
  }
  out << "plan: " << counts[v1::ListenerPlan::ACTION_CREATE] << " to create, "
      << counts[v1::ListenerPlan::ACTION_UPDATE] << " to update, "
      << counts[v1::ListenerPlan::ACTION_DELETE] << " to delete, "
      << counts[v1::ListenerPlan::ACTION_UNCHANGED] << " unchanged\n";
}

absl::Status RunDiff(Context& ctx) {
  absl::StatusOr<v1::FleetSpec> spec = ReadSpec(ctx, *ctx.Flag("filename"));
  if (!spec.ok()) return spec.status();
  absl::StatusOr<v1::FleetPlan> plan =
      PlanSpec(ctx, *spec, ctx.Switch("prune"));
  if (!plan.ok()) return plan.status();
  ctx.Print(*plan, [&](Format format, std::ostream& out) {
    if (format == Format::kName) {
      for (const v1::ListenerPlan& l : plan->listeners()) {
        if (l.action() != v1::ListenerPlan::ACTION_UNCHANGED) {
          out << ListenerName(l.name()) << "\n";
        }
      }
      return;
    }
    PrintPlanText(*plan, out);
  });
  return absl::OkStatus();
}

// --- apply ------------------------------------------------------------------

void PrintApplied(const Context& ctx, const ApplyResult& result) {
  ctx.Print(result, [&](Format format, std::ostream& out) {
    for (const ApplyResult::Listener& l : result.listeners()) {
      out << ListenerName(l.name());
      if (format != Format::kName) {
        out << " "
            << ShortEnumName(ApplyResult::Action_descriptor(), l.action());
        if (result.dry_run()) out << " (dry run)";
      }
      out << "\n";
    }
  });
}

ApplyResult::Action ResultAction(v1::ListenerPlan::Action action) {
  switch (action) {
    case v1::ListenerPlan::ACTION_CREATE:
      return ApplyResult::ACTION_CREATED;
    case v1::ListenerPlan::ACTION_UPDATE:
      return ApplyResult::ACTION_CONFIGURED;
    case v1::ListenerPlan::ACTION_DELETE:
      return ApplyResult::ACTION_DELETED;
    default:
      return ApplyResult::ACTION_UNCHANGED;
  }
}

// Restarts of a listener's shards by index, before a change.
std::map<uint32_t, uint32_t> Restarts(const v1::ListenerState& l) {
  std::map<uint32_t, uint32_t> out;
  for (const v1::Shard& s : l.shards()) out[s.index()] = s.restarts();
  return out;
}

// A worker restarted this often since the change keeps exiting.
constexpr uint32_t kCrashLoopRestarts = 3;

// Why listener `l` does not serve yet (empty: it serves: every shard runs a
// worker that is ready), and whether that is final (crash loop, start-up
// failure) rather than worth waiting for.
std::string NotServing(const v1::ListenerState& l,
                       const std::map<uint32_t, uint32_t>& restarts_before,
                       bool* final) {
  *final = false;
  if (!l.error().empty()) {
    *final = true;
    return l.error();
  }
  if (l.shards().empty()) return "no shards";
  for (const v1::Shard& s : l.shards()) {
    auto before = restarts_before.find(s.index());
    uint32_t base = before == restarts_before.end() ? 0 : before->second;
    std::string why =
        s.health_reason().empty()
            ? ShardStateText(s.state())
            : absl::StrCat(ShardStateText(s.state()), ": ", s.health_reason());
    if (s.restarts() >= base + kCrashLoopRestarts) {
      *final = true;
      return absl::StrCat("shard ", s.index(), ": the worker keeps exiting (",
                          s.restarts() - base, " restarts; ", why, ")");
    }
    if (s.state() != v1::SHARD_STATE_RUNNING || !s.ready()) {
      return absl::StrCat("shard ", s.index(), ": ", why);
    }
  }
  return "";
}

// Waits until listener `name` serves (see NotServing), at most `timeout`.
absl::Status WaitServing(Context& ctx, const std::string& name,
                         const std::map<uint32_t, uint32_t>& restarts_before,
                         absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  std::string why;
  for (;;) {
    v1::GetListenerRequest req;
    req.set_name(name);
    absl::StatusOr<v1::GetListenerResponse> resp =
        ctx.Call(&v1::FleetService::Stub::GetListener, req);
    if (!resp.ok()) return resp.status();
    bool final = false;
    why = NotServing(resp->listener(), restarts_before, &final);
    if (why.empty()) return absl::OkStatus();
    if (final) break;
    if (absl::Now() >= end || ctx.Interrupted()) {
      why = absl::StrCat("not serving after ", absl::FormatDuration(timeout),
                         ": ", why);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return absl::FailedPreconditionError(why);
}

absl::StatusOr<absl::Duration> WaitTimeout(const Context& ctx) {
  absl::Duration timeout = absl::Seconds(60);
  if (std::optional<std::string> v = ctx.Flag("wait-timeout")) {
    if (!absl::ParseDuration(*v, &timeout) || timeout < absl::ZeroDuration()) {
      return UsageError(absl::StrCat("--wait-timeout: bad duration '", *v,
                                     "' (e.g. 30s, 0 = do not wait)"));
    }
  }
  return timeout;
}

// Makes the change `plan` says (the listener's spec from the file, or its
// deletion) and waits until a created or updated listener serves. Errors
// name the listener.
absl::Status ApplyOne(Context& ctx, const v1::ListenerPlan& plan,
                      const v1::Listener* spec, absl::Duration wait) {
  const std::string name = ListenerName(plan.name());
  std::map<uint32_t, uint32_t> restarts_before;
  absl::Status s;
  switch (plan.action()) {
    case v1::ListenerPlan::ACTION_CREATE: {
      v1::CreateListenerRequest req;
      *req.mutable_listener() = *spec;
      s = ctx.Call(&v1::FleetService::Stub::CreateListener, req).status();
      break;
    }
    case v1::ListenerPlan::ACTION_UPDATE: {
      v1::GetListenerRequest get;
      get.set_name(plan.name());
      absl::StatusOr<v1::GetListenerResponse> before =
          ctx.Call(&v1::FleetService::Stub::GetListener, get);
      if (before.ok()) restarts_before = Restarts(before->listener());
      v1::UpdateListenerRequest req;
      *req.mutable_listener() = *spec;
      s = ctx.Call(&v1::FleetService::Stub::UpdateListener, req).status();
      break;
    }
    case v1::ListenerPlan::ACTION_DELETE: {
      v1::DeleteListenerRequest req;
      req.set_name(plan.name());
      return WithPrefix(
          ctx.Call(&v1::FleetService::Stub::DeleteListener, req).status(),
          name);
    }
    default:
      return absl::OkStatus();
  }
  if (!s.ok()) return WithPrefix(s, name);
  if (wait <= absl::ZeroDuration()) return s;
  s = WaitServing(ctx, plan.name(), restarts_before, wait);
  if (s.ok() || s.code() != absl::StatusCode::kFailedPrecondition) {
    return WithPrefix(s, name);
  }
  // The change was made; what it started does not serve.
  return WithPrefix(
      s, absl::StrCat(name, " ",
                      plan.action() == v1::ListenerPlan::ACTION_CREATE
                          ? "created"
                          : "configured",
                      " but not serving"));
}

absl::Status RunApply(Context& ctx) {
  absl::StatusOr<absl::Duration> wait = WaitTimeout(ctx);
  if (!wait.ok()) return wait.status();
  absl::StatusOr<v1::FleetSpec> spec = ReadSpec(ctx, *ctx.Flag("filename"));
  if (!spec.ok()) return spec.status();
  const bool dry_run = ctx.Switch("dry-run");
  ApplyResult result;
  result.set_dry_run(dry_run);
  // Every change is checked by the agent before the first one is made.
  absl::StatusOr<v1::FleetPlan> plan =
      PlanSpec(ctx, *spec, ctx.Switch("prune"));
  if (!plan.ok()) {
    if (ctx.format() != Format::kTable) PrintApplied(ctx, result);
    return plan.status();
  }
  std::map<std::string, const v1::Listener*> by_name;
  for (const v1::Listener& l : spec->listeners()) by_name[l.name()] = &l;
  // Text output goes line by line as listeners are applied; the other
  // formats print the result once, also when a listener failed.
  const bool streaming = ctx.format() == Format::kTable;
  for (const v1::ListenerPlan& p : plan->listeners()) {
    if (!dry_run) {
      auto found = by_name.find(p.name());
      absl::Status s = ApplyOne(
          ctx, p, found == by_name.end() ? nullptr : found->second, *wait);
      if (!s.ok()) {
        if (!streaming) PrintApplied(ctx, result);
        return s;
      }
    }
    ApplyResult::Listener* done = result.add_listeners();
    done->set_name(p.name());
    done->set_action(ResultAction(p.action()));
    *done->mutable_changed_fields() = p.changed_fields();
    if (streaming) {
      ApplyResult one;
      one.set_dry_run(dry_run);
      *one.add_listeners() = *done;
      PrintApplied(ctx, one);
    }
  }
  if (!streaming) PrintApplied(ctx, result);
  return absl::OkStatus();
}

const FlagSpec kFilenameFlag = {
    .name = "filename",
    .short_name = 'f',
    .value = "FILE",
    .help =
        "fleet spec: .textproto/.txtpb or .json; - reads\n"
        "standard input (JSON if it starts with '{')",
    .complete = Complete::kFile,
    .required = true};

const FlagSpec kPruneFlag = {
    .name = "prune",
    .help = "also delete the listeners the file does not name"};

}  // namespace

void AddApplyCommands(std::vector<CommandSpec>* commands) {
  commands->push_back({
      .name = "apply",
      .section = Section::kChange,
      .summary = "create or update the listeners of a fleet spec",
      .description =
          "Creates the listeners of a fleet spec that do not exist and "
          "updates\n"
          "those that differ; says which for each (created, configured,\n"
          "unchanged, deleted). The agent checks every change first (as\n"
          "`diff` shows them); nothing is changed when one would be refused.\n"
          "Then each change is made in file order, and apply waits until a\n"
          "created or updated listener serves (every shard's worker running\n"
          "and ready): a listener that does not serve within --wait-timeout,\n"
          "or whose worker keeps exiting, is an error (exit 1) that says why;\n"
          "the listeners before it stay applied. Listeners missing from the\n"
          "file are left alone unless --prune. `get spec` prints a spec that\n"
          "apply reads back unchanged.\n",
      .flags = {kFilenameFlag,
                {.name = "dry-run",
                 .help = "have the agent check every change and make none"},
                kPruneFlag,
                {.name = "wait-timeout",
                 .value = "DURATION",
                 .help = "how long to wait for each created or updated\n"
                         "listener to serve (default 60s; 0 = do not wait)"}},
      .formats = {Format::kTable, Format::kJson, Format::kYaml, Format::kName,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl apply -f fleet.textproto"},
                   {"what would change, changing nothing",
                    "portfleetctl apply -f fleet.textproto --dry-run"},
                   {"make the agent run exactly the file",
                    "portfleetctl apply -f fleet.textproto --prune"},
                   {"the running configuration, to edit and apply back",
                    "portfleetctl get spec > fleet.textproto"},
                   {"from standard input",
                    "portfleetctl get spec -o json | portfleetctl apply -f -"}},
      .run = RunApply,
  });
  commands->push_back({
      .name = "diff",
      .section = Section::kRead,
      .summary = "what apply -f FILE would change",
      .description =
          "Asks the agent to plan every listener of a fleet spec as apply\n"
          "would (create, update and which fields, delete with --prune,\n"
          "unchanged) and prints each change as a diff of the listener's spec\n"
          "(- running, + file), then a summary line. Changes nothing. Exits 0\n"
          "whether or not there are changes (-o json for scripts; -o name\n"
          "lists the listeners that would change).\n",
      .flags = {kFilenameFlag, kPruneFlag},
      .formats = {Format::kTable, Format::kJson, Format::kYaml, Format::kName,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl diff -f fleet.textproto"},
                   {"including the listeners apply --prune would delete",
                    "portfleetctl diff -f fleet.textproto --prune"}},
      .run = RunDiff,
  });
}

}  // namespace portfleet::ctl
