// SPDX-License-Identifier: Apache-2.0
// matchlock-egress-test: runs the egress proxy (and optionally the sandbox resolver) of one
// sandbox outside any VM, for the acceptance tests and bench/egress.sh.
//
// stdout: first a JSON "ready" line ({"proxy","dns","ca_file","placeholders"}), then one JSON
// reply per stdin command. Commands on stdin: "allow-add HOST...", "allow-del HOST...".
// Events: JSON lines appended to --events (upstream's `event` notification shape).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/log.h"
#include "common/strings.h"
#include "ev/loop.h"
#include "net/dns.h"
#include "net/intercept.h"
#include "net/proxy.h"

namespace {

using matchlock::Result;
using matchlock::Status;
namespace net = matchlock::net;
namespace sys = matchlock::sys;

struct Args {
  std::string listen;
  std::vector<std::string> allow;
  bool allow_private = false;
  bool no_network = false;
  std::vector<std::string> secrets;  // NAME@host,host (value from env NAME)
  std::string upstream_ca;
  std::string ca_out;
  std::string events;
  std::string dns_listen;
  std::vector<std::string> dns_upstreams;
  std::string log_level = "warn";
  std::string rules;  // JSON file: {"rules": [...], "callback_socket": "..."}
};

Result<std::vector<net::Secret>> loadSecrets(const std::vector<std::string>& specs) {
  std::vector<net::Secret> out;
  for (const std::string& spec : specs) {
    matchlock::spec::SecretRef ref;
    size_t at = spec.rfind('@');
    ref.name = spec.substr(0, at);
    ref.env_var = ref.name;
    ref.kind = matchlock::spec::SecretRef::Kind::Env;
    if (at != std::string::npos) {
      ref.hosts = matchlock::split(spec.substr(at + 1), ',');
    }
    ML_ASSIGN_OR_RETURN(net::Secret s, net::loadSecret(ref));
    out.push_back(std::move(s));
  }
  return out;
}

void writeLine(const std::string& line) {
  std::string l = line + "\n";
  size_t off = 0;
  while (off < l.size()) {
    ssize_t n = ::write(STDOUT_FILENO, l.data() + off, l.size() - off);
    if (n <= 0) {
      return;
    }
    off += static_cast<size_t>(n);
  }
}

Status run(const Args& args) {
  ML_ASSIGN_OR_RETURN(auto loop, matchlock::ev::Loop::create());
  net::PolicyConfig pc;
  pc.allow_hosts = args.allow;
  pc.block_private_ips = !args.allow_private;
  pc.no_network = args.no_network;
  ML_ASSIGN_OR_RETURN(net::Policy policy, net::Policy::compile(pc));
  auto store = std::make_shared<net::PolicyStore>(std::move(policy));
  ML_ASSIGN_OR_RETURN(auto secret_list, loadSecrets(args.secrets));
  nlohmann::json placeholders = nlohmann::json::object();
  for (const net::Secret& s : secret_list) {
    placeholders[s.name] = s.placeholder;
    // upstream appends secret hosts to the allow-list
    if (!store->snapshot()->config().allow_hosts.empty()) {
      ML_RETURN_IF_ERROR(store->addHosts(s.hosts));
    }
  }
  auto secrets = std::make_shared<const net::SecretSet>(std::move(secret_list));
  ML_ASSIGN_OR_RETURN(std::shared_ptr<net::CertAuthority> ca, net::CertAuthority::generate());
  if (!args.ca_out.empty()) {
    ML_RETURN_IF_ERROR(matchlock::writeFileAtomic(args.ca_out, ca->certPem(), 0644));
  }
  matchlock::Fd events_fd;
  if (!args.events.empty()) {
    ML_ASSIGN_OR_RETURN(events_fd,
                        matchlock::openFile(args.events, O_WRONLY | O_CREAT | O_APPEND, 0644));
  }
  int efd = events_fd.get();
  auto sink = [efd](const net::NetworkEvent& e) {
    if (efd < 0) {
      return;
    }
    std::string line = net::toJsonLine(e) + "\n";
    if (::write(efd, line.data(), line.size()) < 0) {
      // best effort, as upstream's bounded event buffer
    }
  };

  std::unique_ptr<net::DnsPins> pins;
  std::unique_ptr<net::DnsResolver> resolver;
  if (!args.dns_listen.empty()) {
    pins = std::make_unique<net::DnsPins>();
    ML_ASSIGN_OR_RETURN(sys::SockAddr dl, sys::SockAddr::parse(args.dns_listen));
    std::vector<sys::SockAddr> ups;
    for (const std::string& u : args.dns_upstreams) {
      ML_ASSIGN_OR_RETURN(sys::SockAddr ua, sys::SockAddr::parse(u));
      if (ua.port() == 0) {
        ua.setPort(53);
      }
      ups.push_back(ua);
    }
    ML_ASSIGN_OR_RETURN(resolver, net::DnsResolver::create(*loop, dl, ups, store, pins.get()));
  }

  net::ProxyOptions opts;
  ML_ASSIGN_OR_RETURN(opts.listen, sys::SockAddr::parse(args.listen));
  opts.upstream_ca_file = args.upstream_ca;
  ML_ASSIGN_OR_RETURN(auto proxy,
                      net::Proxy::create(*loop, opts, store, secrets, ca, pins.get(), sink));
  if (!args.rules.empty()) {
    ML_ASSIGN_OR_RETURN(std::string text, matchlock::readFile(args.rules));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return matchlock::makeError(matchlock::Errc::InvalidSpec, args.rules + ": not a JSON object");
    }
    ML_ASSIGN_OR_RETURN(auto rules,
                        net::httpRulesFromJson(j.value("rules", nlohmann::json::array())));
    proxy->setRules(net::HttpRules::compile(std::move(rules), j.value("callback_socket", "")));
  }

  // Commands on stdin.
  std::string cmd_buf;
  int flags = ::fcntl(STDIN_FILENO, F_GETFL);
  (void)::fcntl(STDIN_FILENO, F_SETFL, flags | O_NONBLOCK);
  matchlock::ev::Loop* lp = loop.get();
  ML_ASSIGN_OR_RETURN(
      auto stdin_watch,
      loop->watch(STDIN_FILENO, matchlock::ev::kRead, [&cmd_buf, &store, lp](uint32_t) {
        char buf[4096];
        ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
        if (n == 0) {
          lp->stop();  // stdin closed: the test (our "supervisor") is gone
          return;
        }
        if (n < 0) {
          return;
        }
        cmd_buf.append(buf, static_cast<size_t>(n));
        size_t nl = 0;
        while ((nl = cmd_buf.find('\n')) != std::string::npos) {
          std::string line = cmd_buf.substr(0, nl);
          cmd_buf.erase(0, nl + 1);
          auto words = matchlock::split(std::string(matchlock::trim(line)), ' ');
          if (words.empty() || words[0].empty()) {
            continue;
          }
          std::vector<std::string> hosts(words.begin() + 1, words.end());
          nlohmann::json reply;
          if (words[0] == "allow-add") {
            auto added = store->addHosts(hosts);
            reply = added ? nlohmann::json{{"added", *added}}
                          : nlohmann::json{{"error", added.error().toString()}};
          } else if (words[0] == "allow-del") {
            auto removed = store->deleteHosts(hosts);
            reply = removed ? nlohmann::json{{"removed", *removed}}
                            : nlohmann::json{{"error", removed.error().toString()}};
          } else {
            reply = {{"error", "unknown command"}};
          }
          writeLine(reply.dump());
        }
      }));

  nlohmann::json ready = {{"ready", true},
                          {"proxy", proxy->address().toString()},
                          {"dns", resolver ? resolver->address().toString() : ""},
                          {"ca_file", args.ca_out},
                          {"placeholders", placeholders}};
  writeLine(ready.dump());
  return loop->run();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"matchlock egress proxy test harness"};
  Args args;
  app.add_option("--listen", args.listen, "sandbox-side proxy address ip:port")->required();
  app.add_option("--allow", args.allow, "allowed host pattern (repeatable)");
  app.add_flag("--allow-private", args.allow_private, "do not block private ranges");
  app.add_flag("--no-network", args.no_network, "deny everything");
  app.add_option("--secret", args.secrets, "NAME@host,host: value from env var NAME");
  app.add_option("--upstream-ca", args.upstream_ca, "CA bundle for upstream verification");
  app.add_option("--ca-out", args.ca_out, "write the sandbox CA certificate (PEM) here");
  app.add_option("--events", args.events, "append network events (JSON lines) here");
  app.add_option("--rules", args.rules,
                 "interception rules: JSON file {\"rules\": [...], \"callback_socket\": path}");
  app.add_option("--dns-listen", args.dns_listen, "sandbox resolver address ip:port");
  app.add_option("--dns-upstream", args.dns_upstreams, "upstream resolver ip[:port]");
  app.add_option("--log-level", args.log_level, "log level");
  CLI11_PARSE(app, argc, argv);
  ::signal(SIGPIPE, SIG_IGN);
  matchlock::log::init(args.log_level);
  auto st = run(args);
  if (!st) {
    std::fprintf(stderr, "matchlock-egress-test: %s\n", st.error().toString().c_str());
    return 1;
  }
  return 0;
}
