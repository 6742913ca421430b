#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Shared-directory benchmark, side by side on the same guest kernel, 1 vCPU and 512 MiB:
#   9p        bare qemu-system-x86_64 microvm, virtio-9p-device (fsdev local, passthrough),
#             mounted with trans=virtio,version=9p2000.L,msize=524288;
#   virtiofs  bare qemu microvm, vhost-user-fs-device + /usr/lib/qemu/virtiofsd -o cache=auto;
#   matchlock `matchlock run -v SHARE:/workspace/x:rw --workspace /workspace` (host-served FUSE:
#             a virtio-fs device the supervisor serves over vhost-user; set
#             MATCHLOCK_VFS_TRANSPORT=stream to measure the channel relay instead).
# The baselines boot an initramfs (busybox + bench/vfs_guest.sh as the workload); matchlock runs
# the same script with the same busybox binary (busybox fixture image). Every time is taken inside
# the guest. Rows: 256 MiB sequential write (fsync) and read, create and stat 10,000 files,
# `git status` on a committed 5,000-file repo (the host's git, carried into the guest), twice:
# the 1st re-hashes every file when the guest's inode numbers differ from the host's (9p), the 2nd
# is the stat walk alone.
# Prints medians of VFS_RUNS runs (default 3) and speed ratios baseline_ms / matchlock_ms:
# >= 1.0 means matchlock is at least as fast as that baseline.
# Never a test: numbers move with machine load.
#   VFS_RUNS=3 bench/vfs.sh
# Env: MATCHLOCK_KERNEL, MATCHLOCK_BIN, MATCHLOCK_ACCEL (default tcg, for both sides),
#      VFS_IMAGE (default busybox:latest; the fixture is imported when it is busybox:latest),
#      VFS_ONLY="9p virtiofs matchlock" (a subset of the columns), VFS_KEEP=1 (keep the temp dir).
# shellcheck disable=SC2054 # commas inside QEMU option values, not array separators
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
n=${VFS_RUNS:-3}
kernel=${MATCHLOCK_KERNEL:-$(guest/kernel/build.sh)}
ml=${MATCHLOCK_BIN:-build/matchlock}
image=${VFS_IMAGE:-busybox:latest}
only=${VFS_ONLY:-9p virtiofs matchlock}
accel=${MATCHLOCK_ACCEL:-tcg}
mem=512
qemu=${MATCHLOCK_QEMU:-qemu-system-x86_64}
virtiofsd=${VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
rows=(seqwrite seqread create10k stat10k gitstatus1 gitstatus2)
declare -A label=([seqwrite]="seq write 256 MiB" [seqread]="seq read 256 MiB"
  [create10k]="create 10k files" [stat10k]="stat 10k files"
  [gitstatus1]="git status 5k, 1st" [gitstatus2]="git status 5k, 2nd")

tmp=$(mktemp -d)
share=$tmp/share
export MATCHLOCK_HOME="$tmp/home" XDG_CACHE_HOME="$tmp/cache" MATCHLOCK_KERNEL="$kernel"
export MATCHLOCK_ACCEL=$accel
vfsd_pid=
cleanup() {
  if [[ -n $vfsd_pid ]]; then kill "$vfsd_pid" 2>/dev/null || true; fi
  if [[ -x $ml ]]; then
    "$ml" kill --all >/dev/null 2>&1 || true
    "$ml" prune >/dev/null 2>&1 || true
  fi
  if [[ -n ${VFS_KEEP:-} ]]; then echo "vfs.sh: kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$share/.bench" "$tmp/res"
log() { echo "vfs.sh: $*" >&2; }

# --- the share: a 256 MiB file written by the host, a committed repo, the workload, host git ---
head -c 268435456 /dev/urandom >"$share/seqread.bin"
cp bench/vfs_guest.sh "$share/.bench/vfs_guest.sh"
python3 - "$tmp/repo" <<'EOF'
import os, sys
root = sys.argv[1]
for d in range(50):
    os.makedirs(f"{root}/src/d{d:02d}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/src/d{d:02d}/f{f:03d}.txt", "w") as fh:
            fh.write(f"file {d} {f}\n" * 8)
EOF
(
  cd "$tmp/repo"
  find . -type f -exec touch -d @1600000000 {} +  # old mtimes: no racily clean index entries
  git init -q
  git add -A
  git -c user.name=bench -c user.email=bench@localhost commit -qm "5000 files"
)
if git_bin=$(command -v git); then
  mkdir -p "$share/.bench/tools"
  cp "$git_bin" "$share/.bench/tools/git"
  ldd "$git_bin" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
    [[ -f $lib ]] && cp -L "$lib" "$share/.bench/tools/"
  done
fi

# Before each run: fresh work dir and repo copy, its index refreshed on the host (new inodes).
prepare_share() {
  rm -rf "$share/work" "$share/repo"
  cp -a "$tmp/repo" "$share/repo"
  git -C "$share/repo" status --porcelain >/dev/null
}

# records NAME_ms=N lines of run output $2 for column $1; fails when the workload did not finish
record() {
  local col=$1 out=$2 line
  tr -d '\r' <"$out" >"$out.clean"
  grep -q '^vfs_done=1' "$out.clean" || return 1
  while IFS= read -r line; do
    case $line in
      *_ms=*) echo "${line#*_ms=}" >>"$tmp/res/$col.${line%%_ms=*}" ;;
      *=unavailable*) echo "${line#*=}" >"$tmp/res/$col.${line%%=*}.why" ;;
      dropcaches=no) log "$col: could not drop the guest page cache" ;;
    esac
  done <"$out.clean"
}

# --- bare QEMU baselines: kernel + busybox initramfs whose /init mounts the share and runs it ---
cat >"$tmp/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /mnt
case $(cat /proc/cmdline) in
  *vfs.fs=9p*) mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 bench /mnt ;;
  *vfs.fs=virtiofs*) mount -t virtiofs bench /mnt ;;
  *) false ;;
esac || echo "vfs_error=mount failed"
/bin/sh /mnt/.bench/vfs_guest.sh /mnt
umount /mnt
reboot -f
EOF
tests/tools/mkinitramfs.py "$tmp/init" "$tmp/vfs.cpio" --busybox /bin/busybox

machine=microvm,x-option-roms=off,rtc=off,acpi=off
accel_args=(-accel tcg)
[[ $accel == kvm ]] && accel_args=(-accel kvm -cpu host,arch-capabilities=off)

bare_run() {  # $1 = 9p | virtiofs; $2 = output file
  local fs=$1 out=$2 dev_args
  if [[ $fs == 9p ]]; then
    dev_args=(-M "$machine"
      -fsdev "local,id=fs0,path=$share,security_model=passthrough"
      -device virtio-9p-device,fsdev=fs0,mount_tag=bench)
  else
    rm -f "$tmp/vfs.sock"
    "$virtiofsd" --socket-path="$tmp/vfs.sock" -o source="$share" -o cache=auto \
      >"$tmp/virtiofsd.log" 2>&1 &
    vfsd_pid=$!
    for _ in $(seq 100); do [[ -S $tmp/vfs.sock ]] && break; sleep 0.1; done
    [[ -S $tmp/vfs.sock ]] || { log "virtiofsd did not start:"; cat "$tmp/virtiofsd.log" >&2; return 1; }
    # libvhost-user (virtiofsd) refuses legacy virtio, which microvm's virtio-mmio defaults to.
    dev_args=(-M "$machine,memory-backend=mem" -global virtio-mmio.force-legacy=false
      -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
      -chardev "socket,id=vfs,path=$tmp/vfs.sock"
      -device vhost-user-fs-device,chardev=vfs,tag=bench)
  fi
  local rc=0
  timeout 600 nice -n 10 "$qemu" "${dev_args[@]}" -nodefaults -no-user-config -nographic \
    -no-reboot "${accel_args[@]}" -smp 1 -m "${mem}M" -kernel "$kernel" -initrd "$tmp/vfs.cpio" \
    -append "console=ttyS0 reboot=t panic=-1 quiet vfs.fs=$fs" -serial stdio \
    </dev/null >"$out" 2>&1 || rc=$?
  if [[ -n $vfsd_pid ]]; then
    kill "$vfsd_pid" 2>/dev/null || true
    wait "$vfsd_pid" 2>/dev/null || true
    vfsd_pid=
  fi
  return $rc
}

columns=()
for fs in 9p virtiofs; do
  [[ " $only " == *" $fs "* ]] || continue
  columns+=("$fs")
  for ((i = 0; i < n; i++)); do
    prepare_share
    log "$fs run $((i + 1))/$n"
    if ! bare_run "$fs" "$tmp/out" || ! record "$fs" "$tmp/out"; then
      log "$fs run $((i + 1)) failed; its output:"
      tail -30 "$tmp/out" >&2
      exit 1
    fi
    cp "$tmp/out" "$tmp/res/$fs.out.$i"
  done
done

# --- matchlock: the same script through `matchlock run -v` (skipped until the mount works) ---
ml_guest_dir=/workspace/x
ml_run() {  # $1 = host dir to mount; rest = command in the guest
  local host=$1
  shift
  timeout 900 nice -n 10 "$ml" run --image "$image" --cpus 1 --memory "$mem" --no-network \
    -v "$host:$ml_guest_dir:rw" --workspace /workspace -- "$@"
}
ml_skip=
if [[ " $only " == *" matchlock "* ]]; then
  if [[ ! -x $ml ]]; then
    ml_skip="$ml is not built"
  else
    [[ $image == busybox:latest ]] && import_busybox "$ml"
    mkdir -p "$tmp/probe"
    token=vfs-probe-$$
    echo "$token" >"$tmp/probe/probe.txt"
    # reads a host file and writes one back: the mount must be write-through (rw), not an overlay
    if ! probe=$(ml_run "$tmp/probe" /bin/sh -c \
      "cat $ml_guest_dir/probe.txt && echo $token >$ml_guest_dir/probe.out" 2>&1) ||
      [[ $(tr -d '\r' <<<"$probe") != *"$token"* ]] ||
      [[ $(cat "$tmp/probe/probe.out" 2>/dev/null) != "$token" ]]; then
      ml_skip="\`matchlock run -v HOST:$ml_guest_dir:rw --workspace /workspace\` does not work yet: $(head -c 300 <<<"$probe" | tr '\n' ' ')"
    fi
  fi
  if [[ -z $ml_skip ]]; then
    columns+=(matchlock)
    for ((i = 0; i < n; i++)); do
      prepare_share
      log "matchlock run $((i + 1))/$n"
      if ! ml_run "$share" /bin/sh "$ml_guest_dir/.bench/vfs_guest.sh" "$ml_guest_dir" \
        >"$tmp/out" 2>&1 || ! record matchlock "$tmp/out"; then
        log "matchlock run $((i + 1)) failed; its output:"
        tail -30 "$tmp/out" >&2
        ml_skip="run $((i + 1)) failed (output above); the baselines are still printed"
        rm -f "$tmp"/res/matchlock.*
        break
      fi
    done
  fi
fi

# --- table ---
cell() {  # median ms of column $1, row $2, or "-"
  if [[ -s $tmp/res/$1.$2 ]]; then median <"$tmp/res/$1.$2"; else echo -; fi
}
printf 'guest: 1 vCPU, %d MiB, accel %s, kernel %s; median of %d run(s), ms inside the guest\n' \
  "$mem" "$accel" "$kernel" "$n"
printf '%-20s %10s %10s %10s %9s %9s\n' row 9p virtiofs matchlock 9p/ours vfs/ours
for r in "${rows[@]}"; do
  p=$(cell 9p "$r")
  v=$(cell virtiofs "$r")
  m=$(cell matchlock "$r")
  rp=-
  rv=-
  if [[ $m != - && $m != 0 ]]; then
    [[ $p != - ]] && rp=$(ratio "$p" "$m")
    [[ $v != - ]] && rv=$(ratio "$v" "$m")
  fi
  printf '%-20s %10s %10s %10s %9s %9s\n' "${label[$r]}" "$p" "$v" "$m" "$rp" "$rv"
done
for c in "${columns[@]}"; do
  for r in "${rows[@]}"; do
    [[ -f $tmp/res/$c.$r.why ]] && echo "  $c, ${label[$r]}: $(cat "$tmp/res/$c.$r.why")"
  done
done
echo "ratios: baseline_ms / matchlock_ms; >= 1.0 means matchlock is at least as fast."
if [[ -n $ml_skip ]]; then
  echo "matchlock column skipped: $ml_skip"
fi
