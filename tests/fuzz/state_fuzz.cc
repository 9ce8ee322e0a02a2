// Fuzzes the state file loader (end marker, text format, validation): a
// damaged file is an error, never a crash and never a partial spec.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "agent/api/state_store.h"
#include "agent/spec/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<portfleet::v1::FleetSpec> spec =
      portfleet::ParseFleetState(text, "fleet-state.textproto");
  // Whatever is loaded is a valid spec.
  if (spec.ok() && !portfleet::ValidateFleetSpec(*spec, "loaded").ok()) {
    std::abort();
  }
  return 0;
}
