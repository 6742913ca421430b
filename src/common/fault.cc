// SPDX-License-Identifier: Apache-2.0
#include "common/fault.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>

#include "common/log.h"

namespace matchlock {

void faultPoint(std::string_view point) {
  const char* fault = std::getenv("MATCHLOCK_FAULT");
  if (fault != nullptr && point == fault) {
    ML_LOG(fault, warn, "MATCHLOCK_FAULT={}: killing this process", point);
    (void)::kill(::getpid(), SIGKILL);
  }
}

}  // namespace matchlock
