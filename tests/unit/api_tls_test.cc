// The API's TLS listener on 127.0.0.1:0 with a FakeController: mutual TLS
// (no client certificate, no connection), the authorization policy enforced
// per principal and method (reader, operator, deny rules, CN fallback,
// WatchEvents), the policy reloaded when its file changes, bad files refused
// at Start, health left open, the unix socket unaffected, and portfleetctl's
// --tls-* flags and PORTFLEET_TLS_* variables. Certificates are made at test
// time with the openssl CLI.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "agent/api/server.h"
#include "ctl/ctl.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "portfleet/v1/agent.grpc.pb.h"
#include "tests/testing/process.h"
#include "tests/unit/api_fake_controller.h"

namespace portfleet {
namespace {

using ::portfleet::testing::FakeController;
using ::portfleet::testing::ReadFileOrEmpty;
using ::portfleet::testing::TempDir;
using ::portfleet::testing::WaitFor;
using ::testing::HasSubstr;

constexpr char kReader[] = "spiffe://example/reader";
constexpr char kOperator[] = "spiffe://example/operator";

std::string ExamplePolicy() {
  return std::string(PORTFLEET_SOURCE_DIR) +
         "/deploy/examples/api-authz-policy.json";
}

// A CA, a server certificate for 127.0.0.1/localhost and client
// certificates, made with the openssl CLI in `dir`.
class Pki {
 public:
  explicit Pki(const TempDir& dir) : dir_(dir) {}

  // Runs a shell command; its output goes to openssl.log.
  bool Sh(const std::string& cmd) {
    const std::string full =
        "cd '" + dir_.path() + "' && (" + cmd + ") >>openssl.log 2>&1";
    if (std::system(full.c_str()) != 0) {
      ADD_FAILURE() << "failed: " << cmd << "\n"
                    << ReadFileOrEmpty(dir_.path() + "/openssl.log");
      return false;
    }
    return true;
  }

  bool MakeCa() {
    return Sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
        " -nodes -keyout ca.key -out ca.pem -days 2"
        " -subj /CN=portfleet-test-ca");
  }

  // name.pem and name.key signed by the CA; `san` as in openssl's
  // subjectAltName (empty: none).
  bool MakeCert(const std::string& name, const std::string& cn,
                const std::string& san, const std::string& usage) {
    std::string ext =
        "basicConstraints=CA:FALSE\nextendedKeyUsage=" + usage + "\n";
    if (!san.empty()) ext += "subjectAltName=" + san + "\n";
    dir_.WriteFile(name + ".ext", ext);
    return Sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
              " -nodes -keyout " +
              name + ".key -out " + name + ".csr -subj /CN=" + cn) &&
           Sh("openssl x509 -req -in " + name +
              ".csr -CA ca.pem -CAkey ca.key"
              " -set_serial " +
              std::to_string(++serial_) + " -days 2 -out " + name +
              ".pem -extfile " + name + ".ext");
  }

  bool MakeAll() {
    return MakeCa() &&
           MakeCert("server", "localhost", "IP:127.0.0.1,DNS:localhost",
                    "serverAuth") &&
           MakeCert("reader", "reader", std::string("URI:") + kReader,
                    "clientAuth") &&
           MakeCert("operator", "operator", std::string("URI:") + kOperator,
                    "clientAuth") &&
           MakeCert("stranger", "stranger", "", "clientAuth");
  }

  std::string Path(const std::string& file) const {
    return dir_.path() + "/" + file;
  }

 private:
  const TempDir& dir_;
  int serial_ = 1;
};

class ApiTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(std::system("which openssl >/dev/null 2>&1"), 0)
        << "the openssl CLI is needed (Debian package: openssl)";
    ASSERT_TRUE(pki_.MakeAll());
    policy_ = dir_.WriteFile("policy.json", ReadFileOrEmpty(ExamplePolicy()));
    ASSERT_FALSE(ReadFileOrEmpty(policy_).empty()) << ExamplePolicy();
  }

  ApiServerOptions Options() {
    ApiServerOptions o;
    o.address = "";
    o.tls_address = "127.0.0.1:0";
    o.tls_cert = pki_.Path("server.pem");
    o.tls_key = pki_.Path("server.key");
    o.tls_client_ca = pki_.Path("ca.pem");
    o.authz_policy_file = policy_;
    return o;
  }

  void Start() { Start(Options()); }
  void Start(const ApiServerOptions& options) {
    auto server = ApiServer::Start(options, &fake_);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->tls_port(), 0);
  }

  std::string Target() const {
    return "127.0.0.1:" + std::to_string(server_->tls_port());
  }

  // A stub presenting `client`'s certificate ("" = none).
  std::unique_ptr<v1::FleetService::Stub> Stub(const std::string& client) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadFileOrEmpty(pki_.Path("ca.pem"));
    if (!client.empty()) {
      ssl.pem_cert_chain = ReadFileOrEmpty(pki_.Path(client + ".pem"));
      ssl.pem_private_key = ReadFileOrEmpty(pki_.Path(client + ".key"));
    }
    return v1::FleetService::NewStub(
        grpc::CreateChannel(Target(), grpc::SslCredentials(ssl)));
  }

  static std::unique_ptr<grpc::ClientContext> Ctx() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::seconds(10));
    return ctx;
  }

  static grpc::Status List(v1::FleetService::Stub& stub) {
    v1::ListListenersResponse resp;
    return stub.ListListeners(Ctx().get(), {}, &resp);
  }
  static grpc::Status Scale(v1::FleetService::Stub& stub, uint32_t shards) {
    v1::ScaleListenerRequest req;
    req.set_name("web");
    req.set_shards(shards);
    v1::ScaleListenerResponse resp;
    return stub.ScaleListener(Ctx().get(), req, &resp);
  }

  static v1::Listener WebSpec() {
    v1::Listener l;
    l.set_name("web");
    l.set_address("127.0.0.1:8080");
    l.set_shards(2);
    l.mutable_worker()->set_command("portfleet-worker");
    return l;
  }
  void CreateWeb() { ASSERT_TRUE(fake_.CreateListener(WebSpec()).ok()); }

  // Replaces the policy file atomically.
  void WritePolicy(const std::string& json) {
    const std::string tmp = dir_.WriteFile("policy.json.tmp", json);
    ASSERT_EQ(std::rename(tmp.c_str(), policy_.c_str()), 0);
  }

  TempDir dir_;
  Pki pki_{dir_};
  std::string policy_;
  FakeController fake_;
  std::unique_ptr<ApiServer> server_;
};

TEST_F(ApiTlsTest, NoClientCertificateIsRefused) {
  Start();
  grpc::Status s = List(*Stub(""));
  EXPECT_EQ(s.error_code(), grpc::UNAVAILABLE) << s.error_message();
}

TEST_F(ApiTlsTest, ClientCertificateFromAnotherCaIsRefused) {
  Start();
  TempDir other;
  Pki other_pki(other);
  ASSERT_TRUE(other_pki.MakeCa());
  ASSERT_TRUE(other_pki.MakeCert("reader", "reader",
                                 std::string("URI:") + kReader, "clientAuth"));
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadFileOrEmpty(pki_.Path("ca.pem"));
  ssl.pem_cert_chain = ReadFileOrEmpty(other_pki.Path("reader.pem"));
  ssl.pem_private_key = ReadFileOrEmpty(other_pki.Path("reader.key"));
  auto stub = v1::FleetService::NewStub(
      grpc::CreateChannel(Target(), grpc::SslCredentials(ssl)));
  EXPECT_EQ(List(*stub).error_code(), grpc::UNAVAILABLE);
}

TEST_F(ApiTlsTest, ReaderReadsButCannotMutate) {
  CreateWeb();
  Start();
  auto reader = Stub("reader");
  v1::ListListenersResponse list;
  grpc::Status s = reader->ListListeners(Ctx().get(), {}, &list);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(list.listeners_size(), 1);
  v1::GetStatusResponse status;
  EXPECT_TRUE(reader->GetStatus(Ctx().get(), {}, &status).ok());

  s = Scale(*reader, 3);
  EXPECT_EQ(s.error_code(), grpc::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr(kReader));
  EXPECT_THAT(s.error_message(),
              HasSubstr("/portfleet.v1.FleetService/ScaleListener"));
  EXPECT_THAT(s.error_message(), HasSubstr("no allow rule matches"));
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 2u);
}

TEST_F(ApiTlsTest, OperatorMutates) {
  CreateWeb();
  Start();
  grpc::Status s = Scale(*Stub("operator"), 3);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 3u);
}

TEST_F(ApiTlsTest, UnlistedPrincipalIsRefusedEvenForReads) {
  Start();
  grpc::Status s = List(*Stub("stranger"));
  EXPECT_EQ(s.error_code(), grpc::PERMISSION_DENIED);
  // No SAN: the CN names the caller.
  EXPECT_THAT(s.error_message(), HasSubstr("\"stranger\""));
}

TEST_F(ApiTlsTest, CommonNameWhenNoSubjectAltName) {
  WritePolicy(R"({"name": "cn", "allow_rules": [
      {"name": "s", "source": {"principals": ["stranger"]}}]})");
  Start();
  EXPECT_TRUE(List(*Stub("stranger")).ok());
  EXPECT_EQ(List(*Stub("reader")).error_code(), grpc::PERMISSION_DENIED);
}

TEST_F(ApiTlsTest, WatchEventsIsAuthorized) {
  Start();
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(10));
    auto stream = Stub("stranger")->WatchEvents(&ctx, {});
    v1::WatchEventsResponse e;
    EXPECT_FALSE(stream->Read(&e));
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::PERMISSION_DENIED);
    EXPECT_THAT(s.error_message(),
                HasSubstr("/portfleet.v1.FleetService/WatchEvents"));
  }
  {
    grpc::ClientContext ctx;
    auto stream = Stub("reader")->WatchEvents(&ctx, {});
    v1::WatchEventsResponse e;
    std::atomic<bool> got{false};
    std::thread reader([&] { got = stream->Read(&e); });
    // The subscription starts at some point after the call: make events
    // until one arrives.
    bool exists = false;
    EXPECT_TRUE(WaitFor(
        [&] {
          if (got) return true;
          if (exists) {
            (void)fake_.DeleteListener("web");
          } else {
            (void)fake_.CreateListener(WebSpec());
          }
          exists = !exists;
          return got.load();
        },
        absl::Seconds(5)));
    ctx.TryCancel();
    reader.join();
    stream->Finish();
  }
}

TEST_F(ApiTlsTest, DenyRuleWins) {
  CreateWeb();
  WritePolicy(R"({
    "name": "deny-wins",
    "deny_rules": [{"name": "no-scaling-by-operator",
                    "source": {"principals": ["spiffe://example/operator"]},
                    "request": {"paths": ["/portfleet.v1.FleetService/Scale*"]}}],
    "allow_rules": [{"name": "everyone", "source": {"principals": ["*"]}}]
  })");
  Start();
  grpc::Status s = Scale(*Stub("operator"), 3);
  EXPECT_EQ(s.error_code(), grpc::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(),
              HasSubstr("denied by rule \"no-scaling-by-operator\""));
  EXPECT_TRUE(List(*Stub("operator")).ok());
  EXPECT_TRUE(Scale(*Stub("reader"), 3).ok());
}

TEST_F(ApiTlsTest, EditedPolicyTakesEffectAndBadEditKeepsTheLastGood) {
  CreateWeb();
  Start();
  auto reader = Stub("reader");
  ASSERT_EQ(Scale(*reader, 3).error_code(), grpc::PERMISSION_DENIED);

  WritePolicy(R"({"name": "open-to-reader", "allow_rules": [
      {"name": "r", "source": {"principals": ["spiffe://example/reader"]}}]})");
  // Seen at the first call after the 1 s recheck interval; the bound is
  // generous for a loaded machine.
  EXPECT_TRUE(
      WaitFor([&] { return Scale(*reader, 3).ok(); }, absl::Seconds(15)));

  // A broken edit is refused; the policy in force stays. Waiting longer than
  // the recheck interval guarantees the next call looks at the file.
  WritePolicy("{\"name\": \"broken\", \"allow_rules\": [");
  absl::SleepFor(absl::Milliseconds(1200));
  EXPECT_TRUE(Scale(*reader, 2).ok());
  EXPECT_EQ(List(*Stub("operator")).error_code(), grpc::PERMISSION_DENIED);
}

TEST_F(ApiTlsTest, HealthStaysOpen) {
  Start();
  server_->SetServing(true);
  std::ostringstream out, err;
  ctl::CtlEnv env;
  env.out = &out;
  env.err = &err;
  int code = ctl::Run(
      env, {"--server", Target(), "--tls-cert", pki_.Path("stranger.pem"),
            "--tls-key", pki_.Path("stranger.key"), "--tls-ca",
            pki_.Path("ca.pem"), "health"});
  EXPECT_EQ(code, ctl::kExitOk) << err.str();
  EXPECT_THAT(out.str(), HasSubstr("SERVING"));
}

TEST_F(ApiTlsTest, UnixSocketIsNotSubjectToThePolicy) {
  CreateWeb();
  ApiServerOptions options = Options();
  const std::string socket = dir_.path() + "/run/api.sock";
  options.address = "unix://" + socket;
  Start(options);
  auto stub = v1::FleetService::NewStub(grpc::CreateChannel(
      "unix://" + socket, grpc::InsecureChannelCredentials()));
  EXPECT_TRUE(Scale(*stub, 3).ok());
  EXPECT_EQ(Scale(*Stub("reader"), 4).error_code(), grpc::PERMISSION_DENIED);
}

TEST_F(ApiTlsTest, BadPolicyAtStartNamesTheFile) {
  WritePolicy("{\"name\": \"p\", \"allow_rules\": [{\"name\": 1}]}");
  auto server = ApiServer::Start(Options(), &fake_);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(server.status().message()), HasSubstr(policy_));
  EXPECT_THAT(std::string(server.status().message()),
              HasSubstr("allow_rules[0].name"));

  ApiServerOptions missing = Options();
  missing.authz_policy_file = dir_.path() + "/nope.json";
  server = ApiServer::Start(missing, &fake_);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()),
              HasSubstr(dir_.path() + "/nope.json"));

  ApiServerOptions none = Options();
  none.authz_policy_file = "";
  server = ApiServer::Start(none, &fake_);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ApiTlsTest, BadPemFilesNameTheFile) {
  ApiServerOptions options = Options();
  options.tls_key = pki_.Path("server.pem");  // a certificate, not a key
  auto server = ApiServer::Start(options, &fake_);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()),
              HasSubstr(pki_.Path("server.pem") + ": no PEM PRIVATE KEY"));

  options = Options();
  options.tls_client_ca = dir_.path() + "/missing-ca.pem";
  server = ApiServer::Start(options, &fake_);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()),
              HasSubstr(dir_.path() + "/missing-ca.pem"));

  options = Options();
  options.tls_key = pki_.Path("reader.key");  // does not match server.pem
  server = ApiServer::Start(options, &fake_);
  EXPECT_FALSE(server.ok());
}

struct CtlResult {
  int code;
  std::string out;
  std::string err;
};

CtlResult RunCtl(const std::vector<std::string>& args,
                 std::map<std::string, std::string> environment = {}) {
  std::ostringstream out, err;
  ctl::CtlEnv env;
  env.out = &out;
  env.err = &err;
  env.getenv =
      [environment](const std::string& name) -> std::optional<std::string> {
    auto it = environment.find(name);
    if (it == environment.end()) return std::nullopt;
    return it->second;
  };
  int code = ctl::Run(env, args);
  return {code, out.str(), err.str()};
}

TEST_F(ApiTlsTest, CtlWithTlsFlags) {
  CreateWeb();
  Start();
  const std::vector<std::string> reader = {
      "--server",   Target(),
      "--tls-cert", pki_.Path("reader.pem"),
      "--tls-key",  pki_.Path("reader.key"),
      "--tls-ca",   pki_.Path("ca.pem")};
  std::vector<std::string> args = reader;
  args.insert(args.end(), {"get", "listeners"});
  CtlResult r = RunCtl(args);
  EXPECT_EQ(r.code, ctl::kExitOk) << r.err;
  EXPECT_THAT(r.out, HasSubstr("web"));

  args = reader;
  args.insert(args.end(), {"scale", "web", "--shards", "3"});
  r = RunCtl(args);
  EXPECT_EQ(r.code, ctl::kExitAgentError) << r.err;
  EXPECT_THAT(r.err, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(r.err, HasSubstr(kReader));

  // The operator through the environment.
  r = RunCtl({"scale", "web", "--shards", "3"},
             {{"PORTFLEET_SERVER", Target()},
              {"PORTFLEET_TLS_CERT", pki_.Path("operator.pem")},
              {"PORTFLEET_TLS_KEY", pki_.Path("operator.key")},
              {"PORTFLEET_TLS_CA", pki_.Path("ca.pem")}});
  EXPECT_EQ(r.code, ctl::kExitOk) << r.err;
  EXPECT_EQ(fake_.GetListener("web")->shards.size(), 3u);

  // No client certificate: the handshake fails, the agent is unreachable.
  r = RunCtl({"--server", Target(), "--tls-ca", pki_.Path("ca.pem"),
              "--timeout", "2s", "get", "listeners"});
  EXPECT_EQ(r.code, ctl::kExitUnreachable) << r.err;
  EXPECT_THAT(r.err, HasSubstr("with TLS, check"));
}

TEST_F(ApiTlsTest, CtlTlsUsageErrors) {
  Start();
  CtlResult r = RunCtl({"--server", Target(), "--tls-cert",
                        pki_.Path("reader.pem"), "get", "listeners"});
  EXPECT_EQ(r.code, ctl::kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("--tls-cert and --tls-key go together"));

  r = RunCtl({"--server", Target(), "--tls-cert", pki_.Path("reader.pem"),
              "--tls-key", dir_.path() + "/none.key", "get", "listeners"});
  EXPECT_EQ(r.code, ctl::kExitUsage);
  EXPECT_THAT(r.err,
              HasSubstr("--tls-key: cannot read " + dir_.path() + "/none.key"));

  r = RunCtl({"--help"});
  EXPECT_EQ(r.code, ctl::kExitOk);
  EXPECT_THAT(r.out, HasSubstr("--tls-cert FILE"));
  EXPECT_THAT(r.out, HasSubstr("PORTFLEET_TLS_CA"));
}

}  // namespace
}  // namespace portfleet
