// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <tl/expected.hpp>

#include "common/fd.h"

namespace matchlock::vfs {

/// A provider's answer: a value or a positive errno. The FUSE protocol answers every request with
/// an errno, and most "errors" on this path are ordinary answers (a lookup of a name that does not
/// exist), so they carry no message and cost no allocation. They become an `Error` only where
/// they leave the VFS layer.
template <class T>
using Ret = tl::expected<T, int>;
using RetVoid = tl::expected<void, int>;

/// Writable bytes somewhere else (guest memory a reply goes straight into).
struct Span {
  char* data = nullptr;
  size_t len = 0;
};
inline tl::unexpected<int> fail(int err) {
  return tl::unexpected<int>(err);
}

/// Who asks, as the guest kernel names the caller (guest ids, not host ids).
struct Caller {
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t pid = 0;
};

/// A node handed to the server: the provider's id for it and its attributes. Attributes are in
/// guest terms (ids mapped, st_ino stable for the object's life, st_dev meaningless).
struct Entry {
  uint64_t node = 0;
  struct stat attr {};
};

/// SETATTR: which fields to change (`valid`, FATTR_* bits of <linux/fuse.h>) and their values.
struct SetAttr {
  uint32_t valid = 0;
  uint32_t mode = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t size = 0;
  struct timespec atime {};  ///< tv_nsec == UTIME_NOW for FATTR_ATIME_NOW
  struct timespec mtime {};
};

struct DirEntry {
  std::string_view name;
  uint64_t ino = 0;   ///< as in Entry::attr.st_ino
  uint32_t type = 0;  ///< DT_* value
  uint64_t next = 0;  ///< the offset that resumes the listing after this entry
};

/// One mounted tree, as the FUSE server sees it: node- and handle-based like the FUSE protocol
/// itself (docs/vfs.md). Node ids and handle ids are the provider's own; the server maps them to
/// the connection's. Single-threaded: the server calls a provider from one thread.
///
/// Node lifetime: every successful lookup, mkdir, mknod, symlink, link and create that returns an
/// Entry hands the server a reference to `node`; the server calls forget(node) once when it holds
/// none any more. Until then the provider must keep the id valid and return the same id for the
/// same object. The root node is never forgotten.
///
/// Names are single path components: the server has already refused "", ".", "..", names with
/// '/' or NUL and names longer than 255 bytes before a provider sees them. A provider must still
/// never follow a symlink or reach an object outside its root (docs/vfs.md, Containment).
class Provider {
 public:
  virtual ~Provider() = default;

  virtual uint64_t rootNode() const = 0;
  /// A read-only provider refuses every change with EROFS itself; the server uses this to mount
  /// the tree read-only in the guest as well.
  virtual bool readOnly() const = 0;

  virtual Ret<Entry> lookup(uint64_t parent, std::string_view name) = 0;
  virtual void forget(uint64_t node) = 0;
  virtual Ret<struct stat> getattr(uint64_t node) = 0;
  /// `fh` is a handle of this node when the guest changes an open file (ftruncate), else 0.
  virtual Ret<struct stat> setattr(uint64_t node, const SetAttr& in, uint64_t fh) = 0;
  virtual Ret<std::string> readlink(uint64_t node) = 0;

  /// Regular files, FIFOs and sockets (inert nodes the guest kernel gives meaning to); device
  /// nodes are refused (EPERM).
  virtual Ret<Entry> mknod(uint64_t parent, std::string_view name, uint32_t mode, uint32_t rdev,
                           const Caller& caller) = 0;
  virtual Ret<Entry> mkdir(uint64_t parent, std::string_view name, uint32_t mode,
                           const Caller& caller) = 0;
  virtual Ret<Entry> symlink(uint64_t parent, std::string_view name, std::string_view target,
                             const Caller& caller) = 0;
  /// A new name for `node` in this tree; a provider that cannot guarantee containment answers
  /// EXDEV.
  virtual Ret<Entry> link(uint64_t node, uint64_t new_parent, std::string_view new_name) = 0;
  virtual RetVoid unlink(uint64_t parent, std::string_view name) = 0;
  virtual RetVoid rmdir(uint64_t parent, std::string_view name) = 0;
  /// `flags`: RENAME_NOREPLACE, RENAME_EXCHANGE (others: EINVAL).
  virtual RetVoid rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                         std::string_view new_name, uint32_t flags) = 0;

  /// Opens a regular file (anything else: EACCES or EISDIR); `flags` are the guest's open flags
  /// (O_ACCMODE, O_APPEND, O_TRUNC; O_CREAT/O_EXCL never arrive here). Returns a handle.
  virtual Ret<uint64_t> open(uint64_t node, int flags) = 0;
  /// Creates and opens a regular file; EEXIST when `flags` has O_EXCL and the name exists.
  virtual Ret<std::pair<Entry, uint64_t>> create(uint64_t parent, std::string_view name,
                                                 uint32_t mode, int flags,
                                                 const Caller& caller) = 0;
  /// Reads up to `size` bytes at `offset` into `out` (resized to what was read; 0 = EOF).
  virtual RetVoid read(uint64_t fh, uint64_t offset, size_t size, std::string& out) = 0;
  virtual Ret<size_t> write(uint64_t fh, uint64_t offset, std::string_view data) = 0;
  /// Reads up to the parts' total at `offset` into `parts`, one after the other (a reply that
  /// goes straight into guest memory); returns the bytes read (0 = EOF). The default reads into
  /// a buffer and copies.
  virtual Ret<size_t> readParts(uint64_t fh, uint64_t offset, const std::vector<Span>& parts) {
    size_t total = 0;
    for (const Span& part : parts) {
      total += part.len;
    }
    std::string buf;
    if (auto r = read(fh, offset, total, buf); !r) {
      return tl::make_unexpected(r.error());
    }
    size_t at = 0;
    for (const Span& part : parts) {
      const size_t n = std::min(part.len, buf.size() - at);
      std::copy_n(buf.data() + at, n, part.data);
      at += n;
    }
    return buf.size();
  }
  /// Writes `parts` one after the other from `offset`: a request whose data lies scattered in
  /// guest memory, written without gathering it first. The default joins them and calls write().
  virtual Ret<size_t> writeParts(uint64_t fh, uint64_t offset,
                                 const std::vector<std::string_view>& parts) {
    std::string joined;
    for (std::string_view part : parts) {
      joined.append(part);
    }
    return write(fh, offset, joined);
  }
  virtual RetVoid flush(uint64_t fh) = 0;
  virtual RetVoid fsync(uint64_t fh, bool datasync) = 0;
  virtual void release(uint64_t fh) = 0;
  /// fallocate(2) modes 0 and FALLOC_FL_KEEP_SIZE (punching holes: EOPNOTSUPP is fine).
  virtual RetVoid fallocate(uint64_t fh, int mode, uint64_t offset, uint64_t length) = 0;
  /// SEEK_DATA / SEEK_HOLE (others: EINVAL).
  virtual Ret<uint64_t> lseek(uint64_t fh, uint64_t offset, int whence) = 0;

  virtual Ret<uint64_t> opendir(uint64_t node) = 0;
  /// Lists from `offset` (0 = the start, else an earlier DirEntry::next), "." and ".." included,
  /// calling `emit` per entry until it returns false (the reply is full) or the listing ends.
  virtual RetVoid readdir(uint64_t dir_fh, uint64_t offset,
                          const std::function<bool(const DirEntry&)>& emit) = 0;
  virtual void releasedir(uint64_t dir_fh) = 0;
  virtual Ret<struct statvfs> statfs() = 0;
};

using ProviderPtr = std::unique_ptr<Provider>;

/// A host directory (or a single regular file served as the tree's root) at `root` (an O_PATH
/// or directory fd). Every object is reached by *at() calls on single components beneath the
/// root with no symlink followed; see docs/vfs.md. `read_only` refuses every change with EROFS on
/// the host.
///
/// Ownership (docs/vfs.md): files the guest creates belong on the host to the owner of the root;
/// that owner appears in the guest as `guest_owner` (the sandbox's user, root by default), and
/// the guest may chown only to it. Other host ids appear unchanged.
Ret<ProviderPtr> makeHostProvider(Fd root, bool read_only, const Caller& guest_owner);

/// An empty in-memory tree owned by the guest's `owner`, capped at `max_bytes` of file data
/// (ENOSPC beyond).
ProviderPtr makeMemoryProvider(uint64_t max_bytes, const Caller& owner);

}  // namespace matchlock::vfs
