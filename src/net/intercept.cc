// SPDX-License-Identifier: Apache-2.0
#include "net/intercept.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>

#include "common/base64.h"
#include "common/strings.h"
#include "net/policy.h"

namespace matchlock::net {
namespace {

std::string toUpper(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return out;
}

using Pairs = std::vector<std::pair<std::string, std::string>>;

nlohmann::json pairsJson(const Pairs& pairs) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [k, v] : pairs) {
    out[k] = v;
  }
  return out;
}

nlohmann::json replacementsJson(const Pairs& pairs) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [f, r] : pairs) {
    out.push_back({{"find", f}, {"replace", r}});
  }
  return out;
}

/// Decodes %XX and '+' of a query component.
std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%' && i + 2 < s.size() &&
               std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
               std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string escape(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

/// Applies set_query / delete_query to a raw query; parameters untouched keep their bytes.
std::string editQuery(std::string_view query, const Pairs& set,
                      const std::vector<std::string>& del) {
  std::vector<std::pair<std::string, std::string>> params;  // {decoded key, raw "k=v"}
  for (const std::string& part : split(query, '&')) {
    if (part.empty()) {
      continue;
    }
    size_t eq = part.find('=');
    params.emplace_back(unescape(part.substr(0, eq)), part);
  }
  auto drop = [&](const std::string& key) {
    std::erase_if(params, [&](const auto& p) { return p.first == key; });
  };
  for (const auto& k : del) {
    drop(k);
  }
  for (const auto& [k, v] : set) {
    drop(k);
    params.emplace_back(k, escape(k) + "=" + escape(v));
  }
  std::vector<std::string> raw;
  raw.reserve(params.size());
  for (auto& p : params) {
    raw.push_back(std::move(p.second));
  }
  return join(raw, "&");
}

bool classMatch(std::string_view pattern, size_t* i, char c, bool* ok) {
  // At pattern[*i] == '['; on return *i is past ']'.
  size_t p = *i + 1;
  bool negate = p < pattern.size() && (pattern[p] == '^' || pattern[p] == '!');
  if (negate) {
    ++p;
  }
  bool matched = false;
  bool first = true;
  while (p < pattern.size() && (first || pattern[p] != ']')) {
    first = false;
    char lo = pattern[p];
    if (lo == '\\' && p + 1 < pattern.size()) {
      lo = pattern[++p];
    }
    char hi = lo;
    if (p + 2 < pattern.size() && pattern[p + 1] == '-' && pattern[p + 2] != ']') {
      hi = pattern[p + 2];
      if (hi == '\\' && p + 3 < pattern.size()) {
        hi = pattern[p + 3];
        ++p;
      }
      p += 2;
    }
    if (lo <= c && c <= hi) {
      matched = true;
    }
    ++p;
  }
  if (p >= pattern.size()) {
    *ok = false;  // unterminated class: a bad pattern
    return false;
  }
  *i = p + 1;
  return matched != negate;
}

bool globAt(std::string_view pat, size_t pi, std::string_view s, size_t si, int depth, bool* ok) {
  if (depth > 64) {
    *ok = false;
    return false;
  }
  while (pi < pat.size()) {
    char c = pat[pi];
    if (c == '*') {
      while (pi < pat.size() && pat[pi] == '*') {
        ++pi;
      }
      for (size_t k = si;; ++k) {
        if (globAt(pat, pi, s, k, depth + 1, ok)) {
          return true;
        }
        if (!*ok || k >= s.size() || s[k] == '/') {
          return false;
        }
      }
    }
    if (si >= s.size()) {
      return false;
    }
    if (c == '?') {
      if (s[si] == '/') {
        return false;
      }
      ++pi;
      ++si;
      continue;
    }
    if (c == '[') {
      if (s[si] == '/') {
        return false;
      }
      if (!classMatch(pat, &pi, s[si], ok)) {
        return false;
      }
      ++si;
      continue;
    }
    if (c == '\\') {
      if (++pi >= pat.size()) {
        *ok = false;
        return false;
      }
      c = pat[pi];
    }
    if (s[si] != c) {
      return false;
    }
    ++pi;
    ++si;
  }
  return si == s.size();
}

void applyHeaders(http::Head* head, const Pairs& set, const std::vector<std::string>& del) {
  for (const auto& name : del) {
    head->remove(name);
  }
  for (const auto& [name, value] : set) {
    head->set(name, value);
  }
}

bool validHeaderName(std::string_view name) {
  if (name.empty()) {
    return false;
  }
  return std::ranges::all_of(name, [](char ch) {
    auto c = static_cast<unsigned char>(ch);
    return std::isalnum(c) ||
           std::string_view("!#$%&'*+-.^_`|~").find(ch) != std::string_view::npos;
  });
}

bool validHeaderValue(std::string_view v) {
  return std::ranges::none_of(v, [](char c) { return c == '\r' || c == '\n' || c == '\0'; });
}

/// A path a rule or a callback may put in the request line: absolute, no controls, no spaces,
/// no '?' or '#' (the query is set separately).
bool validRequestPath(std::string_view p) {
  return p.starts_with('/') && std::ranges::none_of(p, [](char c) {
           return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f || c == '?' || c == '#';
         });
}

}  // namespace

nlohmann::json toJson(const std::vector<HttpRule>& rules) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rules) {
    out.push_back({{"name", r.name},
                   {"phase", r.phase == HttpRule::Phase::After ? "after" : "before"},
                   {"hosts", r.hosts},
                   {"methods", r.methods},
                   {"path", r.path},
                   {"action", r.action == HttpRule::Action::Block    ? "block"
                              : r.action == HttpRule::Action::Mutate ? "mutate"
                                                                     : "allow"},
                   {"set_headers", pairsJson(r.set_headers)},
                   {"delete_headers", r.delete_headers},
                   {"set_query", pairsJson(r.set_query)},
                   {"delete_query", r.delete_query},
                   {"rewrite_path", r.rewrite_path},
                   {"set_response_headers", pairsJson(r.set_response_headers)},
                   {"delete_response_headers", r.delete_response_headers},
                   {"body_replacements", replacementsJson(r.body_replacements)},
                   {"callback_id", r.callback_id},
                   {"timeout_ms", r.timeout_ms}});
  }
  return out;
}

Result<std::vector<HttpRule>> httpRulesFromJson(const nlohmann::json& j) {
  if (!j.is_array()) {
    return makeError(Errc::InvalidSpec, "interception rules: expected an array");
  }
  std::vector<HttpRule> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& e = j[i];
    auto fail = [&](std::string_view field, std::string_view why) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("interception.rules[{}].{}: {}", i, field, why));
    };
    if (!e.is_object()) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("interception.rules[{}]: expected an object", i));
    }
    try {
      HttpRule r;
      r.name = e.value("name", "");
      std::string phase = e.value("phase", "before");
      r.phase = phase == "after" ? HttpRule::Phase::After : HttpRule::Phase::Before;
      r.hosts = e.value("hosts", std::vector<std::string>{});
      r.methods = e.value("methods", std::vector<std::string>{});
      for (auto& m : r.methods) {
        m = toUpper(m);
      }
      r.path = e.value("path", "");
      std::string action = e.value("action", "allow");
      r.action = action == "block"    ? HttpRule::Action::Block
                 : action == "mutate" ? HttpRule::Action::Mutate
                                      : HttpRule::Action::Allow;
      auto pairs = [&](const char* key, Pairs* outp, bool headers) -> Status {
        const nlohmann::json map = e.value(key, nlohmann::json::object());
        if (!map.is_object()) {
          return fail(key, "expected a table of strings");
        }
        for (const auto& [k, v] : map.items()) {
          if (!v.is_string()) {
            return fail(fmt::format("{}.{}", key, k), "expected a string");
          }
          if (headers && (!validHeaderName(k) || !validHeaderValue(v.get<std::string>()))) {
            return fail(fmt::format("{}.{}", key, k), "not a valid header name and value");
          }
          if (!k.empty()) {
            outp->emplace_back(k, v.get<std::string>());
          }
        }
        return ok();
      };
      ML_RETURN_IF_ERROR(pairs("set_headers", &r.set_headers, true));
      ML_RETURN_IF_ERROR(pairs("set_query", &r.set_query, false));
      ML_RETURN_IF_ERROR(pairs("set_response_headers", &r.set_response_headers, true));
      r.delete_headers = e.value("delete_headers", std::vector<std::string>{});
      r.delete_query = e.value("delete_query", std::vector<std::string>{});
      r.delete_response_headers = e.value("delete_response_headers", std::vector<std::string>{});
      r.rewrite_path = e.value("rewrite_path", "");
      if (!r.rewrite_path.empty() && !validRequestPath(r.rewrite_path)) {
        return fail("rewrite_path", "must be an absolute path without spaces, '?' or '#'");
      }
      const nlohmann::json replacements = e.value("body_replacements", nlohmann::json::array());
      for (const auto& br : replacements) {
        std::string find = br.value("find", "");
        if (!find.empty()) {
          r.body_replacements.emplace_back(find, br.value("replace", ""));
        }
      }
      r.callback_id = e.value("callback_id", "");
      r.timeout_ms = e.value("timeout_ms", 0);
      if (r.timeout_ms < 0 || r.timeout_ms > spec::kMaxHookTimeoutMs) {
        return fail("timeout_ms", fmt::format("must be within 0..{}", spec::kMaxHookTimeoutMs));
      }
      out.push_back(std::move(r));
    } catch (const nlohmann::json::exception& ex) {
      return makeError(Errc::InvalidSpec, fmt::format("interception.rules[{}]: {}", i, ex.what()));
    }
  }
  return out;
}

bool matchPathGlob(std::string_view pattern, std::string_view path) {
  bool ok = true;
  bool matched = globAt(pattern, 0, path, 0, 0, &ok);
  return ok && matched;
}

std::shared_ptr<const HttpRules> HttpRules::compile(std::vector<HttpRule> rules,
                                                    std::string callback_socket) {
  auto out = std::make_shared<HttpRules>();
  out->callback_socket_ = std::move(callback_socket);
  for (auto& r : rules) {
    const bool changes = !r.set_headers.empty() || !r.delete_headers.empty() ||
                         !r.set_query.empty() || !r.delete_query.empty() ||
                         !r.rewrite_path.empty() || !r.set_response_headers.empty() ||
                         !r.delete_response_headers.empty() || !r.body_replacements.empty();
    if (out->callback_socket_.empty()) {
      r.callback_id.clear();
    }
    if (r.action == HttpRule::Action::Allow && changes) {
      r.action = HttpRule::Action::Mutate;
    }
    if (r.action == HttpRule::Action::Block || (r.action == HttpRule::Action::Mutate && changes) ||
        !r.callback_id.empty()) {
      out->after_callbacks_ |= r.phase == HttpRule::Phase::After && !r.callback_id.empty();
      out->rules_.push_back(std::move(r));
    }
  }
  return out;
}

bool HttpRules::matches(const HttpRule& r, std::string_view host, std::string_view method,
                        std::string_view path) const {
  if (!r.hosts.empty() && std::ranges::none_of(r.hosts, [&](const std::string& p) {
        return matchHostPattern(p, host);
      })) {
    return false;
  }
  if (!r.methods.empty() && std::ranges::find(r.methods, toUpper(method)) == r.methods.end()) {
    return false;
  }
  return r.path.empty() || matchPathGlob(r.path, path);
}

namespace {

/// Go's canonical MIME header key ("content-type" → "Content-Type"), as upstream's maps use.
std::string canonicalHeader(std::string_view name) {
  std::string out(name);
  bool upper = true;
  for (char& c : out) {
    auto u = static_cast<unsigned char>(c);
    c = static_cast<char>(upper ? std::toupper(u) : std::tolower(u));
    upper = c == '-';
  }
  return out;
}

nlohmann::json headerLists(const http::Head& head) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& h : head.headers) {
    out[canonicalHeader(h.name)].push_back(h.value);
  }
  return out;
}

nlohmann::json firstQueryValues(std::string_view query) {
  nlohmann::json out = nlohmann::json::object();
  for (const std::string& part : split(query, '&')) {
    if (part.empty()) {
      continue;
    }
    size_t eq = part.find('=');
    std::string key = unescape(std::string_view(part).substr(0, eq));
    if (!out.contains(key)) {
      out[key] = eq == std::string::npos ? "" : unescape(std::string_view(part).substr(eq + 1));
    }
  }
  return out;
}

HookCall hookCall(const HttpRule& r, const std::string& socket, std::string_view phase,
                  std::string_view host, const http::Head& request) {
  HookCall call;
  call.rule = r.name.empty() ? r.callback_id : r.name;
  call.socket = socket;
  call.timeout =
      std::chrono::milliseconds(r.timeout_ms > 0 ? r.timeout_ms : spec::kDefaultHookTimeoutMs);
  call.request = {{"callback_id", r.callback_id},
                  {"phase", phase},
                  {"host", host},
                  {"method", request.method},
                  {"path", request.path()},
                  {"query", firstQueryValues(request.query())},
                  {"request_headers", headerLists(request)}};
  return call;
}

std::string blockName(const HttpRule& r) {
  return r.name.empty() ? "(unnamed rule)" : r.name;
}

}  // namespace

RuleStep HttpRules::before(std::string_view host, http::Head* head, size_t* cursor) const {
  RuleStep step;
  while (*cursor < rules_.size()) {
    const HttpRule& r = rules_[(*cursor)++];
    if (r.phase != HttpRule::Phase::Before || !matches(r, host, head->method, head->path())) {
      continue;
    }
    if (r.action == HttpRule::Action::Block) {
      step.blocked_by = blockName(r);
      return step;
    }
    applyHeaders(head, r.set_headers, r.delete_headers);
    if (!r.set_query.empty() || !r.delete_query.empty() || !r.rewrite_path.empty()) {
      std::string path = r.rewrite_path.empty() ? std::string(head->path()) : r.rewrite_path;
      std::string query = editQuery(head->query(), r.set_query, r.delete_query);
      head->target = query.empty() ? path : path + "?" + query;
    }
    if (!r.callback_id.empty()) {
      step.call = hookCall(r, callback_socket_, "before", host, *head);
      return step;
    }
  }
  return step;
}

RuleStep HttpRules::after(std::string_view host, const http::Head& request, http::Head* response,
                          BodyPlan* plan, size_t* cursor) const {
  RuleStep step;
  while (*cursor < rules_.size()) {
    const HttpRule& r = rules_[(*cursor)++];
    if (r.phase != HttpRule::Phase::After || !matches(r, host, request.method, request.path())) {
      continue;
    }
    if (r.action == HttpRule::Action::Block) {
      plan->blocked = true;
      plan->blocked_by = blockName(r);
      step.blocked_by = plan->blocked_by;
      return step;
    }
    applyHeaders(response, r.set_response_headers, r.delete_response_headers);
    plan->replacements.insert(plan->replacements.end(), r.body_replacements.begin(),
                              r.body_replacements.end());
    if (!r.callback_id.empty()) {
      step.call = hookCall(r, callback_socket_, "after", host, request);
      step.call->request["status_code"] = response->status;
      step.call->request["response_headers"] = headerLists(*response);
      step.call->request["is_sse"] =
          toLower(response->find("content-type").value_or("")).starts_with("text/event-stream");
      return step;
    }
  }
  return step;
}

namespace {

/// A map of the answer: name → string or list of strings. Header names must be tokens; query
/// keys may be anything (they are percent-encoded when the target is rebuilt).
Result<std::vector<http::Header>> answerMap(const nlohmann::json& j, std::string_view where,
                                            bool header_names) {
  if (!j.is_object()) {
    return makeError(Errc::Protocol, fmt::format("{}: expected an object", where));
  }
  std::vector<http::Header> out;
  for (const auto& [name, v] : j.items()) {
    if (header_names && !validHeaderName(name)) {
      return makeError(Errc::Protocol, fmt::format("{}: '{}' is not a header name", where, name));
    }
    std::vector<std::string> values;
    if (v.is_string()) {
      values.push_back(v.get<std::string>());
    } else if (v.is_array()) {
      for (const auto& x : v) {
        if (!x.is_string()) {
          return makeError(Errc::Protocol, fmt::format("{}.{}: expected strings", where, name));
        }
        values.push_back(x.get<std::string>());
      }
    } else if (!v.is_null()) {
      return makeError(Errc::Protocol,
                       fmt::format("{}.{}: expected a string or a list", where, name));
    }
    for (auto& value : values) {
      if (!validHeaderValue(value)) {
        return makeError(
            Errc::Protocol,
            fmt::format("{}.{}: a header value cannot hold CR, LF or NUL", where, name));
      }
      out.push_back({name, std::move(value)});
    }
  }
  return out;
}

const nlohmann::json* member(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

/// Replaces every header but the `kept` ones (whatever the answer says about those).
void replaceHeaders(http::Head* head, const std::vector<http::Header>& with,
                    std::initializer_list<std::string_view> kept) {
  auto isKept = [&](std::string_view name) {
    return std::ranges::any_of(kept, [&](std::string_view k) { return k == toLower(name); });
  };
  std::vector<http::Header> next;
  for (auto& h : head->headers) {
    if (isKept(h.name)) {
      next.push_back(std::move(h));
    }
  }
  for (const auto& h : with) {
    if (!isKept(h.name)) {
      next.push_back(h);
    }
  }
  head->headers = std::move(next);
}

}  // namespace

Result<HookAnswer> parseHookAnswer(std::string_view bytes) {
  nlohmann::json j = nlohmann::json::parse(bytes, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return makeError(Errc::Protocol, "the answer is not a JSON object");
  }
  HookAnswer a;
  if (const auto* e = member(j, "error")) {
    if (!e->is_string()) {
      return makeError(Errc::Protocol, "error: expected a string");
    }
    if (!e->get<std::string>().empty()) {
      return makeError(Errc::Protocol,
                       fmt::format("the callback reported: {}", e->get<std::string>()));
    }
  }
  if (const auto* act = member(j, "action")) {
    std::string action = act->is_string() ? act->get<std::string>() : "?";
    if (action == "block") {
      a.block = true;
    } else if (action != "" && action != "allow" && action != "mutate") {
      return makeError(Errc::Protocol, "action: expected allow, block or mutate");
    }
  }
  if (const auto* req = member(j, "request")) {
    if (!req->is_object()) {
      return makeError(Errc::Protocol, "request: expected an object");
    }
    if (const auto* h = member(*req, "headers")) {
      ML_ASSIGN_OR_RETURN(a.request_headers, answerMap(*h, "request.headers", true));
    }
    if (const auto* q = member(*req, "query")) {
      ML_ASSIGN_OR_RETURN(auto params, answerMap(*q, "request.query", false));
      a.query.emplace();
      for (auto& p : params) {
        a.query->emplace_back(std::move(p.name), std::move(p.value));
      }
    }
    if (const auto* path = member(*req, "path")) {
      if (!path->is_string()) {
        return makeError(Errc::Protocol, "request.path: expected a string");
      }
      std::string p = path->get<std::string>();
      if (!p.empty()) {
        if (!validRequestPath(p)) {
          return makeError(Errc::Protocol,
                           "request.path: must be an absolute path without spaces, '?' or '#'");
        }
        a.path = std::move(p);
      }
    }
  }
  if (const auto* resp = member(j, "response")) {
    if (!resp->is_object()) {
      return makeError(Errc::Protocol, "response: expected an object");
    }
    if (const auto* h = member(*resp, "headers")) {
      ML_ASSIGN_OR_RETURN(a.response_headers, answerMap(*h, "response.headers", true));
    }
    if (const auto* br = member(*resp, "body_replacements")) {
      if (!br->is_array()) {
        return makeError(Errc::Protocol, "response.body_replacements: expected a list");
      }
      for (const auto& r : *br) {
        const auto* f = r.is_object() ? member(r, "find") : nullptr;
        const auto* t = r.is_object() ? member(r, "replace") : nullptr;
        if (f == nullptr || !f->is_string() || (t != nullptr && !t->is_string())) {
          return makeError(Errc::Protocol,
                           "response.body_replacements: expected {find, replace} strings");
        }
        if (!f->get<std::string>().empty()) {
          a.body_replacements.emplace_back(f->get<std::string>(),
                                           t == nullptr ? "" : t->get<std::string>());
        }
      }
    }
    if (const auto* b = member(*resp, "set_body_base64")) {
      if (!b->is_string()) {
        return makeError(Errc::Protocol, "response.set_body_base64: expected a string");
      }
      if (!b->get<std::string>().empty()) {
        auto body = base64Decode(b->get<std::string>());
        if (!body) {
          return makeError(Errc::Protocol, "response.set_body_base64: not base64");
        }
        a.set_body = std::move(*body);
      }
    }
  }
  return a;
}

bool applyBeforeAnswer(const HookAnswer& a, http::Head* request) {
  if (a.block) {
    return true;
  }
  if (a.request_headers) {
    replaceHeaders(request, *a.request_headers, {"host", "content-length", "transfer-encoding"});
  }
  if (a.query || a.path) {
    std::string path = a.path ? *a.path : std::string(request->path());
    std::string query(request->query());
    if (a.query) {
      std::vector<std::string> raw;
      raw.reserve(a.query->size());
      for (const auto& [k, v] : *a.query) {
        raw.push_back(escape(k) + "=" + escape(v));
      }
      query = join(raw, "&");
    }
    request->target = query.empty() ? path : path + "?" + query;
  }
  return false;
}

bool applyAfterAnswer(const HookAnswer& a, http::Head* response, BodyPlan* plan) {
  if (a.block) {
    plan->blocked = true;
    return true;
  }
  if (a.response_headers) {
    replaceHeaders(response, *a.response_headers, {"content-length", "transfer-encoding"});
  }
  plan->replacements.insert(plan->replacements.end(), a.body_replacements.begin(),
                            a.body_replacements.end());
  if (a.set_body) {
    plan->set_body = a.set_body;
  }
  return false;
}

std::string replaceAll(std::string body, const Pairs& replacements) {
  for (const auto& [find, repl] : replacements) {
    if (find.empty()) {
      continue;
    }
    std::string out;
    size_t pos = 0;
    for (size_t hit; (hit = body.find(find, pos)) != std::string::npos; pos = hit + find.size()) {
      out.append(body, pos, hit - pos);
      out += repl;
    }
    out.append(body, pos);
    body = std::move(out);
  }
  return body;
}

std::string SseRewriter::line(std::string_view text) const {
  if (!text.starts_with("data:")) {
    return std::string(text);
  }
  return "data:" + replaceAll(std::string(text.substr(5)), replacements_);
}

std::string SseRewriter::feed(std::string_view data) {
  std::string out;
  for (char c : data) {
    if (pending_cr_) {
      pending_cr_ = false;
      if (c == '\n') {
        out += '\n';  // the LF of a CRLF whose line went out with the CR
        continue;
      }
    }
    if (c == '\n' || c == '\r') {
      out += line(pending_);
      out += c;
      pending_.clear();
      pending_cr_ = c == '\r';
      continue;
    }
    pending_ += c;
    if (pending_.size() > kMaxLine) {
      out += pending_;  // not an event stream we can rewrite: pass it on unchanged
      pending_.clear();
    }
  }
  return out;
}

std::string SseRewriter::finish() {
  std::string out = line(pending_);
  pending_.clear();
  return out;
}

std::string ChunkedDecoder::feed(std::string_view data, size_t* consumed) {
  std::string out;
  size_t i = 0;
  while (i < data.size() && state_ != State::Done && state_ != State::Failed) {
    char c = data[i];
    switch (state_) {
      case State::Size:
        if (c == '\r') {
          state_ = State::SizeLf;
        } else if (line_.size() > 1024) {
          state_ = State::Failed;
        } else {
          line_ += c;
        }
        ++i;
        break;
      case State::SizeLf: {
        if (c != '\n') {
          state_ = State::Failed;
          break;
        }
        ++i;
        std::string_view size = line_;
        size = size.substr(0, size.find(';'));
        size = trim(size);
        uint64_t n = 0;
        if (size.empty() || size.size() > 15) {
          state_ = State::Failed;
          break;
        }
        for (char h : size) {
          int v = std::isdigit(static_cast<unsigned char>(h)) ? h - '0'
                  : (h >= 'a' && h <= 'f')                    ? h - 'a' + 10
                  : (h >= 'A' && h <= 'F')                    ? h - 'A' + 10
                                                              : -1;
          if (v < 0) {
            state_ = State::Failed;
            break;
          }
          n = n * 16 + static_cast<uint64_t>(v);
        }
        if (state_ == State::Failed) {
          break;
        }
        line_.clear();
        remaining_ = n;
        state_ = n == 0 ? State::Trailer : State::Data;
        break;
      }
      case State::Data: {
        size_t take = static_cast<size_t>(std::min<uint64_t>(remaining_, data.size() - i));
        out.append(data.substr(i, take));
        i += take;
        remaining_ -= take;
        if (remaining_ == 0) {
          state_ = State::DataCr;
        }
        break;
      }
      case State::DataCr:
        state_ = c == '\r' ? State::DataLf : State::Failed;
        ++i;
        break;
      case State::DataLf:
        state_ = c == '\n' ? State::Size : State::Failed;
        ++i;
        break;
      case State::Trailer:
        // Trailer lines until an empty one; kept bounded, then dropped (none are forwarded).
        ++i;
        if (c == '\n') {
          if (line_ == "\r") {
            state_ = State::Done;
          }
          line_.clear();
        } else if (line_.size() > 8192) {
          state_ = State::Failed;
        } else {
          line_ += c;
        }
        break;
      case State::Done:
      case State::Failed:
        break;
    }
  }
  *consumed = i;
  return out;
}

}  // namespace matchlock::net
