// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>

#include "common/result.h"

namespace matchlock::guestproto {

/// The host side of the guest channel as a host-side layer sees it (ports, health): streams it
/// opens to one of the agent's ports, on the supervisor's mux. The supervisor implements it once
/// and routes the streams' frames back to the layer that owns them.
struct StreamChannel {
  /// Opens a stream to the layer's port; fails while the guest is not ready.
  std::function<Result<uint32_t>()> open;
  std::function<void(uint32_t stream, std::string_view bytes)> send;
  /// The layer has processed `n` bytes of the stream's data: credit back to the guest.
  std::function<void(uint32_t stream, size_t n)> consumed;
  /// Bytes queued on the stream beyond the guest's window (backpressure).
  std::function<size_t(uint32_t stream)> pending;
  std::function<void(uint32_t stream)> close_write;
  std::function<void(uint32_t stream, std::string_view why)> reset;
  /// Hands what was queued to the channel's writer.
  std::function<void()> flush;
};

}  // namespace matchlock::guestproto
