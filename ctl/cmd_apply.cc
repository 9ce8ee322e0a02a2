// apply: create or update the listeners of a fleet spec file.
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "agent/spec/spec.h"
#include "ctl/command.h"
#include "ctl/output.pb.h"
#include "ctl/render.h"
#include "google/protobuf/util/message_differencer.h"

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

void PrintApplied(const Context& ctx, const ApplyResult& result) {
  ctx.Print(result, [&](Format format, std::ostream& out) {
    for (const ApplyResult::Listener& l : result.listeners()) {
      out << ListenerName(l.name());
      if (format != Format::kName) {
        out << " "
            << ShortEnumName(ApplyResult::Action_descriptor(), l.action());
      }
      out << "\n";
    }
  });
}

absl::Status RunApply(Context& ctx) {
  absl::StatusOr<v1::FleetSpec> spec = ReadSpec(ctx, *ctx.Flag("filename"));
  if (!spec.ok()) return spec.status();
  absl::StatusOr<v1::ListListenersResponse> current = ctx.Call(
      &v1::FleetService::Stub::ListListeners, v1::ListListenersRequest());
  if (!current.ok()) return current.status();
  std::map<std::string, v1::Listener> existing;
  for (const v1::ListenerState& l : current->listeners()) {
    existing[l.spec().name()] = l.spec();
  }
  ApplyResult result;
  // Text output goes line by line as listeners are applied; the other
  // formats print the result once, also when a listener failed.
  const bool streaming = ctx.format() == Format::kTable;
  for (const v1::Listener& l : spec->listeners()) {
    auto found = existing.find(l.name());
    absl::Status s;
    ApplyResult::Action action;
    if (found == existing.end()) {
      v1::CreateListenerRequest req;
      *req.mutable_listener() = l;
      s = ctx.Call(&v1::FleetService::Stub::CreateListener, req).status();
      action = ApplyResult::ACTION_CREATED;
    } else if (!google::protobuf::util::MessageDifferencer::Equivalent(
                   found->second, l)) {
      v1::UpdateListenerRequest req;
      *req.mutable_listener() = l;
      s = ctx.Call(&v1::FleetService::Stub::UpdateListener, req).status();
      action = ApplyResult::ACTION_CONFIGURED;
    } else {
      action = ApplyResult::ACTION_UNCHANGED;
    }
    if (!s.ok()) {
      if (!streaming) PrintApplied(ctx, result);
      return WithPrefix(s, ListenerName(l.name()));
    }
    ApplyResult::Listener* done = result.add_listeners();
    done->set_name(l.name());
    done->set_action(action);
    if (streaming) {
      ApplyResult one;
      *one.add_listeners() = *done;
      PrintApplied(ctx, one);
    }
  }
  if (!streaming) PrintApplied(ctx, result);
  return absl::OkStatus();
}

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
          "unchanged). Listeners missing from the file are left alone. Stops\n"
          "at the first listener the agent refuses; the ones before it stay\n"
          "applied. `get spec` prints a spec that apply reads back "
          "unchanged.\n",
      .flags = {{.name = "filename",
                 .short_name = 'f',
                 .value = "FILE",
                 .help = "fleet spec: .textproto/.txtpb or .json; - reads\n"
                         "standard input (JSON if it starts with '{')",
                 .complete = Complete::kFile,
                 .required = true}},
      .formats = {Format::kTable, Format::kJson, Format::kYaml, Format::kName,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl apply -f fleet.textproto"},
                   {"the running configuration, to edit and apply back",
                    "portfleetctl get spec > fleet.textproto"},
                   {"from standard input",
                    "portfleetctl get spec -o json | portfleetctl apply -f -"}},
      .run = RunApply,
  });
}

}  // namespace portfleet::ctl
