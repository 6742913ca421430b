// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>

namespace matchlock::guest {

/// Test-only (the `matchlock-guest-hostile` build): the bytes a hostile guest sends on a VFS
/// stream instead of relaying its kernel. Well-framed FUSE requests that try every way out of
/// the mount (names with "..", '/', absolute symlinks, forged node and handle ids, lengths that
/// claim more than they carry, hard links, device nodes), then thousands of random requests,
/// then bytes that cannot be framed. See tests/acceptance/test_vfs.py.
std::string hostileVfsRequests(uint32_t seed);

/// Counts and checks the host's replies (every one must frame and carry errno <= 0).
class HostileReplies {
 public:
  /// False once a reply is malformed.
  bool feed(const std::string& data);
  uint64_t replies() const { return replies_; }
  uint64_t errors() const { return errors_; }

 private:
  std::string buf_;
  uint64_t replies_ = 0;
  uint64_t errors_ = 0;
  bool bad_ = false;
};

}  // namespace matchlock::guest
