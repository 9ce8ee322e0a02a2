// FleetServiceImpl: portfleet.v1.FleetService (callback API) over a
// FleetController.
//
// Requests are validated here first (InvalidArgument naming the field:
// "listener.name: required"). Reads run on a small pool of threads of this
// service so gRPC's own threads never block; mutations are handed to the
// controller, which answers when the change is complete (a delete drains its
// shards) without holding any thread meanwhile. A mutation whose deadline
// has passed or which the client cancelled before it started is not
// started; a cancelled call is answered CANCELLED at once. WatchEvents keeps a
// bounded queue per subscriber: a reader that falls behind is finished with
// RESOURCE_EXHAUSTED instead of growing memory.
#ifndef PORTFLEET_AGENT_API_SERVICE_H_
#define PORTFLEET_AGENT_API_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "agent/controller.h"
#include "portfleet/v1/agent.grpc.pb.h"

namespace portfleet {

// The one absl -> gRPC status conversion: the codes are numerically the same
// (both follow google.rpc.Code); the message is kept.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Conversions to the API's messages.
v1::Shard ToProto(const ShardStatus& shard);
v1::ListenerState ToProto(const ListenerStatus& listener);
v1::Event ToProto(const FleetEvent& event);

// Request checks done before the controller is asked (exposed for tests).
absl::Status ValidateName(const std::string& name, const std::string& field);
absl::Status ValidateSteering(const v1::Steering& steering,
                              const std::string& field);

// Decides whether a call may run before anything else is looked at: OK lets
// it run; any other status finishes the call with it. `method` is the full
// path, "/portfleet.v1.FleetService/ScaleListener".
using CallAuthorizer = std::function<grpc::Status(
    grpc::CallbackServerContext* ctx, const std::string& method)>;

struct FleetServiceOptions {
  // Threads that run controller calls.
  int worker_threads = 4;
  // Calls waiting for a thread beyond this are refused (RESOURCE_EXHAUSTED).
  int max_queued_calls = 256;
  // Events buffered per WatchEvents subscriber before it is dropped.
  size_t max_queued_events = 256;
  // Concurrent WatchEvents streams.
  int max_watchers = 32;
  // Checked for every RPC, WatchEvents included; empty = every call may run.
  CallAuthorizer authorize;
};

class CallRunner;

class FleetServiceImpl final : public v1::FleetService::CallbackService {
 public:
  // `controller` must outlive this service.
  explicit FleetServiceImpl(FleetController* controller,
                            FleetServiceOptions options = {});
  // Waits for the controller calls in progress. Shut the server down first.
  ~FleetServiceImpl() override;

  // Ends every WatchEvents stream with UNAVAILABLE ("agent shutting down")
  // so that a server shutdown need not wait for them.
  void StopWatchers();

  FleetServiceImpl(const FleetServiceImpl&) = delete;
  FleetServiceImpl& operator=(const FleetServiceImpl&) = delete;

  grpc::ServerUnaryReactor* ListListeners(
      grpc::CallbackServerContext* ctx, const v1::ListListenersRequest* req,
      v1::ListListenersResponse* resp) override;
  grpc::ServerUnaryReactor* GetListener(grpc::CallbackServerContext* ctx,
                                        const v1::GetListenerRequest* req,
                                        v1::GetListenerResponse* resp) override;
  grpc::ServerUnaryReactor* ListShards(grpc::CallbackServerContext* ctx,
                                       const v1::ListShardsRequest* req,
                                       v1::ListShardsResponse* resp) override;
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* ctx,
                                      const v1::GetStatusRequest* req,
                                      v1::GetStatusResponse* resp) override;
  grpc::ServerWriteReactor<v1::WatchEventsResponse>* WatchEvents(
      grpc::CallbackServerContext* ctx,
      const v1::WatchEventsRequest* req) override;
  grpc::ServerUnaryReactor* CreateListener(
      grpc::CallbackServerContext* ctx, const v1::CreateListenerRequest* req,
      v1::CreateListenerResponse* resp) override;
  grpc::ServerUnaryReactor* UpdateListener(
      grpc::CallbackServerContext* ctx, const v1::UpdateListenerRequest* req,
      v1::UpdateListenerResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteListener(
      grpc::CallbackServerContext* ctx, const v1::DeleteListenerRequest* req,
      v1::DeleteListenerResponse* resp) override;
  grpc::ServerUnaryReactor* RollOutListener(
      grpc::CallbackServerContext* ctx, const v1::RollOutListenerRequest* req,
      v1::RollOutListenerResponse* resp) override;
  grpc::ServerUnaryReactor* ScaleListener(
      grpc::CallbackServerContext* ctx, const v1::ScaleListenerRequest* req,
      v1::ScaleListenerResponse* resp) override;
  grpc::ServerUnaryReactor* AdoptListener(
      grpc::CallbackServerContext* ctx, const v1::AdoptListenerRequest* req,
      v1::AdoptListenerResponse* resp) override;
  grpc::ServerUnaryReactor* DrainShard(grpc::CallbackServerContext* ctx,
                                       const v1::DrainShardRequest* req,
                                       v1::DrainShardResponse* resp) override;
  grpc::ServerUnaryReactor* GetRollOut(grpc::CallbackServerContext* ctx,
                                       const v1::GetRollOutRequest* req,
                                       v1::GetRollOutResponse* resp) override;
  grpc::ServerUnaryReactor* ListRollOuts(
      grpc::CallbackServerContext* ctx, const v1::ListRollOutsRequest* req,
      v1::ListRollOutsResponse* resp) override;
  grpc::ServerUnaryReactor* RebalanceListener(
      grpc::CallbackServerContext* ctx, const v1::RebalanceListenerRequest* req,
      v1::RebalanceListenerResponse* resp) override;
  grpc::ServerUnaryReactor* PauseRollOut(
      grpc::CallbackServerContext* ctx, const v1::PauseRollOutRequest* req,
      v1::PauseRollOutResponse* resp) override;
  grpc::ServerUnaryReactor* SetShardMaintenance(
      grpc::CallbackServerContext* ctx,
      const v1::SetShardMaintenanceRequest* req,
      v1::SetShardMaintenanceResponse* resp) override;
  grpc::ServerUnaryReactor* SetSteering(grpc::CallbackServerContext* ctx,
                                        const v1::SetSteeringRequest* req,
                                        v1::SetSteeringResponse* resp) override;

 private:
  // Authorizes the call to `method` ("ScaleListener"), validates with
  // `check` (inline), then runs `work` on the pool and finishes the call with
  // its status.
  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* ctx,
                                const char* method, absl::Status check,
                                std::function<absl::Status()> work);
  // Authorizes and checks a mutating call, then `start`s it with a
  // MutationCall that finishes the call (after `fill`, on a pool thread, when
  // it succeeded). No thread waits while the change runs.
  grpc::ServerUnaryReactor* Mutate(grpc::CallbackServerContext* ctx,
                                   const char* method, absl::Status check,
                                   std::function<void(MutationCall)> start,
                                   std::function<void()> fill,
                                   v1::ListenerPlan* plan = nullptr,
                                   v1::RollOut* started = nullptr);
  // Fills `out` with the listener's state after a successful mutation.
  void FillListener(const std::string& name, v1::ListenerState* out);
  // OK when there is no authorizer or it lets the call to `method` run.
  grpc::Status Authorize(grpc::CallbackServerContext* ctx, const char* method);

  FleetController* const controller_;
  const FleetServiceOptions options_;
  std::unique_ptr<CallRunner> runner_;
  std::atomic<int> watchers_{0};
  // Open WatchEvents streams (type-erased: see service.cc).
  std::mutex streams_mu_;
  std::vector<std::weak_ptr<void>> streams_;
};

}  // namespace portfleet

#endif  // PORTFLEET_AGENT_API_SERVICE_H_
