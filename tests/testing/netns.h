// Real-kernel test support: private network namespaces and the privilege
// policy (skip when unprivileged, fail when PORTFLEET_REQUIRE_PRIVILEGED=1).
#ifndef PORTFLEET_TESTS_TESTING_NETNS_H_
#define PORTFLEET_TESTS_TESTING_NETNS_H_

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace portfleet::testing {

// True when PORTFLEET_REQUIRE_PRIVILEGED=1: a privileged test that cannot run
// must fail instead of skipping.
bool PrivilegedRequired();

// Moves the calling process (which must be single-threaded) into a new
// network namespace and brings up "lo". Children inherit the namespace.
absl::Status EnterPrivateNetns();
// True once EnterPrivateNetns has succeeded in this process.
bool InPrivateNetns();

}  // namespace portfleet::testing

// Enter a fresh network namespace, or skip (fail under
// PORTFLEET_REQUIRE_PRIVILEGED=1) with the reason.
#define PF_ENTER_NETNS_OR_SKIP()                                            \
  do {                                                                      \
    absl::Status pf_netns_ = ::portfleet::testing::EnterPrivateNetns();     \
    if (!pf_netns_.ok()) {                                                  \
      if (::portfleet::testing::PrivilegedRequired()) {                     \
        FAIL() << "PORTFLEET_REQUIRE_PRIVILEGED=1 but " << pf_netns_;       \
      } else {                                                              \
        GTEST_SKIP() << "needs a private network namespace: " << pf_netns_; \
      }                                                                     \
    }                                                                       \
  } while (0)

#endif  // PORTFLEET_TESTS_TESTING_NETNS_H_
