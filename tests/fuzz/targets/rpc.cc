// SPDX-License-Identifier: Apache-2.0
// `matchlock rpc` reads JSON-RPC lines from its client (an SDK, or whatever drives it): the line
// parser, and for `create` the params decoder (upstream's Config onto the spec decoder). Neither
// may throw; a create that decodes has an image, and its normalized form (what the state store
// keeps) holds no inline secret value.
#include <string>

#include "fuzz_check.h"
#include "rpc/create_params.h"
#include "rpc/jsonrpc.h"
#include "spec/decode.h"
#include "spec/normalize.h"

namespace rpc = matchlock::rpc;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  rpc::Parsed parsed = rpc::parse(fuzz::asView(data, size));
  FUZZ_CHECK(parsed.message.has_value() != parsed.failure.has_value());
  if (parsed.failure) {
    (void)rpc::errorLine(parsed.failure->id, parsed.failure->code, parsed.failure->message);
    return 0;
  }
  const rpc::Message& m = *parsed.message;
  auto created = rpc::decodeCreateParams(m.params, "vm-fuzz");
  if (!created) {
    FUZZ_CHECK(created.error().message().rfind("Invalid params: ", 0) == 0);
    (void)rpc::errorLine(m.id.value_or(nullptr), rpc::kInvalidParams, created.error().message());
    return 0;
  }
  FUZZ_CHECK(!created->spec.image.empty());
  std::string stored = matchlock::spec::toJson(created->spec).dump();
  for (const auto& secret : created->spec.secrets) {
    if (secret.kind == matchlock::spec::SecretRef::Kind::Inline &&
        secret.inline_value.size() >= 12) {
      FUZZ_CHECK(stored.find(secret.inline_value) == std::string::npos ||
                 fuzz::asView(data, size).find(secret.inline_value) !=
                     fuzz::asView(data, size).rfind(secret.inline_value));
    }
  }
  return 0;
}
