// SPDX-License-Identifier: Apache-2.0
#include "sys/process_ref.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <charconv>

#include "common/fd.h"

namespace matchlock::sys {

Result<ProcStat> parseProcStat(std::string_view text) {
  // "pid (comm) state ppid ...": comm is arbitrary (spaces, parentheses), so anchor on the last
  // ')'.
  const size_t close = text.rfind(')');
  if (close == std::string_view::npos) {
    return makeError(Errc::Internal, "malformed /proc stat: no ')'");
  }
  std::string_view rest = text.substr(close + 1);
  ProcStat out;
  // Field 3 is the first token after ')'; field 22 is the 20th.
  int field = 2;
  while (!rest.empty()) {
    const size_t start = rest.find_first_not_of(" \n");
    if (start == std::string_view::npos) {
      break;
    }
    rest.remove_prefix(start);
    const size_t end = std::min(rest.find_first_of(" \n"), rest.size());
    std::string_view token = rest.substr(0, end);
    rest.remove_prefix(end);
    ++field;
    if (field == 3) {
      if (token.size() != 1) {
        return makeError(Errc::Internal, "malformed /proc stat: bad state field");
      }
      out.state = token[0];
    } else if (field == 22) {
      auto [ptr, ec] = std::from_chars(token.data(), token.data() + token.size(), out.start_time);
      if (ec != std::errc() || ptr != token.data() + token.size()) {
        return makeError(Errc::Internal, "malformed /proc stat: bad starttime field");
      }
      return out;
    }
  }
  return makeError(Errc::Internal, "malformed /proc stat: too few fields");
}

namespace {

Result<ProcStat> readProcStat(pid_t pid) {
  if (pid <= 0) {
    return makeError(Errc::NotFound, fmt::format("no process {}", pid));
  }
  auto text = readFile(fmt::format("/proc/{}/stat", pid));
  if (!text.has_value()) {
    // ENOENT (gone) and ESRCH (exiting while we read) both mean "no such process".
    if (text.error().code() == Errc::NotFound || text.error().sysErrno() == ESRCH) {
      return makeError(Errc::NotFound, fmt::format("no process {}", pid));
    }
    return makeError(std::move(text).error());
  }
  return parseProcStat(*text);
}

}  // namespace

Result<uint64_t> processStartTime(pid_t pid) {
  ML_ASSIGN_OR_RETURN(ProcStat stat, readProcStat(pid));
  return stat.start_time;
}

Result<ProcessRef> processRef(pid_t pid) {
  ML_ASSIGN_OR_RETURN(uint64_t start_time, processStartTime(pid));
  return ProcessRef{pid, start_time};
}

bool isAlive(const ProcessRef& ref) {
  auto stat = readProcStat(ref.pid);
  if (!stat.has_value()) {
    return false;
  }
  // A zombie (or a task being torn down) has exited; only its parent's wait() is outstanding.
  if (stat->state == 'Z' || stat->state == 'X' || stat->state == 'x') {
    return false;
  }
  return stat->start_time == ref.start_time;
}

}  // namespace matchlock::sys
