# SPDX-License-Identifier: Apache-2.0
if(ML_SANITIZE)
  set(_ml_san_flags -fsanitize=${ML_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
  if(ML_SANITIZE MATCHES "undefined")
    # vptr checks misfire across Debian's shared libraries built without RTTI info we can see.
    list(APPEND _ml_san_flags -fno-sanitize=vptr)
  endif()
  add_compile_options(${_ml_san_flags})
  add_link_options(${_ml_san_flags})
endif()

# The libFuzzer targets of tests/fuzz (docs/fuzzing.md) ride on the clang ASan build: every
# object gets coverage instrumentation (fuzzer-no-link) so that the same libraries serve the unit
# tests and the fuzzers, and no third build is needed. ASan's runtime supplies the coverage hooks
# for the binaries that are not fuzzers.
set(ML_FUZZ OFF)
if(ML_SANITIZE MATCHES "address" AND CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  set(ML_FUZZ ON)
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
