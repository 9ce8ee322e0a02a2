# Control API and portfleetctl: state store, FleetService against a fake
# controller through a real gRPC server, CLI in-process (unit); the real agent
# through its API (netns).
portfleet_test(api_state_store_test
  SOURCES unit/api_state_store_test.cc
  LIBS portfleet_api portfleet_testing
  LABELS unit)

portfleet_test(api_service_test
  SOURCES unit/api_service_test.cc
  LIBS portfleet_api portfleet_testing
  LABELS unit)

portfleet_test(ctl_cli_test
  SOURCES unit/ctl_cli_test.cc
  LIBS portfleet_ctl_lib portfleet_api portfleet_testing
  LABELS unit)

# The real agent through its API.
portfleet_test(api_agent_test
  SOURCES netns/api_agent_test.cc
  LIBS portfleet_api portfleet_testing
  LABELS netns)

# The TLS listener: authorization policy parsing, matching and reloading
# (api_tls_authz_test); mutual TLS and the policy enforced on a real server
# with certificates made by the openssl CLI at test time, and portfleetctl's
# --tls-* flags (api_tls_test).
portfleet_test(api_tls_authz_test
  SOURCES unit/api_tls_authz_test.cc
  LIBS portfleet_api portfleet_testing
  LABELS unit)

portfleet_test(api_tls_test
  SOURCES unit/api_tls_test.cc
  LIBS portfleet_ctl_lib portfleet_api portfleet_testing
  LABELS unit)

# portfleetctl beyond the commands: the reflection walk behind -o json|yaml
# (a YAML parser reads the YAML back), golden output per format
# (tests/unit/testdata/ctl), completion scripts run by bash and zsh against
# the built binary, the man page rendered by groff.
portfleet_test(ctl_render_test
  SOURCES unit/ctl_render_test.cc
  LIBS portfleet_ctl_lib portfleet_testing
  LABELS unit)

portfleet_test(ctl_golden_test
  SOURCES unit/ctl_golden_test.cc
  LIBS portfleet_ctl_lib portfleet_api portfleet_testing
  LABELS unit)

portfleet_test(ctl_shell_test
  SOURCES unit/ctl_shell_test.cc
  LIBS portfleet_ctl_lib portfleet_api portfleet_testing
  LABELS unit)
add_dependencies(ctl_shell_test portfleetctl portfleetctl_man)

# The operator loop (get spec, diff, apply --dry-run/--prune, events
# --since) through portfleetctl against the real agent, under load.
portfleet_test(api_operator_test
  SOURCES netns/api_operator_test.cc
  LIBS portfleet_ctl_lib portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e)
