// SPDX-License-Identifier: Apache-2.0
#include "vfs/hooks.h"

#include <fnmatch.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

namespace matchlock::vfs {
namespace {

struct OpName {
  Op op;
  std::string_view name;
};
constexpr std::array<OpName, 16> kOps = {{
    {Op::Stat, "stat"},
    {Op::Readdir, "readdir"},
    {Op::Open, "open"},
    {Op::Create, "create"},
    {Op::Mkdir, "mkdir"},
    {Op::Chmod, "chmod"},
    {Op::Remove, "remove"},
    {Op::Rename, "rename"},
    {Op::Symlink, "symlink"},
    {Op::Readlink, "readlink"},
    {Op::Read, "read"},
    {Op::Write, "write"},
    {Op::Close, "close"},
    {Op::Sync, "sync"},
    {Op::Truncate, "truncate"},
    {Op::Link, "link"},
}};

bool matches(const HookRule& rule, Op op, std::string_view path) {
  if (!rule.ops.empty() && std::find(rule.ops.begin(), rule.ops.end(), op) == rule.ops.end()) {
    return false;
  }
  if (rule.path.empty()) {
    return true;
  }
  std::string p(path);
  return ::fnmatch(rule.path.c_str(), p.c_str(), FNM_PATHNAME) == 0;
}

}  // namespace

std::string_view opName(Op op) {
  for (const auto& o : kOps) {
    if (o.op == op) {
      return o.name;
    }
  }
  return "unknown";
}

std::optional<Op> opFromName(std::string_view name) {
  if (name == "read_dir") {
    return Op::Readdir;
  }
  if (name == "remove_all" || name == "removeall") {
    return Op::Remove;
  }
  for (const auto& o : kOps) {
    if (o.name == name) {
      return o.op;
    }
  }
  return std::nullopt;
}

HookDecision decide(const Hooks& hooks, Op op, std::string_view guest_path) {
  HookDecision d;
  d.report = hooks.emit_events;
  for (const HookRule& rule : hooks.rules) {
    if (!matches(rule, op, guest_path)) {
      continue;
    }
    if (rule.block) {
      d.error = rule.error;
      d.report = true;
      d.rule = &rule;
      return d;
    }
    d.report = true;
    if (d.rule == nullptr) {
      d.rule = &rule;
    }
  }
  return d;
}

std::string toJsonLine(const FileEvent& e) {
  nlohmann::json file = {{"op", opName(e.op)}, {"path", e.path}, {"size", e.size},
                         {"mode", e.mode},     {"uid", e.uid},   {"gid", e.gid}};
  if (e.error != 0) {
    file["error"] = std::string(std::strerror(e.error));
    file["errno"] = e.error;
  }
  if (!e.rule.empty()) {
    file["rule"] = e.rule;
  }
  nlohmann::json j = {{"type", "file"}, {"timestamp", e.timestamp_ms}, {"file", file}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace matchlock::vfs
