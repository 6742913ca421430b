# SPDX-License-Identifier: Apache-2.0
# `cpack -G DEB` from the build directory builds a .deb of the host binary. Kernel and guest
# artefacts join the package when the VM runtime lands.
set(CPACK_PACKAGE_NAME "matchlock")
set(CPACK_PACKAGE_VENDOR "matchlock")
set(CPACK_PACKAGE_CONTACT "matchlock maintainers")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "Declarative micro-VM sandboxes for AI agents")
set(CPACK_DEBIAN_PACKAGE_SECTION "admin")
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
include(CPack)
