#include "agent/spec/plan.h"

#include "google/protobuf/descriptor.h"
#include "google/protobuf/util/message_differencer.h"

namespace portfleet {
namespace {

const v1::Listener* FindListener(const v1::FleetSpec& spec,
                                 const std::string& name) {
  for (const v1::Listener& l : spec.listeners()) {
    if (l.name() == name) return &l;
  }
  return nullptr;
}

// Whether field `f` of two listeners differs (absent = default).
bool FieldDiffers(const v1::Listener& a, const v1::Listener& b,
                  const google::protobuf::FieldDescriptor* f) {
  google::protobuf::util::MessageDifferencer differ;
  differ.set_message_field_comparison(
      google::protobuf::util::MessageDifferencer::EQUIVALENT);
  std::vector<const google::protobuf::FieldDescriptor*> fields = {f};
  return !differ.CompareWithFields(a, b, fields, fields);
}

}  // namespace

v1::ListenerPlan PlanListener(const std::string& name,
                              const v1::FleetSpec& before,
                              const v1::FleetSpec& after) {
  v1::ListenerPlan plan;
  plan.set_name(name);
  const v1::Listener* from = FindListener(before, name);
  const v1::Listener* to = FindListener(after, name);
  if (from != nullptr) *plan.mutable_current() = *from;
  if (to != nullptr) *plan.mutable_desired() = *to;
  if (from == nullptr && to == nullptr) {
    plan.set_action(v1::ListenerPlan::ACTION_UNCHANGED);
  } else if (from == nullptr) {
    plan.set_action(v1::ListenerPlan::ACTION_CREATE);
  } else if (to == nullptr) {
    plan.set_action(v1::ListenerPlan::ACTION_DELETE);
  } else {
    const google::protobuf::Descriptor* d = v1::Listener::descriptor();
    for (int i = 0; i < d->field_count(); ++i) {
      if (FieldDiffers(*from, *to, d->field(i))) {
        plan.add_changed_fields(d->field(i)->name());
      }
    }
    plan.set_action(plan.changed_fields().empty()
                        ? v1::ListenerPlan::ACTION_UNCHANGED
                        : v1::ListenerPlan::ACTION_UPDATE);
  }
  return plan;
}

}  // namespace portfleet
