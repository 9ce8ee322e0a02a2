// Fuzzes the agent's side of a worker's control channel: a worker (here a
// fake process) sends arbitrary packets; the agent must neither crash nor
// lose its shard, whatever arrives. Packets are framed in the input as
// [length high byte, length low byte, bytes...].
#include <sys/socket.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "agent/fleet/fleet.h"
#include "tests/unit/fleet_fakes.h"
#include "worker/sdk/base/log.h"

namespace {

using portfleet::testing::FakeLauncher;
using portfleet::testing::FakeSteering;

struct Rig {
  Rig() {
    portfleet::SetLogLevel(portfleet::LogLevel::kError);
    loop = *portfleet::EventLoop::Create(&clock);
    portfleet::FleetOptions options;
    options.base_env = {"PATH=/usr/bin:/bin"};
    fleet = std::make_unique<portfleet::Fleet>(loop.get(), &launcher, options);
    fleet->SetSteeringBackend(&steering, "");
    portfleet::v1::Listener spec;
    spec.set_name("fuzz");
    spec.set_address("127.0.0.1:39123");
    spec.set_shards(1);
    spec.mutable_worker()->set_command("/bin/true");
    if (!fleet->AddListener(spec).ok()) std::abort();
    loop->RunUntilIdle();
  }
  portfleet::ManualClock clock;
  std::unique_ptr<portfleet::EventLoop> loop;
  FakeLauncher launcher;
  FakeSteering steering;
  std::unique_ptr<portfleet::Fleet> fleet;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto rig = std::make_unique<Rig>();
  FakeLauncher::Process* worker = rig->launcher.All().back();
  int fd = worker->channel->fd();
  size_t i = 0;
  while (i + 2 <= size) {
    size_t len = (static_cast<size_t>(data[i]) << 8) | data[i + 1];
    i += 2;
    len = std::min(len, size - i);
    ::send(fd, data + i, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    i += len;
    rig->loop->RunUntilIdle();
  }
  rig->loop->RunUntilIdle();
  absl::StatusOr<portfleet::ListenerStatus> status =
      rig->fleet->ListenerStatusOf("fuzz");
  if (!status.ok() || status->shards.size() != 1) std::abort();
  return 0;
}
