// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string_view>

#include "common/result.h"
#include "spec/document.h"

namespace matchlock::spec {

// Each reader fills doc.tree and the source maps. Third-party exceptions are caught inside and
// turned into InvalidSpec errors with the parser's position; nothing escapes.
Status readToml(std::string_view text, Document& doc);
Status readYaml(std::string_view text, Document& doc);
Status readJson(std::string_view text, Document& doc);

}  // namespace matchlock::spec
