// The agent itself: status, health, version.
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "ctl/command.h"
#include "ctl/output.pb.h"
#include "ctl/render.h"
#include "ctl/table.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "worker/sdk/base/version.h"

namespace portfleet::ctl {
namespace {

using HealthResponse = ::grpc::health::v1::HealthCheckResponse;

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

std::string HealthStateText(v1::HealthState state) {
  if (state == v1::HEALTH_STATE_UNSPECIFIED) return "-";
  return ShortEnumName(v1::HealthState_descriptor(), state);
}

absl::Status RunStatus(Context& ctx) {
  absl::StatusOr<v1::GetStatusResponse> resp =
      ctx.Call(&v1::FleetService::Stub::GetStatus, v1::GetStatusRequest());
  if (!resp.ok()) return resp.status();
  ctx.Print(*resp, [&](Format format, std::ostream& out) {
    const bool wide = format == Format::kWide;
    std::vector<std::string> headers = {"VERSION", "UPTIME", "LISTENERS",
                                        "SERVING", "HEALTH", "BPF-STEERING"};
    if (wide) headers.insert(headers.begin() + 2, "STARTED");
    Table t(headers);
    std::string bpf =
        resp->bpf_steering_active()
            ? "active"
            : absl::StrCat("inactive: ", resp->bpf_unavailable_reason());
    std::vector<std::string> row = {resp->version(),
                                    FormatUptime(resp->uptime_seconds()),
                                    absl::StrCat(resp->listeners()),
                                    resp->serving() ? "yes" : "no",
                                    HealthStateText(resp->health()),
                                    bpf};
    if (wide) {
      row.insert(
          row.begin() + 2,
          absl::FormatTime("%Y-%m-%dT%H:%M:%SZ",
                           absl::FromUnixSeconds(resp->start_time_unix()),
                           absl::UTCTimeZone()));
    }
    t.AddRow(row);
    t.Print(out, ctx.headers());
    // Why it is not SERVING, one line per listener that is not.
    for (const v1::ListenerHealth& l : resp->listener_health()) {
      if (l.state() == v1::HEALTH_STATE_SERVING) continue;
      out << "listener " << l.name() << ": " << HealthStateText(l.state())
          << " (" << l.healthy_shards() << "/" << l.shards()
          << " shards healthy)" << (l.reason().empty() ? "" : ": ")
          << l.reason() << "\n";
    }
    // Declarative mode: where the fleet comes from and what was applied.
    const v1::ConfigSource& c = resp->config();
    if (c.mode() == v1::CONFIG_MODE_DECLARATIVE) {
      out << "config: declarative " << c.file();
      if (c.applied_generation() > 0) {
        out << ", generation " << c.applied_generation() << " applied ("
            << c.applied_hash() << ", "
            << absl::FormatTime(
                   "%Y-%m-%dT%H:%M:%SZ",
                   absl::FromUnixMicros(c.applied_time_unix_micros()),
                   absl::UTCTimeZone())
            << ")";
      } else {
        out << ", nothing applied yet";
      }
      if (c.reconciling()) out << ", reconciling";
      out << "\n";
      if (!c.error().empty()) out << "config error: " << c.error() << "\n";
    }
  });
  return absl::OkStatus();
}

absl::Status RunHealth(Context& ctx) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = ctx.Channel();
  if (!channel.ok()) return channel.status();
  auto stub = ::grpc::health::v1::Health::NewStub(*channel);
  ::grpc::health::v1::HealthCheckRequest req;
  req.set_service(ctx.Flag("service").value_or(""));
  grpc::ClientContext call;
  ctx.SetDeadline(&call);
  HealthResponse resp;
  grpc::Status s = stub->Check(&call, req, &resp);
  if (!s.ok()) return ctx.RpcError(s);
  ctx.Print(resp, [&](Format, std::ostream& out) {
    // The health protocol's own names, as grpc_health_probe prints them.
    out << HealthResponse::ServingStatus_Name(resp.status()) << "\n";
  });
  if (resp.status() != HealthResponse::SERVING) {
    return absl::UnavailableError(absl::StrCat(
        "the agent is not serving (",
        HealthResponse::ServingStatus_Name(resp.status()),
        "): some listener is not up yet; see portfleetctl get listeners"));
  }
  return absl::OkStatus();
}

absl::Status RunVersion(Context& ctx) {
  VersionInfo info;
  info.set_client(kVersion);
  absl::StatusOr<v1::GetStatusResponse> resp =
      ctx.Call(&v1::FleetService::Stub::GetStatus, v1::GetStatusRequest());
  if (resp.ok()) {
    info.set_server(resp->version());
  } else {
    info.set_server_error(std::string(resp.status().message()));
  }
  ctx.Print(info, [&](Format, std::ostream& out) {
    out << "Client: " << info.client() << "\n";
    if (info.has_server()) {
      out << "Server: " << info.server() << "\n";
    } else {
      out << "Server: unreachable (" << info.server_error() << ")\n";
    }
  });
  return absl::OkStatus();
}

}  // namespace

void AddAgentCommands(std::vector<CommandSpec>* commands) {
  commands->push_back({
      .name = "status",
      .section = Section::kRead,
      .summary = "agent version, uptime, listeners, BPF steering",
      .description =
          "Shows the agent's version, uptime, listener count, whether it is\n"
          "ready (SERVING) and its health (serving, degraded, not-serving,\n"
          "starting, stopping: the same as /readyz and grpc.health.v1, with\n"
          "a line per listener that is not fully serving), and whether BPF\n"
          "steering is active (and why not). -o wide adds the start time.\n"
          "An agent with --config-mode=declarative adds its config file, the\n"
          "generation and hash it last applied, and why the file as it is\n"
          "now is not applied (config error:).\n",
      .formats = {Format::kTable, Format::kWide, Format::kJson, Format::kYaml,
                  Format::kProtoJson},
      .examples =
          {{"", "portfleetctl status"},
           {"the uptime in seconds, for a script",
            "portfleetctl status -o json | jq .uptimeSeconds"},
           {"the config error of a declarative agent, if any",
            "portfleetctl status -o json | jq -r '.config.error // empty'"}},
      .run = RunStatus,
  });
  commands->push_back({
      .name = "health",
      .section = Section::kRead,
      .summary = "grpc.health.v1 status (exit 1 unless SERVING)",
      .description =
          "Asks the agent's grpc.health.v1 service whether it is serving:\n"
          "SERVING once every listener's shards are up. Prints the status;\n"
          "exits 1 when it is not SERVING.\n",
      .flags = {{.name = "service",
                 .value = "NAME",
                 .help = "health of one service (default \"\": the agent;\n"
                         "also portfleet.v1.FleetService)"}},
      .formats = {Format::kTable, Format::kJson, Format::kYaml,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl health"},
                   {"wait until the agent serves",
                    "until portfleetctl health; do sleep 1; done"}},
      .run = RunHealth,
  });
  commands->push_back({
      .name = "version",
      .section = Section::kRead,
      .summary = "client and agent versions",
      .description =
          "Prints the client version and, if the agent answers, its version.\n"
          "Exits 0 even when the agent does not answer.\n",
      .formats = {Format::kTable, Format::kJson, Format::kYaml,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl version"}},
      .run = RunVersion,
  });
}

}  // namespace portfleet::ctl
