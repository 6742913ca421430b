// SPDX-License-Identifier: Apache-2.0
// The host-directory provider: a host tree served to an untrusted guest by a root FUSE server.
//
// Containment. Every node holds an O_PATH|O_NOFOLLOW fd of its object (virtiofsd's "lo_inode"):
// a child is reached only by openat(parent_fd, one_component, O_PATH|O_NOFOLLOW), so no path is
// ever resolved, no symlink is followed (a symlink's node is the link itself, and using it as a
// directory gives ENOTDIR) and ".." never leaves a node. Nodes need no names: renames on the host
// move the inode, and the node's fd moves with it. (A host process that moves a directory out of
// the tree takes its subtree with it; that is a host action, not a guest one.) Mounts below the
// root are entered like any directory.
//
// Opening for I/O. An O_PATH fd cannot do I/O, so a regular file is re-opened through its magic
// link /proc/thread-self/fd/N. That link names the inode itself, not a path, so the object opened
// is exactly the node checked before (an inode's type never changes). The alternative,
// openat(parent, name) plus a (dev, ino) check, needs names and still opens whatever sits at the
// name first, which for a FIFO or device is already the harm. Only regular files with one link are
// opened: devices, sockets, FIFOs (which would block the server) and symlinks are refused with
// EACCES, and so is a file with st_nlink > 1, which may be a hard link to a file outside the tree.
// Directories are opened with openat(node_fd, ".", O_DIRECTORY), which needs no /proc.
//
// Ownership. The host owner of the root owns everything the guest creates and appears in the
// guest as `guest_owner`; other ids appear unchanged. set-user-ID and set-group-ID bits are
// stripped from every mode the guest sets and from every mode it is shown.
//
// Limits. Node and handle counts are capped (ENFILE, EMFILE) so that a guest cannot use up the
// server's fds. Handles are provider ids, never raw fds. Nothing here logs: every refusal is an
// ordinary answer to the guest.
#include <dirent.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "common/fd.h"
#include "vfs/provider.h"

namespace matchlock::vfs {
namespace {

constexpr uint64_t kRootNode = 1;
constexpr size_t kMaxNodes = size_t{1} << 18;  // the supervisor raises RLIMIT_NOFILE to 2^20
constexpr size_t kMaxHandles = 4096;
// Larger than any FUSE max_read (256 pages); bounds the buffer a guest can make us allocate.
constexpr size_t kMaxRead = size_t{4} << 20;
constexpr size_t kDirBufSize = 16 * 1024;
constexpr mode_t kSetIdBits = S_ISUID | S_ISGID;
constexpr mode_t kPermBits = 07777;
// The guest's open flags that reach the host; everything else (O_DIRECT, O_NOATIME, O_PATH, ...)
// is dropped.
constexpr int kOpenFlags = O_ACCMODE | O_APPEND | O_TRUNC | O_SYNC | O_DSYNC;
constexpr uint32_t kChangeBits = FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME |
                                 FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW;
constexpr uint32_t kDataChangeBits =
    FATTR_MODE | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW;
constexpr int kCreateRetries = 3;

struct DevIno {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const DevIno&) const = default;
};

struct DevInoHash {
  size_t operator()(const DevIno& k) const noexcept {
    return std::hash<uint64_t>{}((static_cast<uint64_t>(k.ino) * 0x9E3779B97F4A7C15ULL) ^
                                 static_cast<uint64_t>(k.dev));
  }
};

struct Node {
  Fd fd;  ///< O_PATH|O_NOFOLLOW (the root: the fd the caller gave)
  DevIno id;
  mode_t type = 0;  ///< S_IFMT bits
};

struct Handle {
  Fd fd;
  DevIno id;
  bool is_dir = false;
  // Directory listing: getdents64 output in buf[0, len), the next entry at buf[pos], whose
  // listing offset is `offset` (the d_off of the entry before it; 0 at the start).
  std::unique_ptr<char[]> buf;
  size_t len = 0;
  size_t pos = 0;
  uint64_t offset = 0;
};

int statFd(int fd, struct stat& st) {
  return ::fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
}

// The server already refuses these names; checked again because containment rests on it.
int nameError(std::string_view name) {
  if (name.empty()) {
    return ENOENT;
  }
  if (name == "." || name == ".." || name.find('/') != std::string_view::npos ||
      name.find('\0') != std::string_view::npos) {
    return EINVAL;
  }
  if (name.size() > NAME_MAX) {
    return ENAMETOOLONG;
  }
  return 0;
}

bool validRange(uint64_t offset, uint64_t length) {
  constexpr auto kMax = static_cast<uint64_t>(INT64_MAX);
  return offset <= kMax && length <= kMax - offset;
}

class HostProvider final : public Provider {
 public:
  HostProvider(Fd root, const struct stat& root_st, Fd proc, bool read_only,
               const Caller& guest_owner, size_t max_nodes, size_t max_handles)
      : proc_(std::move(proc)),
        read_only_(read_only),
        guest_(guest_owner),
        host_uid_(root_st.st_uid),
        host_gid_(root_st.st_gid),
        root_id_{root_st.st_dev, root_st.st_ino},
        max_nodes_(max_nodes),
        max_handles_(max_handles) {
    nodes_.emplace(kRootNode, Node{std::move(root), root_id_, root_st.st_mode & S_IFMT});
    by_id_.emplace(root_id_, kRootNode);
  }

  uint64_t rootNode() const override { return kRootNode; }
  bool readOnly() const override { return read_only_; }

  Ret<Entry> lookup(uint64_t parent, std::string_view name) override {
    auto dir = dirNode(parent, name);
    if (!dir) {
      return fail(dir.error());
    }
    std::string cname(name);
    Fd fd(::openat((*dir)->fd.get(), cname.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) {
      return fail(errno);
    }
    struct stat st {};
    if (int err = statFd(fd.get(), st)) {
      return fail(err);
    }
    return adopt(std::move(fd), st);
  }

  void forget(uint64_t node) override {
    if (node == kRootNode) {
      return;
    }
    auto it = nodes_.find(node);
    if (it != nodes_.end()) {
      by_id_.erase(it->second.id);
      nodes_.erase(it);
    }
  }

  Ret<struct stat> getattr(uint64_t node) override {
    Node* n = findNode(node);
    if (n == nullptr) {
      return fail(ESTALE);
    }
    struct stat st {};
    if (int err = statFd(n->fd.get(), st)) {
      return fail(err);
    }
    return guestAttr(st);
  }

  Ret<struct stat> setattr(uint64_t node, const SetAttr& in, uint64_t fh) override {
    Node* n = findNode(node);
    if (n == nullptr) {
      return fail(ESTALE);
    }
    const uint32_t valid = in.valid;
    if ((valid & kChangeBits) != 0 && read_only_) {
      return fail(EROFS);
    }
    struct stat st {};
    if (int err = statFd(n->fd.get(), st)) {
      return fail(err);
    }
    // Ownership never changes on the host: the guest may only "chown" to its owner or to the
    // id it already sees, both no-ops here.
    if ((valid & FATTR_UID) != 0 && in.uid != guest_.uid && in.uid != mapUid(st.st_uid)) {
      return fail(EPERM);
    }
    if ((valid & FATTR_GID) != 0 && in.gid != guest_.gid && in.gid != mapGid(st.st_gid)) {
      return fail(EPERM);
    }
    // A hard-linked file may be shared with a file outside the tree: as opaque as for open().
    if ((valid & kDataChangeBits) != 0 && S_ISREG(st.st_mode) && st.st_nlink > 1) {
      return fail(EACCES);
    }
    if ((valid & FATTR_MODE) != 0 && S_ISLNK(st.st_mode)) {
      return fail(EOPNOTSUPP);
    }
    Handle* h = nullptr;
    if ((valid & FATTR_SIZE) != 0) {
      if (S_ISDIR(st.st_mode)) {
        return fail(EISDIR);
      }
      if (!S_ISREG(st.st_mode)) {
        return fail(EINVAL);
      }
      if (!validRange(in.size, 0)) {
        return fail(EFBIG);
      }
      if (fh != 0) {
        h = findHandle(fh, false);
        if (h == nullptr || h->id != n->id) {
          return fail(EBADF);
        }
      }
    }

    if ((valid & FATTR_MODE) != 0) {
      if (int err = chmodNode(*n, static_cast<mode_t>(in.mode) & kPermBits & ~kSetIdBits)) {
        return fail(err);
      }
    }
    if ((valid & FATTR_SIZE) != 0) {
      const auto size = static_cast<off_t>(in.size);
      if (h != nullptr) {
        if (::ftruncate(h->fd.get(), size) != 0) {
          return fail(errno);
        }
      } else {
        auto fd = openRegular(n->fd.get(), O_WRONLY);
        if (!fd) {
          return fail(fd.error());
        }
        if (::ftruncate(fd->get(), size) != 0) {
          return fail(errno);
        }
      }
    }
    if ((valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW)) != 0) {
      struct timespec times[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
      if ((valid & FATTR_ATIME_NOW) != 0) {
        times[0].tv_nsec = UTIME_NOW;
      } else if ((valid & FATTR_ATIME) != 0) {
        times[0] = in.atime;
      }
      if ((valid & FATTR_MTIME_NOW) != 0) {
        times[1].tv_nsec = UTIME_NOW;
      } else if ((valid & FATTR_MTIME) != 0) {
        times[1] = in.mtime;
      }
      if (int err = utimesNode(*n, times)) {
        return fail(err);
      }
    }
    return getattr(node);
  }

  Ret<std::string> readlink(uint64_t node) override {
    Node* n = findNode(node);
    if (n == nullptr) {
      return fail(ESTALE);
    }
    if (!S_ISLNK(n->type)) {
      return fail(EINVAL);
    }
    std::string out(PATH_MAX, '\0');
    // readlinkat on an O_PATH fd of the link itself (Linux >= 2.6.39).
    ssize_t len = ::readlinkat(n->fd.get(), "", out.data(), out.size());
    if (len < 0) {
      return fail(errno);
    }
    if (static_cast<size_t>(len) >= out.size()) {
      return fail(ENAMETOOLONG);
    }
    out.resize(static_cast<size_t>(len));
    return out;
  }

  Ret<Entry> mknod(uint64_t parent, std::string_view name, uint32_t mode, uint32_t /*rdev*/,
                   const Caller& /*caller*/) override {
    if (read_only_) {
      return fail(EROFS);
    }
    mode_t type = static_cast<mode_t>(mode) & S_IFMT;
    if (type == 0) {
      type = S_IFREG;  // mknod(2): a zero type is a regular file
    }
    // No device can be made on the host. A FIFO or a socket is an inert node here (never opened
    // by the server); the guest kernel gives it its meaning (bind(2) of a Unix socket, a pipe).
    if (type != S_IFREG && type != S_IFIFO && type != S_IFSOCK) {
      return fail(EPERM);
    }
    auto dir = newChildDir(parent, name);
    if (!dir) {
      return fail(dir.error());
    }
    const mode_t perm = static_cast<mode_t>(mode) & kPermBits & ~kSetIdBits;
    std::string cname(name);
    if (::mknodat((*dir)->fd.get(), cname.c_str(), type | perm, 0) != 0) {
      return fail(errno);
    }
    return adoptNew(**dir, cname, type, perm);
  }

  Ret<Entry> mkdir(uint64_t parent, std::string_view name, uint32_t mode,
                   const Caller& /*caller*/) override {
    if (read_only_) {
      return fail(EROFS);
    }
    auto dir = newChildDir(parent, name);
    if (!dir) {
      return fail(dir.error());
    }
    const mode_t perm = static_cast<mode_t>(mode) & kPermBits & ~kSetIdBits;
    std::string cname(name);
    if (::mkdirat((*dir)->fd.get(), cname.c_str(), perm) != 0) {
      return fail(errno);
    }
    return adoptNew(**dir, cname, S_IFDIR, perm);
  }

  Ret<Entry> symlink(uint64_t parent, std::string_view name, std::string_view target,
                     const Caller& /*caller*/) override {
    if (read_only_) {
      return fail(EROFS);
    }
    // The target is stored as given; the host never follows it.
    if (target.empty()) {
      return fail(ENOENT);
    }
    if (target.size() >= PATH_MAX) {
      return fail(ENAMETOOLONG);
    }
    if (target.find('\0') != std::string_view::npos) {
      return fail(EINVAL);
    }
    auto dir = newChildDir(parent, name);
    if (!dir) {
      return fail(dir.error());
    }
    std::string cname(name);
    std::string ctarget(target);
    if (::symlinkat(ctarget.c_str(), (*dir)->fd.get(), cname.c_str()) != 0) {
      return fail(errno);
    }
    return adoptNew(**dir, cname, S_IFLNK, 0);
  }

  Ret<Entry> link(uint64_t /*node*/, uint64_t /*new_parent*/,
                  std::string_view /*new_name*/) override {
    if (read_only_) {
      return fail(EROFS);
    }
    // A new hard link would let the guest share an inode with names we cannot see; and the
    // nlink > 1 rule would lock the guest out of its own file.
    return fail(EXDEV);
  }

  RetVoid unlink(uint64_t parent, std::string_view name) override {
    return removeAt(parent, name, 0);
  }

  RetVoid rmdir(uint64_t parent, std::string_view name) override {
    return removeAt(parent, name, AT_REMOVEDIR);
  }

  RetVoid rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                 std::string_view new_name, uint32_t flags) override {
    if (read_only_) {
      return fail(EROFS);
    }
    if (flags != 0 && flags != RENAME_NOREPLACE && flags != RENAME_EXCHANGE) {
      return fail(EINVAL);
    }
    auto from = dirNode(parent, name);
    if (!from) {
      return fail(from.error());
    }
    auto to = dirNode(new_parent, new_name);
    if (!to) {
      return fail(to.error());
    }
    // Nodes are fds, not names: nothing to update.
    std::string cname(name);
    std::string cnew(new_name);
    if (::renameat2((*from)->fd.get(), cname.c_str(), (*to)->fd.get(), cnew.c_str(), flags) != 0) {
      return fail(errno);
    }
    return {};
  }

  Ret<uint64_t> open(uint64_t node, int flags) override {
    Node* n = findNode(node);
    if (n == nullptr) {
      return fail(ESTALE);
    }
    if (int err = checkOpenFlags(flags)) {
      return fail(err);
    }
    if (S_ISDIR(n->type)) {
      return fail(EISDIR);
    }
    if (!S_ISREG(n->type)) {
      return fail(EACCES);
    }
    if (handles_.size() >= max_handles_) {
      return fail(EMFILE);
    }
    auto fd = openRegular(n->fd.get(), flags);
    if (!fd) {
      return fail(fd.error());
    }
    return addHandle(std::move(*fd), n->id, false);
  }

  Ret<std::pair<Entry, uint64_t>> create(uint64_t parent, std::string_view name, uint32_t mode,
                                         int flags, const Caller& /*caller*/) override {
    if (read_only_) {
      return fail(EROFS);
    }
    if (int err = checkOpenFlags(flags)) {
      return fail(err);
    }
    auto dir = newChildDir(parent, name);
    if (!dir) {
      return fail(dir.error());
    }
    if (handles_.size() >= max_handles_) {
      return fail(EMFILE);
    }
    const int dir_fd = (*dir)->fd.get();
    const mode_t perm = static_cast<mode_t>(mode) & kPermBits & ~kSetIdBits;
    std::string cname(name);

    // O_CREAT|O_EXCL|O_NOFOLLOW never opens an existing object, so a FIFO or device at the name
    // is never opened (it would block or act); an existing name goes through the open() checks.
    Fd fd;
    bool created = false;
    for (int attempt = 0; attempt < kCreateRetries && !fd; ++attempt) {
      fd.reset(::openat(
          dir_fd, cname.c_str(),
          (flags & kOpenFlags & ~O_TRUNC) | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY,
          perm));
      if (fd) {
        created = true;
        break;
      }
      if (errno != EEXIST || (flags & O_EXCL) != 0) {
        return fail(errno);
      }
      Fd path(::openat(dir_fd, cname.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
      if (!path) {
        if (errno == ENOENT) {
          continue;  // removed in between: try to create it again
        }
        return fail(errno);
      }
      struct stat st {};
      if (int err = statFd(path.get(), st)) {
        return fail(err);
      }
      if (S_ISDIR(st.st_mode)) {
        return fail(EISDIR);
      }
      if (S_ISLNK(st.st_mode)) {
        return fail(ELOOP);
      }
      auto opened = openRegular(path.get(), flags);
      if (!opened) {
        return fail(opened.error());
      }
      fd = std::move(*opened);
    }
    if (!fd) {
      return fail(ENOENT);
    }
    auto path = reopen(fd.get(), O_PATH);
    if (!path) {
      return fail(path.error());
    }
    struct stat st {};
    if (int err = statFd(path->get(), st)) {
      return fail(err);
    }
    if (created) {
      if (int err = ownNew(path->get(), st, perm)) {
        return fail(err);
      }
    }
    auto entry = adopt(std::move(*path), st);
    if (!entry) {
      return fail(entry.error());
    }
    uint64_t fh = addHandle(std::move(fd), DevIno{st.st_dev, st.st_ino}, false);
    return std::make_pair(*entry, fh);
  }

  RetVoid read(uint64_t fh, uint64_t offset, size_t size, std::string& out) override {
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    size = std::min(size, kMaxRead);
    if (!validRange(offset, size)) {
      return fail(EINVAL);
    }
    out.resize(size);
    size_t done = 0;
    while (done < size) {
      ssize_t n =
          ::pread(h->fd.get(), out.data() + done, size - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) {
          continue;
        }
        int err = errno;
        out.clear();
        return fail(err);
      }
      if (n == 0) {
        break;
      }
      done += static_cast<size_t>(n);
    }
    out.resize(done);
    return {};
  }

  Ret<size_t> readParts(uint64_t fh, uint64_t offset, const std::vector<Span>& parts) override {
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    size_t total = 0;
    std::vector<iovec> iov;
    iov.reserve(parts.size());
    for (const Span& part : parts) {
      total += part.len;
      iov.push_back(iovec{part.data, part.len});
    }
    if (total > kMaxRead || parts.size() > IOV_MAX) {
      return Provider::readParts(fh, offset, parts);
    }
    if (!validRange(offset, total)) {
      return fail(EINVAL);
    }
    // A regular file reads short only at its end: one call is the whole answer.
    ssize_t n = 0;
    do {
      n = ::preadv(h->fd.get(), iov.data(), static_cast<int>(iov.size()),
                   static_cast<off_t>(offset));
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      return fail(errno);
    }
    return static_cast<size_t>(n);
  }

  Ret<size_t> writeParts(uint64_t fh, uint64_t offset,
                         const std::vector<std::string_view>& parts) override {
    size_t total = 0;
    for (std::string_view part : parts) {
      total += part.size();
    }
    if (read_only_) {
      return fail(EROFS);
    }
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    if (!validRange(offset, total)) {
      return fail(EFBIG);
    }
    if (parts.size() > IOV_MAX) {
      return Provider::writeParts(fh, offset, parts);
    }
    std::vector<iovec> iov;
    iov.reserve(parts.size());
    for (std::string_view part : parts) {
      // pwritev only reads through these pointers.
      iov.push_back(iovec{const_cast<char*>(part.data()), part.size()});  // NOLINT
    }
    // One call: a short write (a full disk) reports what was written, as write() does.
    ssize_t n = 0;
    do {
      n = ::pwritev(h->fd.get(), iov.data(), static_cast<int>(iov.size()),
                    static_cast<off_t>(offset));
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      return fail(errno);
    }
    return static_cast<size_t>(n);
  }

  Ret<size_t> write(uint64_t fh, uint64_t offset, std::string_view data) override {
    if (read_only_) {
      return fail(EROFS);
    }
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    if (!validRange(offset, data.size())) {
      return fail(EFBIG);
    }
    // An O_APPEND handle appends whatever the offset (Linux pwrite(2)).
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::pwrite(h->fd.get(), data.data() + done, data.size() - done,
                           static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) {
          continue;
        }
        if (done > 0) {
          break;
        }
        return fail(errno);
      }
      if (n == 0) {
        break;
      }
      done += static_cast<size_t>(n);
    }
    return done;
  }

  RetVoid flush(uint64_t fh) override {
    if (findHandle(fh, false) == nullptr) {
      return fail(EBADF);
    }
    return {};
  }

  RetVoid fsync(uint64_t fh, bool datasync) override {
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    int rc = datasync ? ::fdatasync(h->fd.get()) : ::fsync(h->fd.get());
    if (rc != 0) {
      return fail(errno);
    }
    return {};
  }

  void release(uint64_t fh) override {
    auto it = handles_.find(fh);
    if (it != handles_.end() && !it->second.is_dir) {
      handles_.erase(it);
    }
  }

  RetVoid fallocate(uint64_t fh, int mode, uint64_t offset, uint64_t length) override {
    if (read_only_) {
      return fail(EROFS);
    }
    if (mode != 0 && mode != FALLOC_FL_KEEP_SIZE) {
      return fail(EOPNOTSUPP);
    }
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    if (!validRange(offset, length)) {
      return fail(EFBIG);
    }
    if (::fallocate(h->fd.get(), mode, static_cast<off_t>(offset), static_cast<off_t>(length)) !=
        0) {
      return fail(errno);
    }
    return {};
  }

  Ret<uint64_t> lseek(uint64_t fh, uint64_t offset, int whence) override {
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
      return fail(EINVAL);
    }
    Handle* h = findHandle(fh, false);
    if (h == nullptr) {
      return fail(EBADF);
    }
    if (!validRange(offset, 0)) {
      return fail(ENXIO);
    }
    off_t pos = ::lseek(h->fd.get(), static_cast<off_t>(offset), whence);
    if (pos < 0) {
      return fail(errno);
    }
    return static_cast<uint64_t>(pos);
  }

  Ret<uint64_t> opendir(uint64_t node) override {
    Node* n = findNode(node);
    if (n == nullptr) {
      return fail(ESTALE);
    }
    if (!S_ISDIR(n->type)) {
      return fail(ENOTDIR);
    }
    if (handles_.size() >= max_handles_) {
      return fail(EMFILE);
    }
    // "." of the node's own fd: the directory itself, with no path and no /proc involved.
    Fd fd(::openat(n->fd.get(), ".", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) {
      return fail(errno);
    }
    return addHandle(std::move(fd), n->id, true);
  }

  RetVoid readdir(uint64_t dir_fh, uint64_t offset,
                  const std::function<bool(const DirEntry&)>& emit) override {
    Handle* h = findHandle(dir_fh, true);
    if (h == nullptr) {
      return fail(EBADF);
    }
    // Offsets are the filesystem's own d_off cookies, so any earlier `next` resumes with lseek;
    // a read continuing where the last one stopped uses the buffered entries.
    if (!h->buf || offset != h->offset) {
      if (!h->buf) {
        h->buf = std::make_unique<char[]>(kDirBufSize);
      }
      if (!validRange(offset, 0)) {
        return fail(EINVAL);
      }
      if (::lseek(h->fd.get(), static_cast<off_t>(offset), SEEK_SET) < 0) {
        return fail(errno);
      }
      h->len = 0;
      h->pos = 0;
      h->offset = offset;
    }
    constexpr size_t kNameAt = offsetof(struct dirent64, d_name);
    for (;;) {
      if (h->pos >= h->len) {
        ssize_t n = ::getdents64(h->fd.get(), h->buf.get(), kDirBufSize);
        if (n < 0) {
          return fail(errno);
        }
        if (n == 0) {
          return {};
        }
        h->len = static_cast<size_t>(n);
        h->pos = 0;
      }
      const char* rec = h->buf.get() + h->pos;
      uint64_t ino = 0;
      int64_t off = 0;
      uint16_t reclen = 0;
      unsigned char type = 0;
      std::memcpy(&reclen, rec + offsetof(struct dirent64, d_reclen), sizeof reclen);
      if (reclen <= kNameAt || reclen > h->len - h->pos) {
        return fail(EIO);
      }
      std::memcpy(&ino, rec + offsetof(struct dirent64, d_ino), sizeof ino);
      std::memcpy(&off, rec + offsetof(struct dirent64, d_off), sizeof off);
      std::memcpy(&type, rec + offsetof(struct dirent64, d_type), sizeof type);
      const char* name = rec + kNameAt;
      std::string_view name_view(name, ::strnlen(name, reclen - kNameAt));
      DirEntry e{name_view, ino, type, static_cast<uint64_t>(off)};
      // The root's ".." is outside the tree: shown as the root itself.
      if (h->id == root_id_ && name_view == "..") {
        e.ino = root_id_.ino;
      }
      if (!emit(e)) {
        return {};
      }
      h->pos += reclen;
      h->offset = e.next;
    }
  }

  void releasedir(uint64_t dir_fh) override {
    auto it = handles_.find(dir_fh);
    if (it != handles_.end() && it->second.is_dir) {
      handles_.erase(it);
    }
  }

  Ret<struct statvfs> statfs() override {
    struct statvfs out {};
    // fstatfs works on O_PATH fds (Linux >= 3.12).
    if (::fstatvfs(nodes_.at(kRootNode).fd.get(), &out) != 0) {
      return fail(errno);
    }
    return out;
  }

 private:
  uid_t mapUid(uid_t uid) const { return uid == host_uid_ ? guest_.uid : uid; }
  gid_t mapGid(gid_t gid) const { return gid == host_gid_ ? guest_.gid : gid; }

  struct stat guestAttr(struct stat st) const {
    st.st_uid = mapUid(st.st_uid);
    st.st_gid = mapGid(st.st_gid);
    st.st_mode &= ~kSetIdBits;
    st.st_rdev = 0;
    st.st_dev = 0;
    return st;
  }

  Node* findNode(uint64_t id) {
    auto it = nodes_.find(id);
    return it == nodes_.end() ? nullptr : &it->second;
  }

  Handle* findHandle(uint64_t fh, bool is_dir) {
    auto it = handles_.find(fh);
    if (it == handles_.end() || it->second.is_dir != is_dir) {
      return nullptr;
    }
    return &it->second;
  }

  uint64_t addHandle(Fd fd, DevIno id, bool is_dir) {
    uint64_t fh = next_handle_++;
    Handle h;
    h.fd = std::move(fd);
    h.id = id;
    h.is_dir = is_dir;
    handles_.emplace(fh, std::move(h));
    return fh;
  }

  // The parent directory node for an operation on `name` in it.
  Ret<Node*> dirNode(uint64_t parent, std::string_view name) {
    if (int err = nameError(name)) {
      return fail(err);
    }
    Node* dir = findNode(parent);
    if (dir == nullptr) {
      return fail(ESTALE);
    }
    if (!S_ISDIR(dir->type)) {
      return fail(ENOTDIR);
    }
    return dir;
  }

  // As dirNode, for an operation that makes a node: refused before anything is created when the
  // node table is full.
  Ret<Node*> newChildDir(uint64_t parent, std::string_view name) {
    auto dir = dirNode(parent, name);
    if (dir && nodes_.size() >= max_nodes_) {
      return fail(ENFILE);
    }
    return dir;
  }

  // Registers the object of `fd` (O_PATH) or finds its existing node; hands out a reference.
  Ret<Entry> adopt(Fd fd, const struct stat& st) {
    DevIno id{st.st_dev, st.st_ino};
    auto it = by_id_.find(id);
    if (it != by_id_.end()) {
      return Entry{it->second, guestAttr(st)};
    }
    if (nodes_.size() >= max_nodes_) {
      return fail(ENFILE);
    }
    uint64_t node = next_node_++;
    nodes_.emplace(node, Node{std::move(fd), id, st.st_mode & S_IFMT});
    by_id_.emplace(id, node);
    return Entry{node, guestAttr(st)};
  }

  // Finishes mkdir/mknod/symlink: opens what was made at `cname`, gives it to the root's owner
  // and registers it.
  Ret<Entry> adoptNew(const Node& dir, const std::string& cname, mode_t type, mode_t perm) {
    Fd fd(::openat(dir.fd.get(), cname.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) {
      return fail(errno);
    }
    struct stat st {};
    if (int err = statFd(fd.get(), st)) {
      return fail(err);
    }
    if ((st.st_mode & S_IFMT) != type) {
      return fail(EIO);  // swapped on the host since we made it: not ours to chown
    }
    if (int err = ownNew(fd.get(), st, perm)) {
      return fail(err);
    }
    return adopt(std::move(fd), st);
  }

  // chown to the root's owner, then the exact mode (the server's umask applied at creation);
  // `st` is refreshed.
  int ownNew(int path_fd, struct stat& st, mode_t perm) {
    if (st.st_uid != host_uid_ || st.st_gid != host_gid_) {
      if (::fchownat(path_fd, "", host_uid_, host_gid_, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
        return errno;
      }
    }
    if (!S_ISLNK(st.st_mode) && (st.st_mode & kPermBits) != perm) {
      if (::fchmodat(proc_.get(), procPath(path_fd).c_str(), perm, 0) != 0) {
        return errno;
      }
    }
    return statFd(path_fd, st);
  }

  static std::string procPath(int fd) { return "thread-self/fd/" + std::to_string(fd); }

  // Re-opens the object of `fd` through its magic link, which names the inode and not a path.
  Ret<Fd> reopen(int fd, int flags) {
    Fd out(::openat(proc_.get(), procPath(fd).c_str(), flags | O_CLOEXEC | O_NOCTTY));
    if (!out) {
      return fail(errno);
    }
    return out;
  }

  // Opens the regular file of the O_PATH fd `path_fd` for I/O with the guest's `flags`.
  Ret<Fd> openRegular(int path_fd, int flags) {
    struct stat st {};
    if (int err = statFd(path_fd, st)) {
      return fail(err);
    }
    if (!S_ISREG(st.st_mode) || st.st_nlink > 1) {
      return fail(EACCES);
    }
    auto fd = reopen(path_fd, flags & kOpenFlags);
    if (!fd) {
      return fail(fd.error());
    }
    struct stat now {};
    if (::fstat(fd->get(), &now) != 0) {
      return fail(errno);
    }
    // The magic link cannot name another object; a link made on the host meanwhile can appear.
    if (now.st_dev != st.st_dev || now.st_ino != st.st_ino || !S_ISREG(now.st_mode) ||
        now.st_nlink > 1) {
      return fail(EACCES);
    }
    return fd;
  }

  int checkOpenFlags(int flags) const {
    const int acc = flags & O_ACCMODE;
    if (acc == O_ACCMODE) {
      return EINVAL;
    }
    if (read_only_ && (acc != O_RDONLY || (flags & (O_TRUNC | O_APPEND)) != 0)) {
      return EROFS;
    }
    return 0;
  }

  int chmodNode(const Node& n, mode_t mode) {
    if (S_ISLNK(n.type)) {
      return EOPNOTSUPP;
    }
    // fchmod does not take O_PATH fds; the magic link does (and reaches FIFOs and devices
    // without opening them).
    if (::fchmodat(proc_.get(), procPath(n.fd.get()).c_str(), mode, 0) != 0) {
      return errno;
    }
    return 0;
  }

  int utimesNode(const Node& n, const struct timespec times[2]) {
    // utimensat(AT_EMPTY_PATH) on an O_PATH fd: Linux >= 5.8; the magic link before that (not
    // for symlinks, which it would not reach).
    if (::utimensat(n.fd.get(), "", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) == 0) {
      return 0;
    }
    if (errno != EINVAL || S_ISLNK(n.type)) {
      return errno;
    }
    if (::utimensat(proc_.get(), procPath(n.fd.get()).c_str(), times, 0) != 0) {
      return errno;
    }
    return 0;
  }

  RetVoid removeAt(uint64_t parent, std::string_view name, int flags) {
    if (read_only_) {
      return fail(EROFS);
    }
    auto dir = dirNode(parent, name);
    if (!dir) {
      return fail(dir.error());
    }
    std::string cname(name);
    if (::unlinkat((*dir)->fd.get(), cname.c_str(), flags) != 0) {
      return fail(errno);
    }
    return {};
  }

  Fd proc_;  ///< /proc (O_PATH), checked to be procfs
  const bool read_only_;
  const Caller guest_;
  const uid_t host_uid_;
  const gid_t host_gid_;
  const DevIno root_id_;
  const size_t max_nodes_;
  const size_t max_handles_;
  std::unordered_map<uint64_t, Node> nodes_;
  std::unordered_map<DevIno, uint64_t, DevInoHash> by_id_;
  std::unordered_map<uint64_t, Handle> handles_;
  uint64_t next_node_ = kRootNode + 1;
  uint64_t next_handle_ = 1;  // never reused, so a stale handle cannot reach a newer file
};

}  // namespace

/// makeHostProvider with other caps, for tests of the ENFILE/EMFILE paths.
Ret<ProviderPtr> makeHostProviderForTest(Fd root, bool read_only, const Caller& guest_owner,
                                         size_t max_nodes, size_t max_handles) {
  if (!root) {
    return fail(EBADF);
  }
  struct stat st {};
  if (int err = statFd(root.get(), st)) {
    return fail(err);
  }
  if (S_ISLNK(st.st_mode)) {
    return fail(ELOOP);
  }
  if (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) {
    return fail(EINVAL);
  }
  Fd proc(::open("/proc", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!proc) {
    return fail(errno);
  }
  // Every I/O open goes through it: it must be the kernel's procfs, not something mounted over.
  struct statfs proc_fs {};
  if (::fstatfs(proc.get(), &proc_fs) != 0) {
    return fail(errno);
  }
  if (proc_fs.f_type != PROC_SUPER_MAGIC) {
    return fail(ENODEV);
  }
  return ProviderPtr(std::make_unique<HostProvider>(std::move(root), st, std::move(proc), read_only,
                                                    guest_owner, max_nodes, max_handles));
}

Ret<ProviderPtr> makeHostProvider(Fd root, bool read_only, const Caller& guest_owner) {
  return makeHostProviderForTest(std::move(root), read_only, guest_owner, kMaxNodes, kMaxHandles);
}

}  // namespace matchlock::vfs
