# Lifecycle under load (issue 5, parts 1-2): the load generator, its unit
# tests, the scale/drain tests against the real agent in private network
# namespaces, and the lifecycle benchmark (a plain executable).

# The load generator: a library (tests can run it in-process) and the binary.
add_library(portfleet_loadgen STATIC ${CMAKE_CURRENT_LIST_DIR}/loadgen/loadgen.cc)
target_compile_options(portfleet_loadgen PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet_loadgen PUBLIC portfleet_base Threads::Threads
                      absl::status absl::statusor absl::strings
                      absl::str_format absl::time)

add_executable(portfleet-loadgen ${CMAKE_CURRENT_LIST_DIR}/loadgen/main.cc)
target_compile_options(portfleet-loadgen PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-loadgen PRIVATE portfleet_loadgen)

portfleet_test(loadgen_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/loadgen/loadgen_test.cc
  LIBS portfleet_loadgen
  LABELS unit)

# Negative controls: the load generator and the blocking test clients against
# misbehaving servers on 127.0.0.1 (refuse, reset, stall, short, wrong).
portfleet_test(loadgen_control_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/loadgen/loadgen_control_test.cc
  LIBS portfleet_loadgen portfleet_testing
  LABELS unit)

portfleet_test(lifecycle_scale_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/lifecycle_scale_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

portfleet_test(lifecycle_drain_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/lifecycle_drain_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

add_executable(portfleet-lifecycle-bench
  ${CMAKE_CURRENT_LIST_DIR}/bench/lifecycle_bench.cc)
target_compile_options(portfleet-lifecycle-bench PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-lifecycle-bench PRIVATE portfleet_loadgen
                      portfleet_api portfleet_testing absl::strings
                      absl::str_format absl::time)

portfleet_test(lifecycle_rollout_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/lifecycle_rollout_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

portfleet_test(lifecycle_restart_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/lifecycle_restart_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

portfleet_test(lifecycle_takeover_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/lifecycle_takeover_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

# The DaemonSet's surge upgrade with restartPolicy Always (issue 12).
portfleet_test(lifecycle_surge_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/lifecycle_surge_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

# The fleet benchmark (a plain executable, never a ctest test): the agent vs
# nginx under load. tests/bench/run_fleet_bench.sh installs nginx and runs it.
add_executable(portfleet-fleet-bench ${CMAKE_CURRENT_LIST_DIR}/bench/fleet_bench.cc)
target_compile_options(portfleet-fleet-bench PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-fleet-bench PRIVATE portfleet_loadgen
                      portfleet_api portfleet_testing absl::strings
                      absl::str_format absl::time)

# Fault containment at start-up and across restarts (issue 9).
portfleet_test(agent_resilience_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/agent_resilience_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e)

# Hostile users and awkward moments (issue 9).
portfleet_test(agent_hostile_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/agent_hostile_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e)

# The randomized fault soak (issue 9), bounded by PORTFLEET_SOAK_SECONDS
# (default 60) and replayable with PORTFLEET_SOAK_SEED.
portfleet_test(fault_soak_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/fault_soak_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

# Agent overhead (idle CPU/RSS by shard count, ListShards latency, steering
# program ns per SYN): a plain executable, never a ctest test.
add_executable(portfleet-agent-bench ${CMAKE_CURRENT_LIST_DIR}/bench/agent_bench.cc)
target_compile_options(portfleet-agent-bench PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-agent-bench PRIVATE portfleet_loadgen
                      portfleet_api portfleet_testing absl::strings
                      absl::str_format absl::time)
