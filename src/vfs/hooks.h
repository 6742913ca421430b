// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace matchlock::vfs {

/// File operations as hooks and events name them (upstream's names, reference §6.4).
enum class Op : uint8_t {
  Stat,
  Readdir,
  Open,
  Create,
  Mkdir,
  Chmod,
  Remove,
  Rename,
  Symlink,
  Readlink,
  Read,
  Write,
  Close,
  Sync,
  Truncate,
  Link,
};

std::string_view opName(Op op);
/// Upstream's names and aliases ("read_dir", "removeall"...); nullopt for an unknown name.
std::optional<Op> opFromName(std::string_view name);

/// A per-mount rule: operations on paths matching `path` (a glob over the absolute guest path;
/// `*` does not cross '/') are refused with `error` (an errno, EPERM by default) when `block`,
/// or only observed (a file event) when not.
struct HookRule {
  std::string name;
  std::vector<Op> ops;  ///< empty = every operation
  std::string path;     ///< empty = every path
  bool block = true;
  int error = 1;  ///< EPERM
};

struct Hooks {
  std::vector<HookRule> rules;
  /// Emit a file event for every operation (not only those a non-blocking rule matches).
  bool emit_events = false;
  bool empty() const { return rules.empty() && !emit_events; }
};

/// One observed operation, in upstream's `file` event shape.
struct FileEvent {
  int64_t timestamp_ms = 0;
  Op op = Op::Stat;
  std::string path;   ///< absolute guest path
  uint64_t size = 0;  ///< bytes read or written
  uint32_t mode = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  int error = 0;  ///< 0, or the errno the guest got (e.g. a blocking rule's)
  std::string rule;
};

/// {"type":"file","timestamp":...,"file":{...}} on one line (no trailing newline).
std::string toJsonLine(const FileEvent& event);

/// The decision for one operation: the first blocking rule that matches wins; an observed
/// operation is reported when a non-blocking rule matches or `emit_events` is on.
struct HookDecision {
  int error = 0;        ///< errno to answer instead of doing the operation
  bool report = false;  ///< emit a file event
  const HookRule* rule = nullptr;
};
HookDecision decide(const Hooks& hooks, Op op, std::string_view guest_path);

}  // namespace matchlock::vfs
