// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <archive.h>

#include <string>

#include "common/cptr.h"

namespace matchlock::image {

using ArchivePtr = CPtr<archive, &archive_read_free>;

/// libarchive's message for the last error. It may have none (archive_error_string returns
/// null on some malformed input), and a null must never reach a formatter.
inline std::string archiveError(archive* a) {
  const char* s = archive_error_string(a);
  return s != nullptr ? s : "malformed archive (libarchive gave no detail)";
}

}  // namespace matchlock::image
