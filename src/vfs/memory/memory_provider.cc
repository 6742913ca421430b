// SPDX-License-Identifier: Apache-2.0
// The in-memory provider: a small POSIX filesystem in RAM (a tmpfs for one sandbox).
//
// The client is an untrusted guest, so every input is checked and every resource is capped:
//   - file data: the sum over live inodes of max(size, fallocated end) is at most `max_bytes`
//     (holes count: a write at offset 1 << 40 answers ENOSPC, it allocates nothing). Data sits in
//     64 KiB chunks that hold only the bytes written, so holes below that cap cost no memory and
//     the memory held never exceeds the bytes charged (plus container overhead);
//   - inodes (kMaxInodes), names including hard links (kMaxNames), the bytes of names and symlink
//     targets (kMaxMetaBytes), open handles (kMaxHandles, EMFILE), links per inode (kMaxLinks).
// Nothing here throws: answers are positive errnos, and the allocations that a guest sizes (file
// data, read buffers) catch std::bad_alloc and answer ENOMEM.
//
// Permissions are not checked here: the guest kernel checks them (default_permissions) against
// the attributes this provider reports.
#include <dirent.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "vfs/provider.h"

namespace matchlock::vfs {
namespace {

constexpr uint64_t kRootNode = 1;
constexpr uint64_t kBlockSize = 4096;
constexpr uint64_t kChunkSize = uint64_t{64} * 1024;
constexpr size_t kNameMax = 255;
constexpr size_t kSymlinkMax = 4095;
constexpr size_t kMaxHandles = 4096;
constexpr uint64_t kMaxInodes = 1'000'000;
constexpr uint64_t kMaxNames = 2'000'000;
constexpr uint64_t kMaxMetaBytes = 128ULL << 20;
constexpr uint64_t kMaxLinks = 65000;
constexpr uint64_t kMaxFileSize = static_cast<uint64_t>(INT64_MAX);
/// Larger than any FUSE read (max_pages 256 = 1 MiB); bounds the buffer a request can size.
constexpr size_t kMaxIo = 16U << 20;
constexpr uint32_t kPermMask = 07777;
constexpr uint32_t kStripMask = S_ISUID | S_ISGID;
constexpr time_t kDay = time_t{24} * 3600;

timespec now() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

bool before(const timespec& a, const timespec& b) {
  return a.tv_sec < b.tv_sec || (a.tv_sec == b.tv_sec && a.tv_nsec < b.tv_nsec);
}

int checkName(std::string_view name) {
  if (name.empty() || name == "." || name == ".." ||
      name.find_first_of(std::string_view("/\0", 2)) != std::string_view::npos) {
    return EINVAL;
  }
  if (name.size() > kNameMax) {
    return ENAMETOOLONG;
  }
  return 0;
}

uint64_t ceilDiv(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0 ? 1 : 0);
}

struct Inode {
  uint64_t id = 0;
  uint32_t mode = 0;  ///< S_IFMT bits and permissions
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t nlink = 0;       ///< names (files); 2 + subdirectories (dirs); 0 once removed
  bool referenced = false;  ///< the server holds a reference (not yet forgotten)
  uint32_t open_count = 0;  ///< file and directory handles
  timespec atime{};
  timespec mtime{};
  timespec ctime{};

  // Regular files. Chunk i holds the bytes from i * kChunkSize on; bytes past a chunk's end
  // (and missing chunks) read as zeros. No chunk holds bytes at or past `size`.
  uint64_t size = 0;
  uint64_t reserved = 0;  ///< end of fallocate(FALLOC_FL_KEEP_SIZE) space, 0 if none
  std::map<uint64_t, std::string> chunks;

  // Directories.
  std::map<std::string, uint64_t, std::less<>> children;
  uint64_t parent = 0;  ///< the directory holding this one's name (root: itself)

  // Symbolic links.
  std::string target;

  bool isDir() const { return S_ISDIR(mode); }
  bool isReg() const { return S_ISREG(mode); }
  bool isLnk() const { return S_ISLNK(mode); }
  /// The bytes this inode counts against max_bytes.
  uint64_t charge() const { return isReg() ? std::max(size, reserved) : 0; }
};

struct Handle {
  uint64_t node = 0;
  bool dir = false;
  int flags = 0;  ///< the open flags (O_ACCMODE, O_APPEND)
  // Directory cursor: the last entry a readdir consumed and the offset it was given.
  bool cursor_valid = false;
  uint64_t cursor_off = 0;
  std::string cursor_name;
};

class MemoryProvider final : public Provider {
 public:
  MemoryProvider(uint64_t max_bytes, const Caller& owner) : max_bytes_(max_bytes) {
    Inode root;
    root.id = kRootNode;
    root.mode = S_IFDIR | 0755;
    root.uid = owner.uid;
    root.gid = owner.gid;
    root.nlink = 2;
    root.parent = kRootNode;
    root.atime = root.mtime = root.ctime = now();
    inodes_.emplace(kRootNode, std::move(root));
  }

  uint64_t rootNode() const override { return kRootNode; }
  bool readOnly() const override { return false; }

  Ret<Entry> lookup(uint64_t parent, std::string_view name) override {
    if (int err = checkName(name); err != 0) {
      return fail(err);
    }
    auto dir = findDir(parent);
    if (!dir) {
      return fail(dir.error());
    }
    auto it = (*dir)->children.find(name);
    if (it == (*dir)->children.end()) {
      return fail(ENOENT);
    }
    return entryOf(inode(it->second));
  }

  void forget(uint64_t node) override {
    if (node == kRootNode) {
      return;
    }
    auto it = inodes_.find(node);
    if (it == inodes_.end()) {
      return;
    }
    it->second.referenced = false;
    maybeFree(node);
  }

  Ret<struct stat> getattr(uint64_t node) override {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    return statOf(*ino);
  }

  Ret<struct stat> setattr(uint64_t node, const SetAttr& in, uint64_t fh) override {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    if (fh != 0) {
      auto h = handles_.find(fh);
      if (h == handles_.end() || h->second.node != node) {
        return fail(EBADF);
      }
    }
    const timespec t = now();
    bool set_atime = false;
    bool set_mtime = false;
    timespec atime = t;
    timespec mtime = t;
    if ((in.valid & FATTR_ATIME) != 0 || (in.valid & FATTR_ATIME_NOW) != 0) {
      auto r = timeArg(in.atime, (in.valid & FATTR_ATIME_NOW) != 0, t);
      if (!r) {
        return fail(r.error());
      }
      set_atime = r->first;
      atime = r->second;
    }
    if ((in.valid & FATTR_MTIME) != 0 || (in.valid & FATTR_MTIME_NOW) != 0) {
      auto r = timeArg(in.mtime, (in.valid & FATTR_MTIME_NOW) != 0, t);
      if (!r) {
        return fail(r.error());
      }
      set_mtime = r->first;
      mtime = r->second;
    }
    // The size first: it is the only change that can fail past this point.
    if ((in.valid & FATTR_SIZE) != 0) {
      if (ino->isDir()) {
        return fail(EISDIR);
      }
      if (!ino->isReg()) {
        return fail(EINVAL);
      }
      if (in.size > kMaxFileSize) {
        return fail(EFBIG);
      }
      if (auto r = resize(*ino, in.size); !r) {
        return fail(r.error());
      }
      ino->mtime = t;
    }
    if ((in.valid & FATTR_MODE) != 0) {
      ino->mode = (ino->mode & S_IFMT) | (in.mode & kPermMask & ~kStripMask);
    }
    if ((in.valid & FATTR_UID) != 0) {
      ino->uid = in.uid;
    }
    if ((in.valid & FATTR_GID) != 0) {
      ino->gid = in.gid;
    }
    if ((in.valid & FATTR_KILL_SUIDGID) != 0) {
      ino->mode &= ~kStripMask;
    }
    if (set_atime) {
      ino->atime = atime;
    }
    if (set_mtime) {
      ino->mtime = mtime;
    }
    ino->ctime = t;
    return statOf(*ino);
  }

  Ret<std::string> readlink(uint64_t node) override {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    if (!ino->isLnk()) {
      return fail(EINVAL);
    }
    try {
      return ino->target;
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    }
  }

  Ret<Entry> mknod(uint64_t parent, std::string_view name, uint32_t mode, uint32_t /*rdev*/,
                   const Caller& caller) override {
    uint32_t type = mode & S_IFMT;
    if (type == 0) {
      type = S_IFREG;  // as mknod(2)
    }
    if (type == S_IFCHR || type == S_IFBLK) {
      return fail(EPERM);
    }
    if (type != S_IFREG && type != S_IFIFO && type != S_IFSOCK) {
      return fail(EINVAL);
    }
    auto made = makeChild(parent, name, type | (mode & kPermMask), caller, 0);
    if (!made) {
      return fail(made.error());
    }
    return entryOf(**made);
  }

  Ret<Entry> mkdir(uint64_t parent, std::string_view name, uint32_t mode,
                   const Caller& caller) override {
    auto made = makeChild(parent, name, S_IFDIR | (mode & kPermMask), caller, 0);
    if (!made) {
      return fail(made.error());
    }
    return entryOf(**made);
  }

  Ret<Entry> symlink(uint64_t parent, std::string_view name, std::string_view target,
                     const Caller& caller) override {
    if (target.empty()) {
      return fail(ENOENT);
    }
    if (target.size() > kSymlinkMax) {
      return fail(ENAMETOOLONG);
    }
    if (target.find('\0') != std::string_view::npos) {
      return fail(EINVAL);
    }
    std::string copy;
    try {
      copy.assign(target);
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    }
    auto made = makeChild(parent, name, S_IFLNK | 0777, caller, copy.size());
    if (!made) {
      return fail(made.error());
    }
    (*made)->target = std::move(copy);
    (*made)->size = target.size();
    meta_bytes_ += target.size();
    return entryOf(**made);
  }

  Ret<Entry> link(uint64_t node, uint64_t new_parent, std::string_view new_name) override {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    if (ino->isDir()) {
      return fail(EPERM);
    }
    if (ino->nlink == 0) {
      return fail(ENOENT);
    }
    if (ino->nlink >= kMaxLinks) {
      return fail(EMLINK);
    }
    auto dir = findLiveDirForCreate(new_parent, new_name);
    if (!dir) {
      return fail(dir.error());
    }
    if (int err = reserveName(new_name.size()); err != 0) {
      return fail(err);
    }
    if (int err = addName(**dir, new_name, node); err != 0) {
      return fail(err);
    }
    const timespec t = now();
    ino->nlink++;
    ino->ctime = t;
    (*dir)->mtime = (*dir)->ctime = t;
    return entryOf(*ino);
  }

  RetVoid unlink(uint64_t parent, std::string_view name) override {
    if (int err = checkName(name); err != 0) {
      return fail(err);
    }
    auto dir = findDir(parent);
    if (!dir) {
      return fail(dir.error());
    }
    auto it = (*dir)->children.find(name);
    if (it == (*dir)->children.end()) {
      return fail(ENOENT);
    }
    if (inode(it->second).isDir()) {
      return fail(EISDIR);
    }
    removeEntry(**dir, it, now());
    return {};
  }

  RetVoid rmdir(uint64_t parent, std::string_view name) override {
    if (int err = checkName(name); err != 0) {
      return fail(err);
    }
    auto dir = findDir(parent);
    if (!dir) {
      return fail(dir.error());
    }
    auto it = (*dir)->children.find(name);
    if (it == (*dir)->children.end()) {
      return fail(ENOENT);
    }
    const Inode& child = inode(it->second);
    if (!child.isDir()) {
      return fail(ENOTDIR);
    }
    if (!child.children.empty()) {
      return fail(ENOTEMPTY);
    }
    removeEntry(**dir, it, now());
    return {};
  }

  RetVoid rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                 std::string_view new_name, uint32_t flags) override {
    if ((flags & ~static_cast<uint32_t>(RENAME_NOREPLACE | RENAME_EXCHANGE)) != 0 ||
        flags == (RENAME_NOREPLACE | RENAME_EXCHANGE)) {
      return fail(EINVAL);
    }
    if (int err = checkName(name); err != 0) {
      return fail(err);
    }
    if (int err = checkName(new_name); err != 0) {
      return fail(err);
    }
    auto src_dir_r = findDir(parent);
    if (!src_dir_r) {
      return fail(src_dir_r.error());
    }
    auto dst_dir_r = findDir(new_parent);
    if (!dst_dir_r) {
      return fail(dst_dir_r.error());
    }
    Inode& src_dir = **src_dir_r;
    Inode& dst_dir = **dst_dir_r;
    auto src_it = src_dir.children.find(name);
    if (src_it == src_dir.children.end()) {
      return fail(ENOENT);
    }
    if (dst_dir.nlink == 0) {
      return fail(ENOENT);
    }
    Inode& src = inode(src_it->second);
    auto dst_it = dst_dir.children.find(new_name);
    Inode* dst = dst_it == dst_dir.children.end() ? nullptr : &inode(dst_it->second);
    const timespec t = now();

    if ((flags & RENAME_EXCHANGE) != 0) {
      if (dst == nullptr) {
        return fail(ENOENT);
      }
      if (&src_dir == &dst_dir) {
        if (src_it == dst_it) {
          return {};
        }
      } else {
        // Each side moves into the other's parent: neither may land inside itself.
        if (src.isDir() && isAncestorOrSelf(src.id, dst_dir.id)) {
          return fail(EINVAL);
        }
        if (dst->isDir() && isAncestorOrSelf(dst->id, src_dir.id)) {
          return fail(EINVAL);
        }
        if (src.isDir()) {
          src.parent = dst_dir.id;
          src_dir.nlink--;
          dst_dir.nlink++;
        }
        if (dst->isDir()) {
          dst->parent = src_dir.id;
          dst_dir.nlink--;
          src_dir.nlink++;
        }
      }
      std::swap(src_it->second, dst_it->second);
      src.ctime = dst->ctime = t;
      src_dir.mtime = src_dir.ctime = t;
      dst_dir.mtime = dst_dir.ctime = t;
      return {};
    }

    if (dst != nullptr) {
      if (dst == &src) {
        return {};  // two names of one inode (or the same name): POSIX says do nothing
      }
      if ((flags & RENAME_NOREPLACE) != 0) {
        return fail(EEXIST);
      }
      if (src.isDir() && !dst->isDir()) {
        return fail(ENOTDIR);
      }
      if (!src.isDir() && dst->isDir()) {
        return fail(EISDIR);
      }
      if (dst->isDir() && !dst->children.empty()) {
        return fail(ENOTEMPTY);
      }
    }
    if (src.isDir() && isAncestorOrSelf(src.id, dst_dir.id)) {
      return fail(EINVAL);
    }
    // The new name costs its bytes unless it replaces an equal name.
    if (dst == nullptr && new_name.size() > name.size() &&
        meta_bytes_ + (new_name.size() - name.size()) > kMaxMetaBytes) {
      return fail(ENOSPC);
    }
    const uint64_t moved = src.id;
    if (dst != nullptr) {
      // The name stays in dst_dir and names `moved` now; the replaced inode loses it.
      dst_it->second = moved;
      dropName(*dst, dst_dir, t);
      meta_bytes_ -= name.size();
      names_--;
      src_dir.children.erase(src_it);
    } else {
      // A new key is the one allocation; make it before changing anything.
      std::string key;
      try {
        key.assign(new_name);
      } catch (const std::bad_alloc&) {
        return fail(ENOMEM);
      }
      auto node = src_dir.children.extract(src_it);
      node.key() = std::move(key);
      meta_bytes_ = meta_bytes_ - name.size() + new_name.size();
      dst_dir.children.insert(std::move(node));
    }
    if (src.isDir() && src_dir.id != dst_dir.id) {
      src_dir.nlink--;
      dst_dir.nlink++;
      src.parent = dst_dir.id;
    }
    src.ctime = t;
    src_dir.mtime = src_dir.ctime = t;
    dst_dir.mtime = dst_dir.ctime = t;
    if (dst != nullptr) {
      maybeFree(dst->id);
    }
    return {};
  }

  Ret<uint64_t> open(uint64_t node, int flags) override {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    if (ino->isDir()) {
      return fail(EISDIR);
    }
    if (!ino->isReg()) {
      return fail(EACCES);
    }
    if ((flags & O_ACCMODE) == O_ACCMODE) {
      return fail(EINVAL);
    }
    if (handles_.size() >= kMaxHandles) {
      return fail(EMFILE);
    }
    auto fh = addHandle(node, false, flags);
    if (!fh) {
      return fail(fh.error());
    }
    if ((flags & O_TRUNC) != 0) {
      (void)resize(*ino, 0);  // shrinking cannot fail
      const timespec t = now();
      ino->mtime = ino->ctime = t;
    }
    return *fh;
  }

  Ret<std::pair<Entry, uint64_t>> create(uint64_t parent, std::string_view name, uint32_t mode,
                                         int flags, const Caller& caller) override {
    if ((flags & O_ACCMODE) == O_ACCMODE) {
      return fail(EINVAL);
    }
    if (int err = checkName(name); err != 0) {
      return fail(err);
    }
    auto dir = findDir(parent);
    if (!dir) {
      return fail(dir.error());
    }
    if (auto it = (*dir)->children.find(name); it != (*dir)->children.end()) {
      if ((flags & O_EXCL) != 0) {
        return fail(EEXIST);
      }
      const uint64_t node = it->second;
      auto fh = open(node, flags);
      if (!fh) {
        return fail(fh.error());
      }
      return std::pair<Entry, uint64_t>(entryOf(inode(node)), *fh);
    }
    if (handles_.size() >= kMaxHandles) {
      return fail(EMFILE);
    }
    auto made = makeChild(parent, name, S_IFREG | (mode & kPermMask), caller, 0);
    if (!made) {
      return fail(made.error());
    }
    Inode& ino = **made;
    Entry entry = entryOf(ino);
    auto fh = addHandle(ino.id, false, flags);
    if (!fh) {
      ino.referenced = false;  // the server never sees this Entry; the name keeps the inode
      return fail(fh.error());
    }
    return std::pair<Entry, uint64_t>(entry, *fh);
  }

  RetVoid read(uint64_t fh, uint64_t offset, size_t size, std::string& out) override {
    auto h = fileHandle(fh);
    if (!h) {
      return fail(h.error());
    }
    if (((*h)->flags & O_ACCMODE) == O_WRONLY) {
      return fail(EBADF);
    }
    Inode& ino = inode((*h)->node);
    out.clear();
    if (offset >= ino.size || size == 0) {
      touchAtime(ino);
      return {};
    }
    const size_t n =
        static_cast<size_t>(std::min<uint64_t>(std::min(size, kMaxIo), ino.size - offset));
    try {
      out.assign(n, '\0');
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    }
    const uint64_t end = offset + n;
    for (auto it = ino.chunks.lower_bound(offset / kChunkSize);
         it != ino.chunks.end() && it->first * kChunkSize < end; ++it) {
      const uint64_t start = it->first * kChunkSize;
      const uint64_t from = std::max(start, offset);
      const uint64_t to = std::min(start + it->second.size(), end);
      if (from < to) {
        std::memcpy(out.data() + (from - offset), it->second.data() + (from - start),
                    static_cast<size_t>(to - from));
      }
    }
    touchAtime(ino);
    return {};
  }

  Ret<size_t> write(uint64_t fh, uint64_t offset, std::string_view data) override {
    auto h = fileHandle(fh);
    if (!h) {
      return fail(h.error());
    }
    if (((*h)->flags & O_ACCMODE) == O_RDONLY) {
      return fail(EBADF);
    }
    Inode& ino = inode((*h)->node);
    if (((*h)->flags & O_APPEND) != 0) {
      offset = ino.size;
    }
    if (data.empty()) {
      return size_t{0};
    }
    if (offset > kMaxFileSize || data.size() > kMaxFileSize - offset) {
      return fail(EFBIG);
    }
    const uint64_t end = offset + data.size();
    const uint64_t old_size = ino.size;
    const uint64_t old_charge = ino.charge();
    if (end > ino.size) {
      if (int err = charge(ino, end, ino.reserved); err != 0) {
        return fail(err);
      }
    }
    try {
      uint64_t pos = offset;
      while (pos < end) {
        const uint64_t index = pos / kChunkSize;
        const uint64_t in_chunk = pos % kChunkSize;
        const uint64_t n = std::min(kChunkSize - in_chunk, end - pos);
        std::string& chunk = ino.chunks[index];
        if (chunk.size() < in_chunk + n) {
          chunk.resize(static_cast<size_t>(in_chunk + n));
        }
        chunk.replace(static_cast<size_t>(in_chunk), static_cast<size_t>(n),
                      data.data() + (pos - offset), static_cast<size_t>(n));
        pos += n;
      }
    } catch (const std::bad_alloc&) {
      // Undo what the new size would have covered; bytes below the old size may have changed,
      // as a failed write(2) may leave them.
      trimData(ino, old_size);
      used_bytes_ = used_bytes_ - std::max({old_size, end, ino.reserved}) + old_charge;
      return fail(ENOMEM);
    }
    ino.size = std::max(ino.size, end);
    const timespec t = now();
    ino.mtime = ino.ctime = t;
    return data.size();
  }

  RetVoid flush(uint64_t fh) override {
    if (!fileHandle(fh)) {
      return fail(EBADF);
    }
    return {};
  }

  RetVoid fsync(uint64_t fh, bool /*datasync*/) override {
    if (!fileHandle(fh)) {
      return fail(EBADF);
    }
    return {};
  }

  void release(uint64_t fh) override {
    auto it = handles_.find(fh);
    if (it == handles_.end() || it->second.dir) {
      return;
    }
    dropHandle(it);
  }

  RetVoid fallocate(uint64_t fh, int mode, uint64_t offset, uint64_t length) override {
    auto h = fileHandle(fh);
    if (!h) {
      return fail(h.error());
    }
    if (mode != 0 && mode != FALLOC_FL_KEEP_SIZE) {
      return fail(EOPNOTSUPP);
    }
    if (((*h)->flags & O_ACCMODE) == O_RDONLY) {
      return fail(EBADF);
    }
    if (length == 0) {
      return fail(EINVAL);
    }
    if (offset > kMaxFileSize || length > kMaxFileSize - offset) {
      return fail(EFBIG);
    }
    Inode& ino = inode((*h)->node);
    const uint64_t end = offset + length;
    if (mode == 0) {
      if (end > ino.size) {
        if (int err = charge(ino, end, ino.reserved); err != 0) {
          return fail(err);
        }
        ino.size = end;
        const timespec t = now();
        ino.mtime = ino.ctime = t;
      }
    } else if (end > ino.reserved) {
      if (int err = charge(ino, ino.size, end); err != 0) {
        return fail(err);
      }
      ino.reserved = end;
    }
    return {};
  }

  Ret<uint64_t> lseek(uint64_t fh, uint64_t offset, int whence) override {
    auto h = fileHandle(fh);
    if (!h) {
      return fail(h.error());
    }
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
      return fail(EINVAL);
    }
    // Data everywhere below the size, one hole at the end.
    const Inode& ino = inode((*h)->node);
    if (offset >= ino.size) {
      return fail(ENXIO);
    }
    return whence == SEEK_DATA ? offset : ino.size;
  }

  Ret<uint64_t> opendir(uint64_t node) override {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    if (!ino->isDir()) {
      return fail(ENOTDIR);
    }
    if (handles_.size() >= kMaxHandles) {
      return fail(EMFILE);
    }
    return addHandle(node, true, O_RDONLY);
  }

  /// Offsets: "." is given next 1, ".." next 2, and the entry at index i (name order) next 3 + i.
  /// The handle remembers the last entry consumed and its offset; a call at that offset resumes
  /// after that name (std::map::upper_bound), so entries added or removed meanwhile neither
  /// repeat nor hide the others: every entry present throughout the listing is listed exactly
  /// once, whatever changed. Another offset (a seekdir to an older telldir) resumes by index,
  /// which is exact when nothing changed. Offsets grow strictly within one listing.
  RetVoid readdir(uint64_t dir_fh, uint64_t offset,
                  const std::function<bool(const DirEntry&)>& emit) override {
    auto hit = handles_.find(dir_fh);
    if (hit == handles_.end() || !hit->second.dir) {
      return fail(EBADF);
    }
    Handle& h = hit->second;
    Inode& dir = inode(h.node);
    if (offset == 0) {
      if (!emit(DirEntry{".", dir.id, DT_DIR, 1})) {
        return {};
      }
      offset = 1;
    }
    if (offset == 1) {
      if (!emit(DirEntry{"..", dir.parent, DT_DIR, 2})) {
        return {};
      }
      offset = 2;
    }
    auto& children = dir.children;
    auto it = children.begin();
    uint64_t index = offset - 2;  // the index of the entry to list first
    if (offset > 2) {
      if (h.cursor_valid && h.cursor_off == offset) {
        it = children.upper_bound(h.cursor_name);
      } else {
        for (uint64_t i = 0; i < index && it != children.end(); ++i) {
          ++it;
        }
      }
    }
    for (; it != children.end(); ++it, ++index) {
      const Inode& child = inode(it->second);
      const uint64_t next = index + 3;
      if (!emit(DirEntry{it->first, child.id, IFTODT(child.mode), next})) {
        break;
      }
      try {
        h.cursor_name = it->first;
        h.cursor_off = next;
        h.cursor_valid = true;
      } catch (const std::bad_alloc&) {
        h.cursor_valid = false;  // a later call resumes by index
      }
    }
    touchAtime(dir);
    return {};
  }

  void releasedir(uint64_t dir_fh) override {
    auto it = handles_.find(dir_fh);
    if (it == handles_.end() || !it->second.dir) {
      return;
    }
    dropHandle(it);
  }

  Ret<struct statvfs> statfs() override {
    struct statvfs st {};
    st.f_bsize = kBlockSize;
    st.f_frsize = kBlockSize;
    st.f_blocks = max_bytes_ / kBlockSize;
    st.f_bfree = (max_bytes_ - std::min(used_bytes_, max_bytes_)) / kBlockSize;
    st.f_bavail = st.f_bfree;
    st.f_files = kMaxInodes;
    st.f_ffree = kMaxInodes - std::min<uint64_t>(inodes_.size(), kMaxInodes);
    st.f_favail = st.f_ffree;
    st.f_namemax = kNameMax;
    return st;
  }

 private:
  Inode* find(uint64_t node) {
    auto it = inodes_.find(node);
    return it == inodes_.end() ? nullptr : &it->second;
  }
  /// An id this provider knows to be live (a directory's child, a handle's node).
  Inode& inode(uint64_t node) { return inodes_.find(node)->second; }

  Ret<Inode*> findDir(uint64_t node) {
    Inode* ino = find(node);
    if (ino == nullptr) {
      return fail(ENOENT);
    }
    if (!ino->isDir()) {
      return fail(ENOTDIR);
    }
    return ino;
  }

  /// The directory `parent`, still linked, where `name` is valid and free.
  Ret<Inode*> findLiveDirForCreate(uint64_t parent, std::string_view name) {
    if (int err = checkName(name); err != 0) {
      return fail(err);
    }
    auto dir = findDir(parent);
    if (!dir) {
      return dir;
    }
    if ((*dir)->nlink == 0) {
      return fail(ENOENT);
    }
    if ((*dir)->children.find(name) != (*dir)->children.end()) {
      return fail(EEXIST);
    }
    return dir;
  }

  int reserveName(size_t name_bytes) const {
    if (names_ >= kMaxNames || meta_bytes_ + name_bytes > kMaxMetaBytes) {
      return ENOSPC;
    }
    return 0;
  }

  int addName(Inode& dir, std::string_view name, uint64_t node) {
    try {
      dir.children.emplace(std::string(name), node);
    } catch (const std::bad_alloc&) {
      return ENOMEM;
    }
    names_++;
    meta_bytes_ += name.size();
    return 0;
  }

  /// Creates an inode of `mode` named `name` in `parent` and hands the server a reference to it.
  /// `extra_meta` is what the caller will add to meta_bytes_ (a symlink's target).
  Ret<Inode*> makeChild(uint64_t parent, std::string_view name, uint32_t mode, const Caller& caller,
                        size_t extra_meta) {
    auto dir_r = findLiveDirForCreate(parent, name);
    if (!dir_r) {
      return dir_r;
    }
    if (inodes_.size() >= kMaxInodes) {
      return fail(ENOSPC);
    }
    if (int err = reserveName(name.size() + extra_meta); err != 0) {
      return fail(err);
    }
    const uint64_t id = next_id_++;
    const timespec t = now();
    Inode* ino = nullptr;
    try {
      Inode fresh;
      fresh.id = id;
      fresh.mode = mode & ~kStripMask;
      fresh.uid = caller.uid;
      fresh.gid = caller.gid;
      fresh.atime = fresh.mtime = fresh.ctime = t;
      ino = &inodes_.emplace(id, std::move(fresh)).first->second;
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    }
    Inode& dir = **dir_r;
    if (int err = addName(dir, name, id); err != 0) {
      inodes_.erase(id);
      return fail(err);
    }
    if (ino->isDir()) {
      ino->nlink = 2;
      ino->parent = dir.id;
      dir.nlink++;
    } else {
      ino->nlink = 1;
    }
    dir.mtime = dir.ctime = t;
    return ino;
  }

  /// Removes the name at `it` from `dir` and unlinks its inode (freeing it if unreferenced).
  void removeEntry(Inode& dir, std::map<std::string, uint64_t, std::less<>>::iterator it,
                   const timespec& t) {
    const uint64_t node = it->second;
    meta_bytes_ -= it->first.size();
    names_--;
    dir.children.erase(it);
    dropName(inode(node), dir, t);
    dir.mtime = dir.ctime = t;
    maybeFree(node);
  }

  /// `ino` lost one name in `dir` (the map entry is the caller's business).
  static void dropName(Inode& ino, Inode& dir, const timespec& t) {
    if (ino.isDir()) {
      ino.nlink = 0;
      dir.nlink--;
    } else {
      ino.nlink--;
    }
    ino.ctime = t;
  }

  void maybeFree(uint64_t node) {
    if (node == kRootNode) {
      return;
    }
    auto it = inodes_.find(node);
    if (it == inodes_.end()) {
      return;
    }
    const Inode& ino = it->second;
    if (ino.nlink > 0 || ino.referenced || ino.open_count > 0) {
      return;
    }
    used_bytes_ -= ino.charge();
    meta_bytes_ -= ino.target.size();
    inodes_.erase(it);
  }

  Entry entryOf(Inode& ino) {
    ino.referenced = true;
    Entry e;
    e.node = ino.id;
    e.attr = statOf(ino);
    return e;
  }

  static struct stat statOf(const Inode& ino) {
    struct stat st {};
    st.st_ino = ino.id;
    st.st_mode = ino.mode;
    st.st_nlink = static_cast<nlink_t>(ino.nlink);
    st.st_uid = ino.uid;
    st.st_gid = ino.gid;
    st.st_blksize = static_cast<blksize_t>(kBlockSize);
    if (ino.isReg()) {
      st.st_size = static_cast<off_t>(ino.size);
      st.st_blocks = static_cast<blkcnt_t>(ceilDiv(ino.charge(), 512));
    } else if (ino.isDir()) {
      st.st_size = static_cast<off_t>(kBlockSize);
    } else if (ino.isLnk()) {
      st.st_size = static_cast<off_t>(ino.target.size());
    }
    st.st_atim = ino.atime;
    st.st_mtim = ino.mtime;
    st.st_ctim = ino.ctime;
    return st;
  }

  /// A time argument of SETATTR: (whether to set, the value).
  static Ret<std::pair<bool, timespec>> timeArg(const timespec& in, bool now_flag,
                                                const timespec& t) {
    if (now_flag || in.tv_nsec == UTIME_NOW) {
      return std::pair<bool, timespec>(true, t);
    }
    if (in.tv_nsec == UTIME_OMIT) {
      return std::pair<bool, timespec>(false, t);
    }
    if (in.tv_nsec < 0 || in.tv_nsec >= 1'000'000'000) {
      return fail(EINVAL);
    }
    return std::pair<bool, timespec>(true, in);
  }

  /// relatime: the access time moves when it is older than the last change or a day old.
  static void touchAtime(Inode& ino) {
    const timespec t = now();
    if (!before(ino.mtime, ino.atime) || !before(ino.ctime, ino.atime) ||
        t.tv_sec - ino.atime.tv_sec >= kDay) {
      ino.atime = t;
    }
  }

  /// Accounts `ino` at size `size` and reservation `reserved` (no data changes); ENOSPC if the
  /// new total exceeds max_bytes.
  int charge(Inode& ino, uint64_t size, uint64_t reserved) {
    const uint64_t old_charge = ino.charge();
    const uint64_t new_charge = std::max(size, reserved);
    if (new_charge > old_charge) {
      const uint64_t delta = new_charge - old_charge;
      if (used_bytes_ > max_bytes_ || delta > max_bytes_ - used_bytes_) {
        return ENOSPC;
      }
    }
    used_bytes_ = used_bytes_ - old_charge + new_charge;
    return 0;
  }

  /// Truncates or extends (with zeros, as a hole) a regular file; drops any KEEP_SIZE
  /// reservation, as truncate(2) frees the blocks past the new size.
  RetVoid resize(Inode& ino, uint64_t size) {
    if (int err = charge(ino, size, 0); err != 0) {
      return fail(err);
    }
    if (size < ino.size) {
      trimData(ino, size);
    }
    ino.size = size;
    ino.reserved = 0;
    return {};
  }

  /// Drops the data at and past `size` (never allocates).
  static void trimData(Inode& ino, uint64_t size) {
    const uint64_t first_gone = ceilDiv(size, kChunkSize);
    ino.chunks.erase(ino.chunks.lower_bound(first_gone), ino.chunks.end());
    if (size % kChunkSize != 0) {
      auto it = ino.chunks.find(size / kChunkSize);
      if (it != ino.chunks.end() && it->second.size() > size % kChunkSize) {
        it->second.resize(static_cast<size_t>(size % kChunkSize));
      }
    }
  }

  bool isAncestorOrSelf(uint64_t ancestor, uint64_t node) {
    while (true) {
      if (node == ancestor) {
        return true;
      }
      if (node == kRootNode) {
        return false;
      }
      node = inode(node).parent;
    }
  }

  Ret<uint64_t> addHandle(uint64_t node, bool dir, int flags) {
    const uint64_t fh = next_fh_++;
    try {
      Handle h;
      h.node = node;
      h.dir = dir;
      h.flags = flags;
      handles_.emplace(fh, std::move(h));
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    }
    inode(node).open_count++;
    return fh;
  }

  Ret<Handle*> fileHandle(uint64_t fh) {
    auto it = handles_.find(fh);
    if (it == handles_.end() || it->second.dir) {
      return fail(EBADF);
    }
    return &it->second;
  }

  void dropHandle(std::unordered_map<uint64_t, Handle>::iterator it) {
    const uint64_t node = it->second.node;
    handles_.erase(it);
    inode(node).open_count--;
    maybeFree(node);
  }

  const uint64_t max_bytes_;
  uint64_t used_bytes_ = 0;  ///< the sum of Inode::charge()
  uint64_t meta_bytes_ = 0;  ///< bytes of names and symlink targets
  uint64_t names_ = 0;       ///< directory entries, hard links included
  uint64_t next_id_ = kRootNode + 1;
  uint64_t next_fh_ = 1;
  std::unordered_map<uint64_t, Inode> inodes_;
  std::unordered_map<uint64_t, Handle> handles_;
};

}  // namespace

ProviderPtr makeMemoryProvider(uint64_t max_bytes, const Caller& owner) {
  return std::make_unique<MemoryProvider>(max_bytes, owner);
}

}  // namespace matchlock::vfs
