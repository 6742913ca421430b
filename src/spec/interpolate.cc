// SPDX-License-Identifier: Apache-2.0
#include "spec/interpolate.h"

#include <fmt/format.h>

#include <cctype>
#include <cstdlib>

#include "common/strings.h"

namespace matchlock::spec {
namespace {

bool isNameStart(char c) {
  return std::isalpha(static_cast<unsigned char>(c)) != 0 || c == '_';
}
bool isNameChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
}

constexpr int kMaxNesting = 8;

Result<std::string> interpolateImpl(std::string_view in, const EnvLookup& env, bool& substituted,
                                    int depth);

// Expands the body of `${...}` (without braces).
Result<std::string> expandBraced(std::string_view body, const EnvLookup& env, bool& substituted,
                                 int depth) {
  size_t n = 0;
  if (body.empty() || !isNameStart(body[0])) {
    return makeError(
        Errc::InvalidSpec,
        fmt::format("invalid interpolation '${{{}}}': expected a variable name", body));
  }
  while (n < body.size() && isNameChar(body[n])) {
    ++n;
  }
  std::string name(body.substr(0, n));
  std::string_view rest = body.substr(n);
  std::optional<std::string> value = env(name);
  substituted = true;
  if (rest.empty()) {
    return value.value_or("");
  }
  bool colon = rest[0] == ':';
  if (colon) {
    rest.remove_prefix(1);
  }
  if (rest.empty() || (rest[0] != '-' && rest[0] != '?' && rest[0] != '+')) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid interpolation '${{{}}}': unknown operator", body));
  }
  char op = rest[0];
  std::string_view arg = rest.substr(1);
  // With ':' an empty value counts as unset (shell semantics).
  bool is_set = value.has_value() && (!colon || !value->empty());
  switch (op) {
    case '-':
      if (is_set) {
        return *value;
      }
      return interpolateImpl(arg, env, substituted, depth + 1);
    case '+':
      if (!is_set) {
        return std::string();
      }
      return interpolateImpl(arg, env, substituted, depth + 1);
    default: {  // '?'
      if (is_set) {
        return *value;
      }
      auto msg = interpolateImpl(arg, env, substituted, depth + 1);
      std::string text = msg && !msg->empty() ? *msg : (colon ? "is unset or empty" : "is unset");
      return makeError(Errc::InvalidSpec,
                       fmt::format("required variable {} is missing a value: {}", name, text));
    }
  }
}

Result<std::string> interpolateImpl(std::string_view in, const EnvLookup& env, bool& substituted,
                                    int depth) {
  if (depth > kMaxNesting) {
    return makeError(Errc::InvalidSpec, "interpolation nested too deeply");
  }
  std::string out;
  size_t i = 0;
  while (i < in.size()) {
    char c = in[i];
    if (c != '$') {
      out.push_back(c);
      ++i;
      continue;
    }
    if (i + 1 >= in.size()) {
      return makeError(Errc::InvalidSpec,
                       "invalid interpolation: lone '$' at the end (write '$$' "
                       "for a literal dollar sign)");
    }
    char next = in[i + 1];
    if (next == '$') {
      out.push_back('$');
      i += 2;
      continue;
    }
    if (isNameStart(next)) {
      size_t j = i + 1;
      while (j < in.size() && isNameChar(in[j])) {
        ++j;
      }
      std::string name(in.substr(i + 1, j - i - 1));
      out += env(name).value_or("");
      substituted = true;
      i = j;
      continue;
    }
    if (next == '{') {
      // Find the matching brace, allowing nested ${...} in defaults.
      size_t j = i + 2;
      int level = 1;
      while (j < in.size() && level > 0) {
        if (in[j] == '$' && j + 1 < in.size() && in[j + 1] == '{') {
          ++level;
          j += 2;
          continue;
        }
        if (in[j] == '}') {
          --level;
          if (level == 0) {
            break;
          }
        }
        ++j;
      }
      if (level != 0) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("invalid interpolation: unterminated '${{' in '{}'", in));
      }
      ML_ASSIGN_OR_RETURN(std::string expanded,
                          expandBraced(in.substr(i + 2, j - i - 2), env, substituted, depth));
      out += expanded;
      i = j + 1;
      continue;
    }
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid interpolation: '${}' (write '$$' for a literal dollar "
                                 "sign)",
                                 next));
  }
  return out;
}

void walk(Document& doc, nlohmann::json& node, const std::string& ptr, const EnvLookup& env,
          std::vector<Diagnostic>& diags) {
  if (node.is_object()) {
    for (auto it = node.begin(); it != node.end(); ++it) {
      if (it.key().rfind("x-", 0) == 0) {
        continue;
      }
      walk(doc, it.value(), pointerAppend(ptr, it.key()), env, diags);
    }
  } else if (node.is_array()) {
    for (size_t i = 0; i < node.size(); ++i) {
      walk(doc, node[i], pointerAppend(ptr, i), env, diags);
    }
  } else if (node.is_string()) {
    const std::string& s = node.get_ref<const std::string&>();
    if (s.find('$') == std::string::npos) {
      return;
    }
    bool substituted = false;
    auto r = interpolate(s, env, substituted);
    if (!r) {
      diags.push_back(Diagnostic{doc.file, doc.positionOf(ptr), dottedPath(doc.tree, ptr),
                                 r.error().message()});
      doc.interpolation_failed.insert(ptr);
      return;
    }
    if (substituted) {
      doc.interpolated.insert(ptr);
    }
    node = std::move(*r);
  }
}

}  // namespace

EnvLookup layeredEnv(std::map<std::string, std::string, std::less<>> dotenv) {
  return [dotenv = std::move(dotenv)](std::string_view name) -> std::optional<std::string> {
    if (const char* v = std::getenv(std::string(name).c_str()); v != nullptr) {
      return std::string(v);
    }
    if (auto it = dotenv.find(name); it != dotenv.end()) {
      return it->second;
    }
    return std::nullopt;
  };
}

Result<std::string> interpolate(std::string_view in, const EnvLookup& env, bool& substituted) {
  return interpolateImpl(in, env, substituted, 0);
}

Result<std::map<std::string, std::string, std::less<>>> parseDotEnv(std::string_view text,
                                                                    const std::string& file) {
  std::map<std::string, std::string, std::less<>> out;
  int lineno = 0;
  for (const std::string& raw : split(text, '\n')) {
    ++lineno;
    std::string_view line = trim(raw);
    if (line.empty() || line[0] == '#') {
      continue;
    }
    if (line.rfind("export ", 0) == 0) {
      line = trim(line.substr(7));
    }
    size_t eq = line.find('=');
    std::string_view key = trim(line.substr(0, eq));
    bool valid_key = !key.empty() && isNameStart(key[0]);
    for (char c : key) {
      valid_key = valid_key && isNameChar(c);
    }
    if (eq == std::string_view::npos || !valid_key) {
      return makeError(Errc::InvalidSpec, fmt::format("{}:{}: expected KEY=VALUE with KEY matching "
                                                      "[A-Za-z_][A-Za-z0-9_]*",
                                                      file, lineno));
    }
    std::string_view val = trim(line.substr(eq + 1));
    std::string value;
    if (!val.empty() && (val[0] == '\'' || val[0] == '"')) {
      char q = val[0];
      size_t end = val.find(q, 1);
      while (q == '"' && end != std::string_view::npos && val[end - 1] == '\\') {
        end = val.find(q, end + 1);
      }
      if (end == std::string_view::npos) {
        return makeError(Errc::InvalidSpec, fmt::format("{}:{}: unterminated quote in value of {}",
                                                        file, lineno, key));
      }
      std::string_view inner = val.substr(1, end - 1);
      if (q == '\'') {
        value = std::string(inner);
      } else {
        for (size_t i = 0; i < inner.size(); ++i) {
          if (inner[i] == '\\' && i + 1 < inner.size()) {
            char e = inner[++i];
            value.push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e);
          } else {
            value.push_back(inner[i]);
          }
        }
      }
    } else {
      // Unquoted: an inline comment starts at " #".
      if (size_t hash = val.find(" #"); hash != std::string_view::npos) {
        val = trim(val.substr(0, hash));
      }
      value = std::string(val);
    }
    out[std::string(key)] = std::move(value);
  }
  return out;
}

void interpolateDocument(Document& doc, const EnvLookup& env, std::vector<Diagnostic>& diags) {
  walk(doc, doc.tree, "", env, diags);
}

}  // namespace matchlock::spec
