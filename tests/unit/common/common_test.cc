// SPDX-License-Identifier: Apache-2.0
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <string>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "common/result.h"
#include "common/scope_exit.h"
#include "common/sha256.h"
#include "common/strings.h"
#include "common/wipe.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)

namespace {

Result<int> half(int x) {
  if (x % 2 != 0) {
    return makeError(Errc::InvalidSpec, "odd");
  }
  return x / 2;
}

Result<int> quarter(int x) {
  ML_ASSIGN_OR_RETURN(int h, half(x));
  ML_ASSIGN_OR_RETURN(int q, half(h));
  return q;
}

Status checkEven(int x) {
  ML_RETURN_IF_ERROR(half(x));
  return ok();
}

bool fdOpen(int fd) {
  return ::fcntl(fd, F_GETFD) != -1;
}

}  // namespace

TEST_CASE("wipe zeroes a string's whole buffer; wipeAppend keeps content across growth") {
  std::string s(100, 'x');
  s.resize(10);  // the bytes past size() still hold 'x'
  const char* buf = s.data();
  size_t cap = s.capacity();
  matchlock::wipe(s);
  CHECK(s.empty());
  REQUIRE(s.data() == buf);  // same buffer: it was zeroed, not replaced
  CHECK(std::all_of(buf, buf + cap, [](char c) { return c == '\0'; }));

  std::string out = "head:";
  for (int i = 0; i < 200; ++i) {
    matchlock::wipeAppend(out, "value-");
  }
  CHECK(out.size() == 5 + 200 * 6);
  CHECK(out.rfind("head:value-value-", 0) == 0);
  CHECK(out.substr(out.size() - 6) == "value-");
}

TEST_CASE("invalidUtf8At accepts RFC 3629 UTF-8 only") {
  using matchlock::invalidUtf8At;
  constexpr size_t kOk = std::string_view::npos;
  CHECK(invalidUtf8At("") == kOk);
  CHECK(invalidUtf8At("plain ascii") == kOk);
  CHECK(invalidUtf8At("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == kOk);
  CHECK(invalidUtf8At("\xef\xbf\xbf\xf4\x8f\xbf\xbf") == kOk);  // U+FFFF, U+10FFFF
  CHECK(invalidUtf8At("ab\xa8") == 2);                          // lone continuation byte
  CHECK(invalidUtf8At("\xc0\xaf") == 0);                        // overlong '/'
  CHECK(invalidUtf8At("\xe0\x80\xaf") == 0);                    // overlong, three bytes
  CHECK(invalidUtf8At("x\xed\xa0\x80") == 1);                   // surrogate U+D800
  CHECK(invalidUtf8At("\xf4\x90\x80\x80") == 0);                // above U+10FFFF
  CHECK(invalidUtf8At("\xf5\x80\x80\x80") == 0);
  CHECK(invalidUtf8At("ok\xe2\x82") == 2);    // truncated at the end
  CHECK(invalidUtf8At("\xe2\x28\xa1") == 0);  // bad continuation
  CHECK(invalidUtf8At(std::string_view("a\0b", 3)) == kOk);
}

TEST_CASE("Result propagates values and errors through the macros") {
  REQUIRE(quarter(8).value() == 2);
  auto r = quarter(6);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code() == Errc::InvalidSpec);
  CHECK(r.error().message() == "odd");
  CHECK(checkEven(4).has_value());
  CHECK_FALSE(checkEven(3).has_value());
}

TEST_CASE("Error context, errno and exit codes") {
  Error e = Error(Errc::System, "open x", ENOENT).withContext("loading spec");
  CHECK(e.message() == "loading spec: open x");
  CHECK(e.toString() == "loading spec: open x: No such file or directory");
  CHECK(exitCodeFor(Errc::InvalidSpec) == 65);
  CHECK(exitCodeFor(Errc::Internal) == 70);
  CHECK(errcName(Errc::Unavailable) == "unavailable");
}

TEST_CASE("Fd closes on destruction and transfers ownership on move") {
  auto pipe = Pipe::create();
  REQUIRE(pipe.has_value());
  int raw = pipe->read.get();
  CHECK((::fcntl(raw, F_GETFD) & FD_CLOEXEC) != 0);
  {
    Fd moved = std::move(pipe->read);
    CHECK_FALSE(pipe->read);
    CHECK(moved.get() == raw);
    CHECK(fdOpen(raw));
  }
  CHECK_FALSE(fdOpen(raw));
  Fd w = std::move(pipe->write);
  int released = w.release();
  CHECK_FALSE(w);
  CHECK(fdOpen(released));
  ::close(released);
}

TEST_CASE("ScopeExit runs unless dismissed") {
  int runs = 0;
  {
    ML_DEFER {
      ++runs;
    };
  }
  CHECK(runs == 1);
  {
    ScopeExit guard([&] { ++runs; });
    guard.dismiss();
  }
  CHECK(runs == 1);
}

TEST_CASE("string helpers") {
  CHECK(split("a,b,,c", ',') == std::vector<std::string>{"a", "b", "", "c"});
  CHECK(trim("  x y \n") == "x y");
  CHECK(editDistance("imgae", "image") == 1);
  CHECK(editDistance("memroy", "memory") == 1);
  std::vector<std::string_view> cands = {"image", "memory", "cpus"};
  CHECK(closestMatch("imgae", cands) == "image");
  CHECK(closestMatch("zzzzzz", cands).empty());
  CHECK(toHex("\x01\xff") == "01ff");
}

TEST_CASE("sha256 and hmac known answers") {
  CHECK(sha256Hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // RFC 4231 test case 2.
  CHECK(hmacSha256Hex("Jefe", "what do ya want for nothing?") ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST_CASE("writeFileAtomic and readFile round trip") {
  char tmpl[] = "/tmp/ml-common-XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  std::string path = std::string(tmpl) + "/f";
  REQUIRE(writeFileAtomic(path, "hello").has_value());
  CHECK(readFile(path).value() == "hello");
  auto missing = readFile(std::string(tmpl) + "/nope");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code() == Errc::NotFound);
  ::unlink(path.c_str());
  ::rmdir(tmpl);
}

TEST_CASE("lastLines keeps the last non-blank lines", "[strings]") {
  CHECK(matchlock::lastLines("a\n\nb\n  c  \n\n", 2) == "b\nc");
  CHECK(matchlock::lastLines("only", 5) == "only");
  CHECK(matchlock::lastLines("\n\n", 3).empty());
}
