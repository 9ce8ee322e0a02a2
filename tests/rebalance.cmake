# Rebalancing (issue 11): the planner and the fleet's one-shot rebalance over
# fakes (unit), and the real agent under client load in a private network
# namespace (netns).
portfleet_test(rebalance_test
  SOURCES unit/rebalance_test.cc
  LIBS portfleet_agent_lib
  LABELS unit)

portfleet_test(rebalance_netns_test
  SOURCES netns/rebalance_netns_test.cc
  LIBS portfleet_ctl_lib portfleet_loadgen portfleet_api portfleet_testing
       portfleet_worker_sdk
  LABELS e2e
  LOCK load)

# GCC 12 warns on designated initializers that leave members defaulted.
target_compile_options(rebalance_test PRIVATE -Wno-missing-field-initializers)

# The hand-off benchmark (a plain executable, not a test; see
# tests/bench/README.md).
add_executable(portfleet-rebalance-bench
  ${CMAKE_CURRENT_LIST_DIR}/bench/rebalance_bench.cc)
target_compile_options(portfleet-rebalance-bench PRIVATE ${PORTFLEET_WARNINGS}
                       -Wno-missing-field-initializers)
target_link_libraries(portfleet-rebalance-bench PRIVATE portfleet_loadgen
                      portfleet_api portfleet_agent_lib portfleet_testing absl::strings
                      absl::str_format absl::time)
target_compile_definitions(portfleet-rebalance-bench PRIVATE
  PORTFLEET_BINARY_DIR="${CMAKE_BINARY_DIR}")

# The auto-rebalancer's decision over a manual clock (unit).
portfleet_test(auto_rebalance_test
  SOURCES unit/auto_rebalance_test.cc
  LIBS portfleet_agent_lib
  LABELS unit)
target_compile_options(auto_rebalance_test PRIVATE
                       -Wno-missing-field-initializers)
