// ApiProber: checks from inside the agent that its own API still answers.
// gRPC 1.51's listener stops accepting for good after an accept() fails with
// EMFILE (grpc/grpc#20418) and does not recover when descriptors free up; an
// agent whose API is dead must not look alive. Every `period` the prober
// calls GetStatus over a new connection to the unix socket; after
// `failures_to_report` failures in a row, Liveness() is an error that
// /healthz reports, so that the kubelet or systemd restarts the agent (its
// workers keep serving and are re-adopted: no connection is lost).
#ifndef PORTFLEET_AGENT_API_PROBER_H_
#define PORTFLEET_AGENT_API_PROBER_H_

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace portfleet {

struct ApiProberOptions {
  std::string target;  // "unix:///run/portfleet/api.sock"
  absl::Duration period = absl::Seconds(5);
  absl::Duration call_timeout = absl::Seconds(3);
  int failures_to_report = 3;
};

class ApiProber {
 public:
  explicit ApiProber(ApiProberOptions options);
  ~ApiProber();  // stops and joins
  ApiProber(const ApiProber&) = delete;
  ApiProber& operator=(const ApiProber&) = delete;

  // OK while the API answers (or has not failed often enough yet), else
  // Unavailable saying since when and why. Thread-safe.
  absl::Status Liveness() const;

 private:
  void Run();
  absl::Status ProbeOnce() const;

  const ApiProberOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  int failures_ = 0;
  absl::Time failing_since_;
  absl::Status last_error_;
  std::thread thread_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_API_PROBER_H_
