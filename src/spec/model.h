// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace matchlock::spec {

inline constexpr double kDefaultCpus = 1.0;
inline constexpr int64_t kDefaultMemoryMib = 512;
inline constexpr int64_t kDefaultDiskMib = 5120;
inline constexpr int kDefaultMtu = 1500;
/// An interception rule's SDK callback deadline: the default and the largest allowed.
inline constexpr int kDefaultHookTimeoutMs = 5000;
inline constexpr int kMaxHookTimeoutMs = 60000;
inline constexpr const char* kDefaultPortAddress = "127.0.0.1";

/// Overlay, ReadWrite, ReadOnly and Memory are served by the host VFS (docs/vfs.md); Volume (a
/// named volume) and Disk (a raw ext4 image) are block devices the guest init mounts.
enum class MountMode { Overlay, ReadWrite, ReadOnly, Memory, Volume, Disk };
enum class RestartPolicy { No, OnFailure, Always, UnlessStopped };

/// A host-served mount's interception rule (docs/vfs.md, Hooks): operations on paths matching a
/// glob are blocked with an errno or only observed (a file event).
struct MountRule {
  std::string name;
  std::vector<std::string> ops;  ///< upstream's operation names; empty = all
  std::string path;              ///< glob over the absolute guest path; empty = all
  bool block = true;             ///< action "block" (else "allow": observe only)
  std::string error = "EPERM";   ///< what a blocked operation returns
  bool operator==(const MountRule&) const = default;
};

struct Mount {
  std::string source;  ///< absolute host path; empty for Memory; the volume name for Volume
  std::string target;  ///< absolute guest path
  MountMode mode = MountMode::Overlay;
  bool readonly = false;         ///< Volume and Disk only
  std::vector<MountRule> rules;  ///< interception.rules (host-served mounts only)
  bool emit_events = false;      ///< interception.emit_events
  bool operator==(const Mount&) const = default;
};

/// The errno names an interception rule may return.
inline constexpr std::array<const char*, 7> kMountRuleErrors = {
    "EPERM", "EACCES", "EROFS", "ENOENT", "EIO", "ENOSPC", "EEXIST"};
/// The operation names an interception rule may name (upstream's, with its aliases).
inline constexpr std::array<const char*, 19> kMountRuleOps = {
    "stat",   "readdir",    "read_dir",  "open",     "create",  "mkdir",    "chmod",
    "remove", "remove_all", "removeall", "rename",   "symlink", "readlink", "read",
    "write",  "close",      "sync",      "truncate", "link"};

struct PortForward {
  int host = 0;
  int guest = 0;
  std::string address = kDefaultPortAddress;
  std::string protocol = "tcp";
  bool operator==(const PortForward&) const = default;
};

/// Where a secret's value comes from. The value itself is never part of a spec, except for
/// Inline secrets which only the JSON-RPC path creates; those live in memory only.
struct SecretRef {
  enum class Kind { Env, File, Command, Inline };
  std::string name;  ///< env var name the guest sees (holding a placeholder)
  Kind kind = Kind::Env;
  std::string env_var;               ///< Kind::Env
  std::string file;                  ///< Kind::File, absolute
  std::vector<std::string> command;  ///< Kind::Command
  std::string inline_value;          ///< Kind::Inline; never serialized
  std::string placeholder;           ///< optional fixed placeholder (RPC)
  std::vector<std::string> hosts;    ///< host patterns allowed to receive the value
  bool operator==(const SecretRef&) const = default;
};

struct Healthcheck {
  std::vector<std::string> test;
  int64_t interval_ms = 30000;
  int64_t timeout_ms = 30000;
  int64_t start_period_ms = 0;
  int retries = 3;
  bool operator==(const Healthcheck&) const = default;
};

/// One HTTP interception rule (docs/egress.md "Interception rules", upstream's
/// network.interception.rules): which requests it matches and what it does to them. Header names
/// as written; methods upper case; hosts lower-case patterns.
struct HttpRule {
  std::string name;
  enum class Phase { Before, After };
  Phase phase = Phase::Before;
  std::vector<std::string> hosts;    ///< host patterns; empty: every host
  std::vector<std::string> methods;  ///< empty: every method
  std::string path;                  ///< glob on the URL path ('*' stops at '/'); empty: all
  enum class Action { Allow, Block, Mutate };
  Action action = Action::Allow;
  // Before phase.
  std::vector<std::pair<std::string, std::string>> set_headers;
  std::vector<std::string> delete_headers;
  std::vector<std::pair<std::string, std::string>> set_query;
  std::vector<std::string> delete_query;
  std::string rewrite_path;
  // After phase.
  std::vector<std::pair<std::string, std::string>> set_response_headers;
  std::vector<std::string> delete_response_headers;
  std::vector<std::pair<std::string, std::string>> body_replacements;  ///< {find, replace}
  /// SDK callback (reference §4.8): the proxy asks the program listening on the network's
  /// callback_socket what to do; timeout_ms 0 means the default (docs/egress.md).
  std::string callback_id;
  int timeout_ms = 0;
  bool operator==(const HttpRule&) const = default;
};

struct NetworkSpec {
  bool no_network = false;
  std::vector<std::string> allow_hosts;  ///< lower-case patterns
  bool block_private_ips = true;
  std::vector<std::string> dns_servers = {"8.8.8.8", "8.8.4.4"};
  std::map<std::string, std::string> add_hosts;  ///< host name -> IP
  int mtu = kDefaultMtu;
  bool intercept = false;
  /// Extra CA bundle (absolute host path) trusted for upstream TLS besides the system store;
  /// verification itself cannot be turned off.
  std::string upstream_ca;
  /// network.interception.rules, applied by the egress proxy.
  std::vector<HttpRule> rules;
  /// network.interception.callback_socket: the Unix socket the rules' callbacks are sent to.
  std::string callback_socket;
  bool operator==(const NetworkSpec&) const = default;
};

/// One sandbox, fully defaulted and validated.
struct SandboxSpec {
  std::string name;
  std::string source_file;  ///< spec file it came from ("" for RPC)
  std::string image;
  double cpus = kDefaultCpus;
  int64_t memory_mib = kDefaultMemoryMib;
  int64_t disk_mib = kDefaultDiskMib;
  std::map<std::string, std::string> env;
  std::optional<std::string> workdir;
  std::optional<std::string> user;
  std::optional<std::vector<std::string>> command;
  std::optional<std::vector<std::string>> entrypoint;
  std::string hostname;
  bool privileged = false;
  std::map<std::string, std::string> labels;
  std::vector<std::string> depends_on;
  RestartPolicy restart = RestartPolicy::No;
  std::optional<Healthcheck> healthcheck;
  NetworkSpec network;
  std::vector<SecretRef> secrets;
  std::vector<Mount> mounts;
  std::vector<PortForward> ports;
  bool operator==(const SandboxSpec&) const = default;
};

/// A project: the union of the sandboxes of one or more spec files.
struct Project {
  std::string name;
  std::vector<std::string> files;
  std::map<std::string, SandboxSpec> sandboxes;
  bool operator==(const Project&) const = default;
};

std::string_view toString(MountMode m);
/// Volume and Disk: attached as block devices, not served by the VFS.
inline bool isBlockMount(MountMode m) {
  return m == MountMode::Volume || m == MountMode::Disk;
}
std::string_view toString(RestartPolicy r);
std::string_view toString(SecretRef::Kind k);

}  // namespace matchlock::spec
