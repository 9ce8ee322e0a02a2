# Worker SDK and reference worker: protocol pieces in-process (unit), the real
# portfleet-worker binary on a real socket in a private netns (netns).
# Sources are named from this file's directory so that the fragment works
# wherever it is included from.
portfleet_test(worker_http_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/worker_http_test.cc
  LIBS portfleet_worker_lib
  LABELS unit)

portfleet_test(worker_sdk_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/worker_sdk_test.cc
  LIBS portfleet_worker_sdk portfleet_testing
  LABELS unit)

portfleet_test(worker_netns_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/worker_netns_test.cc
  LIBS portfleet_worker_sdk portfleet_testing
  LABELS netns)
# The netns cases run the binary.
add_dependencies(worker_netns_test portfleet-worker)

# Hand-off pauses: the log-linear histogram and its message form (unit).
portfleet_test(duration_histogram_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/duration_histogram_test.cc
  LIBS portfleet_worker_sdk
  LABELS unit)
