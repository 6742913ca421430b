// SPDX-License-Identifier: Apache-2.0
#include "image/reference.h"

#include <fmt/format.h>

#include <cstdlib>

#include "image/digest.h"

namespace matchlock::image {
namespace {

bool validRepository(std::string_view repo) {
  if (repo.empty() || repo.front() == '/' || repo.back() == '/') {
    return false;
  }
  char prev = '/';
  for (char c : repo) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-' || c == '/';
    if (!ok) {
      return false;
    }
    if (c == '/' && prev == '/') {
      return false;
    }
    prev = c;
  }
  return repo.find("..") == std::string_view::npos;
}

bool validTag(std::string_view tag) {
  if (tag.empty() || tag.size() > 128 || tag.front() == '.' || tag.front() == '-') {
    return false;
  }
  for (char c : tag) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-';
    if (!ok) {
      return false;
    }
  }
  return true;
}

bool validHost(std::string_view host) {
  if (host.empty()) {
    return false;
  }
  for (char c : host) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '-' || c == ':' || c == '[' || c == ']';
    if (!ok) {
      return false;
    }
  }
  return true;
}

// Splits "repo[:tag][@digest]" into its parts.
Status splitNameTagDigest(std::string_view rest, std::string_view whole, Reference& ref) {
  size_t at = rest.find('@');
  if (at != std::string_view::npos) {
    ML_ASSIGN_OR_RETURN(Digest d, parseDigest(rest.substr(at + 1)));
    ref.digest = d.str();
    rest = rest.substr(0, at);
  }
  size_t colon = rest.rfind(':');
  size_t slash = rest.rfind('/');
  if (colon != std::string_view::npos && (slash == std::string_view::npos || colon > slash)) {
    ref.tag = std::string(rest.substr(colon + 1));
    rest = rest.substr(0, colon);
    if (!validTag(ref.tag)) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid image reference '{}': bad tag '{}'", whole, ref.tag));
    }
  }
  if (!validRepository(rest)) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid image reference '{}': bad repository name '{}' (lower "
                                 "case letters, digits, '.', '_', '-' and '/')",
                                 whole, rest));
  }
  ref.repository = std::string(rest);
  if (ref.tag.empty() && ref.digest.empty()) {
    ref.tag = "latest";
  }
  return ok();
}

}  // namespace

std::string Reference::str() const {
  if (!digest.empty()) {
    return fmt::format("{}/{}@{}", registry, repository, digest);
  }
  return fmt::format("{}/{}:{}", registry, repository, tag);
}

std::string defaultRegistry() {
  const char* env = std::getenv("MATCHLOCK_DEFAULT_REGISTRY");
  return env != nullptr ? std::string(env) : std::string();
}

Result<Reference> parseReference(std::string_view text, std::string_view default_registry) {
  if (text.empty()) {
    return makeError(Errc::InvalidSpec, "empty image reference");
  }
  for (char c : text) {
    if (c <= ' ' || c == '\x7f') {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid image reference '{}': contains whitespace or control "
                                   "characters",
                                   text));
    }
  }
  Reference ref;
  std::string_view rest = text;
  size_t slash = text.find('/');
  if (slash != std::string_view::npos) {
    std::string_view first = text.substr(0, slash);
    if (first.find('.') != std::string_view::npos || first.find(':') != std::string_view::npos ||
        first == "localhost") {
      if (!validHost(first)) {
        return makeError(
            Errc::InvalidSpec,
            fmt::format("invalid image reference '{}': bad registry host '{}'", text, first));
      }
      ref.registry = std::string(first);
      rest = text.substr(slash + 1);
    }
  }
  if (ref.registry.empty()) {
    if (default_registry.empty()) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("image reference '{}' names no registry and no default "
                                   "registry is configured (there is no implicit Docker Hub): "
                                   "write host[:port]/{} or set MATCHLOCK_DEFAULT_REGISTRY",
                                   text, text));
    }
    ref.registry = std::string(default_registry);
  }
  ML_RETURN_IF_ERROR(splitNameTagDigest(rest, text, ref));
  return ref;
}

Result<std::string> normalizeLocalName(std::string_view text) {
  Reference ref;
  ML_RETURN_IF_ERROR(splitNameTagDigest(text, text, ref));
  if (!ref.digest.empty()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("local image name '{}' must not contain a digest", text));
  }
  return ref.repository + ":" + ref.tag;
}

}  // namespace matchlock::image
