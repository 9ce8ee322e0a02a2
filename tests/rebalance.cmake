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
  LABELS e2e
  LOCK load)

# GCC 12 warns on designated initializers that leave members defaulted.
target_compile_options(rebalance_test PRIVATE -Wno-missing-field-initializers)
