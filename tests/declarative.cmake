# Declarative mode (issue 12): the agent follows its --config file (the
# kubelet's ConfigMap symlink swap, an editor's rename) under client load,
# rejects a broken file and refuses API changes of the desired state.
portfleet_test(declarative_config_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/declarative_config_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

# Its units without a kernel: the reconciler against the API's fake
# controller on a real event loop, the config-mode guard behind a real API
# server driven by portfleetctl in-process.
portfleet_test(declarative_unit_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/declarative_unit_test.cc
  LIBS portfleet_agent portfleet_ctl_lib portfleet_api portfleet_testing
  LABELS unit)
