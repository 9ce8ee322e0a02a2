# Shard health: the pure policy, the health signals (heartbeat, readiness,
# sd_notify) and the health monitor in the fleet with fakes (unit).
portfleet_test(health_test
  SOURCES unit/health_test.cc
  LIBS portfleet_agent portfleet_metrics
  LABELS unit)

portfleet_test(fleet_health_test
  SOURCES unit/fleet_health_test.cc
  LIBS portfleet_agent
  LABELS unit)

# The real agent and workers in private network namespaces, outcomes counted
# from the client side.
portfleet_test(health_netns_test
  SOURCES netns/health_netns_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

portfleet_test(health_signals_netns_test
  SOURCES netns/health_signals_netns_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e)

# The health benchmark (a plain executable, never a ctest test): time from
# SIGSTOP to ejection and to the replacement serving, client failures.
add_executable(portfleet-health-bench ${CMAKE_CURRENT_LIST_DIR}/bench/health_bench.cc)
target_compile_options(portfleet-health-bench PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-health-bench PRIVATE portfleet_loadgen
                      portfleet_api portfleet_testing absl::strings
                      absl::str_format absl::time)
