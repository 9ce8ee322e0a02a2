// Blocking test clients that classify every outcome from the client side.
#ifndef PORTFLEET_TESTS_TESTING_CLIENT_H_
#define PORTFLEET_TESTS_TESTING_CLIENT_H_

#include <map>
#include <string>

#include "absl/time/time.h"

namespace portfleet::testing {

// kShort: EOF before the whole answer; kWrong: a complete answer that is not
// the expected one (HTTP status other than 200, echo bytes that differ).
enum class Outcome {
  kOk,
  kRefused,
  kReset,
  kTimeout,
  kShort,
  kWrong,
  kOtherError
};
const char* OutcomeName(Outcome outcome);

struct Reply {
  Outcome outcome = Outcome::kOtherError;
  std::string error;     // errno text or what was wrong with the answer
  std::string raw;       // everything read
  std::string listener;  // from the portfleet-worker http body
  int shard = -1;
  int pid = -1;
};

struct ClientOptions {
  absl::Duration timeout = absl::Seconds(5);  // whole exchange
  int source_port = 0;                        // 0 = kernel's choice
  std::string source_address;                 // "" = kernel's choice
};

// "host:port" / "[v6]:port" -> connect, send "GET / HTTP/1.1" with
// "Connection: close", read to EOF, check a complete 200 answer, and parse
// the portfleet-worker body "portfleet listener=L shard=N pid=P".
Reply HttpGet(const std::string& address, const ClientOptions& options = {});

// Connect, send `payload`, read back exactly as many bytes, check equality.
Reply EchoOnce(const std::string& address, const std::string& payload,
               const ClientOptions& options = {});

// Tally of outcomes, keyed by pid that answered.
struct Tally {
  int ok = 0;
  int failed = 0;
  std::map<Outcome, int> by_outcome;
  std::map<int, int> by_pid;
  std::map<int, int> by_shard;
  std::string first_error;
  void Add(const Reply& reply);
};

}  // namespace portfleet::testing

#endif  // PORTFLEET_TESTS_TESTING_CLIENT_H_
