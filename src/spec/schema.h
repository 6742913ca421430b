// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string_view>
#include <vector>

#include "spec/document.h"

namespace matchlock::spec {

/// The published contract, schema/sandbox.v1.schema.json, embedded at build time.
std::string_view sandboxSchemaText();

/// Validates the document's (interpolated, coerced) tree against the embedded JSON Schema and
/// appends diagnostics for the deepest failures. The typed decoder runs first and gives the
/// friendlier messages; this keeps the decoder honest to the published schema.
void validateAgainstSchema(const Document& doc, std::vector<Diagnostic>& diags);

}  // namespace matchlock::spec
