#include "worker/sdk/handoff_choice.h"

#include <algorithm>

namespace portfleet {

HandOffChoice ChooseForHandOff(std::vector<HandOffCandidate> candidates,
                               uint32_t count, uint64_t bytes_per_second) {
  HandOffChoice out;
  if (bytes_per_second == 0) {
    for (const HandOffCandidate& c : candidates) {
      if (out.keys.size() >= count) break;
      out.keys.push_back(c.key);
      out.bytes_per_second += c.bytes_per_second;
    }
    return out;
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const HandOffCandidate& a, const HandOffCandidate& b) {
                     return a.bytes_per_second > b.bytes_per_second;
                   });
  const double budget = static_cast<double>(bytes_per_second);
  double remaining = budget;
  for (const HandOffCandidate& c : candidates) {
    if (out.keys.size() >= count || remaining <= 0) break;
    // Sorted: the rest are as small. A connection with under a twentieth
    // of the budget is not worth its hand-off (nor is one without traffic).
    if (c.bytes_per_second <= 0 ||
        c.bytes_per_second < kMinShareOfBudget * budget) {
      break;
    }
    if (c.bytes_per_second > 2 * remaining) continue;
    out.keys.push_back(c.key);
    out.bytes_per_second += c.bytes_per_second;
    remaining -= c.bytes_per_second;
  }
  return out;
}

}  // namespace portfleet
