// Real-kernel test support: private network namespaces and the privilege
// policy (skip when unprivileged, fail when PORTFLEET_REQUIRE_PRIVILEGED=1).
#ifndef PORTFLEET_TESTS_TESTING_NETNS_H_
#define PORTFLEET_TESTS_TESTING_NETNS_H_

#include <cstdlib>
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

// True when PORTFLEET_REQUIRE_PYTHON_DEPS=1: a test that needs the optional
// Python packages (python3-grpcio, python3-grpc-tools) must fail instead of
// skipping when they are missing. Separate from the privilege flag: a
// privileged CI job need not install them, and a job that installs them
// need not be privileged.
bool PythonDepsRequired();

// True when a TCP socket can bind [::1]:0 here (the host or namespace has an
// IPv6 loopback). Lets a test tell "no IPv6 on this machine" (skip) from
// "the code under test failed on IPv6" (a failure).
bool HasIpv6Loopback();

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

// Skips the test with `reason` (a string), or fails it under
// PORTFLEET_REQUIRE_PRIVILEGED=1: a missing CPU, IPv6 loopback, root or tool
// must not look like a pass in CI.
#define PF_SKIP_OR_FAIL(reason)                                   \
  do {                                                            \
    const std::string pf_reason_ = (reason);                      \
    if (::portfleet::testing::PrivilegedRequired()) {             \
      FAIL() << "PORTFLEET_REQUIRE_PRIVILEGED=1 but cannot run: " \
             << pf_reason_;                                       \
    } else {                                                      \
      GTEST_SKIP() << pf_reason_;                                 \
    }                                                             \
  } while (0)

// Skips without the optional Python packages, or fails under
// PORTFLEET_REQUIRE_PYTHON_DEPS=1.
#define PF_REQUIRE_PYTHON_GRPC()                                        \
  do {                                                                  \
    if (::system("/usr/bin/python3 -c 'import grpc, grpc_tools' "       \
                 "2>/dev/null") != 0) {                                 \
      if (::portfleet::testing::PythonDepsRequired()) {                 \
        FAIL() << "PORTFLEET_REQUIRE_PYTHON_DEPS=1 but python3-grpcio " \
                  "and python3-grpc-tools are missing";                 \
      } else {                                                          \
        GTEST_SKIP() << "needs python3-grpcio and python3-grpc-tools";  \
      }                                                                 \
    }                                                                   \
  } while (0)

#endif  // PORTFLEET_TESTS_TESTING_NETNS_H_
