// SPDX-License-Identifier: Apache-2.0
#include "common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace matchlock::log {
namespace {

struct Registry {
  std::mutex mu;
  spdlog::sink_ptr sink;
  spdlog::level::level_enum level = spdlog::level::warn;
  std::map<std::string, std::shared_ptr<spdlog::logger>, std::less<>> loggers;
};

Registry& registry() {
  static Registry* r = new Registry();  // intentionally leaked: used from atexit paths
  return *r;
}

spdlog::sink_ptr sinkLocked(Registry& r) {
  if (!r.sink) {
    r.sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    r.sink->set_pattern("%^%l%$ [%n] %v");
  }
  return r.sink;
}

}  // namespace

void init(std::string_view level) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.level = spdlog::level::from_str(std::string(level));
  for (auto& [name, logger] : r.loggers) {
    logger->set_level(r.level);
  }
}

spdlog::logger& get(std::string_view component) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  auto it = r.loggers.find(component);
  if (it != r.loggers.end()) {
    return *it->second;
  }
  auto logger = std::make_shared<spdlog::logger>(std::string(component), sinkLocked(r));
  logger->set_level(r.level);
  auto& ref = *logger;
  r.loggers.emplace(std::string(component), std::move(logger));
  return ref;
}

}  // namespace matchlock::log
