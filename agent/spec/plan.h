// Plans of mutating calls (ListenerPlan): what a change did or, for a dry
// run (validate_only), would do to one listener, from the desired fleet spec
// before and after it.
#ifndef PORTFLEET_AGENT_SPEC_PLAN_H_
#define PORTFLEET_AGENT_SPEC_PLAN_H_

#include <string>

#include "portfleet/v1/agent.pb.h"
#include "portfleet/v1/fleet.pb.h"

namespace portfleet {

// The plan for listener `name` between two desired specs: CREATE when it is
// only in `after`, DELETE when only in `before`, UPDATE (with the top-level
// fields that differ) or UNCHANGED when in both. A name in neither is
// UNCHANGED with no specs.
v1::ListenerPlan PlanListener(const std::string& name,
                              const v1::FleetSpec& before,
                              const v1::FleetSpec& after);

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_SPEC_PLAN_H_
