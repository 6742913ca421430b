// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "common/result.h"

namespace matchlock::guest {

struct ResolvedUser {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  ///< supplementary groups from /etc/group
  std::string name;           ///< "" when given numerically and absent from /etc/passwd
  std::string home = "/";
};

/// Resolves "uid", "uid:gid", "name" or "name:group" (empty = root) against the image's
/// /etc/passwd and /etc/group under `root`. Unknown names are NotFound errors; unknown numeric
/// ids are allowed (as Docker does), with gid = uid's group or the given one.
Result<ResolvedUser> resolveUser(const std::string& spec, const std::string& root = "/");

}  // namespace matchlock::guest
