// Fuzzes the gRPC authorization policy parser and its evaluation.
#include <cstdint>
#include <string>
#include <vector>

#include "agent/api/authz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string json(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<portfleet::AuthzPolicy> policy =
      portfleet::ParseAuthzPolicy(json, "fuzz.json");
  if (!policy.ok()) return 0;
  for (const char* path :
       {"/portfleet.v1.FleetService/ScaleListener",
        "/portfleet.v1.FleetService/ListListeners", "/x", ""}) {
    portfleet::EvaluateAuthzPolicy(
        *policy, {"spiffe://example/reader", "operator", ""}, path);
  }
  // Patterns from the input itself.
  size_t half = json.size() / 2;
  portfleet::AuthzPatternMatches(json.substr(0, half), json.substr(half));
  return 0;
}
