# Agent core: spec parsing/validation (unit), fleet lifecycle against the
# real binaries in private network namespaces (netns).
portfleet_test(spec_test
  SOURCES unit/spec_test.cc
  LIBS portfleet_agent_lib
  LABELS unit)

portfleet_test(launcher_test
  SOURCES unit/launcher_test.cc
  LIBS portfleet_agent_lib portfleet_testing
  LABELS unit)

# The /proc and sock_diag reader (agent/procfs.h), on this process.
portfleet_test(procfs_test
  SOURCES unit/procfs_test.cc
  LIBS portfleet_agent_lib
  LABELS unit)

# The agent's record of its workers and the reconnect checks it backs
# (agent/worker_registry.h, agent/adoption.h), with real child processes
# (one as nobody: root).
portfleet_test(worker_registry_test
  SOURCES unit/worker_registry_test.cc
  LIBS portfleet_agent_lib portfleet_testing
  LABELS unit)

portfleet_test(agent_fleet_test
  SOURCES netns/agent_fleet_test.cc
  LIBS portfleet_agent_lib portfleet_testing
  LABELS netns)

portfleet_test(agent_sockets_test
  SOURCES netns/agent_sockets_test.cc
  LIBS portfleet_agent_lib portfleet_testing
  LABELS netns)

portfleet_test(agent_steering_test
  SOURCES netns/agent_steering_test.cc
  LIBS portfleet_api portfleet_testing PkgConfig::LIBBPF
  LABELS netns)

portfleet_test(agent_scale_test
  SOURCES netns/agent_scale_test.cc
  LIBS portfleet_loadgen portfleet_api portfleet_testing
  LABELS e2e)

# Fleet logic with fakes behind ProcessLauncher and SteeringBackend and a
# manual clock: no processes, BPF or privileges (unit).
portfleet_test(fleet_test
  SOURCES unit/fleet_test.cc
  LIBS portfleet_agent_lib
  LABELS unit)

# Command line and retired instances (issue 12).
portfleet_test(agent_options_test
  SOURCES unit/agent_options_test.cc
  LIBS portfleet_agent portfleet_testing
  LABELS unit)

# README promises about the agent's process life: restart backoff, SIGHUP,
# a second stop signal, a corrupt state file (real agent, netns).
portfleet_test(agent_promises_test
  SOURCES netns/agent_promises_test.cc
  LIBS portfleet_api portfleet_testing
  LABELS netns)

# What a stop request means (drain, or step aside when systemd restarts the
# agent), with a fake RestartProbe (issue 12).
portfleet_test(stop_decider_test
  SOURCES unit/stop_decider_test.cc
  LIBS portfleet_agent
  LABELS unit)
