#include "agent/restart_probe.h"

#include <systemd/sd-bus.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/status.h"

namespace portfleet {
namespace {

constexpr char kSystemd[] = "org.freedesktop.systemd1";
constexpr char kUnitInterface[] = "org.freedesktop.systemd1.Unit";

struct BusCloser {
  void operator()(sd_bus* bus) const { sd_bus_flush_close_unref(bus); }
};
using Bus = std::unique_ptr<sd_bus, BusCloser>;

struct MessageUnref {
  void operator()(sd_bus_message* m) const { sd_bus_message_unref(m); }
};
using Message = std::unique_ptr<sd_bus_message, MessageUnref>;

// An sd_bus_error that frees itself.
class BusError {
 public:
  BusError() = default;
  ~BusError() { sd_bus_error_free(&error_); }
  BusError(const BusError&) = delete;
  BusError& operator=(const BusError&) = delete;
  sd_bus_error* get() { return &error_; }

  // `what` failed with sd-bus's negative errno `r`: the bus error's name and
  // message when the peer sent one.
  absl::Status ToStatus(int r, absl::string_view what) {
    if (sd_bus_error_is_set(&error_)) {
      return absl::UnavailableError(absl::StrCat(
          what, ": ", error_.name,
          error_.message ? absl::StrCat(": ", error_.message) : ""));
    }
    return ErrnoError(-r, what);
  }

 private:
  sd_bus_error error_ = SD_BUS_ERROR_NULL;
};

// A string property; `what` names it in an error.
absl::StatusOr<std::string> GetString(sd_bus* bus, const char* path,
                                      const char* interface,
                                      const char* property) {
  BusError error;
  char* value = nullptr;
  int r = sd_bus_get_property_string(bus, kSystemd, path, interface, property,
                                     error.get(), &value);
  if (r < 0) {
    return error.ToStatus(r, absl::StrCat("reading ", property, " of ", path));
  }
  std::string out(value);
  std::free(value);
  return out;
}

// root talks to systemd directly on its private socket, as systemctl does
// (works without a D-Bus daemon); anyone else, or when that fails, goes
// through the system bus.
absl::StatusOr<Bus> Connect(absl::Duration timeout) {
  uint64_t usec = static_cast<uint64_t>(absl::ToInt64Microseconds(timeout));
  int r = 0;
  if (::geteuid() == 0) {
    sd_bus* raw = nullptr;
    r = sd_bus_new(&raw);
    if (r < 0) return ErrnoError(-r, "sd_bus_new");
    Bus bus(raw);
    r = sd_bus_set_address(bus.get(), "unix:path=/run/systemd/private");
    if (r >= 0) r = sd_bus_set_method_call_timeout(bus.get(), usec);
    if (r >= 0) r = sd_bus_start(bus.get());
    if (r >= 0) return bus;
  }
  sd_bus* raw = nullptr;
  r = sd_bus_open_system(&raw);
  if (r < 0) return ErrnoError(-r, "connecting to the system bus");
  Bus bus(raw);
  r = sd_bus_set_method_call_timeout(bus.get(), usec);
  if (r < 0) return ErrnoError(-r, "sd_bus_set_method_call_timeout");
  return bus;
}

// Each call gets what is left until `deadline`, so that the whole probe
// answers in about its timeout even when every call would time out.
absl::Status SetCallTimeout(sd_bus* bus, absl::Time deadline) {
  absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) {
    return absl::DeadlineExceededError("no answer from systemd in time");
  }
  int r = sd_bus_set_method_call_timeout(
      bus, static_cast<uint64_t>(absl::ToInt64Microseconds(left)));
  if (r < 0) return ErrnoError(-r, "sd_bus_set_method_call_timeout");
  return absl::OkStatus();
}

class SystemdRestartProbe : public RestartProbe {
 public:
  absl::StatusOr<RestartVerdict> Probe(absl::Duration timeout) override {
    RestartVerdict verdict;
    // systemd sets $INVOCATION_ID for every service it runs.
    if (std::getenv("INVOCATION_ID") == nullptr) return verdict;
    absl::Time deadline = absl::Now() + timeout;
    ASSIGN_OR_RETURN(Bus bus, Connect(timeout));

    // Our unit, by our pid (also right in a container's cgroup namespace).
    BusError error;
    sd_bus_message* raw = nullptr;
    RETURN_IF_ERROR(SetCallTimeout(bus.get(), deadline));
    int r = sd_bus_call_method(bus.get(), kSystemd, "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager",
                               "GetUnitByPID", error.get(), &raw, "u",
                               static_cast<uint32_t>(::getpid()));
    if (r < 0) return error.ToStatus(r, "GetUnitByPID");
    Message reply(raw);
    const char* unit_path = nullptr;
    r = sd_bus_message_read(reply.get(), "o", &unit_path);
    if (r < 0) return ErrnoError(-r, "reading the reply of GetUnitByPID");
    std::string path(unit_path);
    RETURN_IF_ERROR(SetCallTimeout(bus.get(), deadline));
    ASSIGN_OR_RETURN(verdict.unit,
                     GetString(bus.get(), path.c_str(), kUnitInterface, "Id"));

    // Only the service whose main process we are (not, say, a unit whose
    // shell started an agent by hand).
    uint32_t main_pid = 0;
    BusError pid_error;
    RETURN_IF_ERROR(SetCallTimeout(bus.get(), deadline));
    r = sd_bus_get_property_trivial(bus.get(), kSystemd, path.c_str(),
                                    "org.freedesktop.systemd1.Service",
                                    "MainPID", pid_error.get(), 'u', &main_pid);
    if (r < 0) {
      return pid_error.ToStatus(
          r, absl::StrCat("reading MainPID of ", verdict.unit));
    }
    if (main_pid != static_cast<uint32_t>(::getpid())) {
      verdict.unit.clear();
      return verdict;
    }

    // The unit's job: (id, path), id 0 for none.
    BusError job_error;
    raw = nullptr;
    RETURN_IF_ERROR(SetCallTimeout(bus.get(), deadline));
    r = sd_bus_get_property(bus.get(), kSystemd, path.c_str(), kUnitInterface,
                            "Job", job_error.get(), &raw, "(uo)");
    if (r < 0) {
      return job_error.ToStatus(
          r, absl::StrCat("reading the job of ", verdict.unit));
    }
    Message job(raw);
    uint32_t job_id = 0;
    const char* job_path = nullptr;
    r = sd_bus_message_read(job.get(), "(uo)", &job_id, &job_path);
    if (r < 0) return ErrnoError(-r, "reading the job property");
    if (job_id == 0) return verdict;
    RETURN_IF_ERROR(SetCallTimeout(bus.get(), deadline));
    ASSIGN_OR_RETURN(verdict.job_type,
                     GetString(bus.get(), job_path,
                               "org.freedesktop.systemd1.Job", "JobType"));
    verdict.restarting = IsRestartJob(verdict.job_type);
    return verdict;
  }
};

}  // namespace

bool IsRestartJob(absl::string_view job_type) {
  // systemd turns try-restart into restart for an active unit, and
  // reload-or-restart too for a unit that cannot reload; both names are
  // accepted should a version report them as they were asked for.
  return job_type == "restart" || job_type == "try-restart" ||
         job_type == "reload-or-restart";
}

std::unique_ptr<RestartProbe> MakeSystemdRestartProbe() {
  return std::make_unique<SystemdRestartProbe>();
}

}  // namespace portfleet
