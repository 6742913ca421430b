// SPDX-License-Identifier: Apache-2.0
#include "net/intercept.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>

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
                   {"body_replacements", replacementsJson(r.body_replacements)}});
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
      if (!r.rewrite_path.empty() &&
          (r.rewrite_path[0] != '/' ||
           r.rewrite_path.find_first_of(" \r\n\t?#") != std::string::npos)) {
        return fail("rewrite_path", "must be an absolute path without spaces, '?' or '#'");
      }
      const nlohmann::json replacements = e.value("body_replacements", nlohmann::json::array());
      for (const auto& br : replacements) {
        std::string find = br.value("find", "");
        if (!find.empty()) {
          r.body_replacements.emplace_back(find, br.value("replace", ""));
        }
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

std::shared_ptr<const HttpRules> HttpRules::compile(std::vector<HttpRule> rules) {
  auto out = std::make_shared<HttpRules>();
  for (auto& r : rules) {
    const bool changes = !r.set_headers.empty() || !r.delete_headers.empty() ||
                         !r.set_query.empty() || !r.delete_query.empty() ||
                         !r.rewrite_path.empty() || !r.set_response_headers.empty() ||
                         !r.delete_response_headers.empty() || !r.body_replacements.empty();
    if (r.action == HttpRule::Action::Allow && changes) {
      r.action = HttpRule::Action::Mutate;
    }
    if (r.action == HttpRule::Action::Block || (r.action == HttpRule::Action::Mutate && changes)) {
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

std::string HttpRules::before(std::string_view host, http::Head* head) const {
  for (const auto& r : rules_) {
    if (r.phase != HttpRule::Phase::Before || !matches(r, host, head->method, head->path())) {
      continue;
    }
    if (r.action == HttpRule::Action::Block) {
      return r.name.empty() ? "(unnamed rule)" : r.name;
    }
    applyHeaders(head, r.set_headers, r.delete_headers);
    if (!r.set_query.empty() || !r.delete_query.empty() || !r.rewrite_path.empty()) {
      std::string path = r.rewrite_path.empty() ? std::string(head->path()) : r.rewrite_path;
      std::string query = editQuery(head->query(), r.set_query, r.delete_query);
      head->target = query.empty() ? path : path + "?" + query;
    }
  }
  return "";
}

BodyPlan HttpRules::after(std::string_view host, std::string_view method, std::string_view path,
                          http::Head* head) const {
  BodyPlan plan;
  for (const auto& r : rules_) {
    if (r.phase != HttpRule::Phase::After || !matches(r, host, method, path)) {
      continue;
    }
    if (r.action == HttpRule::Action::Block) {
      plan.blocked = true;
      plan.blocked_by = r.name.empty() ? "(unnamed rule)" : r.name;
      return plan;
    }
    applyHeaders(head, r.set_response_headers, r.delete_response_headers);
    plan.replacements.insert(plan.replacements.end(), r.body_replacements.begin(),
                             r.body_replacements.end());
  }
  return plan;
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
