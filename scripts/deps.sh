# SPDX-License-Identifier: Apache-2.0
# The Debian packages matchlock needs to build, run and test. Sourced by scripts/setup.
ML_DEPS=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git file
  clang-14 clang-format-14 clang-tidy-14 libclang-rt-14-dev
  # libraries (see docs/architecture.md for who uses what)
  libtomlplusplus-dev libyaml-cpp-dev libcli11-dev nlohmann-json3-dev libexpected-dev
  libspdlog-dev libfmt-dev libsqlite3-dev libssl-dev libvalijson-dev catch2
  libcurl4-openssl-dev libarchive-dev libext2fs-dev libnftnl-dev libmnl-dev
  # tools used at run time and by tests
  sqlite3 python3 python3-pytest python3-jsonschema python3-yaml
  # confinement tests: gdb (gcore) takes a core of the supervisor
  gdb
  # images: rootfs disks (mke2fs, debugfs, e2fsck), test images and local registries
  e2fsprogs busybox-static debootstrap docker-registry skopeo openssl apache2-utils
  # guest kernel (guest/kernel/build.sh) and the VMM
  linux-source-6.1 patch bc bison flex libelf-dev cpio xz-utils qemu-system-x86 busybox-static
  # egress proxy: tests/acceptance/test_egress.py and bench/egress.sh
  iproute2 nftables curl dnsmasq-base mitmproxy nginx-light
)
