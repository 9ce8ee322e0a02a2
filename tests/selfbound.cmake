# Self-bound workers (issue 16): servers that bind their own SO_REUSEPORT
# socket (tests/workers/reuseport_server.py), found and steered by the real
# agent, in private network namespaces, counted from the client side.
portfleet_test(selfbound_netns_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/selfbound_netns_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)

portfleet_test(selfbound_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/selfbound_test.cc
  LIBS portfleet_agent_lib
  LABELS unit)

# The four-thread, four-socket C server the netns test adopts.
add_executable(reuseport_threads ${CMAKE_CURRENT_LIST_DIR}/workers/reuseport_threads.c)
target_link_libraries(reuseport_threads PRIVATE Threads::Threads)
add_dependencies(selfbound_netns_test reuseport_threads)
