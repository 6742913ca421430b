// SPDX-License-Identifier: Apache-2.0
// Exec-stream messages (port 5000) as either side reads them: the message reader over a stream
// of any bytes, and every payload decoder. A decoded Start re-encodes to a request that decodes
// to the same thing.
#include <string>

#include "fuzz_check.h"
#include "guestproto/exec.h"

namespace gp = matchlock::guestproto;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input = fuzz::asView(data, size);
  gp::ExecMessageReader reader;
  if (reader.feed(input)) {
    while (auto m = reader.next()) {
      FUZZ_CHECK(m->payload.size() <= gp::kMaxExecMessage);
    }
  }
  if (auto start = gp::decodeStart(input)) {
    auto again = gp::decodeStart(gp::startPayload(*start));
    FUZZ_CHECK(again.has_value());
    FUZZ_CHECK(again->argv == start->argv && again->env == start->env && again->cwd == start->cwd &&
               again->user == start->user && again->tty == start->tty &&
               again->rows == start->rows && again->cols == start->cols &&
               again->kill_grace_seconds == start->kill_grace_seconds);
  }
  (void)gp::decodeResize(input);
  (void)gp::decodeSignal(input);
  if (auto exit = gp::decodeExit(input)) {
    auto again = gp::decodeExit(gp::encodeExit(*exit).substr(5));
    FUZZ_CHECK(again.has_value() && again->code == exit->code && again->signal == exit->signal &&
               again->error == exit->error);
  }
  return 0;
}
