#include "agent/fleet/handoff.h"

#include <linux/sockios.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "worker/sdk/base/log.h"
#include "worker/sdk/handoff_sockets.h"

namespace portfleet {

std::vector<HandOffTransfer> PlanHandOffs(
    const std::vector<HandOffInput>& shards) {
  std::vector<HandOffTransfer> out;
  if (shards.empty()) return out;
  uint64_t total = 0;
  for (const HandOffInput& s : shards) total += s.connections;
  const uint64_t n = shards.size();
  // Targets: the mean, rounded down; the remainder stays on the hottest.
  std::vector<size_t> by_load(n);
  for (size_t i = 0; i < n; ++i) by_load[i] = i;
  std::stable_sort(by_load.begin(), by_load.end(), [&](size_t a, size_t b) {
    return shards[a].connections > shards[b].connections;
  });
  std::vector<uint64_t> target(n, total / n);
  for (uint64_t k = 0; k < total % n; ++k) target[by_load[k]]++;
  std::vector<uint64_t> surplus(n, 0), deficit(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (!shards[i].capable) continue;
    if (shards[i].connections > target[i]) {
      surplus[i] = shards[i].connections - target[i];
    } else {
      deficit[i] = target[i] - shards[i].connections;
    }
  }
  for (;;) {
    size_t from =
        std::max_element(surplus.begin(), surplus.end()) - surplus.begin();
    size_t to =
        std::max_element(deficit.begin(), deficit.end()) - deficit.begin();
    const uint64_t count = std::min(surplus[from], deficit[to]);
    if (count == 0) break;
    out.push_back(HandOffTransfer{.from = shards[from].index,
                                  .to = shards[to].index,
                                  .count = static_cast<uint32_t>(count)});
    surplus[from] -= count;
    deficit[to] -= count;
  }
  return out;
}

std::vector<HandOffTransfer> PlanByteHandOffs(
    const std::vector<ByteHandOffInput>& shards, double min_fraction) {
  std::vector<HandOffTransfer> out;
  if (shards.empty()) return out;
  double total = 0;
  for (const ByteHandOffInput& s : shards) total += s.bytes_per_second;
  const double mean = total / static_cast<double>(shards.size());
  if (mean <= 0) return out;
  const size_t n = shards.size();
  std::vector<double> surplus(n, 0), deficit(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (!shards[i].capable) continue;
    const double d = shards[i].bytes_per_second - mean;
    if (d > 0) {
      surplus[i] = d;
    } else {
      deficit[i] = -d;
    }
  }
  // Each shard gives or takes in one direction only, so at most n - 1 moves.
  for (size_t round = 0; round + 1 < n; ++round) {
    size_t from =
        std::max_element(surplus.begin(), surplus.end()) - surplus.begin();
    size_t to =
        std::max_element(deficit.begin(), deficit.end()) - deficit.begin();
    const double amount = std::min(surplus[from], deficit[to]);
    if (amount < min_fraction * mean || amount < 1) break;
    out.push_back(
        HandOffTransfer{.from = shards[from].index,
                        .to = shards[to].index,
                        .count = kMaxConnectionsPerByteTransfer,
                        .bytes_per_second = static_cast<uint64_t>(amount)});
    surplus[from] -= amount;
    deficit[to] -= amount;
  }
  return out;
}

std::vector<HandOffTransfer> LimitHandOffs(
    std::vector<HandOffTransfer> transfers, uint32_t max_moves) {
  std::vector<HandOffTransfer> out;
  for (HandOffTransfer& t : transfers) {
    if (max_moves == 0) break;
    t.count = std::min(t.count, max_moves);
    max_moves -= t.count;
    if (t.count > 0) out.push_back(t);
  }
  return out;
}

bool HandOffRouter::Busy(const std::string& name) const {
  for (const auto& [id, p] : pending_) {
    if (p.listener == name) return true;
  }
  return false;
}

HandOffRouter::~HandOffRouter() {
  for (auto& [id, timer] : drain_timers_) ctx_->loop->CancelTimer(timer);
  for (auto& [id, batch] : batches_) {
    if (batch.timer) ctx_->loop->CancelTimer(*batch.timer);
  }
}

void HandOffRouter::Run(Listener& listener,
                        const std::vector<HandOffTransfer>& transfers,
                        absl::Duration timeout, BatchDone done) {
  const uint64_t batch_id = next_batch_++;
  Batch& batch = batches_[batch_id];
  batch.done = std::move(done);
  for (const HandOffTransfer& t : transfers) {
    const uint64_t id = next_id_++;
    Pending& p = pending_[id];
    p.listener = listener.spec.name();
    p.batch = batch_id;
    p.result.transfer = t;
    batch.ids.push_back(id);
    if (AskNext(listener, id, p)) batch.open++;
  }
  if (batch.open == 0) {
    Finish(batch_id);
    return;
  }
  batch.timer = ctx_->loop->AddTimer(timeout, [this, batch_id] {
    auto it = batches_.find(batch_id);
    if (it == batches_.end()) return;
    it->second.timer.reset();
    Finish(batch_id);
  });
}

bool HandOffRouter::AskNext(Listener& listener, uint64_t id, Pending& p) {
  const HandOffTransfer& t = p.result.transfer;
  Shard* from = listener.Find(t.from);
  if (from == nullptr || !from->worker || !from->worker->control) {
    return false;  // nobody to ask: nothing moves
  }
  const uint32_t count = std::min(kChunk, t.count - p.asked);
  v1::AgentMessage ask;
  ask.mutable_handoff_request()->set_id(id);
  ask.mutable_handoff_request()->set_count(count);
  if (t.bytes_per_second > 0) {
    // What remains of the traffic to move after the earlier chunks.
    const uint64_t moved =
        std::min(p.result.bytes_per_second, t.bytes_per_second);
    ask.mutable_handoff_request()->set_bytes_per_second(
        std::max<uint64_t>(1, t.bytes_per_second - moved));
  }
  if (absl::Status s = from->worker->control->Send(ask); !s.ok()) {
    PF_LOG(WARNING) << listener.Name(*from)
                    << ": hand-off request: " << s.message();
    return false;
  }
  p.asked += count;
  return true;
}

void HandOffRouter::AskWhenDrained(uint64_t id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;  // its batch ended
  Pending& p = it->second;
  auto l = listeners_->find(p.listener);
  Listener* listener = l == listeners_->end() ? nullptr : l->second.get();
  Shard* to = listener ? listener->Find(p.result.transfer.to) : nullptr;
  int queued = 0;
  if (to != nullptr && to->worker && to->worker->control &&
      ::ioctl(to->worker->control->fd(), SIOCOUTQ, &queued) == 0 &&
      queued > kMaxQueued) {
    drain_timers_[id] = ctx_->loop->AddTimer(absl::Milliseconds(1), [this, id] {
      drain_timers_.erase(id);
      AskWhenDrained(id);
    });
    return;
  }
  if (listener != nullptr && AskNext(*listener, id, p)) return;
  p.result.answered = true;
  auto b = batches_.find(p.batch);
  if (b != batches_.end() && --b->second.open == 0) Finish(p.batch);
}

namespace {

std::vector<int> Raw(const std::vector<Fd>& fds) {
  std::vector<int> out;
  for (const Fd& fd : fds) out.push_back(fd.get());
  return out;
}

}  // namespace

void HandOffRouter::OnWorkerMessage(Listener& listener, Shard& shard,
                                    const v1::WorkerMessage& message,
                                    std::vector<Fd> fds) {
  const uint64_t id = message.has_handoff_connection()
                          ? message.handoff_connection().id()
                          : message.handoff_done().id();
  auto it = pending_.find(id);
  const bool ours = it != pending_.end() &&
                    it->second.listener == listener.spec.name() &&
                    it->second.result.transfer.from == shard.index;
  if (message.has_handoff_connection()) {
    const v1::HandOffConnection& handoff = message.handoff_connection();
    if (absl::Status s = CheckHandOffSockets(fds, HandOffSocketCount(handoff));
        !s.ok()) {
      // Nothing that came can be trusted as the connection: close it all.
      PF_LOG(ERROR) << listener.Name(shard) << ": worker pid "
                    << (shard.worker ? shard.worker->process.pid : 0)
                    << ": hand-off " << id << ": released "
                    << (handoff.upstream_attached() ? "proxied pair"
                                                    : "connection")
                    << " refused: " << s.message() << "; closed " << fds.size()
                    << " descriptors";
      if (ours) it->second.result.invalid++;
      return;
    }
  } else if (!fds.empty()) {
    PF_LOG(WARNING) << listener.Name(shard) << ": worker pid "
                    << (shard.worker ? shard.worker->process.pid : 0)
                    << ": handoff_done " << id << " with " << fds.size()
                    << " descriptors attached; closed";
    fds.clear();
  }
  if (!ours) {
    if (!fds.empty()) {
      // Not ours to route (late, after the batch timed out): give it back
      // to the worker that sent it rather than close a live connection.
      if (shard.worker && shard.worker->control) {
        // Unchanged (released_mono_ns too: its pause goes on).
        v1::AgentMessage back;
        *back.mutable_adopt_connection() = message.handoff_connection();
        if (shard.worker->control->SendWithFds(back, Raw(fds)).ok()) return;
      }
      PF_LOG(ERROR) << listener.Name(shard) << ": hand-off " << id
                    << ": a released connection nobody can take was closed";
    }
    return;
  }
  Pending& p = it->second;
  if (message.has_handoff_connection()) {
    Forward(listener, p, message.handoff_connection(), std::move(fds));
    return;
  }
  if (p.result.answered) return;
  p.result.busy = message.handoff_done().busy();
  p.result.bytes_per_second += message.handoff_done().bytes_per_second();
  const uint32_t chunk = p.asked - p.released;
  p.released += message.handoff_done().released();
  // A full chunk: there may be more idle connections; ask for the next.
  if (message.handoff_done().released() == chunk &&
      p.asked < p.result.transfer.count) {
    AskWhenDrained(id);
    return;
  }
  p.result.answered = true;
  auto b = batches_.find(p.batch);
  if (b != batches_.end() && --b->second.open == 0) Finish(p.batch);
}

void HandOffRouter::Forward(Listener& listener, Pending& p,
                            const v1::HandOffConnection& handoff,
                            std::vector<Fd> fds) {
  if (fds.empty()) return;
  const bool pair = handoff.upstream_attached();
  // Passed on unchanged: the id, the buffered input, the sender's
  // released_mono_ns (the receiver measures the pause from it).
  v1::AgentMessage adopt;
  *adopt.mutable_adopt_connection() = handoff;
  const std::vector<int> raw = Raw(fds);
  bool refused = false;
  auto send_to = [&](uint32_t index) {
    Shard* s = listener.Find(index);
    if (s == nullptr || s->draining() || !s->worker || !s->worker->ready ||
        !s->worker->handoff || !s->worker->control) {
      return false;
    }
    if (pair && !s->worker->handoff_pairs) {
      // A worker that does not proxy (e.g. a rollout to another mode
      // under way): it would have to close the pair.
      if (!refused) {
        refused = true;
        p.result.refused++;
        listener.rebalance_refusals++;
      }
      PF_LOG(WARNING) << listener.Name(*s) << ": worker pid "
                      << s->worker->process.pid << ": hand-off " << handoff.id()
                      << ": cannot adopt a proxied pair (its hello did not "
                         "say handoff_pairs); not sent to it";
      return false;
    }
    return s->worker->control->SendWithFds(adopt, raw).ok();
  };
  if (send_to(p.result.transfer.to)) {
    p.result.moved++;
    listener.rebalance_connections_moved++;
  } else if (send_to(p.result.transfer.from)) {
    p.result.returned++;
  } else {
    p.result.lost++;
    PF_LOG(ERROR) << "listener " << listener.spec.name() << ": hand-off "
                  << handoff.id() << ": neither shard " << p.result.transfer.to
                  << " nor shard " << p.result.transfer.from
                  << " could take a released connection; it was closed";
  }
}

void HandOffRouter::Finish(uint64_t batch_id) {
  auto b = batches_.find(batch_id);
  if (b == batches_.end()) return;
  Batch batch = std::move(b->second);
  batches_.erase(b);
  if (batch.timer) ctx_->loop->CancelTimer(*batch.timer);
  std::vector<HandOffResult> results;
  for (uint64_t id : batch.ids) {
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;
    results.push_back(it->second.result);
    pending_.erase(it);
  }
  if (batch.done) batch.done(std::move(results));
}

}  // namespace portfleet
