// SPDX-License-Identifier: Apache-2.0
#include "spec/interpolate.h"

#include <map>

#include <catch2/catch.hpp>

using matchlock::spec::EnvLookup;
using matchlock::spec::interpolate;
using matchlock::spec::parseDotEnv;

namespace {

EnvLookup fakeEnv() {
  static const std::map<std::string, std::string, std::less<>> kVars = {
      {"SET", "value"}, {"EMPTY", ""}, {"NUM", "2"}, {"INNER", "in"}};
  return [](std::string_view name) -> std::optional<std::string> {
    if (auto it = kVars.find(name); it != kVars.end()) {
      return it->second;
    }
    return std::nullopt;
  };
}

std::string expand(std::string_view in) {
  bool substituted = false;
  auto r = interpolate(in, fakeEnv(), substituted);
  REQUIRE(r.has_value());
  return *r;
}

std::string expandError(std::string_view in) {
  bool substituted = false;
  auto r = interpolate(in, fakeEnv(), substituted);
  REQUIRE_FALSE(r.has_value());
  return r.error().message();
}

}  // namespace

TEST_CASE("compose interpolation forms") {
  CHECK(expand("plain") == "plain");
  CHECK(expand("$SET") == "value");
  CHECK(expand("${SET}") == "value");
  CHECK(expand("a-${SET}-b") == "a-value-b");
  CHECK(expand("$UNSET") == "");
  CHECK(expand("${UNSET:-def}") == "def");
  CHECK(expand("${EMPTY:-def}") == "def");
  CHECK(expand("${EMPTY-def}") == "");
  CHECK(expand("${UNSET-def}") == "def");
  CHECK(expand("${SET:+alt}") == "alt");
  CHECK(expand("${EMPTY:+alt}") == "");
  CHECK(expand("${EMPTY+alt}") == "alt");
  CHECK(expand("${UNSET:-${INNER}-x}") == "in-x");
  CHECK(expand("$$HOME and $${SET}") == "$HOME and ${SET}");
  CHECK(expand("${NUM}") == "2");
}

TEST_CASE("interpolation errors are explained") {
  CHECK(expandError("${UNSET:?set it please}").find("UNSET") != std::string::npos);
  CHECK(expandError("${UNSET:?set it please}").find("set it please") != std::string::npos);
  CHECK(expandError("${EMPTY:?}").find("unset or empty") != std::string::npos);
  CHECK(expandError("${SET").find("unterminated") != std::string::npos);
  CHECK(expandError("cost $5").find("'$5'") != std::string::npos);
  CHECK(expandError("end $").find("lone '$'") != std::string::npos);
  CHECK(expandError("${}").find("variable name") != std::string::npos);
  CHECK(expandError("${SET!x}").find("unknown operator") != std::string::npos);
}

TEST_CASE("substituted flag is set only for real substitutions") {
  bool substituted = false;
  REQUIRE(interpolate("$$x", fakeEnv(), substituted).has_value());
  CHECK_FALSE(substituted);
  REQUIRE(interpolate("${SET}", fakeEnv(), substituted).has_value());
  CHECK(substituted);
}

TEST_CASE(".env parsing") {
  auto vars = parseDotEnv(
      "# comment\n\nA=1\nexport B = two words \nC='lit $x # no comment'\nD=\"q\\\"uote\\n\"\n"
      "E=val # comment\nF=\n",
      ".env");
  REQUIRE(vars.has_value());
  CHECK(vars->at("A") == "1");
  CHECK(vars->at("B") == "two words");
  CHECK(vars->at("C") == "lit $x # no comment");
  CHECK(vars->at("D") == "q\"uote\n");
  CHECK(vars->at("E") == "val");
  CHECK(vars->at("F").empty());
  auto bad = parseDotEnv("A=1\nnot a pair\n", "dir/.env");
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().message().find("dir/.env:2:") == 0);
  auto unterminated = parseDotEnv("A='x\n", ".env");
  REQUIRE_FALSE(unterminated.has_value());
}
