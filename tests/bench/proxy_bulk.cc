// portfleet-proxy-bulk: bulk throughput through a TCP proxy to an echo
// server. Holds --connections long connections over --threads threads (one
// epoll loop each); every connection writes a seeded pattern as fast as the
// path takes it (at most --window bytes sent and not yet echoed) and checks
// every echoed byte against what it sent. Bounded in time; loopback only.
//
//   portfleet-proxy-bulk --target 127.0.0.1:19001 --connections 8
//       --seconds 10 [--threads 2] [--chunk 65536] [--window 1048576]
//
// Prints one JSON object: echoed bytes, MiB/s, connections, errors (any
// socket error, early EOF or wrong byte); exit 1 when there was an error.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "worker/sdk/base/address.h"
#include "worker/sdk/base/fd.h"

namespace portfleet {
namespace {

constexpr size_t kBlock = 1 << 16;  // the pattern repeats every kBlock bytes

struct Options {
  std::string target;
  int connections = 8;
  int threads = 2;
  int seconds = 10;
  size_t chunk = 64 * 1024;
  size_t window = 1 << 20;
};

struct Conn {
  Fd fd;
  uint64_t sent = 0;
  uint64_t echoed = 0;
};

struct Totals {
  std::atomic<uint64_t> echoed{0};
  std::atomic<int> errors{0};
  std::atomic<int> connected{0};
  std::string first_error;
};

std::string MakeBlock() {
  std::string b(kBlock, '\0');
  uint32_t x = 2463534242u;
  for (char& c : b) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    c = static_cast<char>(x);
  }
  return b;
}

void Fail(Totals& t, std::string why) {
  if (t.errors.fetch_add(1) == 0) t.first_error = std::move(why);
}

void RunThread(const Options& o, const SocketAddress& to, int count,
               absl::Time end, const std::string& block, Totals& totals) {
  Fd ep(::epoll_create1(EPOLL_CLOEXEC));
  std::vector<Conn> conns(count);
  for (int i = 0; i < count; ++i) {
    Conn& c = conns[i];
    c.fd = Fd(::socket(to.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(c.fd.get(), to.get(), to.length) != 0) {
      Fail(totals, absl::StrCat("connect: ", std::strerror(errno)));
      return;
    }
    int one = 1;
    ::setsockopt(c.fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int flags = SOCK_NONBLOCK;
    ::ioctl(c.fd.get(), FIONBIO, &flags);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.u32 = static_cast<uint32_t>(i);
    ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, c.fd.get(), &ev);
    totals.connected++;
  }
  std::string buf(o.chunk, '\0');
  epoll_event events[64];
  while (absl::Now() < end && totals.errors.load() == 0) {
    int n = ::epoll_wait(ep.get(), events, 64, 100);
    for (int k = 0; k < n; ++k) {
      Conn& c = conns[events[k].data.u32];
      if (events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        for (;;) {
          ssize_t r = ::recv(c.fd.get(), buf.data(), buf.size(), MSG_DONTWAIT);
          if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
          if (r <= 0) {
            Fail(totals, r == 0 ? "EOF from the server"
                                : absl::StrCat("recv: ", std::strerror(errno)));
            return;
          }
          // Check against the pattern at the stream offset.
          size_t done = 0;
          while (done < static_cast<size_t>(r)) {
            size_t at = (c.echoed + done) % kBlock;
            size_t len = std::min<size_t>(r - done, kBlock - at);
            if (std::memcmp(buf.data() + done, block.data() + at, len) != 0) {
              Fail(totals, "an echoed byte differs");
              return;
            }
            done += len;
          }
          c.echoed += static_cast<uint64_t>(r);
          totals.echoed += static_cast<uint64_t>(r);
        }
      }
      while (c.sent - c.echoed < o.window) {
        size_t at = c.sent % kBlock;
        size_t len = std::min<size_t>(
            {o.chunk, kBlock - at,
             static_cast<size_t>(o.window - (c.sent - c.echoed))});
        ssize_t w = ::send(c.fd.get(), block.data() + at, len,
                           MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (w < 0) {
          Fail(totals, absl::StrCat("send: ", std::strerror(errno)));
          return;
        }
        c.sent += static_cast<uint64_t>(w);
      }
    }
  }
}

int Main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {  // every flag takes a value
    std::string a = argv[i];
    std::string v = i + 1 < argc ? argv[i + 1] : "";
    bool ok = true;
    if (a == "--target") {
      o.target = v;
    } else if (a == "--connections") {
      ok = absl::SimpleAtoi(v, &o.connections) && o.connections > 0 &&
           o.connections <= 1000;
    } else if (a == "--threads") {
      ok = absl::SimpleAtoi(v, &o.threads) && o.threads > 0 && o.threads <= 16;
    } else if (a == "--seconds") {
      ok = absl::SimpleAtoi(v, &o.seconds) && o.seconds > 0 && o.seconds <= 600;
    } else if (a == "--chunk") {
      ok = absl::SimpleAtoi(v, &o.chunk) && o.chunk > 0 && o.chunk <= kBlock;
    } else if (a == "--window") {
      ok = absl::SimpleAtoi(v, &o.window) && o.window >= 1024;
    } else {
      std::fprintf(stderr, "portfleet-proxy-bulk: unknown flag '%s'\n",
                   a.c_str());
      return 2;
    }
    if (!ok) {
      std::fprintf(stderr, "portfleet-proxy-bulk: bad value '%s' for %s\n",
                   v.c_str(), a.c_str());
      return 2;
    }
  }
  absl::StatusOr<SocketAddress> to = SocketAddress::Parse(o.target);
  if (!to.ok()) {
    std::fprintf(stderr, "portfleet-proxy-bulk: --target: %s\n",
                 std::string(to.status().message()).c_str());
    return 2;
  }
  if (!absl::StartsWith(o.target, "127.") &&
      !absl::StartsWith(o.target, "[::1]")) {
    std::fprintf(stderr, "portfleet-proxy-bulk: only loopback targets\n");
    return 2;
  }
  const std::string block = MakeBlock();
  Totals totals;
  absl::Time start = absl::Now();
  absl::Time end = start + absl::Seconds(o.seconds);
  std::vector<std::thread> threads;
  for (int t = 0; t < o.threads; ++t) {
    int count = o.connections / o.threads + (t < o.connections % o.threads);
    threads.emplace_back(
        [&, count] { RunThread(o, *to, count, end, block, totals); });
  }
  for (std::thread& t : threads) t.join();
  double secs = absl::ToDoubleSeconds(absl::Now() - start);
  double mib = static_cast<double>(totals.echoed.load()) / (1 << 20);
  std::printf(
      "{\"target\": \"%s\", \"seconds\": %.3f, \"connections\": %d, "
      "\"echoed_bytes\": %llu, \"mib_per_s\": %.1f, \"errors\": %d, "
      "\"first_error\": \"%s\"}\n",
      o.target.c_str(), secs, totals.connected.load(),
      static_cast<unsigned long long>(totals.echoed.load()), mib / secs,
      totals.errors.load(), totals.first_error.c_str());
  return totals.errors.load() == 0 ? 0 : 1;
}

}  // namespace
}  // namespace portfleet

int main(int argc, char** argv) { return portfleet::Main(argc, argv); }
