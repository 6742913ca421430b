#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the guest vmlinux from Debian's linux-source-6.1 with patches/*.patch applied and
# matchlock.config on top of tinyconfig, cached under
# ${XDG_CACHE_HOME:-~/.cache}/matchlock/kernels/<key>/vmlinux where <key> hashes the fragment, the
# patches, this script and the linux-source package version. Prints the path.
#   guest/kernel/build.sh [--print-key]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/matchlock.config"
tarball=/usr/src/linux-source-6.1.tar.xz
if [[ ! -f $tarball ]]; then
  echo "build.sh: $tarball missing; install linux-source-6.1 (scripts/setup does)" >&2
  exit 66
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
patches=("$here"/patches/*.patch)
key=$(cat "$fragment" "$0" "${patches[@]}" <(echo "$src_version") | sha256sum | cut -c1-16)
if [[ "${1:-}" == "--print-key" ]]; then
  echo "$key"
  exit 0
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/kernels/$key"
if [[ -f "$cache/vmlinux" ]]; then
  echo "$cache/vmlinux"
  exit 0
fi
mkdir -p "$(dirname "$cache")"
work=$(mktemp -d "$(dirname "$cache")/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build.sh: building guest kernel $key (linux-source $src_version) in $work" >&2
tar -C "$work" -xf "$tarball"
cd "$work"/linux-source-6.1
for p in "${patches[@]}"; do
  patch -s -p1 <"$p" >&2
done
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig >&2
# Every option the fragment asks for must have survived dependency resolution.
missing=0
while IFS= read -r line; do
  [[ $line =~ ^CONFIG_ ]] || continue
  if ! grep -qxF "$line" .config; then
    echo "build.sh: $line did not survive olddefconfig" >&2
    missing=1
  fi
done <"$fragment"
((missing == 0)) || exit 1
make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$work/out"
cp vmlinux .config "$work/out/"
mv "$work/out" "$cache"
echo "$cache/vmlinux"
