// SPDX-License-Identifier: Apache-2.0
// OCI distribution client on libcurl. libcurl and nlohmann stay inside this file.
#include "image/registry.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/base64.h"
#include "common/cptr.h"
#include "common/log.h"
#include "common/strings.h"

namespace matchlock::image {
namespace {

using CurlPtr = CPtr<CURL, &curl_easy_cleanup>;
using SlistPtr = CPtr<curl_slist, &curl_slist_free_all>;

constexpr size_t kMaxDocumentBytes = 8U << 20;
constexpr size_t kMaxErrorBody = 16U << 10;

void initCurlOnce() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

/// Registry replies may wrap base64 across lines.
Result<std::string> base64DecodeLoose(std::string_view in) {
  std::string clean;
  for (char c : in) {
    if (c != '\n' && c != '\r' && c != ' ') {
      clean.push_back(c);
    }
  }
  return base64Decode(clean);
}

std::string urlEncode(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

std::string hostOfKey(std::string_view key) {
  size_t scheme = key.find("://");
  if (scheme != std::string_view::npos) {
    key = key.substr(scheme + 3);
  }
  return std::string(key.substr(0, key.find('/')));
}

// ---- progress ---------------------------------------------------------------------------------

class Progress {
 public:
  Progress(ProgressMode mode, size_t layers, int64_t total)
      : mode_(resolve(mode)), layers_(layers), total_(total) {}

  void add(int64_t bytes) {
    int64_t now_done = done_bytes_.fetch_add(bytes) + bytes;
    if (mode_ != ProgressMode::Tty) {
      return;
    }
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(mu_);
    if (now - last_draw_ < std::chrono::milliseconds(150)) {
      return;
    }
    last_draw_ = now;
    draw(now_done);
  }
  void layerDone(const std::string& digest, int64_t size, bool cached) {
    std::lock_guard lock(mu_);
    ++layers_done_;
    if (mode_ == ProgressMode::Quiet) {
      return;
    }
    if (mode_ == ProgressMode::Tty) {
      fmt::print(stderr, "\r\033[K");
    }
    fmt::print(stderr, "{}: {} ({:.1f} MB)\n", digest.substr(0, 19),
               cached ? "already exists" : "pull complete", static_cast<double>(size) / 1e6);
    if (mode_ == ProgressMode::Tty) {
      draw(done_bytes_.load());
    }
  }
  void finish() {
    if (mode_ == ProgressMode::Tty) {
      fmt::print(stderr, "\r\033[K");
    }
  }

 private:
  static ProgressMode resolve(ProgressMode mode) {
    if (mode != ProgressMode::Auto) {
      return mode;
    }
    return ::isatty(STDERR_FILENO) == 1 ? ProgressMode::Tty : ProgressMode::Plain;
  }
  void draw(int64_t done) {
    fmt::print(stderr, "\r\033[Klayers {}/{}  {:.1f}/{:.1f} MB", layers_done_, layers_,
               static_cast<double>(done) / 1e6, static_cast<double>(total_) / 1e6);
    (void)std::fflush(stderr);
  }

  ProgressMode mode_;
  size_t layers_;
  int64_t total_;
  std::atomic<int64_t> done_bytes_{0};
  std::mutex mu_;
  size_t layers_done_ = 0;
  std::chrono::steady_clock::time_point last_draw_;
};

// ---- HTTP -------------------------------------------------------------------------------------

/// Receives a 200 or 206 body, chunk by chunk, with the response status.
using Sink = std::function<Status(std::string_view, long)>;

struct HttpResponse {
  long status = 0;
  std::string content_type;
  std::string www_authenticate;
  std::string docker_digest;
  std::string body;  // the document, or the error body when status != 200
};

struct TransferState {
  HttpResponse* response = nullptr;
  CURL* curl = nullptr;
  const Sink* sink = nullptr;
  size_t limit = kMaxDocumentBytes;
  std::optional<Error> sink_error;
};

size_t onHeader(char* data, size_t size, size_t nitems, void* user) {
  auto* st = static_cast<TransferState*>(user);
  std::string_view line(data, size * nitems);
  if (line.rfind("HTTP/", 0) == 0) {
    // A new response (after a redirect or 100-continue): forget earlier headers.
    st->response->content_type.clear();
    st->response->www_authenticate.clear();
    st->response->docker_digest.clear();
    return size * nitems;
  }
  size_t colon = line.find(':');
  if (colon != std::string_view::npos) {
    std::string key = toLower(trim(line.substr(0, colon)));
    std::string value(trim(line.substr(colon + 1)));
    if (key == "content-type") {
      st->response->content_type = value;
    } else if (key == "www-authenticate") {
      st->response->www_authenticate = value;
    } else if (key == "docker-content-digest") {
      st->response->docker_digest = value;
    }
  }
  return size * nitems;
}

size_t onBody(char* data, size_t size, size_t nmemb, void* user) {
  auto* st = static_cast<TransferState*>(user);
  size_t n = size * nmemb;
  long status = 0;
  curl_easy_getinfo(st->curl, CURLINFO_RESPONSE_CODE, &status);
  if ((status == 200 || status == 206) && st->sink != nullptr) {
    Status s = (*st->sink)(std::string_view(data, n), status);
    if (!s) {
      st->sink_error = std::move(s).error();
      return 0;
    }
    return n;
  }
  size_t limit = status == 200 ? st->limit : kMaxErrorBody;
  if (st->response->body.size() + n > limit) {
    if (status == 200) {
      st->sink_error =
          Error(Errc::InvalidSpec, fmt::format("registry document larger than {} bytes", limit));
      return 0;
    }
    return n;  // drop the rest of a large error body
  }
  st->response->body.append(data, n);
  return n;
}

struct Endpoint {
  std::string base;  // "https://host:port"
  std::string host;
  std::string repository;
  std::string ca_file;
  std::optional<Credentials> credentials;
  std::string credentials_source;
  int max_attempts = 4;
};

class Client {
 public:
  explicit Client(Endpoint endpoint) : ep_(std::move(endpoint)) {}

  /// GET with auth handshake and retries. `sink` receives a 200 body (nullptr: into response.body);
  /// `reset` is called before each retry so the sink can start over.
  Result<HttpResponse> get(const std::string& path, const std::string& accept, const Sink* sink,
                           const std::function<Status()>& reset, std::string_view what,
                           const std::function<std::string()>& extra_header = {}) {
    bool auth_tried = false;
    for (int attempt = 1;; ++attempt) {
      if (attempt > 1 && reset) {
        ML_RETURN_IF_ERROR(reset());
      }
      auto resp =
          once(ep_.base + path, accept, authHeader(), sink, extra_header ? extra_header() : "");
      bool retryable = false;
      if (!resp) {
        retryable = resp.error().code() == Errc::Unavailable;
        if (!retryable || attempt >= ep_.max_attempts) {
          return makeError(std::move(resp).error().withContext(what));
        }
      } else if (resp->status == 401 && !auth_tried) {
        auth_tried = true;
        ML_RETURN_IF_ERROR(authenticate(resp->www_authenticate));
        --attempt;  // the auth round trip is not a failed attempt
        continue;
      } else if (resp->status == 429 || resp->status >= 500) {
        retryable = true;
        if (attempt >= ep_.max_attempts) {
          return makeError(Errc::Unavailable,
                           fmt::format("{}: registry {} answered HTTP {} after {} attempts", what,
                                       ep_.host, resp->status, attempt));
        }
      } else {
        if (resp->status == 206 && sink != nullptr) {
          return resp;
        }
        ML_RETURN_IF_ERROR(statusError(*resp, what));
        return resp;
      }
      if (retryable) {
        auto delay = std::chrono::milliseconds(250 << std::min(attempt, 5));
        ML_LOG(image, info, "{}: retrying in {} ms (attempt {}/{})", what, delay.count(), attempt,
               ep_.max_attempts);
        std::this_thread::sleep_for(delay);
      }
    }
  }

  const Endpoint& endpoint() const { return ep_; }

 private:
  std::string authHeader() {
    std::lock_guard lock(mu_);
    return auth_header_;
  }

  Status statusError(const HttpResponse& resp, std::string_view what) const {
    switch (resp.status) {
      case 200:
        return ok();
      case 401:
        return makeError(Errc::PermissionDenied,
                         fmt::format("{}: registry {} refused the credentials (HTTP 401 "
                                     "unauthorized){}",
                                     what, ep_.host,
                                     ep_.credentials ? " from " + ep_.credentials_source
                                                     : "; no credentials configured for this "
                                                       "host in the Docker config"));
      case 403:
        return makeError(Errc::PermissionDenied,
                         fmt::format("{}: registry {} denied access to {} (HTTP 403 forbidden)",
                                     what, ep_.host, ep_.repository));
      case 416:
        // Our Range start is past the blob: the partial download is wrong and gets dropped.
        return makeError(
            Errc::InvalidSpec,
            fmt::format("{}: registry {} refused the resume range (HTTP 416)", what, ep_.host));
      case 404:
        return makeError(Errc::NotFound,
                         fmt::format("{}: not found on registry {} (HTTP 404)", what, ep_.host));
      default:
        return makeError(Errc::Unavailable,
                         fmt::format("{}: registry {} answered HTTP {}: {}", what, ep_.host,
                                     resp.status, resp.body.substr(0, 200)));
    }
  }

  Status authenticate(const std::string& header) {
    if (header.empty()) {
      return makeError(
          Errc::PermissionDenied,
          fmt::format("registry {} answered 401 without a WWW-Authenticate challenge", ep_.host));
    }
    ML_ASSIGN_OR_RETURN(AuthChallenge ch, parseAuthChallenge(header));
    std::string basic;
    if (ep_.credentials) {
      basic = "Basic " + base64Encode(ep_.credentials->username + ":" + ep_.credentials->password);
    }
    if (ch.scheme == "basic") {
      if (basic.empty()) {
        return makeError(Errc::PermissionDenied,
                         fmt::format("registry {} requires authentication (HTTP 401) and no "
                                     "credentials are configured for it (add them to "
                                     "~/.docker/config.json or $DOCKER_CONFIG/config.json)",
                                     ep_.host));
      }
      std::lock_guard lock(mu_);
      auth_header_ = basic;
      return ok();
    }
    if (ch.scheme != "bearer" || ch.realm.empty()) {
      return makeError(
          Errc::PermissionDenied,
          fmt::format("registry {}: unsupported authentication challenge '{}'", ep_.host, header));
    }
    std::string scope = ch.scope.empty() ? "repository:" + ep_.repository + ":pull" : ch.scope;
    std::string url = ch.realm + (ch.realm.find('?') == std::string::npos ? "?" : "&") +
                      "scope=" + urlEncode(scope);
    if (!ch.service.empty()) {
      url += "&service=" + urlEncode(ch.service);
    }
    ML_ASSIGN_OR_RETURN(HttpResponse resp, once(url, "application/json", basic, nullptr, ""));
    if (resp.status == 401 || resp.status == 403) {
      return makeError(
          Errc::PermissionDenied,
          fmt::format("token service {} refused the credentials (HTTP {})", ch.realm, resp.status));
    }
    if (resp.status != 200) {
      return makeError(Errc::Unavailable,
                       fmt::format("token service {} answered HTTP {}", ch.realm, resp.status));
    }
    nlohmann::json j = nlohmann::json::parse(resp.body, nullptr, false);
    std::string token;
    if (j.is_object()) {
      for (const char* key : {"token", "access_token"}) {
        auto it = j.find(key);
        if (it != j.end() && it->is_string() && !it->get<std::string>().empty()) {
          token = it->get<std::string>();
          break;
        }
      }
    }
    if (token.empty()) {
      return makeError(Errc::PermissionDenied,
                       fmt::format("token service {} returned no token", ch.realm));
    }
    std::lock_guard lock(mu_);
    auth_header_ = "Bearer " + token;
    return ok();
  }

  Result<HttpResponse> once(const std::string& url, const std::string& accept,
                            const std::string& auth, const Sink* sink,
                            const std::string& extra_header) const {
    initCurlOnce();
    CurlPtr curl(curl_easy_init());
    if (!curl) {
      return makeError(Errc::Internal, "curl_easy_init failed");
    }
    HttpResponse resp;
    TransferState st;
    st.response = &resp;
    st.curl = curl.get();
    st.sink = sink;
    curl_slist* raw_headers = nullptr;
    raw_headers = curl_slist_append(raw_headers, ("Accept: " + accept).c_str());
    if (!auth.empty()) {
      raw_headers = curl_slist_append(raw_headers, ("Authorization: " + auth).c_str());
    }
    if (!extra_header.empty()) {
      raw_headers = curl_slist_append(raw_headers, extra_header.c_str());
    }
    SlistPtr headers(raw_headers);
    char errbuf[CURL_ERROR_SIZE] = {0};
    CURL* h = curl.get();
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers.get());
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "matchlock");
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, &onHeader);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &st);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &onBody);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &st);
    if (!ep_.ca_file.empty()) {
      curl_easy_setopt(h, CURLOPT_CAINFO, ep_.ca_file.c_str());
    }
    CURLcode rc = curl_easy_perform(h);
    if (st.sink_error) {
      return makeError(std::move(*st.sink_error));
    }
    if (rc != CURLE_OK) {
      std::string detail = errbuf[0] != '\0' ? errbuf : curl_easy_strerror(rc);
      switch (rc) {
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CIPHER:
        case CURLE_SSL_ISSUER_ERROR:
          return makeError(Errc::PermissionDenied,
                           fmt::format("TLS error talking to registry {}: {} (for a private CA "
                                       "pass --ca-file or set MATCHLOCK_CA_BUNDLE; for a "
                                       "plain-HTTP registry use --insecure)",
                                       ep_.host, detail));
        case CURLE_COULDNT_RESOLVE_HOST:
          return makeError(Errc::Unavailable,
                           fmt::format("cannot resolve registry host {}: {}", ep_.host, detail));
        default:
          return makeError(Errc::Unavailable,
                           fmt::format("cannot reach registry {}: {}", ep_.host, detail));
      }
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp.status);
    return resp;
  }

  Endpoint ep_;
  std::mutex mu_;
  std::string auth_header_;
};

const std::string kManifestAccept = fmt::format("{}, {}, {}, {}", kMediaOciIndex, kMediaOciManifest,
                                                kMediaDockerList, kMediaDockerManifest);

struct Document {
  std::string body;
  std::string media_type;
  Digest digest;
};

Result<Document> fetchManifest(Client& client, const std::string& ref, std::string_view what) {
  const Endpoint& ep = client.endpoint();
  ML_ASSIGN_OR_RETURN(HttpResponse resp,
                      client.get(fmt::format("/v2/{}/manifests/{}", ep.repository, ref),
                                 kManifestAccept, nullptr, {}, what));
  Document doc;
  doc.digest = digestOf(resp.body);
  if (ref.rfind("sha256:", 0) == 0 && doc.digest.str() != ref) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("{}: digest mismatch: asked for {}, registry sent content hashing "
                                 "to {}",
                                 what, ref, doc.digest.str()));
  }
  if (!resp.docker_digest.empty() && resp.docker_digest != doc.digest.str()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("{}: digest mismatch: registry says {}, content hashes to {}",
                                 what, resp.docker_digest, doc.digest.str()));
  }
  ML_ASSIGN_OR_RETURN(doc.media_type, detectMediaType(resp.content_type, resp.body));
  doc.body = std::move(resp.body);
  return doc;
}

// Downloads one blob into the store (verified, atomic, resumable). Returns true when it was
// already there.
//
// The partial download lives at tmp/partial-<hex> and is only touched under the digest's lock.
// A retry, or a later pull after a crash or a network failure, continues it with a Range request
// (the bytes already there are re-hashed first); a server that answers 200 instead of 206 makes it
// start over. The partial is deleted when the content turns out wrong and kept when the network
// failed.
Result<bool> fetchBlob(Client& client, Store& store, const Descriptor& desc, Progress* progress) {
  ML_ASSIGN_OR_RETURN(Digest digest, parseDigest(desc.digest));
  ML_ASSIGN_OR_RETURN(FileLock lock, store.lockDigest(digest));
  if (store.hasBlob(digest)) {
    return true;
  }
  const std::string partial = fmt::format("{}/partial-{}", store.tmpDir(), digest.hex);
  ML_ASSIGN_OR_RETURN(Fd fd, openFile(partial, O_RDWR | O_CREAT, 0600));
  TempFile temp(std::move(fd), partial);
  std::unique_ptr<Sha256> hasher = std::make_unique<Sha256>();
  int64_t received = 0;
  auto restart = [&]() -> Status {
    if (::ftruncate(temp.fd(), 0) != 0 || ::lseek(temp.fd(), 0, SEEK_SET) != 0) {
      return makeError(Errc::System, "truncate " + temp.path(), errno);
    }
    if (progress != nullptr) {
      progress->add(-received);
    }
    received = 0;
    hasher = std::make_unique<Sha256>();
    return ok();
  };
  {
    // Re-hash what an earlier attempt left.
    std::string buf(1 << 16, '\0');
    for (;;) {
      ssize_t n = ::read(temp.fd(), buf.data(), buf.size());
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0) {
        return makeError(Errc::System, "read " + partial, errno);
      }
      if (n == 0) {
        break;
      }
      hasher->update(std::string_view(buf.data(), static_cast<size_t>(n)));
      received += n;
    }
    if (desc.size > 0 && received > desc.size) {
      ML_RETURN_IF_ERROR(restart());
    } else if (received > 0) {
      ML_LOG(image, info, "blob {}: resuming at byte {}", desc.digest, received);
      if (progress != nullptr) {
        progress->add(received);
      }
    }
  }
  bool fresh_response = true;
  Sink sink = [&](std::string_view chunk, long status) -> Status {
    if (fresh_response) {
      fresh_response = false;
      if (status == 200 && received > 0) {
        ML_RETURN_IF_ERROR(restart());  // the server ignored our Range
      }
    }
    received += static_cast<int64_t>(chunk.size());
    if (desc.size > 0 && received > desc.size) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("blob {} is larger than the {} bytes the manifest declares",
                                   desc.digest, desc.size));
    }
    hasher->update(chunk);
    if (progress != nullptr) {
      progress->add(static_cast<int64_t>(chunk.size()));
    }
    return temp.write(chunk);
  };
  auto next_attempt = [&]() -> Status {
    fresh_response = true;
    return ok();
  };
  auto range = [&]() -> std::string {
    return received > 0 ? fmt::format("Range: bytes={}-", received) : std::string();
  };
  const Endpoint& ep = client.endpoint();
  std::string what = fmt::format("blob {}", desc.digest);
  bool complete = desc.size > 0 && received == desc.size;
  if (!complete) {
    auto got = client.get(fmt::format("/v2/{}/blobs/{}", ep.repository, desc.digest), "*/*", &sink,
                          next_attempt, what, range);
    if (!got) {
      if (got.error().code() == Errc::Unavailable && received > 0) {
        temp.release();  // keep the partial download for the next attempt
      }
      return makeError(std::move(got).error());
    }
  }
  Digest computed = hasher->finish();
  if (desc.size > 0 && received != desc.size) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("{}: size mismatch: manifest declares {} bytes, got {}; the "
                                 "blob was discarded",
                                 what, desc.size, received));
  }
  auto committed = store.commitBlob(temp, computed, digest);
  if (!committed) {
    return makeError(std::move(committed).error().withContext(what));
  }
  return false;
}

}  // namespace

Result<std::optional<Credentials>> credentialsFor(std::string_view host, const std::string& path) {
  std::string file = path;
  if (file.empty()) {
    if (const char* dir = std::getenv("DOCKER_CONFIG"); dir != nullptr && *dir != '\0') {
      file = std::string(dir) + "/config.json";
    } else if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
      file = std::string(home) + "/.docker/config.json";
    } else {
      return std::optional<Credentials>();
    }
  }
  auto text = readFile(file);
  if (!text) {
    if (text.error().code() == Errc::NotFound) {
      return std::optional<Credentials>();
    }
    return makeError(std::move(text).error().withContext("reading Docker config"));
  }
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return makeError(Errc::InvalidSpec, fmt::format("{}: not a JSON object", file));
  }
  if (j.contains("credsStore") || j.contains("credHelpers")) {
    ML_LOG(image, warn, "{}: credential helpers are not supported; only 'auths' is read", file);
  }
  auto auths = j.find("auths");
  if (auths == j.end() || !auths->is_object()) {
    return std::optional<Credentials>();
  }
  for (const auto& [key, value] : auths->items()) {
    if (hostOfKey(key) != host || !value.is_object()) {
      continue;
    }
    Credentials c;
    auto auth = value.find("auth");
    if (auth != value.end() && auth->is_string() && !auth->get<std::string>().empty()) {
      auto decoded = base64DecodeLoose(auth->get<std::string>());
      if (!decoded) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("{}: auths.{}.auth is not valid base64", file, key));
      }
      size_t colon = decoded->find(':');
      if (colon == std::string::npos) {
        return makeError(
            Errc::InvalidSpec,
            fmt::format("{}: auths.{}.auth is not base64 of user:password", file, key));
      }
      c.username = decoded->substr(0, colon);
      c.password = decoded->substr(colon + 1);
      return std::optional<Credentials>(std::move(c));
    }
    auto user = value.find("username");
    auto pass = value.find("password");
    if (user != value.end() && pass != value.end() && user->is_string() && pass->is_string()) {
      c.username = user->get<std::string>();
      c.password = pass->get<std::string>();
      return std::optional<Credentials>(std::move(c));
    }
  }
  return std::optional<Credentials>();
}

Result<AuthChallenge> parseAuthChallenge(std::string_view header) {
  header = trim(header);
  size_t space = header.find(' ');
  AuthChallenge ch;
  ch.scheme = toLower(header.substr(0, space));
  if (space == std::string_view::npos) {
    return ch;
  }
  std::string_view rest = header.substr(space + 1);
  while (!rest.empty()) {
    rest = trim(rest);
    size_t eq = rest.find('=');
    if (eq == std::string_view::npos) {
      break;
    }
    std::string key = toLower(trim(rest.substr(0, eq)));
    rest = rest.substr(eq + 1);
    std::string value;
    if (!rest.empty() && rest.front() == '"') {
      size_t end = 1;
      while (end < rest.size() && rest[end] != '"') {
        if (rest[end] == '\\' && end + 1 < rest.size()) {
          ++end;
        }
        value.push_back(rest[end]);
        ++end;
      }
      if (end >= rest.size()) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("malformed WWW-Authenticate header '{}'", header));
      }
      rest = rest.substr(end + 1);
    } else {
      size_t comma = rest.find(',');
      value = std::string(trim(rest.substr(0, comma)));
      rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma);
    }
    if (key == "realm") {
      ch.realm = value;
    } else if (key == "service") {
      ch.service = value;
    } else if (key == "scope") {
      ch.scope = value;
    }
    rest = trim(rest);
    if (!rest.empty() && rest.front() == ',') {
      rest = rest.substr(1);
    }
  }
  return ch;
}

void applyEnvironment(PullOptions& options) {
  if (options.insecure_registries.empty()) {
    if (const char* env = std::getenv("MATCHLOCK_INSECURE_REGISTRIES"); env != nullptr) {
      for (const std::string& host : split(env, ',')) {
        if (!trim(host).empty()) {
          options.insecure_registries.emplace_back(trim(host));
        }
      }
    }
  }
  if (options.ca_file.empty()) {
    if (const char* env = std::getenv("MATCHLOCK_CA_BUNDLE"); env != nullptr) {
      options.ca_file = env;
    }
  }
}

Result<ImageRecord> pullImage(Store& store, const Reference& ref, const PullOptions& options) {
  Endpoint ep;
  bool insecure = options.insecure ||
                  std::find(options.insecure_registries.begin(), options.insecure_registries.end(),
                            ref.registry) != options.insecure_registries.end();
  ep.base = (insecure ? "http://" : "https://") + ref.registry;
  ep.host = ref.registry;
  ep.repository = ref.repository;
  ep.ca_file = options.ca_file;
  ep.max_attempts = std::max(1, options.max_attempts);
  ML_ASSIGN_OR_RETURN(ep.credentials, credentialsFor(ref.registry, options.docker_config));
  ep.credentials_source =
      options.docker_config.empty() ? "the Docker config" : options.docker_config;
  Client client(std::move(ep));

  ML_ASSIGN_OR_RETURN(FileLock store_lock, store.lockStore(FileLock::Mode::Shared));
  const std::string what = "manifest " + ref.str();
  ML_ASSIGN_OR_RETURN(Document doc, fetchManifest(client, ref.manifestRef(), what));
  if (isIndexMediaType(doc.media_type)) {
    ML_ASSIGN_OR_RETURN(Index index, parseIndex(doc.body));
    auto chosen = selectPlatform(index, options.platform);
    if (!chosen) {
      return makeError(std::move(chosen).error().withContext(ref.str()));
    }
    ML_ASSIGN_OR_RETURN(doc, fetchManifest(client, chosen->digest,
                                           fmt::format("manifest {} for {}", chosen->digest,
                                                       options.platform.str())));
    if (!isManifestMediaType(doc.media_type)) {
      return makeError(
          Errc::InvalidSpec,
          fmt::format("{}: index entry is not an image manifest ({})", ref.str(), doc.media_type));
    }
  }
  ML_ASSIGN_OR_RETURN(Manifest manifest, parseManifest(doc.body));

  ML_ASSIGN_OR_RETURN(bool unused_cached, fetchBlob(client, store, manifest.config, nullptr));
  (void)unused_cached;
  ML_ASSIGN_OR_RETURN(Digest config_digest, parseDigest(manifest.config.digest));
  ML_ASSIGN_OR_RETURN(std::string config_text, store.readBlob(config_digest));
  ML_ASSIGN_OR_RETURN(ImageConfig config, parseImageConfig(config_text));
  if (!config.diff_ids.empty() && config.diff_ids.size() != manifest.layers.size()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("{}: config lists {} diff_ids but the manifest has {} layers",
                                 ref.str(), config.diff_ids.size(), manifest.layers.size()));
  }

  int64_t total = 0;
  for (const Descriptor& d : manifest.layers) {
    total += d.size;
  }
  Progress progress(options.progress, manifest.layers.size(), total);
  std::atomic<size_t> next{0};
  std::mutex err_mu;
  std::optional<Error> first_error;
  auto worker = [&]() {
    for (;;) {
      size_t i = next.fetch_add(1);
      if (i >= manifest.layers.size()) {
        return;
      }
      {
        std::lock_guard lock(err_mu);
        if (first_error) {
          return;
        }
      }
      const Descriptor& d = manifest.layers[i];
      auto cached = fetchBlob(client, store, d, &progress);
      if (!cached) {
        std::lock_guard lock(err_mu);
        if (!first_error) {
          first_error = std::move(cached).error();
        }
        return;
      }
      progress.layerDone(d.digest, d.size, *cached);
    }
  };
  size_t n_threads =
      std::min<size_t>(static_cast<size_t>(std::max(1, options.parallel)), manifest.layers.size());
  std::vector<std::thread> threads;
  for (size_t t = 1; t < n_threads; ++t) {
    threads.emplace_back(worker);
  }
  worker();
  for (std::thread& t : threads) {
    t.join();
  }
  progress.finish();
  if (first_error) {
    return makeError(std::move(*first_error).withContext("pulling " + ref.str()));
  }

  // The manifest is stored last: its presence means every blob it names is in the store.
  ML_RETURN_IF_ERROR(store.putBlob(doc.body, doc.digest));
  ImageRecord record;
  record.name = ref.str();
  record.manifest_digest = doc.digest.str();
  record.config_digest = manifest.config.digest;
  record.source = "registry";
  record.platform =
      config.os.empty() ? options.platform.str() : config.os + "/" + config.architecture;
  for (const Descriptor& d : manifest.layers) {
    record.layers.push_back(LayerRecord{d.digest, d.media_type, d.size});
    record.size += d.size;
  }
  ML_RETURN_IF_ERROR(store.saveImage(record));
  return record;
}

}  // namespace matchlock::image
