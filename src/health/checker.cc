// SPDX-License-Identifier: Apache-2.0
#include "health/checker.h"

#include <fmt/format.h>

#include "common/log.h"
#include "common/strings.h"

namespace matchlock::health {

std::optional<std::vector<std::string>> argvOf(const std::vector<std::string>& test) {
  if (test.empty() || test[0] == "NONE") {
    return std::nullopt;
  }
  if (test[0] == "CMD") {
    if (test.size() < 2) {
      return std::nullopt;
    }
    return std::vector<std::string>(test.begin() + 1, test.end());
  }
  if (test[0] == "CMD-SHELL") {
    std::vector<std::string> rest(test.begin() + 1, test.end());
    return std::vector<std::string>{"/bin/sh", "-c", join(rest, " ")};
  }
  return test;
}

nlohmann::json toJson(const Check& c) {
  return {{"argv", c.argv},
          {"interval_ms", c.interval.count()},
          {"timeout_ms", c.timeout.count()},
          {"start_period_ms", c.start_period.count()},
          {"retries", c.retries}};
}

Result<Check> checkFromJson(const nlohmann::json& j) {
  try {
    Check c;
    c.argv = j.at("argv").get<std::vector<std::string>>();
    c.interval = std::chrono::milliseconds(j.value("interval_ms", int64_t{30000}));
    c.timeout = std::chrono::milliseconds(j.value("timeout_ms", int64_t{30000}));
    c.start_period = std::chrono::milliseconds(j.value("start_period_ms", int64_t{0}));
    c.retries = j.value("retries", 3);
    if (c.argv.empty() || c.interval.count() <= 0 || c.timeout.count() <= 0 || c.retries < 1) {
      return makeError(Errc::InvalidSpec, "healthcheck: empty command or a non-positive value");
    }
    return c;
  } catch (const nlohmann::json::exception& e) {
    return makeError(Errc::InvalidSpec, fmt::format("healthcheck: {}", e.what()));
  }
}

std::string_view toString(State s) {
  switch (s) {
    case State::Starting:
      return "starting";
    case State::Healthy:
      return "healthy";
    case State::Unhealthy:
      return "unhealthy";
  }
  return "starting";
}

Checker::Checker(std::optional<Check> check, Channel channel, OnChange on_change)
    : check_(std::move(check)), channel_(std::move(channel)), on_change_(std::move(on_change)) {}

Checker::~Checker() = default;

Result<std::unique_ptr<Checker>> Checker::create(ev::Loop& loop, std::optional<Check> check,
                                                 Channel channel, OnChange on_change) {
  std::unique_ptr<Checker> c(
      new Checker(std::move(check), std::move(channel), std::move(on_change)));
  Checker* raw = c.get();
  ML_ASSIGN_OR_RETURN(c->next_, loop.timer([raw] { raw->probe(); }));
  ML_ASSIGN_OR_RETURN(c->deadline_, loop.timer([raw] {
    if (raw->stream_ != 0) {
      uint32_t s = raw->stream_;
      raw->stream_ = 0;
      raw->channel_.reset(s, "healthcheck timed out");
      raw->channel_.flush();
      raw->finished(false, fmt::format("timed out after {} ms", raw->check_->timeout.count()));
    }
  }));
  return c;
}

void Checker::start() {
  started_ = true;
  started_at_ = std::chrono::steady_clock::now();
  probe();
}

void Checker::cancelProbe() {
  (void)next_.disarm();
  (void)deadline_.disarm();
  if (stream_ != 0) {
    channel_.reset(stream_, "healthcheck replaced");
    channel_.flush();
    stream_ = 0;
  }
}

void Checker::replace(std::optional<Check> check) {
  cancelProbe();
  const bool had = check_.has_value();
  check_ = std::move(check);
  streak_ = 0;
  ever_healthy_ = false;
  last_output_.clear();
  started_at_ = std::chrono::steady_clock::now();
  if (!check_) {
    state_ = State::Starting;
    if (had && on_change_) {
      on_change_(std::nullopt, "");
    }
    return;
  }
  if (state_ != State::Starting || !had) {
    state_ = State::Starting;
    if (on_change_) {
      on_change_(State::Starting, "");
    }
  }
  if (started_) {
    probe();
  }
}

std::optional<nlohmann::json> Checker::handleControl(const nlohmann::json& request) {
  if (request.value("op", "") != "healthcheck") {
    return std::nullopt;
  }
  std::optional<Check> check;
  if (auto h = request.find("healthcheck"); h != request.end() && !h->is_null()) {
    auto parsed = checkFromJson(*h);
    if (!parsed) {
      return nlohmann::json{{"ok", false}, {"error", parsed.error().message()}};
    }
    check = std::move(*parsed);
  }
  replace(std::move(check));
  return nlohmann::json{
      {"ok", true},
      {"health", check_ ? nlohmann::json(std::string(toString(state_))) : nlohmann::json()}};
}

void Checker::probe() {
  if (stream_ != 0 || !check_ || !started_) {
    return;  // one probe at a time, and only with a check in a ready guest
  }
  auto stream = channel_.open();
  if (!stream) {
    finished(false, stream.error().message());
    return;
  }
  stream_ = *stream;
  reader_ = guestproto::ExecMessageReader();
  output_.clear();
  guestproto::ExecRequest req;
  req.argv = check_->argv;
  req.cwd = "/";
  req.kill_grace_seconds = 1;
  channel_.send(stream_, guestproto::encodeStart(req));
  channel_.send(stream_, guestproto::encodeExecMessage(guestproto::ExecKind::StdinEof, ""));
  channel_.flush();
  (void)deadline_.arm(check_->timeout);
}

void Checker::onData(uint32_t stream, std::string_view data) {
  if (!owns(stream)) {
    return;
  }
  channel_.consumed(stream, data.size());  // output is kept bounded, never pushed back
  if (Status st = reader_.feed(data); !st) {
    uint32_t s = stream_;
    stream_ = 0;
    channel_.reset(s, "bad exec framing");
    finished(false, st.error().message());
    return;
  }
  while (auto m = reader_.next()) {
    if (m->kind == guestproto::ExecKind::Stdout || m->kind == guestproto::ExecKind::Stderr) {
      output_ += m->payload;
      if (output_.size() > kMaxOutput) {
        output_.erase(0, output_.size() - kMaxOutput);
      }
    } else if (m->kind == guestproto::ExecKind::Exit) {
      auto exit = guestproto::decodeExit(m->payload);
      closing_.insert(stream_);
      stream_ = 0;
      (void)deadline_.disarm();
      if (!exit) {
        finished(false, exit.error().message());
      } else if (!exit->error.empty()) {
        finished(false, exit->error);
      } else if (exit->code != 0) {
        finished(false, fmt::format("exit {}", exit->code));
      } else {
        finished(true, "");
      }
      return;
    }
  }
  channel_.flush();
}

void Checker::onClose(uint32_t stream) {
  channel_.close_write(stream);
  channel_.flush();
  closing_.erase(stream);
  if (stream == stream_) {  // closed without an Exit
    stream_ = 0;
    (void)deadline_.disarm();
    finished(false, "the probe's stream closed without an exit status");
  }
}

void Checker::onReset(uint32_t stream, std::string_view message) {
  closing_.erase(stream);
  if (stream == stream_) {
    stream_ = 0;
    (void)deadline_.disarm();
    finished(false, std::string(message));
  }
}

void Checker::finished(bool ok, std::string why) {
  last_output_ = std::string(trim(output_));
  if (ok) {
    streak_ = 0;
    ever_healthy_ = true;
    set(State::Healthy, "");
  } else {
    const bool grace =
        !ever_healthy_ && std::chrono::steady_clock::now() - started_at_ < check_->start_period;
    if (!grace) {
      ++streak_;
    }
    if (streak_ >= check_->retries) {
      std::string detail = fmt::format("healthcheck failed {} time(s) in a row: {}", streak_, why);
      if (!last_output_.empty()) {
        detail += ": " + last_output_.substr(0, 300);
      }
      set(State::Unhealthy, detail);
    }
  }
  (void)next_.arm(check_->interval);
}

void Checker::set(State state, const std::string& detail) {
  if (state == state_) {
    return;
  }
  state_ = state;
  ML_LOG(health, info, "healthcheck: {}{}{}", toString(state), detail.empty() ? "" : ": ", detail);
  if (on_change_) {
    on_change_(state, detail);
  }
}

}  // namespace matchlock::health
