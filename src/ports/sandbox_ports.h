// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "guestproto/channel.h"

namespace matchlock::ports {

/// One published port: host address:host_port relayed to the guest's own 127.0.0.1:guest_port.
struct Binding {
  std::string address = "127.0.0.1";
  uint16_t host_port = 0;  ///< 0: an ephemeral port (bindings() reports the real one)
  uint16_t guest_port = 0;
  bool operator==(const Binding&) const = default;
};

nlohmann::json toJson(const std::vector<Binding>& bindings);
/// `[{"address", "host_port", "guest_port"}]`; an error names the entry that is wrong.
Result<std::vector<Binding>> bindingsFromJson(const nlohmann::json& j);

/// The sandbox's published ports, owned by its supervisor (docs/ports.md): host listeners whose
/// connections are relayed, each over one guest service stream (port 5003, `forward`), to the
/// guest's 127.0.0.1. Nothing is routed, so forwards work without a guest network and never give
/// the guest a path to the host. Listeners bind exactly the requested addresses (a wildcard only
/// when asked for). Flow control is end to end: a slow reader on either side stops reading the
/// other, and neither side buffers more than about a window plus kHighWater per connection.
///
/// Serves the control verb `ports` (`action`: `list`, or `set` with the whole new list; a set
/// binds every new listener or none, so a failure leaves the forwards as they were).
class SandboxPorts {
 public:
  /// The host↔guest channel as the supervisor offers it: streams to the agent's service port.
  using Channel = guestproto::StreamChannel;
  /// Bytes queued in either direction beyond this stop reading the other side.
  static constexpr size_t kHighWater = size_t{1} << 20;

  /// Binds `initial` (all or nothing; a taken port is an error naming it and `sandbox`).
  /// Connections accepted before ready() wait, unread, until the guest is ready.
  [[nodiscard]] static Result<std::unique_ptr<SandboxPorts>> create(
      ev::Loop& loop, std::string sandbox, const std::vector<Binding>& initial, Channel channel);
  SandboxPorts(const SandboxPorts&) = delete;
  SandboxPorts& operator=(const SandboxPorts&) = delete;
  SandboxPorts(SandboxPorts&&) = delete;
  SandboxPorts& operator=(SandboxPorts&&) = delete;
  ~SandboxPorts();

  /// Replaces the forwards with `wanted`: listeners that stay are kept (a changed guest port
  /// takes effect for new connections), new ones are bound first, all or nothing, then removed
  /// ones close (their open connections run to their end).
  [[nodiscard]] Status set(const std::vector<Binding>& wanted);
  std::vector<Binding> bindings() const;
  size_t connections() const { return conns_.size(); }

  /// The guest is ready: waiting connections open their streams.
  void ready();
  bool owns(uint32_t stream) const;
  void onData(uint32_t stream, std::string_view data);
  void onClose(uint32_t stream);
  void onReset(uint32_t stream, std::string_view message);
  /// The guest channel's queue drained: connections paused on it read again.
  void onDrained();
  /// The `ports` verb; nullopt for every other op.
  std::optional<nlohmann::json> handleControl(const nlohmann::json& request);

 private:
  struct Listener;
  struct Conn;
  SandboxPorts(ev::Loop& loop, std::string sandbox, Channel channel);
  Result<std::unique_ptr<Listener>> listen(const Binding& b);
  void onAccept(Listener& l);
  void startStream(Conn& c);
  void pump(Conn& c);
  void grant(Conn& c);
  void drop(Conn* c);
  Conn* connOf(uint32_t stream);

  ev::Loop& loop_;
  std::string sandbox_;
  Channel channel_;
  bool ready_ = false;
  std::list<std::unique_ptr<Listener>> listeners_;
  std::list<std::unique_ptr<Conn>> conns_;
  std::set<uint32_t> draining_;  ///< streams whose connection ended after the guest's Exit
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);  ///< for tasks posted to the loop
};

}  // namespace matchlock::ports
