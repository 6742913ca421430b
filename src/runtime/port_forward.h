// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"

namespace matchlock::runtime {

struct ForwardBinding {
  std::string address = "127.0.0.1";
  uint16_t local_port = 0;  ///< 0: an ephemeral port (the real one is reported back)
  uint16_t remote_port = 0;
};

/// Host listeners whose connections are relayed, one guest service stream each, to the guest's
/// own 127.0.0.1:remote_port (docs/rpc.md). Nothing is routed: the guest never gets a path to
/// the host, and forwards work without a guest network. Listeners bind exactly the requested
/// addresses (a wildcard only when it is what was asked for). Destroying it closes every listener
/// and connection.
class PortForwarder {
 public:
  /// Binds every listener or none: a port already taken fails the whole set with an error naming
  /// the address and port.
  [[nodiscard]] static Result<std::unique_ptr<PortForwarder>> start(
      ev::Loop& loop, std::string control_socket, const std::vector<ForwardBinding>& bindings);
  PortForwarder(const PortForwarder&) = delete;
  PortForwarder& operator=(const PortForwarder&) = delete;
  PortForwarder(PortForwarder&&) = delete;
  PortForwarder& operator=(PortForwarder&&) = delete;
  ~PortForwarder();

  /// The bound listeners, with the real local ports.
  const std::vector<ForwardBinding>& bindings() const { return bound_; }
  size_t connections() const { return conns_.size(); }

 private:
  struct Listener;
  struct Conn;
  PortForwarder(ev::Loop& loop, std::string control_socket);
  void onAccept(Listener& l);
  void pump(Conn& c);
  void drop(Conn* c);

  ev::Loop& loop_;
  std::string control_;
  std::vector<ForwardBinding> bound_;
  std::list<std::unique_ptr<Listener>> listeners_;
  std::list<std::unique_ptr<Conn>> conns_;
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);  ///< for tasks posted to the loop
};

}  // namespace matchlock::runtime
