#include "agent/api/prober.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "worker/sdk/base/log.h"

namespace portfleet {

ApiProber::ApiProber(ApiProberOptions options)
    : options_(std::move(options)), thread_([this] { Run(); }) {}

ApiProber::~ApiProber() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

absl::Status ApiProber::Liveness() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (failures_ < options_.failures_to_report) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "the API on ", options_.target, " has not answered since ",
      absl::FormatTime("%H:%M:%S", failing_since_, absl::UTCTimeZone()),
      " UTC (", failures_, " checks): ", last_error_.message()));
}

absl::Status ApiProber::ProbeOnce() const {
  grpc::ChannelArguments args;
  // A new connection each time: a channel that reconnects in the background
  // would hide an API that accepts no new connection.
  args.SetInt("grpc.use_local_subchannel_pool", 1);
  auto channel = grpc::CreateCustomChannel(
      options_.target, grpc::InsecureChannelCredentials(), args);
  auto stub = v1::FleetService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   absl::ToChronoMilliseconds(options_.call_timeout));
  v1::GetStatusRequest req;
  v1::GetStatusResponse resp;
  grpc::Status s = stub->GetStatus(&ctx, req, &resp);
  // UNAVAILABLE with a message from the agent means it answered (e.g. it is
  // shutting down): only transport failures count.
  if (s.ok() || (s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED &&
                 s.error_code() != grpc::StatusCode::UNAVAILABLE)) {
    return absl::OkStatus();
  }
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE &&
      s.error_message().find("shutting down") != std::string::npos) {
    return absl::OkStatus();
  }
  return absl::UnavailableError(s.error_message());
}

void ApiProber::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, absl::ToChronoMilliseconds(options_.period),
                       [this] { return stop_; })) {
    lock.unlock();
    absl::Status s = ProbeOnce();
    lock.lock();
    if (s.ok()) {
      if (failures_ >= options_.failures_to_report) {
        PF_LOG(INFO) << "the API answers again";
      }
      failures_ = 0;
      continue;
    }
    if (failures_++ == 0) failing_since_ = absl::Now();
    last_error_ = s;
    if (failures_ == options_.failures_to_report) {
      PF_LOG(ERROR) << "the API on " << options_.target << " does not answer ("
                    << s.message()
                    << "); /healthz reports it so that the agent is "
                       "restarted (workers keep serving)";
    }
  }
}

}  // namespace portfleet
