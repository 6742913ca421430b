// SPDX-License-Identifier: Apache-2.0
#include "sys/ext4.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>

#include "common/fd.h"
#include "common/strings.h"
#include "sys/process.h"

namespace matchlock::sys {

Status runTool(const std::vector<std::string>& argv, const std::string& log_path, int max_ok,
               std::chrono::seconds timeout) {
  SpawnOptions opts;
  opts.stdout_path = log_path;
  opts.stderr_path = log_path;
  ML_ASSIGN_OR_RETURN(auto child, ChildProcess::spawn(argv, opts));
  ML_ASSIGN_OR_RETURN(auto exit, child.waitFor(timeout));
  if (!exit || exit->code < 0 || exit->code > max_ok) {
    return makeError(Errc::System, fmt::format("{} failed: {}", join(argv, " "),
                                               readFile(log_path).value_or("(no output)")));
  }
  (void)::unlink(log_path.c_str());
  return ok();
}

Status makeExt4Image(const std::string& path, int64_t mib, const Ext4Options& options) {
  const std::string tmp = path + ".new";
  {
    ML_ASSIGN_OR_RETURN(Fd fd, openFile(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600));
    if (::ftruncate(fd.get(), mib * 1024 * 1024) != 0) {
      Error e(Errc::System, fmt::format("ftruncate {}", tmp), errno);
      (void)::unlink(tmp.c_str());
      return makeError(std::move(e));
    }
  }
  std::vector<std::string> argv{"mkfs.ext4", "-q", "-F"};
  if (!options.journal) {
    argv.insert(argv.end(), {"-O", "^has_journal"});
  }
  argv.insert(argv.end(), {"-E", "lazy_itable_init=1", tmp});
  if (Status st = runTool(argv, path + ".mkfs.log"); !st) {
    (void)::unlink(tmp.c_str());
    return st;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Error e(Errc::System, fmt::format("rename {}", tmp), errno);
    (void)::unlink(tmp.c_str());
    return makeError(std::move(e));
  }
  return ok();
}

}  // namespace matchlock::sys
