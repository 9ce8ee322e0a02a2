// The command table, assembled from the command groups, and the global
// flags.
#include "ctl/command.h"

namespace portfleet::ctl {

const std::vector<CommandSpec>& Commands() {
  static const auto* commands = [] {
    auto* c = new std::vector<CommandSpec>;
    AddAgentCommands(c);
    AddGetCommands(c);
    AddEventCommands(c);
    AddApplyCommands(c);
    AddChangeCommands(c);
    AddRollOutCommands(c);
    AddRebalanceCommands(c);
    AddShellCommands(c);
    return c;
  }();
  return *commands;
}

const std::vector<FlagSpec>& GlobalFlags() {
  static const auto* flags = new std::vector<FlagSpec>{
      {.name = "server",
       .value = "ADDR",
       .help = "agent API address (default $PORTFLEET_SERVER,\n"
               "else " +
               std::string(kDefaultServer) + ")"},
      {.name = "output",
       .short_name = 'o',
       .value = "FORMAT",
       .help = "table, wide, json, yaml, name, proto-json or\n"
               "textproto; each command lists the ones it supports",
       .choices = {"table", "wide", "json", "yaml", "name", "proto-json",
                   "textproto"}},
      {.name = "no-headers", .help = "table and wide: no header line"},
      {.name = "timeout",
       .value = "DURATION",
       .help = "per-call deadline, e.g. 10s, 500ms (default 10s;\n"
               "2m for state-changing commands)"},
      {.name = "tls-cert",
       .value = "FILE",
       .help = "client certificate (PEM) for an agent's remote\n"
               "API (--server HOST:PORT, mutual TLS); default\n"
               "$PORTFLEET_TLS_CERT",
       .complete = Complete::kFile},
      {.name = "tls-key",
       .value = "FILE",
       .help = "private key (PEM) of --tls-cert; default\n"
               "$PORTFLEET_TLS_KEY",
       .complete = Complete::kFile},
      {.name = "tls-ca",
       .value = "FILE",
       .help = "CA (PEM) that signed the agent's certificate;\n"
               "default $PORTFLEET_TLS_CA, else the system's CAs.\n"
               "The --tls-* settings are ignored for unix:\n"
               "addresses",
       .complete = Complete::kFile},
      {.name = "help", .short_name = 'h', .help = "help for a command"},
  };
  return *flags;
}

}  // namespace portfleet::ctl
