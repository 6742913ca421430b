#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Guest half of bench/vfs.sh: the same workload on every shared-directory backend (virtio-9p,
# virtiofs, matchlock's host-served FUSE mount). POSIX sh; runs under busybox sh (the bench
# initramfs, the busybox fixture image) and under dash with coreutils (the agent image).
#   sh vfs_guest.sh DIR
# DIR is the mounted share, prepared by bench/vfs.sh: DIR/seqread.bin (256 MiB written by the host),
# DIR/repo (a committed 5,000-file git repo), optionally DIR/.bench/tools (host git + its libraries).
# Times are taken inside the guest and printed one per line as NAME_ms=N; a row that cannot run
# prints NAME=unavailable(reason). The last line is vfs_done=1.
set -u
dir=${1:?usage: vfs_guest.sh DIR}
work=$dir/work

# The busybox image has only a few applet links; give the workload the full set from the same binary.
for tool in dd seq xargs touch ls mkdir rm sync awk cp wc stat head tr grep; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if command -v busybox >/dev/null 2>&1; then
      mkdir -p /tmp/vfs-bb && busybox --install -s /tmp/vfs-bb && PATH=/tmp/vfs-bb:$PATH
    fi
    break
  fi
done

# Wall clock in ms. GNU date has %N; busybox date does not, but its adjtimex applet prints the
# clock with tv_usec holding nanoseconds when the STA_NANO (8192) status bit is set.
now_ms() {
  t=$(date +%s%N 2>/dev/null)
  case $t in
    *N* | '') ;;
    *)
      echo $((t / 1000000))
      return
      ;;
  esac
  # shellcheck disable=SC2046 # three numbers, split on purpose
  set -- $(adjtimex 2>/dev/null | awk '/status:/ {n = int($2 / 8192) % 2} /tv_sec:/ {s = $2}
    /tv_usec:/ {u = $2} END {print s, u, n}')
  if [ "${3:-0}" = 1 ]; then echo $(($1 * 1000 + $2 / 1000000)); else echo $(($1 * 1000 + $2 / 1000)); fi
}

dropped=yes
drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || dropped=no
}

rm -rf "$work"
mkdir -p "$work/files" || { echo "vfs_error=cannot create $work"; exit 1; }

# 1. sequential write, 256 MiB, flushed to the host before the clock stops
drop_caches
t0=$(now_ms)
dd if=/dev/zero of="$work/seq.bin" bs=1M count=256 conv=fsync 2>/dev/null && sync
t1=$(now_ms)
size=$(stat -c %s "$work/seq.bin")
if [ "$size" = 268435456 ]; then echo "seqwrite_ms=$((t1 - t0))"; else echo "seqwrite=unavailable(wrote $size bytes)"; fi

# 2. sequential read, 256 MiB the host wrote (no guest cache is warm; dropped anyway)
drop_caches
t0=$(now_ms)
dd if="$dir/seqread.bin" of=/dev/null bs=1M 2>/tmp/vfs-dd.err
t1=$(now_ms)
if grep -q '^256+0 records in' /tmp/vfs-dd.err; then
  echo "seqread_ms=$((t1 - t0))"
else
  echo "seqread=unavailable($(head -c 120 /tmp/vfs-dd.err | tr '\n' ' '))"
fi

# 3. create 10,000 empty files in one directory (a few touch processes via xargs), then sync
cd "$work/files" || exit 1
t0=$(now_ms)
seq 1 10000 | xargs touch && sync
t1=$(now_ms)
cd / || exit 1
echo "create10k_ms=$((t1 - t0))"

# 4. stat the 10,000 files (readdir + lstat each) after dropping the dentry and inode caches
drop_caches
t0=$(now_ms)
ls -ln "$work/files" >/dev/null
t1=$(now_ms)
count=$(ls "$work/files" | wc -l)
if [ "$count" -eq 10000 ]; then echo "stat10k_ms=$((t1 - t0))"; else echo "stat10k=unavailable(saw $count files)"; fi

# 5. git status on the 5,000-file repo, twice, with the guest's git or else the host's (copied to
#    the guest's /tmp untimed; the agent and busybox images have no git)
tools=$dir/.bench/tools
if command -v git >/dev/null 2>&1; then
  git_cmd=git
elif [ -x "$tools/git" ] && [ -e "$tools/ld-linux-x86-64.so.2" ]; then
  rm -rf /tmp/vfs-git && cp -r "$tools" /tmp/vfs-git
  git_cmd="/tmp/vfs-git/ld-linux-x86-64.so.2 --library-path /tmp/vfs-git /tmp/vfs-git/git"
else
  git_cmd=
fi
if [ -z "$git_cmd" ]; then
  echo "gitstatus1=unavailable(no git in the guest)"
  echo "gitstatus2=unavailable(no git in the guest)"
elif [ ! -d "$dir/repo/.git" ]; then
  echo "gitstatus1=unavailable(no repo)"
  echo "gitstatus2=unavailable(no repo)"
else
  export HOME=/tmp GIT_CONFIG_NOSYSTEM=1
  # 1st: if the guest sees other inode numbers (or ctimes) than the host's git recorded, git
  # re-hashes every file and rewrites the index (9p shows host inode + 2). 2nd: the pure stat walk.
  for pass in 1 2; do
    drop_caches
    t0=$(now_ms)
    $git_cmd -c safe.directory='*' -C "$dir/repo" status --porcelain >/tmp/vfs-git-status 2>&1
    rc=$?
    t1=$(now_ms)
    dirty=$(wc -l </tmp/vfs-git-status)
    if [ "$rc" -eq 0 ] && [ "$dirty" -eq 0 ]; then
      echo "gitstatus${pass}_ms=$((t1 - t0))"
    else
      echo "gitstatus${pass}=unavailable(rc $rc, $dirty lines: $(head -c 120 /tmp/vfs-git-status | tr '\n' ' '))"
    fi
  done
fi

echo "dropcaches=$dropped"
echo "vfs_done=1"
