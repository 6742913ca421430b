// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "spec/model.h"

namespace matchlock::rpc {

/// What a `create` call asks for, decoded from its params (upstream's `Config` plus our
/// `keep_on_disconnect` and `launch_entrypoint`). Sans-I/O: the params are the client's bytes.
struct CreateParams {
  spec::SandboxSpec spec;
  std::string id;  ///< the new sandbox's id (names it in the spec's messages)
  bool keep = false;
  bool launch_entrypoint = false;
  std::string workspace;  ///< vfs.workspace, "" when absent
};

/// Decodes `params` for sandbox `id`. Errors are InvalidSpec with the message to send with
/// kInvalidParams ("Invalid params: resources.memory_mb: ...", upstream's field names).
Result<CreateParams> decodeCreateParams(const nlohmann::json& params, const std::string& id);

/// Rewrites the decoder's spec field names in `message` ("sandboxes.<id>.memory") to upstream's
/// config names ("resources.memory_mb").
std::string upstreamFieldNames(std::string message, const std::string& id);

}  // namespace matchlock::rpc
