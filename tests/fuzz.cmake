# libFuzzer targets (issue 9): the spec parser, the state file loader, the
# authorization policy parser, the agent's side of a worker control channel
# and the takeover receiver. Built only with clang and -DPORTFLEET_FUZZ=ON
# (deploy/fuzz.sh), never by the normal build; each has a seed corpus in
# tests/fuzz/corpus/<name>/.
if(PORTFLEET_FUZZ)
  function(portfleet_fuzzer name)
    cmake_parse_arguments(F "" "" "SOURCES;LIBS" ${ARGN})
    add_executable(${name} ${F_SOURCES})
    target_compile_options(${name} PRIVATE ${PORTFLEET_WARNINGS}
                           -fsanitize=fuzzer)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer)
    target_link_libraries(${name} PRIVATE ${F_LIBS})
    list(APPEND PORTFLEET_FUZZERS ${name})
    set(PORTFLEET_FUZZERS ${PORTFLEET_FUZZERS} PARENT_SCOPE)
  endfunction()
  set(PORTFLEET_FUZZERS)
  portfleet_fuzzer(spec_fuzz SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz/spec_fuzz.cc
                   LIBS portfleet_spec)
  portfleet_fuzzer(state_fuzz
                   SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz/state_fuzz.cc
                   LIBS portfleet_api)
  portfleet_fuzzer(authz_fuzz
                   SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz/authz_fuzz.cc
                   LIBS portfleet_api)
  portfleet_fuzzer(control_fuzz
                   SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz/control_fuzz.cc
                   LIBS portfleet_agent_lib)
  portfleet_fuzzer(takeover_fuzz
                   SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz/takeover_fuzz.cc
                   LIBS portfleet_agent)
  add_custom_target(fuzzers DEPENDS ${PORTFLEET_FUZZERS})
endif()
