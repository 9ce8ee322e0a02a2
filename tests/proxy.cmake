# Proxy mode of portfleet-worker (issue 11, part 3): flags (unit), the real
# binary between a client and an upstream in a private netns (netns), and
# proxy shards under the agent through scale and drain under load (e2e).
portfleet_test(proxy_flags_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/proxy_flags_test.cc
  LIBS portfleet_worker_lib
  LABELS unit)

# Hand-off of proxied pairs: the idle rule and the checks of the sockets
# that travel (unit).
portfleet_test(proxy_handoff_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/proxy_handoff_test.cc
  LIBS portfleet_worker_lib
  LABELS unit)
target_compile_options(proxy_handoff_test PRIVATE
                       -Wno-missing-field-initializers)

portfleet_test(proxy_netns_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/proxy_netns_test.cc
  LIBS portfleet_worker_sdk portfleet_testing
  LABELS netns)
add_dependencies(proxy_netns_test portfleet-worker)

portfleet_test(proxy_agent_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/proxy_agent_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)
add_dependencies(proxy_agent_test portfleet-worker portfleet-agent)

# Hand-off of idle proxied pairs under the real agent: a proxy scale-up
# evened by a one-shot rebalance without new upstream connections, and
# pairs with data in flight left in place (e2e).
portfleet_test(proxy_handoff_netns_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/proxy_handoff_test.cc
  LIBS portfleet_ctl_lib portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e
  LOCK load)
add_dependencies(proxy_handoff_netns_test portfleet-worker portfleet-agent)

# The proxy benchmark's bulk client (a plain executable, never a ctest test);
# tests/bench/proxy_bench.py runs it with portfleet-loadgen against the proxy
# mode and HAProxy.
add_executable(portfleet-proxy-bulk ${CMAKE_CURRENT_LIST_DIR}/bench/proxy_bulk.cc)
target_compile_options(portfleet-proxy-bulk PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-proxy-bulk PRIVATE portfleet_base absl::strings
                      absl::time Threads::Threads)
