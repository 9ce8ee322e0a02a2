# Steering (bpf/ program + agent/steering): unit tests, real-kernel tests and
# the benchmark (a plain executable, not a test).
#
# steering_test(): portfleet_test() plus the CTest name prefix "steering/", so
# `ctest -R steering` selects exactly these cases.
function(steering_test name)
  cmake_parse_arguments(T "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_compile_options(${name} PRIVATE ${PORTFLEET_WARNINGS})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gmock
                        GTest::gtest_main)
  target_compile_definitions(${name} PRIVATE
    PORTFLEET_BINARY_DIR="${CMAKE_BINARY_DIR}"
    PORTFLEET_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
  gtest_discover_tests(${name} TEST_PREFIX "steering/"
                       PROPERTIES LABELS "${T_LABELS}" DISCOVERY_TIMEOUT 30)
endfunction()

steering_test(steering_tables_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/unit/steering_tables_test.cc
  LIBS portfleet_steering
  LABELS unit)

steering_test(steering_kernel_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/netns/steering_kernel_test.cc
  LIBS portfleet_steering portfleet_testing Threads::Threads
  LABELS netns)

add_executable(portfleet-steering-bench
  ${CMAKE_CURRENT_LIST_DIR}/bench/steering_bench.cc)
target_compile_options(portfleet-steering-bench PRIVATE ${PORTFLEET_WARNINGS})
target_link_libraries(portfleet-steering-bench PRIVATE portfleet_steering
                      portfleet_testing Threads::Threads absl::strings
                      absl::str_format absl::time)

# GCC 12 warns on designated initializers that leave members defaulted, which
# is how the tests build config structs on purpose.
foreach(t steering_tables_test steering_kernel_test portfleet-steering-bench)
  target_compile_options(${t} PRIVATE -Wno-missing-field-initializers)
endforeach()
