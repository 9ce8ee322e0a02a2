// Fuzzes the fleet spec parser (textproto and JSON) and its validation: no
// input may crash it, and a spec it accepts must survive a round trip.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "agent/spec/spec.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  for (auto format :
       {portfleet::SpecFormat::kTextproto, portfleet::SpecFormat::kJson}) {
    absl::StatusOr<portfleet::v1::FleetSpec> spec =
        portfleet::ParseFleetSpec(text, format, "fuzz");
    if (!spec.ok()) continue;
    std::string again;
    google::protobuf::TextFormat::PrintToString(*spec, &again);
    absl::StatusOr<portfleet::v1::FleetSpec> reparsed =
        portfleet::ParseFleetSpec(again, portfleet::SpecFormat::kTextproto,
                                  "round trip");
    if (!reparsed.ok() ||
        !google::protobuf::util::MessageDifferencer::Equals(*spec, *reparsed)) {
      std::abort();  // an accepted spec must print and parse back the same
    }
  }
  return 0;
}
