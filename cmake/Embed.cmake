# SPDX-License-Identifier: Apache-2.0
# ml_embed_files(TARGET name NAMESPACE ns FILES a b ...): generates a C++ source holding each file as
# a string, exposed as `std::span<const ns::EmbeddedFile> ns::embeddedFiles()`. Names keep the
# file's basename; order follows FILES (callers pass them sorted).
function(ml_embed_files)
  cmake_parse_arguments(EMB "" "TARGET;NAMESPACE" "FILES" ${ARGN})
  set(out_cc ${CMAKE_CURRENT_BINARY_DIR}/${EMB_TARGET}_embedded.cc)
  set(out_h ${CMAKE_CURRENT_BINARY_DIR}/${EMB_TARGET}_embedded.h)
  # A ';' in the command line would split it into two shell commands: pass the list '|'-joined.
  string(REPLACE ";" "|" files_arg "${EMB_FILES}")
  add_custom_command(
    OUTPUT ${out_cc} ${out_h}
    COMMAND ${CMAKE_COMMAND} -DOUT_CC=${out_cc} -DOUT_H=${out_h} -DNS=${EMB_NAMESPACE}
            "-DFILES=${files_arg}" -P ${PROJECT_SOURCE_DIR}/cmake/EmbedGen.cmake
    DEPENDS ${EMB_FILES} ${PROJECT_SOURCE_DIR}/cmake/EmbedGen.cmake
    COMMENT "Embedding files for ${EMB_TARGET}"
    VERBATIM)
  add_library(${EMB_TARGET} STATIC ${out_cc})
  target_include_directories(${EMB_TARGET} PUBLIC ${CMAKE_CURRENT_BINARY_DIR})
endfunction()
