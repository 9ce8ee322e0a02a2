# Self-bound workers (issue 16): servers that bind their own SO_REUSEPORT
# socket (tests/workers/reuseport_server.py), found and steered by the real
# agent, in private network namespaces, counted from the client side.
portfleet_test(selfbound_netns_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/selfbound_netns_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)
