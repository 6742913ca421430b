# SPDX-License-Identifier: Apache-2.0
# ml_warnings: warning flags; ml_hardening: hardening flags. Every project target links both.
add_library(ml_warnings INTERFACE)
target_compile_options(ml_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Woverloaded-virtual -Wold-style-cast
  -Wvla -Wformat=2 -Wimplicit-fallthrough -Wnull-dereference)
if(ML_WERROR)
  target_compile_options(ml_warnings INTERFACE -Werror)
endif()

add_library(ml_hardening INTERFACE)
target_compile_options(ml_hardening INTERFACE
  -fstack-protector-strong -fstack-clash-protection -fcf-protection -fno-omit-frame-pointer
  -D_GLIBCXX_ASSERTIONS)
# _FORTIFY_SOURCE needs optimisation; glibc warns at -O0.
if(NOT CMAKE_BUILD_TYPE STREQUAL "Debug")
  target_compile_options(ml_hardening INTERFACE -D_FORTIFY_SOURCE=2)
endif()
target_link_options(ml_hardening INTERFACE -pie -Wl,-z,relro,-z,now,-z,noexecstack)
