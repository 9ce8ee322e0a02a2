// Following the fleet: events (the WatchEvents stream) and top (a refreshing
// per-shard view).
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "agent/spec/spec.h"
#include "ctl/command.h"
#include "ctl/render.h"
#include "ctl/table.h"

namespace portfleet::ctl {
namespace {

std::string Pad(std::string s, size_t width) {
  if (s.size() < width) s.append(width - s.size(), ' ');
  return s + " ";
}

void PrintEventRow(const v1::Event& e, std::ostream& out) {
  std::string time = absl::FormatTime(
      "%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMicros(e.time_unix_micros()),
      absl::UTCTimeZone());
  out << Pad(time, 26)
      << Pad(ShortEnumName(v1::EventType_descriptor(), e.type()), 19)
      << Pad(e.listener().empty() ? "-" : e.listener(), 16)
      << Pad(e.shard() >= 0 ? absl::StrCat(e.shard()) : "-", 7)
      << Pad(e.pid() > 0 ? absl::StrCat(e.pid()) : "-", 8) << e.message()
      << "\n";
}

absl::Status RunEvents(Context& ctx) {
  absl::StatusOr<v1::FleetService::Stub*> stub = ctx.Fleet();
  if (!stub.ok()) return stub.status();
  std::vector<std::string> types = ctx.FlagList("type");
  v1::WatchEventsRequest req;
  req.set_listener(ctx.Flag("listener").value_or(""));
  if (std::optional<std::string> v = ctx.Flag("since")) {
    absl::Duration ago;
    absl::Time at;
    std::string error;
    if (absl::ParseDuration(*v, &ago) && ago >= absl::ZeroDuration()) {
      at = absl::Now() - ago;
    } else if (!absl::ParseTime(absl::RFC3339_full, *v, &at, &error)) {
      return UsageError(absl::StrCat(
          "--since: '", *v,
          "' is neither a duration (10m, 1h30m) nor an RFC 3339 time"));
    }
    // 0 means "none" to the agent: the epoch itself is 1 µs later.
    req.set_since_unix_micros(std::max<int64_t>(1, absl::ToUnixMicros(at)));
  }
  const bool follow = ctx.Switch("follow");
  req.set_history_only(!follow);
  grpc::ClientContext call;  // no deadline when following
  if (!follow) ctx.SetDeadline(&call);
  std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader =
      (*stub)->WatchEvents(&call, req);
  // Ctrl-C cancels the stream from this thread.
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    while (!done.load()) {
      if (ctx.Interrupted()) {
        call.TryCancel();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  bool header = !ctx.headers();
  v1::WatchEventsResponse resp;
  while (reader->Read(&resp)) {
    const v1::Event& e = resp.event();
    if (!types.empty() && std::find(types.begin(), types.end(),
                                    ShortEnumName(v1::EventType_descriptor(),
                                                  e.type())) == types.end()) {
      continue;
    }
    ctx.PrintItem(e, [&](Format, std::ostream& out) {
      if (!header) {
        out << Pad("TIME", 26) << Pad("TYPE", 19) << Pad("LISTENER", 16)
            << Pad("SHARD", 7) << Pad("PID", 8) << "MESSAGE\n";
        header = true;
      }
      PrintEventRow(e, out);
    });
  }
  grpc::Status s = reader->Finish();
  done.store(true);
  watcher.join();
  if (ctx.Interrupted() && s.error_code() == grpc::CANCELLED) {
    return absl::OkStatus();
  }
  if (!s.ok()) return ctx.RpcError(s);
  return absl::OkStatus();
}

// Raw keyboard input for `top`: restores the terminal on destruction.
class RawInput {
 public:
  RawInput(int fd, const std::atomic<bool>* interrupted)
      : fd_(fd), interrupted_(interrupted) {
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
  RawInput(const RawInput&) = delete;
  RawInput& operator=(const RawInput&) = delete;

  // Waits up to `timeout` for a key; true when 'q' was pressed, the input
  // ended or the command was interrupted.
  bool WaitQuit(absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (absl::Now() < end) {
      if (interrupted_ != nullptr && interrupted_->load()) return true;
      const int ms = static_cast<int>(std::clamp<int64_t>(
          absl::ToInt64Milliseconds(end - absl::Now()), 1, 50));
      if (fd_ < 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        continue;
      }
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, ms) > 0) {
        char c;
        ssize_t n = read(fd_, &c, 1);
        if (n == 0) return true;
        if (n == 1 && (c == 'q' || c == 'Q')) return true;
      }
    }
    return false;
  }

 private:
  int fd_;
  const std::atomic<bool>* interrupted_;
  termios saved_{};
};

// Open connections of a shard: the agent's load measurement (reports or the
// kernel's count), else the last report.
uint64_t ShardConnections(const v1::Shard& sh) {
  return sh.load().connections_source() != v1::ShardLoad::SOURCE_UNSPECIFIED
             ? sh.load().connections()
             : sh.active_connections();
}

// "64", or "114 (+50)" with the rebalancer's part; "-" without slots.
std::string SlotsText(const v1::Shard& sh) {
  if (sh.steering_slots() == 0) return "-";
  if (sh.rebalance_slot_delta() == 0) return absl::StrCat(sh.steering_slots());
  return absl::StrCat(sh.steering_slots(), " (",
                      sh.rebalance_slot_delta() > 0 ? "+" : "",
                      sh.rebalance_slot_delta(), ")");
}

absl::Status RunTop(Context& ctx) {
  absl::StatusOr<absl::Duration> interval = ctx.IntervalFlag();
  if (!interval.ok()) return interval.status();
  int iterations = 0;
  if (std::optional<std::string> v = ctx.Flag("iterations")) {
    if (!absl::SimpleAtoi(*v, &iterations) || iterations < 0) {
      return UsageError(absl::StrCat("--iterations: bad count '", *v, "'"));
    }
  }
  const std::string only = ctx.arg(0);
  RawInput input(ctx.env().input_fd, ctx.env().interrupted);
  // Previous "selected" counters, to show the steering share per interval.
  std::map<std::pair<std::string, uint32_t>, uint64_t> previous;
  for (int i = 0; iterations == 0 || i < iterations; ++i) {
    absl::StatusOr<v1::ListListenersResponse> resp = ctx.Call(
        &v1::FleetService::Stub::ListListeners, v1::ListListenersRequest());
    if (!resp.ok()) return resp.status();
    if (ctx.env().terminal) ctx.out() << "\033[H\033[2J";
    ctx.PrintItem(*resp, [&](Format, std::ostream& out) {
      out << "portfleet top — " << ctx.server() << " — every "
          << absl::FormatDuration(*interval) << " (q to quit)\n\n";
      Table t({"LISTENER", "SHARD", "STATE", "HEALTH", "PID", "CONNECTIONS",
               "CPU%", "BYTES/S", "REQ/S", "QUEUE", "ACCEPTED", "SLOTS",
               "SHARE"});
      std::vector<std::string> imbalances;
      for (const v1::ListenerState& l : resp->listeners()) {
        if (!only.empty() && l.spec().name() != only) continue;
        uint64_t total = 0;
        std::vector<uint64_t> delta;
        for (const v1::Shard& sh : l.shards()) {
          auto key = std::make_pair(l.spec().name(), sh.index());
          const uint64_t before = previous.count(key) ? previous[key] : 0;
          const uint64_t now = sh.counters().selected();
          const uint64_t d = now >= before ? now - before : now;
          delta.push_back(d);
          total += d;
          previous[key] = now;
        }
        uint64_t ready = 0, sum = 0, max = 0;
        for (int j = 0; j < l.shards_size(); ++j) {
          const v1::Shard& sh = l.shards(j);
          const uint64_t conns = ShardConnections(sh);
          if (sh.ready()) {
            ++ready;
            sum += conns;
            max = std::max(max, conns);
          }
          t.AddRow(
              {l.spec().name(), absl::StrCat(sh.index()),
               ShardStateText(sh.state()), ShardHealthText(sh.health()),
               sh.pid() > 0 ? absl::StrCat(sh.pid()) : "-", absl::StrCat(conns),
               absl::StrFormat("%.0f", sh.load().cpu() * 100),
               sh.load().reports()
                   ? absl::StrFormat("%.0f", sh.load().bytes_per_second())
                   : "-",
               sh.load().reports()
                   ? absl::StrFormat("%.0f", sh.load().requests_per_second())
                   : "-",
               absl::StrCat(sh.queue_depth()),
               absl::StrCat(sh.accepted_total()), SlotsText(sh),
               total == 0 ? "-" : absl::StrCat(delta[j] * 100 / total, "%")});
        }
        if (sum > 0) {
          const v1::ListenerRebalanceStatus& r = l.rebalance();
          imbalances.push_back(absl::StrFormat(
              "%s: imbalance %.2f (max/mean connections over %d ready "
              "shards); rebalance %s%s",
              l.spec().name(), static_cast<double>(max) * ready / sum, ready,
              DescribeRebalance(l.spec()),
              r.auto_active()
                  ? absl::StrFormat(", rebalancing now (%d steps so far)",
                                    r.auto_steps())
                  : std::string()));
        }
      }
      t.Print(out, ctx.headers());
      for (const std::string& line : imbalances) out << line << "\n";
    });
    if (iterations != 0 && i + 1 >= iterations) break;
    if (input.WaitQuit(*interval)) break;
  }
  return absl::OkStatus();
}

}  // namespace

void AddEventCommands(std::vector<CommandSpec>* commands) {
  commands->push_back({
      .name = "events",
      .section = Section::kRead,
      .summary = "recent fleet events, or follow them (-f)",
      .description =
          "Prints fleet events (shards started, exited, restarted, drains,\n"
          "steering changes, listeners created and deleted, errors). The\n"
          "agent keeps its last 1000 events: without -f, events prints them\n"
          "(those since --since, else all) and exits; with -f it prints those\n"
          "since --since (else none) and follows new ones until Ctrl-C. (-f "
          "is\n"
          "--follow here, as in kubectl logs -f; for apply and diff it is\n"
          "--filename.) With -o json each event is one line.\n",
      .flags = {{.name = "follow",
                 .short_name = 'f',
                 .help = "follow new events until Ctrl-C"},
                {.name = "since",
                 .value = "DURATION|TIME",
                 .help = "only events at most this old (10m, 2h) or since\n"
                         "an RFC 3339 time"},
                {.name = "listener",
                 .value = "NAME",
                 .help = "only events of this listener",
                 .complete = Complete::kListener},
                {.name = "type",
                 .value = "TYPE",
                 .help = "only events of these types (repeat or separate\n"
                         "with commas)",
                 .choices = ShortEnumNames(v1::EventType_descriptor()),
                 .repeated = true}},
      .formats = {Format::kTable, Format::kJson, Format::kYaml,
                  Format::kProtoJson},
      .examples =
          {{"what happened in the last 10 minutes",
            "portfleetctl events --since 10m"},
           {"follow one listener", "portfleetctl events -f --listener web"},
           {"restarts and errors only, as JSON lines",
            "portfleetctl events --type shard-restarted,error -o json"}},
      .run = RunEvents,
  });
  commands->push_back({
      .name = "top",
      .args = "[NAME]",
      .min_args = 0,
      .max_args = 1,
      .arg_complete = Complete::kListener,
      .section = Section::kRead,
      .summary = "refreshing per-shard view (q or Ctrl-C quits)",
      .description =
          "A refreshing per-shard view: connections, CPU of the worker (% of\n"
          "one core), bytes and requests per second (workers that send load\n"
          "reports), accept queue depth, indirection-table slots (with the\n"
          "rebalancer's part) and the share of new connections steered to\n"
          "each shard since the last refresh; under the table, each\n"
          "listener's imbalance (max/mean connections over ready shards).\n"
          "q or Ctrl-C quits. With -o json each refresh is one line.\n",
      .flags = {{.name = "interval",
                 .value = "DURATION",
                 .help = "refresh period (default 2s, at least 100ms)"},
                {.name = "iterations",
                 .value = "N",
                 .help = "stop after N refreshes (default 0 = never)"}},
      .formats = {Format::kTable, Format::kJson, Format::kYaml,
                  Format::kProtoJson},
      .examples = {{"", "portfleetctl top web --interval 1s"}},
      .run = RunTop,
  });
}

}  // namespace portfleet::ctl
