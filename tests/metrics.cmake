# Agent metrics endpoint: Prometheus rendering (golden text, escaping) and the
# HTTP server on an ephemeral loopback port (unit).
portfleet_test(metrics_render_test
  SOURCES unit/metrics_render_test.cc
  LIBS portfleet_metrics
  LABELS unit)

portfleet_test(metrics_server_test
  SOURCES unit/metrics_server_test.cc
  LIBS portfleet_metrics portfleet_testing
  LABELS unit)
