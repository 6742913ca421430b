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
