// SPDX-License-Identifier: Apache-2.0
#include "spec/decode.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <sys/un.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <regex>
#include <set>

#include "common/strings.h"

namespace matchlock::spec {
namespace {

using Json = nlohmann::json;
using Keys = std::initializer_list<std::string_view>;

constexpr int64_t kMinMemoryMib = 32;
constexpr int64_t kMaxMemoryMib = int64_t{1} << 20;  // 1 TiB
constexpr int64_t kMinDiskMib = 16;
constexpr int64_t kMaxDiskMib = int64_t{1} << 24;  // 16 TiB
constexpr double kMaxCpus = 256;

const std::regex& nameRe() {
  static const std::regex re("^[a-z0-9][a-z0-9_-]*$");
  return re;
}
const std::regex& envNameRe() {
  static const std::regex re("^[A-Za-z_][A-Za-z0-9_]*$");
  return re;
}
const std::regex& guestPathRe() {
  static const std::regex re("^/[a-zA-Z0-9/_.-]+$");
  return re;
}
bool volumeNameOk(const std::string& name) {
  static const std::regex re("^[a-zA-Z0-9][a-zA-Z0-9_.-]*$");
  return name.size() <= 128 && std::regex_match(name, re);
}
/// The guest has 16 free virtio-mmio slots for extra disks (runtime::kMaxExtraDisks).
constexpr size_t kMaxBlockMounts = 16;
const std::regex& userRe() {
  static const std::regex re("^[A-Za-z0-9_.][A-Za-z0-9_.-]*(:[A-Za-z0-9_.][A-Za-z0-9_.-]*)?$");
  return re;
}

std::string typeName(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "integer";
    case Json::value_t::number_float:
      return "number";
    case Json::value_t::string:
      return "string";
    case Json::value_t::array:
      return "list";
    case Json::value_t::object:
      return "table/mapping";
    default:
      return "unknown";
  }
}

bool isIpLiteral(const std::string& s, std::string* normalized = nullptr) {
  unsigned char buf[16];
  char out[INET6_ADDRSTRLEN];
  for (int af : {AF_INET, AF_INET6}) {
    if (inet_pton(af, s.c_str(), buf) == 1) {
      if (normalized != nullptr && inet_ntop(af, buf, out, sizeof(out)) != nullptr) {
        *normalized = out;
      }
      return true;
    }
  }
  return false;
}

bool isHostname(const std::string& s) {
  static const std::regex label("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$");
  if (s.empty() || s.size() > 253) {
    return false;
  }
  for (const std::string& part : split(s, '.')) {
    if (!std::regex_match(part, label)) {
      return false;
    }
  }
  return true;
}

/// Host patterns: "*", exact names, "*.example.com", "api-*.example.com", IP literals.
bool isHostPattern(const std::string& s) {
  static const std::regex label("^[a-z0-9_*]([a-z0-9_*-]*[a-z0-9_*])?$");
  if (s == "*" || isIpLiteral(s)) {
    return true;
  }
  if (s.empty() || s.size() > 253) {
    return false;
  }
  for (const std::string& part : split(s, '.')) {
    if (part.empty() || part.size() > 63 || !std::regex_match(part, label)) {
      return false;
    }
  }
  return true;
}

class Decoder {
 public:
  Decoder(Document& doc, std::vector<Diagnostic>& diags, Origin origin)
      : doc_(doc), diags_(diags), origin_(origin) {}

  DecodedFile decode() {
    DecodedFile out;
    Json& root = doc_.tree;
    if (!root.is_object()) {
      error("", root.is_null() ? "the file is empty; expected a table/mapping with 'sandboxes'"
                               : fmt::format("expected a table/mapping, got {}", typeName(root)));
      return out;
    }
    checkKeys(root, "", {"version", "name", "sandboxes", "$schema"});
    if (Json* v = field(root, "", "version")) {
      bool okv = (v->is_number_integer() && v->get<int64_t>() == 1) ||
                 (v->is_string() && v->get<std::string>() == "1");
      if (!okv) {
        error("/version", "unsupported spec version; this matchlock reads version 1");
      }
    }
    if (Json* v = field(root, "", "$schema")) {
      (void)getString(*v, "/$schema");
    }
    if (Json* v = field(root, "", "name")) {
      if (auto s = getString(*v, "/name")) {
        if (!std::regex_match(*s, nameRe()) || s->size() > 63) {
          error("/name",
                fmt::format("invalid project name '{}': use lower-case letters, digits, '-' and "
                            "'_', starting with a letter or digit (at most 63)",
                            *s));
        } else {
          out.project_name = *s;
        }
      }
    }
    Json* sandboxes = field(root, "", "sandboxes");
    if (sandboxes == nullptr) {
      error("", "missing required key 'sandboxes'");
      return out;
    }
    if (!sandboxes->is_object()) {
      typeError(*sandboxes, "/sandboxes", "a table/mapping of sandboxes");
      return out;
    }
    if (sandboxes->empty()) {
      error("/sandboxes", "declares no sandboxes");
    }
    for (auto it = sandboxes->begin(); it != sandboxes->end(); ++it) {
      const std::string& name = it.key();
      std::string ptr = pointerAppend("/sandboxes", name);
      if (name.rfind("x-", 0) == 0) {
        continue;
      }
      if (!std::regex_match(name, nameRe()) || name.size() > 63) {
        errorAtKey(ptr, fmt::format("invalid sandbox name '{}': use lower-case letters, digits, "
                                    "'-' and '_', starting with a letter or digit (at most 63)",
                                    name));
        continue;
      }
      out.sandbox_pos[name] = doc_.keyPositionOf(ptr);
      out.sandboxes[name] = decodeSandbox(name, it.value(), ptr);
    }
    return out;
  }

  SandboxSpec decodeSandbox(const std::string& name, Json& node, const std::string& ptr) {
    SandboxSpec s;
    s.name = name;
    s.source_file = origin_ == Origin::File ? doc_.file : "";
    s.hostname = name;
    std::ranges::replace(s.hostname, '_', '-');
    if (!node.is_object()) {
      typeError(node, ptr, "a table/mapping");
      return s;
    }
    checkKeys(node, ptr,
              {"image", "cpus", "memory", "disk", "env", "workdir", "user", "command", "entrypoint",
               "hostname", "privileged", "labels", "depends_on", "restart", "healthcheck",
               "network", "secrets", "mounts", "ports"});
    auto at = [&](std::string_view key) { return pointerAppend(ptr, key); };

    if (Json* v = field(node, ptr, "image")) {
      if (auto str = getString(*v, at("image"))) {
        if (trim(*str).empty() || str->find_first_of(" \t\n") != std::string::npos) {
          error(at("image"), "expected an image reference like 'alpine:3.20'");
        }
        s.image = *str;
      }
    } else {
      error(ptr, "missing required key 'image'");
    }
    if (Json* v = field(node, ptr, "cpus")) {
      if (auto n = getNumber(*v, at("cpus"))) {
        if (!std::isfinite(*n) || *n <= 0 || *n > kMaxCpus) {
          error(at("cpus"), fmt::format("must be greater than 0 and at most {}", kMaxCpus));
        } else {
          s.cpus = *n;
        }
      }
    }
    if (Json* v = field(node, ptr, "memory")) {
      s.memory_mib = size(*v, at("memory"), kMinMemoryMib, kMaxMemoryMib).value_or(s.memory_mib);
    }
    if (Json* v = field(node, ptr, "disk")) {
      s.disk_mib = size(*v, at("disk"), kMinDiskMib, kMaxDiskMib).value_or(s.disk_mib);
    }
    if (Json* v = field(node, ptr, "env")) {
      s.env = keyValues(*v, at("env"), true);
    }
    if (Json* v = field(node, ptr, "workdir")) {
      if (auto str = getString(*v, at("workdir"))) {
        if (str->empty() || (*str)[0] != '/') {
          error(at("workdir"), "must be an absolute path");
        } else {
          std::string norm = std::filesystem::path(*str).lexically_normal().string();
          while (norm.size() > 1 && norm.back() == '/') {
            norm.pop_back();
          }
          s.workdir = norm;
        }
      }
    }
    if (Json* v = field(node, ptr, "user")) {
      if (auto str = getString(*v, at("user"))) {
        if (!std::regex_match(*str, userRe())) {
          error(at("user"), "expected 'uid', 'uid:gid', 'name' or 'name:group'");
        } else {
          s.user = *str;
        }
      }
    }
    if (Json* v = field(node, ptr, "command")) {
      s.command = commandLike(*v, at("command"), false);
    }
    if (Json* v = field(node, ptr, "entrypoint")) {
      s.entrypoint = commandLike(*v, at("entrypoint"), true);
    }
    if (Json* v = field(node, ptr, "hostname")) {
      if (auto str = getString(*v, at("hostname"))) {
        std::string lower = toLower(*str);
        if (!isHostname(lower)) {
          error(at("hostname"), "not a valid host name (RFC 1123: letters, digits, '-', dots)");
        } else {
          s.hostname = lower;
        }
      }
    }
    if (Json* v = field(node, ptr, "privileged")) {
      s.privileged = getBool(*v, at("privileged")).value_or(false);
    }
    if (Json* v = field(node, ptr, "labels")) {
      s.labels = keyValues(*v, at("labels"), false);
    }
    if (Json* v = field(node, ptr, "depends_on")) {
      s.depends_on =
          stringList(*v, at("depends_on"), [&](const std::string& dep, const std::string& p) {
            if (dep == name) {
              error(p, "a sandbox cannot depend on itself");
            }
            return true;
          });
      std::set<std::string> seen;
      for (size_t i = 0; i < s.depends_on.size(); ++i) {
        if (!seen.insert(s.depends_on[i]).second) {
          error(pointerAppend(at("depends_on"), i),
                fmt::format("'{}' is listed twice", s.depends_on[i]));
        }
      }
    }
    if (Json* v = field(node, ptr, "restart")) {
      if (v->is_boolean() && !v->get<bool>()) {
        error(at("restart"),
              "expected a string; write restart: \"no\" (quoted: YAML 1.1 tools read "
              "a bare no as false)");
      } else if (auto str = getString(*v, at("restart"))) {
        static const std::map<std::string, RestartPolicy, std::less<>> kPolicies = {
            {"no", RestartPolicy::No},
            {"on-failure", RestartPolicy::OnFailure},
            {"always", RestartPolicy::Always},
            {"unless-stopped", RestartPolicy::UnlessStopped}};
        if (auto it = kPolicies.find(*str); it != kPolicies.end()) {
          s.restart = it->second;
        } else {
          enumError(at("restart"), *str, {"no", "on-failure", "always", "unless-stopped"});
        }
      }
    }
    if (Json* v = field(node, ptr, "healthcheck")) {
      s.healthcheck = healthcheck(*v, at("healthcheck"));
    }
    if (Json* v = field(node, ptr, "network")) {
      s.network = network(*v, at("network"));
    }
    if (Json* v = field(node, ptr, "secrets")) {
      s.secrets = secrets(*v, at("secrets"), s);
    }
    if (Json* v = field(node, ptr, "mounts")) {
      s.mounts = mounts(*v, at("mounts"));
    }
    if (Json* v = field(node, ptr, "ports")) {
      s.ports = ports(*v, at("ports"));
    }
    // Cross-field rules.
    if (s.network.no_network) {
      // Reported at the field to remove, which is what the user has to change.
      std::string np = at("network");
      if (!s.network.allow_hosts.empty()) {
        errorAtKey(pointerAppend(np, "allow_hosts"),
                   "allow_hosts cannot be combined with network.no_network = true");
      }
      if (s.network.intercept) {
        errorAtKey(pointerAppend(np, "intercept"),
                   "intercept cannot be combined with network.no_network = true");
      }
      if (!s.network.rules.empty() || !s.network.callback_socket.empty()) {
        errorAtKey(pointerAppend(np, "interception"),
                   "interception rules need the egress proxy and cannot be combined with "
                   "network.no_network = true");
      }
      if (!s.secrets.empty()) {
        errorAtKey(at("secrets"),
                   "secrets need the egress proxy and cannot be combined with network.no_network "
                   "= true");
      }
    }
    return s;
  }

  // --- diagnostics ---------------------------------------------------------------------------

  void error(const std::string& ptr, std::string message) {
    diags_.push_back(Diagnostic{doc_.file, doc_.positionOf(ptr), dottedPath(doc_.tree, ptr),
                                std::move(message)});
  }

  void errorAtKey(const std::string& ptr, std::string message) {
    diags_.push_back(Diagnostic{doc_.file, doc_.keyPositionOf(ptr), dottedPath(doc_.tree, ptr),
                                std::move(message)});
  }

  void typeError(const Json& v, const std::string& ptr, std::string_view expected) {
    error(ptr, fmt::format("expected {}, got {}", expected, typeName(v)));
  }

  void enumError(const std::string& ptr, const std::string& got, Keys allowed) {
    std::vector<std::string> names;
    for (std::string_view a : allowed) {
      names.push_back(fmt::format("'{}'", a));
    }
    std::vector<std::string_view> cands(allowed);
    std::string hint = closestMatch(got, cands);
    error(ptr, fmt::format("invalid value '{}': expected one of {}{}", got, join(names, ", "),
                           hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint)));
  }

  // --- structure -----------------------------------------------------------------------------

  /// Reports keys not in `allowed` (x-* extension keys are ignored) with a "did you mean" hint.
  void checkKeys(const Json& obj, const std::string& ptr, Keys allowed) {
    std::vector<std::string_view> cands(allowed);
    for (auto it = obj.begin(); it != obj.end(); ++it) {
      const std::string& key = it.key();
      if (key.rfind("x-", 0) == 0 || std::ranges::find(cands, key) != cands.end()) {
        continue;
      }
      std::string hint = closestMatch(key, cands);
      errorAtKey(pointerAppend(ptr, key),
                 fmt::format("unknown key '{}'{}", key,
                             hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint)));
    }
  }

  /// The child `key` of `obj`, or nullptr when absent. An explicit null counts as absent in
  /// YAML (`memory:` with no value), so defaults apply.
  static Json* field(Json& obj, const std::string& /*ptr*/, std::string_view key) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      return nullptr;
    }
    return &*it;
  }

  // --- scalars -------------------------------------------------------------------------------

  bool interpolated(const std::string& ptr) const { return doc_.interpolated.contains(ptr); }
  /// A string that interpolation produced may stand for a number (`cpus = "${CPUS}"`): replace
  /// it in the tree when it parses as JSON of the wanted kind, so the schema check sees it too.
  template <class Want>
  void coerceInterpolated(Json& v, const std::string& ptr, Want want) {
    if (v.is_string() && interpolated(ptr)) {
      Json parsed = Json::parse(v.get<std::string>(), nullptr, false);
      if (want(parsed)) {
        v = std::move(parsed);
      }
    }
  }

  /// A value whose interpolation failed was reported already: report nothing more about it.
  bool failed(const std::string& ptr) const { return doc_.interpolation_failed.contains(ptr); }

  std::optional<std::string> getString(const Json& v, const std::string& ptr) {
    if (failed(ptr)) {
      return std::nullopt;
    }
    if (v.is_string()) {
      return v.get<std::string>();
    }
    typeError(v, ptr, "a string");
    return std::nullopt;
  }

  std::optional<double> getNumber(Json& v, const std::string& ptr) {
    if (failed(ptr)) {
      return std::nullopt;
    }
    coerceInterpolated(v, ptr, [](const Json& j) { return j.is_number(); });
    if (v.is_number()) {
      return v.get<double>();
    }
    typeError(v, ptr, "a number");
    return std::nullopt;
  }

  std::optional<int64_t> getInteger(Json& v, const std::string& ptr) {
    if (failed(ptr)) {
      return std::nullopt;
    }
    coerceInterpolated(v, ptr, [](const Json& j) { return j.is_number_integer(); });
    if (v.is_number_integer()) {
      return v.get<int64_t>();
    }
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
        std::abs(v.get<double>()) < 1e15) {
      int64_t n = static_cast<int64_t>(v.get<double>());
      v = n;
      return n;
    }
    typeError(v, ptr, "an integer");
    return std::nullopt;
  }

  std::optional<int64_t> getIntegerIn(Json& v, const std::string& ptr, int64_t lo, int64_t hi) {
    auto n = getInteger(v, ptr);
    if (n && (*n < lo || *n > hi)) {
      error(ptr, fmt::format("must be between {} and {}, got {}", lo, hi, *n));
      return std::nullopt;
    }
    return n;
  }

  std::optional<bool> getBool(Json& v, const std::string& ptr) {
    if (failed(ptr)) {
      return std::nullopt;
    }
    if (v.is_string() && interpolated(ptr)) {
      const std::string& s = v.get_ref<const std::string&>();
      if (s == "true" || s == "false") {
        v = s == "true";
      }
    }
    if (v.is_boolean()) {
      return v.get<bool>();
    }
    typeError(v, ptr, "true or false");
    return std::nullopt;
  }

  std::optional<int64_t> size(Json& v, const std::string& ptr, int64_t lo, int64_t hi) {
    if (failed(ptr)) {
      return std::nullopt;
    }
    coerceInterpolated(v, ptr, [](const Json& j) { return j.is_number_integer(); });
    auto mib = parseSizeMib(v);
    if (!mib) {
      error(ptr, mib.error().message());
      return std::nullopt;
    }
    if (*mib < lo || *mib > hi) {
      error(ptr, fmt::format("must be between {} MiB and {} MiB, got {} MiB", lo, hi, *mib));
      return std::nullopt;
    }
    return *mib;
  }

  std::optional<int64_t> duration(Json& v, const std::string& ptr) {
    if (failed(ptr)) {
      return std::nullopt;
    }
    auto ms = parseDurationMs(v);
    if (!ms) {
      error(ptr, ms.error().message());
      return std::nullopt;
    }
    return *ms;
  }

  // --- composites ----------------------------------------------------------------------------

  using ItemCheck = std::function<bool(const std::string&, const std::string&)>;

  std::vector<std::string> stringList(Json& v, const std::string& ptr, const ItemCheck& check) {
    std::vector<std::string> out;
    if (!v.is_array()) {
      typeError(v, ptr, "a list of strings");
      return out;
    }
    for (size_t i = 0; i < v.size(); ++i) {
      std::string p = pointerAppend(ptr, i);
      if (auto s = getString(v[i], p)) {
        if (check(*s, p)) {
          out.push_back(*s);
        }
      }
    }
    return out;
  }

  std::vector<std::string> hostPatterns(Json& v, const std::string& ptr) {
    std::vector<std::string> out;
    for (std::string h :
         stringList(v, ptr, [](const std::string&, const std::string&) { return true; })) {
      h = toLower(trim(h));
      if (std::ranges::find(out, h) == out.end()) {
        out.push_back(h);
      }
    }
    // Validate after normalisation, pointing at the original element.
    if (v.is_array()) {
      for (size_t i = 0; i < v.size(); ++i) {
        if (v[i].is_string() && !isHostPattern(toLower(trim(v[i].get<std::string>())))) {
          error(pointerAppend(ptr, i),
                fmt::format("invalid host pattern '{}': expected a host name, '*', "
                            "'*.example.com' or an IP address",
                            v[i].get<std::string>()));
        }
      }
    }
    return out;
  }

  std::optional<std::vector<std::string>> commandLike(Json& v, const std::string& ptr,
                                                      bool allow_empty) {
    if (v.is_string()) {
      const std::string& s = v.get_ref<const std::string&>();
      if (trim(s).empty()) {
        if (allow_empty) {
          return std::vector<std::string>{};
        }
        error(ptr, "must not be empty");
        return std::nullopt;
      }
      return std::vector<std::string>{"/bin/sh", "-c", s};
    }
    if (!v.is_array()) {
      typeError(v, ptr, "a string or a list of strings");
      return std::nullopt;
    }
    if (v.empty() && !allow_empty) {
      error(ptr, "must not be empty");
      return std::nullopt;
    }
    return stringList(v, ptr, [](const std::string&, const std::string&) { return true; });
  }

  /// env and labels: a map (string/number/bool values) or a list of "K=V" strings.
  std::map<std::string, std::string> keyValues(Json& v, const std::string& ptr, bool is_env) {
    std::map<std::string, std::string> out;
    auto check_name = [&](const std::string& key, const std::string& p, bool at_key) {
      bool good = is_env ? std::regex_match(key, envNameRe()) : !trim(key).empty();
      if (!good) {
        std::string msg = is_env ? fmt::format(
                                       "invalid variable name '{}': expected "
                                       "[A-Za-z_][A-Za-z0-9_]*",
                                       key)
                                 : "label keys must not be empty";
        at_key ? errorAtKey(p, msg) : error(p, msg);
      }
      return good;
    };
    auto from_host = [&](const std::string& key,
                         const std::string& p) -> std::optional<std::string> {
      // `KEY` without a value (list form) or `KEY:` with null takes the host's value, as
      // `docker run -e KEY` does.
      if (const char* hv = std::getenv(key.c_str()); hv != nullptr) {
        return std::string(hv);
      }
      error(p, fmt::format("'{}' has no value and is not set in the environment", key));
      return std::nullopt;
    };
    if (v.is_object()) {
      for (auto it = v.begin(); it != v.end(); ++it) {
        std::string p = pointerAppend(ptr, it.key());
        if (!check_name(it.key(), p, true)) {
          continue;
        }
        const Json& val = it.value();
        if (val.is_string()) {
          out[it.key()] = val.get<std::string>();
        } else if (val.is_number_integer() || val.is_number_unsigned()) {
          out[it.key()] = val.dump();
        } else if (val.is_number_float()) {
          out[it.key()] = fmt::format("{}", val.get<double>());
        } else if (val.is_boolean()) {
          out[it.key()] = val.get<bool>() ? "true" : "false";
        } else if (val.is_null() && is_env) {
          if (auto hv = from_host(it.key(), p)) {
            out[it.key()] = *hv;
          }
        } else {
          typeError(val, p, "a string, number or bool");
        }
      }
      return out;
    }
    if (v.is_array()) {
      for (size_t i = 0; i < v.size(); ++i) {
        std::string p = pointerAppend(ptr, i);
        auto item = getString(v[i], p);
        if (!item) {
          continue;
        }
        size_t eq = item->find('=');
        std::string key = item->substr(0, eq);
        if (!check_name(key, p, false)) {
          continue;
        }
        if (out.contains(key)) {
          error(p, fmt::format("'{}' is set twice", key));
          continue;
        }
        if (eq == std::string::npos) {
          if (!is_env) {
            out[key] = "";
          } else if (auto hv = from_host(key, p)) {
            out[key] = *hv;
          }
          continue;
        }
        out[key] = item->substr(eq + 1);
      }
      return out;
    }
    typeError(v, ptr, "a table/mapping or a list of \"KEY=VALUE\" strings");
    return out;
  }

  std::optional<Healthcheck> healthcheck(Json& v, const std::string& ptr) {
    if (!v.is_object()) {
      typeError(v, ptr, "a table/mapping");
      return std::nullopt;
    }
    checkKeys(v, ptr, {"test", "interval", "timeout", "retries", "start_period"});
    Healthcheck h;
    auto at = [&](std::string_view key) { return pointerAppend(ptr, key); };
    if (Json* t = field(v, ptr, "test")) {
      if (auto cmd = commandLike(*t, at("test"), false)) {
        h.test = *cmd;
      }
    } else {
      error(ptr, "missing required key 'test'");
    }
    if (Json* t = field(v, ptr, "interval")) {
      h.interval_ms = duration(*t, at("interval")).value_or(h.interval_ms);
    }
    if (Json* t = field(v, ptr, "timeout")) {
      h.timeout_ms = duration(*t, at("timeout")).value_or(h.timeout_ms);
    }
    if (Json* t = field(v, ptr, "start_period")) {
      h.start_period_ms = duration(*t, at("start_period")).value_or(h.start_period_ms);
    }
    if (Json* t = field(v, ptr, "retries")) {
      h.retries = static_cast<int>(getIntegerIn(*t, at("retries"), 1, 1000).value_or(h.retries));
    }
    return h;
  }

  NetworkSpec network(Json& v, const std::string& ptr) {
    NetworkSpec n;
    if (!v.is_object()) {
      typeError(v, ptr, "a table/mapping");
      return n;
    }
    checkKeys(v, ptr,
              {"no_network", "allow_hosts", "block_private_ips", "dns_servers", "add_hosts", "mtu",
               "intercept", "upstream_ca", "interception"});
    auto at = [&](std::string_view key) { return pointerAppend(ptr, key); };
    if (Json* f = field(v, ptr, "no_network")) {
      n.no_network = getBool(*f, at("no_network")).value_or(false);
    }
    if (Json* f = field(v, ptr, "allow_hosts")) {
      n.allow_hosts = hostPatterns(*f, at("allow_hosts"));
    }
    if (Json* f = field(v, ptr, "block_private_ips")) {
      n.block_private_ips = getBool(*f, at("block_private_ips")).value_or(true);
    }
    if (Json* f = field(v, ptr, "intercept")) {
      n.intercept = getBool(*f, at("intercept")).value_or(false);
    }
    if (Json* f = field(v, ptr, "upstream_ca")) {
      if (!f->is_string() || f->get<std::string>().empty()) {
        typeError(*f, at("upstream_ca"), "a path to a PEM CA bundle");
      } else {
        n.upstream_ca = resolvePath(f->get<std::string>());
      }
    }
    if (Json* f = field(v, ptr, "mtu")) {
      n.mtu = static_cast<int>(getIntegerIn(*f, at("mtu"), 68, 65535).value_or(n.mtu));
    }
    if (Json* f = field(v, ptr, "interception")) {
      httpInterception(*f, at("interception"), n);
    }
    if (Json* f = field(v, ptr, "dns_servers")) {
      n.dns_servers =
          stringList(*f, at("dns_servers"), [&](const std::string& s, const std::string& p) {
            if (!isIpLiteral(s)) {
              error(p, fmt::format("'{}' is not an IP address", s));
              return false;
            }
            return true;
          });
      for (std::string& s : n.dns_servers) {
        isIpLiteral(s, &s);
      }
    }
    if (Json* f = field(v, ptr, "add_hosts")) {
      std::string ap = at("add_hosts");
      if (!f->is_object()) {
        typeError(*f, ap, "a table/mapping of host name to IP address");
      } else {
        for (auto it = f->begin(); it != f->end(); ++it) {
          std::string p = pointerAppend(ap, it.key());
          std::string host = toLower(it.key());
          if (!isHostname(host)) {
            errorAtKey(p, fmt::format("invalid host name '{}'", it.key()));
            continue;
          }
          if (auto ip = getString(it.value(), p)) {
            std::string norm;
            if (!isIpLiteral(*ip, &norm)) {
              error(p, fmt::format("'{}' is not an IP address", *ip));
              continue;
            }
            n.add_hosts[host] = norm;
          }
        }
      }
    }
    return n;
  }

  std::vector<SecretRef> secrets(Json& v, const std::string& ptr, const SandboxSpec& s) {
    std::vector<SecretRef> out;
    if (!v.is_array()) {
      typeError(v, ptr, "a list of secrets");
      return out;
    }
    std::set<std::string> names;
    for (size_t i = 0; i < v.size(); ++i) {
      std::string sp = pointerAppend(ptr, i);
      Json& item = v[i];
      if (!item.is_object()) {
        typeError(item, sp, "a table/mapping");
        continue;
      }
      auto at = [&](std::string_view key) { return pointerAppend(sp, key); };
      if (origin_ == Origin::File && item.contains("value")) {
        errorAtKey(at("value"),
                   "literal secret values are not allowed in spec files (they end up in git); use "
                   "from_env, from_file or from_command");
        continue;
      }
      if (origin_ == Origin::File) {
        checkKeys(item, sp, {"name", "from_env", "from_file", "from_command", "hosts"});
      } else {
        checkKeys(
            item, sp,
            {"name", "from_env", "from_file", "from_command", "hosts", "value", "placeholder"});
      }
      SecretRef ref;
      if (Json* f = field(item, sp, "name")) {
        if (auto name = getString(*f, at("name"))) {
          if (!std::regex_match(*name, envNameRe())) {
            error(at("name"), fmt::format("invalid secret name '{}': it becomes an environment "
                                          "variable, so use [A-Za-z_][A-Za-z0-9_]*",
                                          *name));
          } else if (!names.insert(*name).second) {
            error(at("name"), fmt::format("secret '{}' is declared twice", *name));
          } else if (s.env.contains(*name)) {
            error(at("name"), fmt::format("'{}' is both a secret and an env variable", *name));
          }
          ref.name = *name;
        }
      } else {
        error(sp, "missing required key 'name'");
      }
      int sources = 0;
      if (Json* f = field(item, sp, "from_env")) {
        ++sources;
        ref.kind = SecretRef::Kind::Env;
        if (auto e = getString(*f, at("from_env"))) {
          if (!std::regex_match(*e, envNameRe())) {
            error(at("from_env"), fmt::format("invalid variable name '{}'", *e));
          }
          ref.env_var = *e;
        }
      }
      if (Json* f = field(item, sp, "from_file")) {
        ++sources;
        ref.kind = SecretRef::Kind::File;
        if (auto path = getString(*f, at("from_file"))) {
          if (path->empty()) {
            error(at("from_file"), "must not be empty");
          } else {
            ref.file = resolvePath(*path);
          }
        }
      }
      if (Json* f = field(item, sp, "from_command")) {
        ++sources;
        ref.kind = SecretRef::Kind::Command;
        if (auto cmd = commandLike(*f, at("from_command"), false)) {
          ref.command = *cmd;
        }
      }
      if (Json* f = field(item, sp, "value"); f != nullptr && origin_ == Origin::Rpc) {
        ++sources;
        ref.kind = SecretRef::Kind::Inline;
        if (auto val = getString(*f, at("value"))) {
          ref.inline_value = *val;
        }
      }
      if (Json* f = field(item, sp, "placeholder"); f != nullptr && origin_ == Origin::Rpc) {
        ref.placeholder = getString(*f, at("placeholder")).value_or("");
      }
      if (sources != 1) {
        error(sp, sources == 0 ? "needs one of from_env, from_file or from_command"
                               : "give only one of from_env, from_file or from_command");
      }
      if (Json* f = field(item, sp, "hosts")) {
        ref.hosts = hostPatterns(*f, at("hosts"));
        if (ref.hosts.empty() && f->is_array() && origin_ == Origin::File) {
          error(at("hosts"), "must name at least one host (use [\"*\"] for any host)");
        }
      } else if (origin_ == Origin::File) {
        error(sp,
              "missing required key 'hosts' (the hosts allowed to receive the secret; "
              "[\"*\"] for any)");
      }
      out.push_back(std::move(ref));
    }
    return out;
  }

  std::string resolvePath(const std::string& path) const {
    std::filesystem::path p(path);
    if (p.is_relative()) {
      p = std::filesystem::path(doc_.dir) / p;
    }
    return p.lexically_normal().string();
  }

  std::vector<Mount> mounts(Json& v, const std::string& ptr) {
    std::vector<Mount> out;
    if (!v.is_array()) {
      typeError(v, ptr, "a list of mounts");
      return out;
    }
    std::set<std::string> targets;
    for (size_t i = 0; i < v.size(); ++i) {
      std::string mp = pointerAppend(ptr, i);
      Json& item = v[i];
      if (!item.is_object()) {
        typeError(item, mp, "a table/mapping");
        continue;
      }
      checkKeys(item, mp, {"source", "target", "mode", "readonly", "interception"});
      auto at = [&](std::string_view key) { return pointerAppend(mp, key); };
      Mount m;
      bool good = true;
      if (Json* f = field(item, mp, "mode")) {
        if (auto mode = getString(*f, at("mode"))) {
          static const std::map<std::string, MountMode, std::less<>> kModes = {
              {"overlay", MountMode::Overlay}, {"rw", MountMode::ReadWrite},
              {"ro", MountMode::ReadOnly},     {"memory", MountMode::Memory},
              {"volume", MountMode::Volume},   {"disk", MountMode::Disk}};
          if (auto it = kModes.find(*mode); it != kModes.end()) {
            m.mode = it->second;
          } else {
            enumError(at("mode"), *mode, {"overlay", "rw", "ro", "memory", "volume", "disk"});
            good = false;
          }
        }
      }
      if (Json* f = field(item, mp, "source")) {
        if (auto src = getString(*f, at("source"))) {
          if (src->empty()) {
            error(at("source"), "must not be empty");
          } else if (m.mode == MountMode::Memory) {
            error(at("source"), "a memory mount has no source");
          } else if (m.mode == MountMode::Volume) {
            if (!volumeNameOk(*src)) {
              error(at("source"),
                    "must be a volume name matching ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$ (see matchlock "
                    "volume ls)");
            } else {
              m.source = *src;
            }
          } else {
            m.source = resolvePath(*src);
          }
        }
      } else if (m.mode != MountMode::Memory && good) {
        error(mp, "missing required key 'source' (the host directory to mount)");
      }
      if (Json* f = field(item, mp, "target")) {
        if (auto target = getString(*f, at("target"))) {
          std::string norm = std::filesystem::path(*target).lexically_normal().string();
          while (norm.size() > 1 && norm.back() == '/') {
            norm.pop_back();
          }
          bool has_dotdot = false;
          for (const auto& part : std::filesystem::path(*target)) {
            has_dotdot = has_dotdot || part == "..";
          }
          if (!std::regex_match(*target, guestPathRe()) || has_dotdot) {
            error(at("target"), "must be an absolute guest path of [a-zA-Z0-9/_.-] without '..'");
          } else if (norm == "/") {
            error(at("target"), "cannot mount over the guest's root");
          } else if (!targets.insert(norm).second) {
            error(at("target"), fmt::format("'{}' is already a mount target", norm));
          } else {
            m.target = norm;
          }
        }
      } else {
        error(mp, "missing required key 'target'");
      }
      if (Json* f = field(item, mp, "interception")) {
        interception(*f, at("interception"), m);
        if (isBlockMount(m.mode) && good) {
          errorAtKey(at("interception"),
                     "a volume or disk mount is not served by the host: no interception");
        }
      }
      if (Json* f = field(item, mp, "readonly")) {
        m.readonly = getBool(*f, at("readonly")).value_or(false);
        if (!isBlockMount(m.mode) && good) {
          errorAtKey(at("readonly"),
                     "only a volume or disk mount takes readonly (use mode = \"ro\")");
        }
      }
      out.push_back(std::move(m));
    }
    // A disk mounted inside a VFS mount would be hidden by it (the VFS mounts go on last).
    size_t disks = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      if (!isBlockMount(out[i].mode) || out[i].target.empty()) {
        continue;
      }
      if (++disks == kMaxBlockMounts + 1) {
        error(pointerAppend(pointerAppend(ptr, i), "mode"),
              fmt::format("at most {} volume and disk mounts per sandbox", kMaxBlockMounts));
      }
      if (std::string parent = shadowingVfsMount(out, out[i].target); !parent.empty()) {
        error(pointerAppend(pointerAppend(ptr, i), "target"),
              fmt::format("'{}' would be shadowed by the mount at '{}'", out[i].target, parent));
      }
    }
    return out;
  }

  /// A table of header name → value (names are HTTP tokens, values have no CR, LF or NUL).
  std::vector<std::pair<std::string, std::string>> headerMap(Json& v, const std::string& ptr,
                                                             bool headers) {
    std::vector<std::pair<std::string, std::string>> out;
    if (!v.is_object()) {
      typeError(v, ptr, headers ? "a table of header name to value" : "a table of name to value");
      return out;
    }
    for (auto it = v.begin(); it != v.end(); ++it) {
      std::string p = pointerAppend(ptr, it.key());
      auto value = getString(it.value(), p);
      if (!value) {
        continue;
      }
      const bool token = !it.key().empty() && std::ranges::all_of(it.key(), [](char ch) {
        auto c = static_cast<unsigned char>(ch);
        return std::isalnum(c) ||
               std::string_view("!#$%&'*+-.^_`|~").find(ch) != std::string_view::npos;
      });
      if (headers && !token) {
        errorAtKey(p, fmt::format("'{}' is not a valid header name", it.key()));
        continue;
      }
      if (value->find_first_of(std::string_view("\r\n\0", 3)) != std::string::npos) {
        error(p, "must not contain CR, LF or NUL");
        continue;
      }
      if (!it.key().empty()) {
        out.emplace_back(it.key(), *value);
      }
    }
    return out;
  }

  /// `network.interception = { rules = [...] }` (reference §4.7): HTTP rules of the egress proxy.
  void httpInterception(Json& v, const std::string& ptr, NetworkSpec& n) {
    if (!v.is_object()) {
      typeError(v, ptr, "a table/mapping");
      return;
    }
    checkKeys(v, ptr, {"rules", "callback_socket"});
    if (Json* f = field(v, ptr, "callback_socket")) {
      const std::string sp = pointerAppend(ptr, "callback_socket");
      if (!f->is_string() || f->get<std::string>().empty()) {
        typeError(*f, sp, "a path to a Unix socket");
      } else {
        n.callback_socket = resolvePath(f->get<std::string>());
        if (n.callback_socket.size() >= sizeof(sockaddr_un::sun_path)) {
          error(sp, fmt::format("a Unix socket path is at most {} bytes",
                                sizeof(sockaddr_un::sun_path) - 1));
        }
      }
    }
    Json* rules = field(v, ptr, "rules");
    if (rules == nullptr) {
      return;
    }
    const std::string rp = pointerAppend(ptr, "rules");
    if (!rules->is_array()) {
      typeError(*rules, rp, "a list of rules");
      return;
    }
    static constexpr std::array<std::string_view, 3> kAfterOnly = {
        "set_response_headers", "delete_response_headers", "body_replacements"};
    static constexpr std::array<std::string_view, 5> kBeforeOnly = {
        "set_headers", "delete_headers", "set_query", "delete_query", "rewrite_path"};
    for (size_t i = 0; i < rules->size(); ++i) {
      const std::string ip = pointerAppend(rp, i);
      Json& item = (*rules)[i];
      if (!item.is_object()) {
        typeError(item, ip, "a table/mapping");
        continue;
      }
      checkKeys(item, ip,
                {"name", "phase", "hosts", "methods", "path", "action", "callback_id", "timeout_ms",
                 "set_headers", "delete_headers", "set_query", "delete_query", "rewrite_path",
                 "set_response_headers", "delete_response_headers", "body_replacements"});
      auto at = [&](std::string_view key) { return pointerAppend(ip, key); };
      HttpRule r;
      if (Json* f = field(item, ip, "callback_id")) {
        r.callback_id = getString(*f, at("callback_id")).value_or("");
        if (r.callback_id.empty()) {
          error(at("callback_id"), "must be a non-empty string");
        } else if (n.callback_socket.empty()) {
          errorAtKey(at("callback_id"),
                     "a callback rule needs network.interception.callback_socket (the Unix "
                     "socket the callbacks are sent to)");
        }
      }
      if (Json* f = field(item, ip, "timeout_ms")) {
        r.timeout_ms =
            static_cast<int>(getIntegerIn(*f, at("timeout_ms"), 1, kMaxHookTimeoutMs).value_or(0));
        if (r.callback_id.empty()) {
          errorAtKey(at("timeout_ms"), "only for a rule with a callback_id");
        }
      }
      if (Json* f = field(item, ip, "name")) {
        r.name = getString(*f, at("name")).value_or("");
      }
      if (Json* f = field(item, ip, "phase")) {
        if (auto ph = getString(*f, at("phase"))) {
          if (*ph == "before" || *ph == "after") {
            r.phase = *ph == "after" ? HttpRule::Phase::After : HttpRule::Phase::Before;
          } else {
            enumError(at("phase"), *ph, {"before", "after"});
          }
        }
      }
      using KeySpan = std::span<const std::string_view>;
      for (auto key :
           r.phase == HttpRule::Phase::After ? KeySpan(kBeforeOnly) : KeySpan(kAfterOnly)) {
        if (field(item, ip, key) != nullptr) {
          errorAtKey(at(key), fmt::format("only for phase = \"{}\"",
                                          r.phase == HttpRule::Phase::After ? "before" : "after"));
        }
      }
      if (Json* f = field(item, ip, "hosts")) {
        r.hosts = hostPatterns(*f, at("hosts"));
      }
      if (Json* f = field(item, ip, "methods")) {
        r.methods = stringList(*f, at("methods"), [&](const std::string& m, const std::string& p) {
          if (m.empty() || !std::ranges::all_of(m, [](char c) {
                return std::isalpha(static_cast<unsigned char>(c));
              })) {
            error(p, fmt::format("'{}' is not an HTTP method", m));
            return false;
          }
          return true;
        });
        for (auto& m : r.methods) {
          for (char& c : m) {
            c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
          }
        }
      }
      if (Json* f = field(item, ip, "path")) {
        r.path = getString(*f, at("path")).value_or("");
        if (!r.path.empty() && !r.path.starts_with("/") && !r.path.starts_with("*")) {
          error(at("path"), "must be a glob over URL paths (e.g. /v1/*)");
        }
      }
      if (Json* f = field(item, ip, "action")) {
        if (auto a = getString(*f, at("action"))) {
          if (*a == "allow" || *a == "block" || *a == "mutate") {
            r.action = *a == "block"    ? HttpRule::Action::Block
                       : *a == "mutate" ? HttpRule::Action::Mutate
                                        : HttpRule::Action::Allow;
          } else {
            enumError(at("action"), *a, {"allow", "block", "mutate"});
          }
        }
      }
      if (!r.callback_id.empty() && r.action == HttpRule::Action::Block) {
        error(at("action"), "a callback rule cannot block by itself (its callback decides)");
      }
      auto names = [&](const char* key, std::vector<std::string>* out) {
        if (Json* f = field(item, ip, key)) {
          *out =
              stringList(*f, at(key), [](const std::string&, const std::string&) { return true; });
        }
      };
      if (Json* f = field(item, ip, "set_headers")) {
        r.set_headers = headerMap(*f, at("set_headers"), true);
      }
      names("delete_headers", &r.delete_headers);
      if (Json* f = field(item, ip, "set_query")) {
        r.set_query = headerMap(*f, at("set_query"), false);
      }
      names("delete_query", &r.delete_query);
      if (Json* f = field(item, ip, "rewrite_path")) {
        r.rewrite_path = getString(*f, at("rewrite_path")).value_or("");
        if (!r.rewrite_path.starts_with("/") || std::ranges::any_of(r.rewrite_path, [](char c) {
              return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f || c == '?' || c == '#';
            })) {
          error(at("rewrite_path"), "must be an absolute path without spaces, '?' or '#'");
        }
      }
      if (Json* f = field(item, ip, "set_response_headers")) {
        r.set_response_headers = headerMap(*f, at("set_response_headers"), true);
      }
      names("delete_response_headers", &r.delete_response_headers);
      if (Json* f = field(item, ip, "body_replacements")) {
        const std::string bp = at("body_replacements");
        if (!f->is_array()) {
          typeError(*f, bp, "a list of { find, replace } tables");
        } else {
          for (size_t k = 0; k < f->size(); ++k) {
            const std::string ep = pointerAppend(bp, k);
            Json& e = (*f)[k];
            if (!e.is_object()) {
              typeError(e, ep, "a { find, replace } table");
              continue;
            }
            checkKeys(e, ep, {"find", "replace"});
            std::string find;
            std::string replace;
            if (Json* x = field(e, ep, "find")) {
              find = getString(*x, pointerAppend(ep, "find")).value_or("");
            }
            if (Json* x = field(e, ep, "replace")) {
              replace = getString(*x, pointerAppend(ep, "replace")).value_or("");
            }
            if (find.empty()) {
              error(ep, "'find' must be a non-empty string");
              continue;
            }
            r.body_replacements.emplace_back(std::move(find), std::move(replace));
          }
        }
      }
      n.rules.push_back(std::move(r));
    }
  }

  /// `interception = { emit_events = bool, rules = [{ name, ops, path, action, errno }] }`
  void interception(Json& v, const std::string& ptr, Mount& m) {
    if (!v.is_object()) {
      typeError(v, ptr, "a table/mapping");
      return;
    }
    checkKeys(v, ptr, {"emit_events", "rules"});
    if (Json* f = field(v, ptr, "emit_events")) {
      m.emit_events = getBool(*f, pointerAppend(ptr, "emit_events")).value_or(false);
    }
    Json* rules = field(v, ptr, "rules");
    if (rules == nullptr) {
      return;
    }
    const std::string rp = pointerAppend(ptr, "rules");
    if (!rules->is_array()) {
      typeError(*rules, rp, "a list of rules");
      return;
    }
    for (size_t i = 0; i < rules->size(); ++i) {
      const std::string ip = pointerAppend(rp, i);
      Json& item = (*rules)[i];
      if (!item.is_object()) {
        typeError(item, ip, "a table/mapping");
        continue;
      }
      checkKeys(item, ip, {"name", "ops", "path", "action", "errno"});
      auto at = [&](std::string_view key) { return pointerAppend(ip, key); };
      MountRule r;
      if (Json* f = field(item, ip, "name")) {
        r.name = getString(*f, at("name")).value_or("");
      }
      if (Json* f = field(item, ip, "path")) {
        r.path = getString(*f, at("path")).value_or("");
        if (!r.path.empty() && !r.path.starts_with("/") && !r.path.starts_with("*")) {
          error(at("path"), "must be a glob over absolute guest paths (e.g. /workspace/*.key)");
        }
      }
      if (Json* f = field(item, ip, "ops")) {
        r.ops = stringList(*f, at("ops"), [&](const std::string& op, const std::string& p) {
          if (std::ranges::find(kMountRuleOps, op) == kMountRuleOps.end()) {
            enumError(
                p, op,
                {"stat", "readdir", "open", "create", "mkdir", "chmod", "remove", "rename",
                 "symlink", "readlink", "read", "write", "close", "sync", "truncate", "link"});
            return false;
          }
          return true;
        });
      }
      if (Json* f = field(item, ip, "action")) {
        if (auto a = getString(*f, at("action"))) {
          if (*a == "block" || *a == "allow") {
            r.block = *a == "block";
          } else {
            enumError(at("action"), *a, {"block", "allow"});
          }
        }
      }
      if (Json* f = field(item, ip, "errno")) {
        if (auto e = getString(*f, at("errno"))) {
          if (std::ranges::find(kMountRuleErrors, *e) == kMountRuleErrors.end()) {
            enumError(at("errno"), *e,
                      {"EPERM", "EACCES", "EROFS", "ENOENT", "EIO", "ENOSPC", "EEXIST"});
          } else {
            r.error = *e;
          }
        }
      }
      m.rules.push_back(std::move(r));
    }
  }

  std::vector<PortForward> ports(Json& v, const std::string& ptr) {
    std::vector<PortForward> out;
    if (!v.is_array()) {
      typeError(v, ptr, "a list of ports");
      return out;
    }
    std::set<std::pair<std::string, int>> seen;
    for (size_t i = 0; i < v.size(); ++i) {
      std::string pp = pointerAppend(ptr, i);
      Json& item = v[i];
      if (!item.is_object()) {
        typeError(item, pp, "a table/mapping");
        continue;
      }
      checkKeys(item, pp, {"host", "guest", "address", "protocol"});
      auto at = [&](std::string_view key) { return pointerAppend(pp, key); };
      PortForward p;
      if (Json* f = field(item, pp, "guest")) {
        p.guest = static_cast<int>(getIntegerIn(*f, at("guest"), 1, 65535).value_or(0));
      } else {
        error(pp, "missing required key 'guest'");
      }
      if (Json* f = field(item, pp, "host")) {
        p.host = static_cast<int>(getIntegerIn(*f, at("host"), 1, 65535).value_or(0));
      } else {
        p.host = p.guest;  // one port means the same on both sides, as upstream's -p
      }
      if (Json* f = field(item, pp, "address")) {
        if (auto addr = getString(*f, at("address"))) {
          std::string norm;
          if (*addr == "localhost") {
            p.address = "127.0.0.1";
          } else if (isIpLiteral(*addr, &norm)) {
            p.address = norm;
          } else {
            error(at("address"), fmt::format("'{}' is not an IP address or 'localhost'", *addr));
          }
        }
      }
      if (Json* f = field(item, pp, "protocol")) {
        if (auto proto = getString(*f, at("protocol")); proto && *proto != "tcp") {
          enumError(at("protocol"), *proto, {"tcp"});
        }
      }
      if (p.host > 0 && !seen.insert({p.address, p.host}).second) {
        error(pp, fmt::format("host port {}:{} is published twice", p.address, p.host));
      }
      out.push_back(std::move(p));
    }
    return out;
  }

 private:
  Document& doc_;
  std::vector<Diagnostic>& diags_;
  Origin origin_;
};

}  // namespace

DecodedFile decodeDocument(Document& doc, std::vector<Diagnostic>& diags, Origin origin) {
  Decoder decoder(doc, diags, origin);
  return decoder.decode();
}

void checkProject(const Project& project, const std::map<std::string, SandboxLocation>& where,
                  std::vector<Diagnostic>& diags) {
  auto diag_at = [&](const std::string& sandbox, const std::string& sub, std::string msg) {
    auto it = where.find(sandbox);
    if (it == where.end() || it->second.doc == nullptr) {
      diags.push_back(
          Diagnostic{"<project>", {}, fmt::format("sandboxes.{}", sandbox), std::move(msg)});
      return;
    }
    const Document& d = *it->second.doc;
    std::string ptr = it->second.pointer + sub;
    diags.push_back(Diagnostic{d.file, d.positionOf(ptr), dottedPath(d.tree, ptr), std::move(msg)});
  };
  // depends_on targets exist.
  for (const auto& [name, s] : project.sandboxes) {
    for (size_t i = 0; i < s.depends_on.size(); ++i) {
      if (!project.sandboxes.contains(s.depends_on[i])) {
        diag_at(name, fmt::format("/depends_on/{}", i),
                fmt::format("depends on unknown sandbox '{}'", s.depends_on[i]));
      }
    }
  }
  // Cycles: depth-first search with colours; report each cycle once, at its first member.
  std::map<std::string, int> colour;  // 0 white, 1 grey, 2 black
  std::vector<std::string> stack;
  std::function<void(const std::string&)> visit = [&](const std::string& n) {
    colour[n] = 1;
    stack.push_back(n);
    const SandboxSpec& s = project.sandboxes.at(n);
    for (size_t i = 0; i < s.depends_on.size(); ++i) {
      const std::string& dep = s.depends_on[i];
      if (!project.sandboxes.contains(dep) || dep == n) {
        continue;
      }
      if (colour[dep] == 1) {
        auto from = std::ranges::find(stack, dep);
        std::vector<std::string> cycle(from, stack.end());
        cycle.push_back(dep);
        diag_at(n, fmt::format("/depends_on/{}", i),
                fmt::format("dependency cycle: {}", join(cycle, " -> ")));
      } else if (colour[dep] == 0) {
        visit(dep);
      }
    }
    stack.pop_back();
    colour[n] = 2;
  };
  for (const auto& [name, s] : project.sandboxes) {
    if (colour[name] == 0) {
      visit(name);
    }
  }
  // Published host ports are unique across the project.
  std::map<std::pair<std::string, int>, std::string> owners;
  for (const auto& [name, s] : project.sandboxes) {
    for (size_t i = 0; i < s.ports.size(); ++i) {
      const PortForward& p = s.ports[i];
      if (p.host <= 0) {
        continue;
      }
      auto [it, inserted] = owners.emplace(std::make_pair(p.address, p.host), name);
      if (!inserted && it->second != name) {
        diag_at(name, fmt::format("/ports/{}", i),
                fmt::format("host port {}:{} is already published by sandbox '{}'", p.address,
                            p.host, it->second));
      }
    }
  }
}

Result<int64_t> parseSizeMib(const nlohmann::json& value) {
  if (value.is_number_integer()) {
    int64_t n = value.get<int64_t>();
    if (n < 0) {
      return makeError(Errc::InvalidSpec, "a size cannot be negative");
    }
    return n;
  }
  if (!value.is_string()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("expected a size (integer MiB or a string like \"1GiB\"), got {}",
                                 typeName(value)));
  }
  static const std::regex re(R"(^\s*([0-9]{1,9})(?:\.([0-9]{1,3}))?\s*([A-Za-z]*)\s*$)");
  const std::string& s = value.get_ref<const std::string&>();
  std::smatch m;
  if (!std::regex_match(s, m, re)) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid size '{}': expected a number with an optional unit "
                                 "(KiB, MiB, GiB, TiB)",
                                 s));
  }
  static const std::map<std::string, uint64_t, std::less<>> kUnits = {
      {"", 1024},
      {"k", 1},
      {"K", 1},
      {"Ki", 1},
      {"KiB", 1},
      {"m", 1024},
      {"M", 1024},
      {"Mi", 1024},
      {"MiB", 1024},
      {"g", 1024 * 1024},
      {"G", 1024 * 1024},
      {"Gi", 1024 * 1024},
      {"GiB", 1024 * 1024},
      {"t", 1024ULL * 1024 * 1024},
      {"T", 1024ULL * 1024 * 1024},
      {"Ti", 1024ULL * 1024 * 1024},
      {"TiB", 1024ULL * 1024 * 1024}};
  std::string unit = m[3].str();
  auto it = kUnits.find(unit);
  if (it == kUnits.end()) {
    std::string hint =
        (unit == "KB" || unit == "MB" || unit == "GB" || unit == "TB" || unit == "kB")
            ? fmt::format(" (decimal units are ambiguous; write {}iB)",
                          unit.substr(0, 1) == "k" ? "K" : unit.substr(0, 1))
            : "";
    return makeError(
        Errc::InvalidSpec,
        fmt::format("invalid size unit '{}' in '{}': use KiB, MiB, GiB or TiB{}", unit, s, hint));
  }
  // Exact arithmetic in KiB: value = (int * 10^d + frac) / 10^d units of `kib_per_unit` KiB.
  uint64_t int_part = std::stoull(m[1].str());
  std::string frac = m[2].str();
  uint64_t scale = 1;
  for (size_t i = 0; i < frac.size(); ++i) {
    scale *= 10;
  }
  uint64_t numerator = int_part * scale + (frac.empty() ? 0 : std::stoull(frac));
  uint64_t kib_times_scale = numerator * it->second;
  if (kib_times_scale % scale != 0 || (kib_times_scale / scale) % 1024 != 0) {
    return makeError(Errc::InvalidSpec, fmt::format("size '{}' is not a whole number of MiB", s));
  }
  return static_cast<int64_t>(kib_times_scale / scale / 1024);
}

Result<int64_t> parseDurationMs(const nlohmann::json& value) {
  if (value.is_number_integer()) {
    int64_t n = value.get<int64_t>();
    if (n < 0) {
      return makeError(Errc::InvalidSpec, "a duration cannot be negative");
    }
    return n * 1000;
  }
  if (!value.is_string()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("expected a duration (integer seconds or a string like \"30s\"), "
                                 "got {}",
                                 typeName(value)));
  }
  static const std::regex part(R"(([0-9]+(?:\.[0-9]+)?)(ns|us|µs|μs|ms|s|m|h))");
  const std::string& s = value.get_ref<const std::string&>();
  if (s == "0") {
    return 0;
  }
  double total_ms = 0;
  size_t consumed = 0;
  for (auto it = std::sregex_iterator(s.begin(), s.end(), part); it != std::sregex_iterator();
       ++it) {
    if (static_cast<size_t>(it->position()) != consumed) {
      break;
    }
    consumed += static_cast<size_t>(it->length());
    double n = std::stod((*it)[1].str());
    std::string unit = (*it)[2].str();
    double factor = unit == "h"    ? 3600e3
                    : unit == "m"  ? 60e3
                    : unit == "s"  ? 1e3
                    : unit == "ms" ? 1
                    : unit == "ns" ? 1e-6
                                   : 1e-3;
    total_ms += n * factor;
  }
  if (s.empty() || consumed != s.size()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid duration '{}': expected e.g. \"30s\", \"1m30s\", "
                                 "\"500ms\"",
                                 s));
  }
  if (total_ms > 366.0 * 24 * 3600e3) {
    return makeError(Errc::InvalidSpec, fmt::format("duration '{}' is too long", s));
  }
  return static_cast<int64_t>(total_ms);
}

std::string formatDurationMs(int64_t ms) {
  if (ms == 0) {
    return "0s";
  }
  std::string out;
  int64_t h = ms / 3600000;
  ms %= 3600000;
  int64_t m = ms / 60000;
  ms %= 60000;
  int64_t s = ms / 1000;
  ms %= 1000;
  if (h > 0) {
    out += fmt::format("{}h", h);
  }
  if (m > 0) {
    out += fmt::format("{}m", m);
  }
  if (s > 0) {
    out += fmt::format("{}s", s);
  }
  if (ms > 0) {
    out += fmt::format("{}ms", ms);
  }
  return out;
}

bool isValidGuestMountPath(const std::string& path) {
  if (!std::regex_match(path, guestPathRe())) {
    return false;
  }
  for (const auto& part : std::filesystem::path(path)) {
    if (part == "..") {
      return false;
    }
  }
  return std::filesystem::path(path).lexically_normal() != "/" &&
         path.find_first_not_of('/') != std::string::npos;
}

std::string shadowingVfsMount(const std::vector<Mount>& mounts, const std::string& target) {
  for (const Mount& m : mounts) {
    if (isBlockMount(m.mode) || m.target.empty()) {
      continue;
    }
    if (target == m.target || target.starts_with(m.target + "/")) {
      return m.target;
    }
  }
  return {};
}

std::string_view toString(MountMode m) {
  switch (m) {
    case MountMode::Overlay:
      return "overlay";
    case MountMode::ReadWrite:
      return "rw";
    case MountMode::ReadOnly:
      return "ro";
    case MountMode::Memory:
      return "memory";
    case MountMode::Volume:
      return "volume";
    case MountMode::Disk:
      return "disk";
  }
  return "overlay";
}

std::string_view toString(RestartPolicy r) {
  switch (r) {
    case RestartPolicy::No:
      return "no";
    case RestartPolicy::OnFailure:
      return "on-failure";
    case RestartPolicy::Always:
      return "always";
    case RestartPolicy::UnlessStopped:
      return "unless-stopped";
  }
  return "no";
}

std::string_view toString(SecretRef::Kind k) {
  switch (k) {
    case SecretRef::Kind::Env:
      return "env";
    case SecretRef::Kind::File:
      return "file";
    case SecretRef::Kind::Command:
      return "command";
    case SecretRef::Kind::Inline:
      return "inline";
  }
  return "env";
}

}  // namespace matchlock::spec
