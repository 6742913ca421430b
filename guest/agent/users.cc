// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/users.h"

#include <fmt/format.h>

#include <charconv>
#include <fstream>

#include "common/strings.h"

namespace matchlock::guest {
namespace {

bool parseId(std::string_view s, unsigned& out) {
  if (s.empty()) {
    return false;
  }
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}

// Lines of a colon-separated database (passwd, group); missing files read as empty.
std::vector<std::vector<std::string>> readDb(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') {
      continue;
    }
    rows.push_back(split(line, ':'));
  }
  return rows;
}

}  // namespace

Result<ResolvedUser> resolveUser(const std::string& spec, const std::string& root) {
  ResolvedUser out;
  if (spec.empty()) {
    out.name = "root";
    out.home = "/root";
  }
  std::string user_part = spec;
  std::string group_part;
  if (size_t colon = spec.find(':'); colon != std::string::npos) {
    user_part = spec.substr(0, colon);
    group_part = spec.substr(colon + 1);
  }
  auto passwd = readDb(root + "/etc/passwd");
  auto groups = readDb(root + "/etc/group");
  bool found = false;
  if (!user_part.empty() || spec.empty()) {
    unsigned id = 0;
    bool numeric = parseId(user_part, id);
    for (const auto& row : passwd) {
      if (row.size() < 7) {
        continue;
      }
      unsigned row_uid = 0;
      unsigned row_gid = 0;
      if (!parseId(row[2], row_uid) || !parseId(row[3], row_gid)) {
        continue;
      }
      bool match = spec.empty() ? row_uid == 0 : (numeric ? row_uid == id : row[0] == user_part);
      if (match) {
        out.uid = row_uid;
        out.gid = row_gid;
        out.name = row[0];
        out.home = row[5].empty() ? "/" : row[5];
        found = true;
        break;
      }
    }
    if (!found && !spec.empty()) {
      if (!numeric) {
        return makeError(Errc::NotFound,
                         fmt::format("user '{}' not found in /etc/passwd", user_part));
      }
      out.uid = id;
      out.gid = id;
      out.name.clear();
      out.home = "/";
    }
  }
  if (!group_part.empty()) {
    unsigned gid = 0;
    if (parseId(group_part, gid)) {
      out.gid = gid;
    } else {
      bool group_found = false;
      for (const auto& row : groups) {
        unsigned row_gid = 0;
        if (row.size() >= 3 && row[0] == group_part && parseId(row[2], row_gid)) {
          out.gid = row_gid;
          group_found = true;
          break;
        }
      }
      if (!group_found) {
        return makeError(Errc::NotFound,
                         fmt::format("group '{}' not found in /etc/group", group_part));
      }
    }
  }
  out.groups.push_back(out.gid);
  if (!out.name.empty()) {
    for (const auto& row : groups) {
      unsigned row_gid = 0;
      if (row.size() < 4 || !parseId(row[2], row_gid) || row_gid == out.gid) {
        continue;
      }
      for (const std::string& member : split(row[3], ',')) {
        if (member == out.name) {
          out.groups.push_back(row_gid);
        }
      }
    }
  }
  return out;
}

}  // namespace matchlock::guest
