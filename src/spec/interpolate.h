// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "spec/document.h"

namespace matchlock::spec {

/// Looks a variable up; nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(std::string_view)>;

/// Process environment first, then `dotenv` (compose's precedence: the shell wins).
EnvLookup layeredEnv(std::map<std::string, std::string, std::less<>> dotenv);

/// Compose-style interpolation of one string: `$$`, `$VAR`, `${VAR}`, `${VAR:-d}`, `${VAR-d}`,
/// `${VAR:?msg}`, `${VAR?msg}`, `${VAR:+alt}`, `${VAR+alt}` (defaults may nest). On error the
/// message explains the problem (without position). `substituted` is set when any `$` form other
/// than `$$` was expanded.
Result<std::string> interpolate(std::string_view in, const EnvLookup& env, bool& substituted);

/// Parses a `.env` file: `KEY=VALUE`, optional `export `, `#` comments, blank lines, single
/// quotes (literal) and double quotes (with \n, \t, \", \\ escapes). Errors name file:line.
Result<std::map<std::string, std::string, std::less<>>> parseDotEnv(std::string_view text,
                                                                    const std::string& file);

/// Interpolates every string value of the document (keys are never interpolated; `x-*` extension
/// subtrees are skipped because they are ignored anyway). Records substituted pointers in
/// doc.interpolated and appends one diagnostic per failing value.
void interpolateDocument(Document& doc, const EnvLookup& env, std::vector<Diagnostic>& diags);

}  // namespace matchlock::spec
