# Third-party pre-fork workers (issue 15): a plain pre-fork test worker
# (tests/workers/prefork_worker.py) and gunicorn from Debian, driven through
# the real agent in private network namespaces.
portfleet_test(prefork_netns_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/prefork_netns_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e)
