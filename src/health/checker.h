// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "ev/loop.h"
#include "guestproto/channel.h"
#include "guestproto/exec.h"

namespace matchlock::health {

/// A sandbox's healthcheck, compose's meanings (docs/health.md).
struct Check {
  std::vector<std::string> argv;  ///< run in the guest as root, cwd /
  std::chrono::milliseconds interval{30000};
  std::chrono::milliseconds timeout{30000};
  std::chrono::milliseconds start_period{0};
  int retries = 3;
};

/// compose's `test`: ["CMD", args...], ["CMD-SHELL", "cmd"], a plain argv (a string form was
/// already made `/bin/sh -c ...` by the decoder), or ["NONE"] (nullopt: no check).
std::optional<std::vector<std::string>> argvOf(const std::vector<std::string>& test);

nlohmann::json toJson(const Check& check);
Result<Check> checkFromJson(const nlohmann::json& j);

enum class State { Starting, Healthy, Unhealthy };
std::string_view toString(State state);

/// Runs one sandbox's healthcheck in its guest, through the agent's exec port: the first probe as
/// soon as the guest is ready, then one every `interval` after the previous ended. A probe that
/// exits 0 is a success; a non-zero exit, a failure to start or running past `timeout` (its
/// process group is then killed) is a failure. Failures inside `start_period` do not count
/// until the first success; `retries` consecutive failures make the sandbox unhealthy, one
/// success makes it healthy again. on_change runs on every transition (and never otherwise) with
/// the new status and, for unhealthy, why (exit code and the tail of the probe's output).
class Checker {
 public:
  /// Streams to the agent's exec port.
  using Channel = guestproto::StreamChannel;
  /// The new state (nullopt: no healthcheck any more) and, for unhealthy, why.
  using OnChange = std::function<void(std::optional<State> state, const std::string& detail)>;
  /// Output kept per probe (its tail), as Docker keeps the last 4 KiB.
  static constexpr size_t kMaxOutput = 4096;

  /// `check` nullopt: idle until replace() gives it one.
  [[nodiscard]] static Result<std::unique_ptr<Checker>> create(ev::Loop& loop,
                                                               std::optional<Check> check,
                                                               Channel channel, OnChange on_change);
  Checker(const Checker&) = delete;
  Checker& operator=(const Checker&) = delete;
  Checker(Checker&&) = delete;
  Checker& operator=(Checker&&) = delete;
  ~Checker();

  /// The guest is ready: probing starts.
  void start();
  /// A new check (nullopt: none) applied at once: a probe in flight is cancelled, the state
  /// starts over (starting, start period from now) and the first probe runs now if started.
  void replace(std::optional<Check> check);
  bool enabled() const { return check_.has_value(); }
  State state() const { return state_; }
  int failingStreak() const { return streak_; }
  const std::string& lastOutput() const { return last_output_; }

  bool owns(uint32_t stream) const {
    return stream != 0 && (stream == stream_ || closing_.contains(stream));
  }
  void onData(uint32_t stream, std::string_view data);
  void onClose(uint32_t stream);
  void onReset(uint32_t stream, std::string_view message);
  /// The control verb `{"op": "healthcheck", "healthcheck": {...} | null}` (replace()); nullopt
  /// for every other op.
  std::optional<nlohmann::json> handleControl(const nlohmann::json& request);

 private:
  Checker(std::optional<Check> check, Channel channel, OnChange on_change);
  void cancelProbe();
  void probe();
  void finished(bool ok, std::string why);
  void set(State state, const std::string& detail);

  std::optional<Check> check_;
  bool started_ = false;
  Channel channel_;
  OnChange on_change_;
  ev::Timer next_;
  ev::Timer deadline_;
  std::chrono::steady_clock::time_point started_at_;
  State state_ = State::Starting;
  bool ever_healthy_ = false;
  int streak_ = 0;
  uint32_t stream_ = 0;         ///< the probe running now
  std::set<uint32_t> closing_;  ///< probes that exited, their Close still to come
  guestproto::ExecMessageReader reader_;
  std::string output_;
  std::string last_output_;
};

}  // namespace matchlock::health
