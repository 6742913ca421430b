// SPDX-License-Identifier: Apache-2.0
// Layer merge (libarchive) and ext4 writer (libext2fs). Both C libraries stay inside this file.
#include "image/rootfs.h"

#include <archive.h>
#include <archive_entry.h>
#include <ext2fs/ext2fs.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>

#include "common/cptr.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/scope_exit.h"
#include "common/strings.h"
#include "image/libarchive_util.h"

namespace matchlock::image {
namespace {

constexpr uint32_t kTypeMask = 0170000;
// Explicit (MKE2FS_CONFIG=/dev/null), so the host's mke2fs.conf cannot change the image. No
// journal: the disk is mounted read-only.
constexpr std::string_view kExt4Features =
    "ext_attr,dir_index,filetype,extent,flex_bg,sparse_super,large_file,huge_file,dir_nlink,"
    "extra_isize,64bit,^has_journal,^resize_inode";

Result<ArchivePtr> openLayer(const LayerSource& layer) {
  ArchivePtr a(archive_read_new());
  if (!a) {
    return makeError(Errc::Internal, "archive_read_new failed");
  }
  archive_read_support_filter_all(a.get());
  archive_read_support_format_tar(a.get());
  if (archive_read_open_filename(a.get(), layer.path.c_str(), 1 << 16) != ARCHIVE_OK) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("layer {}: {}", layer.name, archiveError(a.get())));
  }
  return a;
}

Error layerError(const LayerSource& layer, std::string_view path, std::string_view what) {
  return Error(Errc::InvalidSpec, fmt::format("layer {}: entry '{}': {}", layer.name, path, what));
}

// Splits a tar path into components, rejecting absolute paths and "..".
Result<std::vector<std::string>> pathComponents(const LayerSource& layer, std::string_view path) {
  if (!path.empty() && path.front() == '/') {
    return makeError(layerError(layer, path, "absolute path in a layer (refusing to apply it)"));
  }
  std::vector<std::string> out;
  for (std::string& c : split(path, '/')) {
    if (c.empty() || c == ".") {
      continue;
    }
    if (c == "..") {
      return makeError(layerError(layer, path, "path traversal ('..') in a layer"));
    }
    out.push_back(std::move(c));
  }
  return out;
}

struct Inode {
  uint32_t mode = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  int64_t mtime = 0;
  int64_t size = 0;
  uint32_t rdev_major = 0;
  uint32_t rdev_minor = 0;
  std::string symlink;
  std::vector<std::pair<std::string, std::string>> xattrs;
  size_t layer = 0;
  int64_t entry = -1;  // index of the entry in `layer` that carries the data
  uint32_t nlink = 0;
  ext2_ino_t ino = 0;
};

Inode dirInode() {
  Inode in;
  in.mode = S_IFDIR | 0755;
  return in;
}

struct Node {
  size_t inode = 0;
  size_t layer = 0;
  std::map<std::string, std::unique_ptr<Node>> children;
};

class Tree {
 public:
  Tree() {
    inodes_.push_back(dirInode());
    root_.inode = 0;
  }

  Status apply(const LayerSource& layer, size_t layer_index, int64_t entry_index,
               archive_entry* e) {
    const char* raw_path = archive_entry_pathname(e);
    std::string path = raw_path != nullptr ? raw_path : "";
    ML_ASSIGN_OR_RETURN(std::vector<std::string> comps, pathComponents(layer, path));
    uint32_t type = archive_entry_filetype(e);
    const char* hardlink = archive_entry_hardlink(e);
    if (comps.empty()) {
      if (type == AE_IFDIR) {
        setMeta(inodes_[root_.inode], e);
      }
      return ok();
    }
    ML_ASSIGN_OR_RETURN(Node * parent, walkParents(layer, path, comps, layer_index));
    const std::string& name = comps.back();
    if (name.rfind(".wh.", 0) == 0) {
      if (name == ".wh..wh..opq") {
        for (auto it = parent->children.begin(); it != parent->children.end();) {
          it = it->second->layer < layer_index ? parent->children.erase(it) : std::next(it);
        }
      } else {
        // Whiteouts hide lower layers only (OCI image spec): an entry of this same layer stays.
        auto it = parent->children.find(name.substr(4));
        if (it != parent->children.end() && it->second->layer < layer_index) {
          parent->children.erase(it);
        }
      }
      return ok();
    }
    auto node = std::make_unique<Node>();
    node->layer = layer_index;
    if (hardlink != nullptr) {
      ML_ASSIGN_OR_RETURN(std::vector<std::string> target, pathComponents(layer, hardlink));
      Node* t = find(target);
      if (t == nullptr) {
        return makeError(
            layerError(layer, path, fmt::format("hard link to missing '{}'", hardlink)));
      }
      if ((inodes_[t->inode].mode & kTypeMask) == S_IFDIR) {
        return makeError(layerError(layer, path, "hard link to a directory"));
      }
      node->inode = t->inode;
      parent->children[name] = std::move(node);
      return ok();
    }
    if (type == AE_IFDIR) {
      auto existing = parent->children.find(name);
      if (existing != parent->children.end() &&
          (inodes_[existing->second->inode].mode & kTypeMask) == S_IFDIR) {
        setMeta(inodes_[existing->second->inode], e);
        return ok();
      }
    }
    Inode inode;
    setMeta(inode, e);
    switch (type) {
      case AE_IFREG:
        inode.size = archive_entry_size(e);
        inode.layer = layer_index;
        inode.entry = entry_index;
        break;
      case AE_IFLNK: {
        const char* target = archive_entry_symlink(e);
        inode.symlink = target != nullptr ? target : "";
        inode.size = static_cast<int64_t>(inode.symlink.size());
        break;
      }
      case AE_IFCHR:
      case AE_IFBLK:
        inode.rdev_major = static_cast<uint32_t>(archive_entry_rdevmajor(e));
        inode.rdev_minor = static_cast<uint32_t>(archive_entry_rdevminor(e));
        break;
      case AE_IFDIR:
      case AE_IFIFO:
      case AE_IFSOCK:
        break;
      default:
        return makeError(layerError(layer, path, fmt::format("unsupported entry type {:o}", type)));
    }
    inode.mode = (type & kTypeMask) | (inode.mode & 07777);
    node->inode = inodes_.size();
    inodes_.push_back(std::move(inode));
    parent->children[name] = std::move(node);
    return ok();
  }

  // Depth-first, sorted by name; `fn(path, node, parent_path)`.
  template <class Fn>
  void walk(Fn&& fn) const {
    walkNode(root_, "", fn);
  }

  std::vector<Inode>& inodes() { return inodes_; }
  const Node& root() const { return root_; }

 private:
  static void setMeta(Inode& inode, archive_entry* e) {
    inode.mode = static_cast<uint32_t>(archive_entry_mode(e));
    inode.uid = static_cast<uint32_t>(archive_entry_uid(e));
    inode.gid = static_cast<uint32_t>(archive_entry_gid(e));
    inode.mtime = archive_entry_mtime(e);
    inode.xattrs.clear();
    archive_entry_xattr_reset(e);
    const char* xname = nullptr;
    const void* value = nullptr;
    size_t size = 0;
    while (archive_entry_xattr_next(e, &xname, &value, &size) == ARCHIVE_OK) {
      inode.xattrs.emplace_back(xname, std::string(static_cast<const char*>(value), size));
    }
  }

  Result<Node*> walkParents(const LayerSource& layer, std::string_view path,
                            const std::vector<std::string>& comps, size_t layer_index) {
    Node* cur = &root_;
    for (size_t i = 0; i + 1 < comps.size(); ++i) {
      auto it = cur->children.find(comps[i]);
      if (it == cur->children.end()) {
        auto dir = std::make_unique<Node>();
        dir->layer = layer_index;
        dir->inode = inodes_.size();
        inodes_.push_back(dirInode());
        it = cur->children.emplace(comps[i], std::move(dir)).first;
      }
      uint32_t type = inodes_[it->second->inode].mode & kTypeMask;
      if (type == S_IFLNK) {
        return makeError(layerError(layer, path,
                                    fmt::format("parent '{}' is a symlink (refusing to write "
                                                "through it)",
                                                comps[i])));
      }
      if (type != S_IFDIR) {
        return makeError(
            layerError(layer, path, fmt::format("parent '{}' is not a directory", comps[i])));
      }
      cur = it->second.get();
    }
    return cur;
  }

  Node* find(const std::vector<std::string>& comps) {
    Node* cur = &root_;
    for (const std::string& c : comps) {
      auto it = cur->children.find(c);
      if (it == cur->children.end()) {
        return nullptr;
      }
      cur = it->second.get();
    }
    return cur;
  }

  template <class Fn>
  static void walkNode(const Node& node, const std::string& path, Fn& fn) {
    for (const auto& [name, child] : node.children) {
      std::string child_path = path + "/" + name;
      fn(child_path, *child, node);
      walkNode(*child, child_path, fn);
    }
  }

  std::vector<Inode> inodes_;
  Node root_;
};

Result<Tree> merge(std::span<const LayerSource> layers) {
  Tree tree;
  for (size_t li = 0; li < layers.size(); ++li) {
    ML_ASSIGN_OR_RETURN(ArchivePtr a, openLayer(layers[li]));
    archive_entry* e = nullptr;
    int64_t index = 0;
    for (;; ++index) {
      int rc = archive_read_next_header(a.get(), &e);
      if (rc == ARCHIVE_EOF) {
        break;
      }
      if (rc < ARCHIVE_WARN) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("layer {}: {}", layers[li].name, archiveError(a.get())));
      }
      ML_RETURN_IF_ERROR(tree.apply(layers[li], li, index, e));
    }
  }
  return tree;
}

// ---- ext4 ---------------------------------------------------------------------------------------

void initExt2ErrorsOnce() {
  static std::once_flag once;
  std::call_once(once, [] { initialize_ext2_error_table(); });
}

Error ext2Error(errcode_t rc, std::string_view what) {
  return Error(Errc::System, fmt::format("{}: {}", what, error_message(rc)));
}

Status runMke2fs(const std::string& path, uint64_t size_kib, uint64_t inodes) {
  std::vector<std::string> args{"mke2fs",
                                "-q",
                                "-F",
                                "-t",
                                "ext4",
                                "-b",
                                "4096",
                                "-I",
                                "256",
                                "-m",
                                "0",
                                "-N",
                                std::to_string(inodes),
                                "-T",
                                "default",
                                "-O",
                                std::string(kExt4Features),
                                "-E",
                                "root_owner=0:0,nodiscard",
                                "-L",
                                "matchlock-root",
                                path,
                                fmt::format("{}k", size_kib)};
  std::vector<char*> argv;
  for (std::string& a : args) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  ML_DEFER {
    posix_spawn_file_actions_destroy(&actions);
  };
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  std::vector<std::string> env_storage{"PATH=/usr/sbin:/sbin:/usr/bin:/bin",
                                       "MKE2FS_CONFIG=/dev/null"};
  std::vector<char*> envp;
  for (std::string& v : env_storage) {
    envp.push_back(v.data());
  }
  envp.push_back(nullptr);
  int rc = posix_spawnp(&pid, "mke2fs", &actions, nullptr, argv.data(), envp.data());
  if (rc != 0) {
    return makeError(Errc::Unavailable, "cannot run mke2fs (install e2fsprogs)", rc);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      return makeError(Errc::System, "waitpid mke2fs", errno);
    }
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return makeError(Errc::System, fmt::format("mke2fs {} failed (status {})", path, status));
  }
  return ok();
}

class Ext4Writer {
 public:
  explicit Ext4Writer(ext2_filsys fs) : fs_(fs) {}

  // Runs `op`; when the directory is full, expands it and tries once more.
  template <class Op>
  Status inDir(ext2_ino_t dir, std::string_view what, Op&& op) {
    errcode_t rc = op();
    if (rc == EXT2_ET_DIR_NO_SPACE) {
      rc = ext2fs_expand_dir(fs_, dir);
      if (rc == 0) {
        rc = op();
      }
    }
    if (rc != 0) {
      return makeError(ext2Error(rc, what));
    }
    return ok();
  }

  Status setMeta(ext2_ino_t ino, const Inode& src, bool keep_type_from_fs) {
    ext2_inode inode{};
    errcode_t rc = ext2fs_read_inode(fs_, ino, &inode);
    if (rc != 0) {
      return makeError(ext2Error(rc, "read inode"));
    }
    uint16_t type = static_cast<uint16_t>(inode.i_mode & kTypeMask);
    inode.i_mode = static_cast<uint16_t>((keep_type_from_fs ? type : (src.mode & kTypeMask)) |
                                         (src.mode & 07777));
    fillOwner(inode, src);
    rc = ext2fs_write_inode(fs_, ino, &inode);
    if (rc != 0) {
      return makeError(ext2Error(rc, "write inode"));
    }
    return ok();
  }

  static void fillOwner(ext2_inode& inode, const Inode& src) {
    inode.i_uid = static_cast<uint16_t>(src.uid & 0xffff);
    ext2fs_set_i_uid_high(inode, static_cast<uint16_t>(src.uid >> 16));
    inode.i_gid = static_cast<uint16_t>(src.gid & 0xffff);
    ext2fs_set_i_gid_high(inode, static_cast<uint16_t>(src.gid >> 16));
    auto t = static_cast<uint32_t>(std::max<int64_t>(src.mtime, 0));
    inode.i_atime = inode.i_ctime = inode.i_mtime = t;
  }

  Status setXattrs(ext2_ino_t ino, const Inode& src) {
    if (src.xattrs.empty()) {
      return ok();
    }
    ext2_xattr_handle* h = nullptr;
    errcode_t rc = ext2fs_xattrs_open(fs_, ino, &h);
    if (rc == 0) {
      rc = ext2fs_xattrs_read(h);
    }
    for (const auto& [key, value] : src.xattrs) {
      if (rc != 0) {
        break;
      }
      rc = ext2fs_xattr_set(h, key.c_str(), value.data(), value.size());
    }
    errcode_t close_rc = h != nullptr ? ext2fs_xattrs_close(&h) : 0;
    if (rc == 0) {
      rc = close_rc;
    }
    if (rc != 0) {
      return makeError(ext2Error(rc, "set xattrs"));
    }
    return ok();
  }

  Status createDir(ext2_ino_t parent, const std::string& name, Inode& src) {
    ext2_ino_t existing = 0;
    if (ext2fs_lookup(fs_, parent, name.c_str(), static_cast<int>(name.size()), nullptr,
                      &existing) == 0) {
      src.ino = existing;  // lost+found made by mke2fs
    } else {
      ext2_ino_t ino = 0;
      errcode_t rc = ext2fs_new_inode(fs_, parent, LINUX_S_IFDIR | 0755, nullptr, &ino);
      if (rc != 0) {
        return makeError(ext2Error(rc, "allocate inode"));
      }
      ML_RETURN_IF_ERROR(inDir(parent, "mkdir " + name,
                               [&] { return ext2fs_mkdir(fs_, parent, ino, name.c_str()); }));
      src.ino = ino;
    }
    ML_RETURN_IF_ERROR(setMeta(src.ino, src, true));
    return setXattrs(src.ino, src);
  }

  Status createSymlink(ext2_ino_t parent, const std::string& name, Inode& src) {
    ext2_ino_t ino = 0;
    errcode_t rc = ext2fs_new_inode(fs_, parent, LINUX_S_IFLNK | 0777, nullptr, &ino);
    if (rc != 0) {
      return makeError(ext2Error(rc, "allocate inode"));
    }
    ML_RETURN_IF_ERROR(inDir(parent, "symlink " + name, [&] {
      return ext2fs_symlink(fs_, parent, ino, name.c_str(), src.symlink.c_str());
    }));
    src.ino = ino;
    ML_RETURN_IF_ERROR(setMeta(ino, src, true));
    return setXattrs(ino, src);
  }

  Status createOther(ext2_ino_t parent, const std::string& name, Inode& src) {
    uint32_t type = src.mode & kTypeMask;
    ext2_ino_t ino = 0;
    errcode_t rc = ext2fs_new_inode(fs_, parent, static_cast<int>(type | 0600), nullptr, &ino);
    if (rc != 0) {
      return makeError(ext2Error(rc, "allocate inode"));
    }
    int ft = type == S_IFREG    ? EXT2_FT_REG_FILE
             : type == S_IFCHR  ? EXT2_FT_CHRDEV
             : type == S_IFBLK  ? EXT2_FT_BLKDEV
             : type == S_IFIFO  ? EXT2_FT_FIFO
             : type == S_IFSOCK ? EXT2_FT_SOCK
                                : EXT2_FT_UNKNOWN;
    ML_RETURN_IF_ERROR(inDir(parent, "link " + name,
                             [&] { return ext2fs_link(fs_, parent, name.c_str(), ino, ft); }));
    ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
    ext2_inode inode{};
    inode.i_mode = static_cast<uint16_t>(type | (src.mode & 07777));
    fillOwner(inode, src);
    inode.i_links_count = static_cast<uint16_t>(std::max<uint32_t>(src.nlink, 1));
    if (type == S_IFCHR || type == S_IFBLK) {
      uint32_t major = src.rdev_major;
      uint32_t minor = src.rdev_minor;
      if (major < 256 && minor < 256) {
        inode.i_block[0] = major * 256 + minor;
        inode.i_block[1] = 0;
      } else {
        inode.i_block[0] = 0;
        inode.i_block[1] = (minor & 0xff) | (major << 8) | ((minor & ~0xffU) << 12);
      }
    }
    if (type == S_IFREG && ext2fs_has_feature_extents(fs_->super) != 0) {
      ext2_extent_handle_t handle = nullptr;
      rc = ext2fs_extent_open2(fs_, ino, &inode, &handle);
      if (rc != 0) {
        return makeError(ext2Error(rc, "extent header"));
      }
      ext2fs_extent_free(handle);
    }
    rc = ext2fs_write_new_inode(fs_, ino, &inode);
    if (rc != 0) {
      return makeError(ext2Error(rc, "write inode " + name));
    }
    src.ino = ino;
    return setXattrs(ino, src);
  }

  Status link(ext2_ino_t parent, const std::string& name, const Inode& src) {
    uint32_t type = src.mode & kTypeMask;
    int ft = type == S_IFREG   ? EXT2_FT_REG_FILE
             : type == S_IFLNK ? EXT2_FT_SYMLINK
                               : EXT2_FT_UNKNOWN;
    if (type == S_IFCHR) {
      ft = EXT2_FT_CHRDEV;
    } else if (type == S_IFBLK) {
      ft = EXT2_FT_BLKDEV;
    } else if (type == S_IFIFO) {
      ft = EXT2_FT_FIFO;
    }
    return inDir(parent, "link " + name,
                 [&] { return ext2fs_link(fs_, parent, name.c_str(), src.ino, ft); });
  }

  Status fixLinkCount(const Inode& src) {
    ext2_inode inode{};
    errcode_t rc = ext2fs_read_inode(fs_, src.ino, &inode);
    if (rc == 0) {
      inode.i_links_count = static_cast<uint16_t>(src.nlink);
      rc = ext2fs_write_inode(fs_, src.ino, &inode);
    }
    return rc == 0 ? ok() : makeError(ext2Error(rc, "link count"));
  }

  Status writeData(ext2_ino_t ino, archive* a, const std::string& what) {
    ext2_file_t file = nullptr;
    errcode_t rc = ext2fs_file_open(fs_, ino, EXT2_FILE_WRITE, &file);
    if (rc != 0) {
      return makeError(ext2Error(rc, "open " + what));
    }
    std::string buf(1 << 16, '\0');
    Status status = ok();
    for (;;) {
      la_ssize_t n = archive_read_data(a, buf.data(), buf.size());
      if (n < 0) {
        status = makeError(Errc::InvalidSpec, fmt::format("reading {}: {}", what, archiveError(a)));
        break;
      }
      if (n == 0) {
        break;
      }
      size_t off = 0;
      while (off < static_cast<size_t>(n)) {
        unsigned int written = 0;
        rc =
            ext2fs_file_write(file, buf.data() + off, static_cast<unsigned int>(n) - off, &written);
        if (rc != 0) {
          status = makeError(ext2Error(rc, "write " + what));
          break;
        }
        off += written;
      }
      if (!status) {
        break;
      }
    }
    errcode_t close_rc = ext2fs_file_close(file);
    if (status && close_rc != 0) {
      return makeError(ext2Error(close_rc, "close " + what));
    }
    return status;
  }

 private:
  ext2_filsys fs_;
};

Status writeExt4(Tree& tree, std::span<const LayerSource> layers, const std::string& path) {
  initExt2ErrorsOnce();
  std::vector<Inode>& inodes = tree.inodes();
  // Link counts and size estimate.
  uint64_t data_blocks = 0;
  uint64_t dirs = 1;
  tree.walk([&](const std::string&, const Node& node, const Node&) {
    Inode& in = inodes[node.inode];
    ++in.nlink;
    if ((in.mode & kTypeMask) == S_IFDIR) {
      ++dirs;
    }
  });
  for (const Inode& in : inodes) {
    if (in.nlink > 0 || &in == &inodes[0]) {
      data_blocks += static_cast<uint64_t>((in.size + 4095) / 4096) + 1;
    }
  }
  uint64_t n_inodes = inodes.size() + 256;
  uint64_t bytes = (data_blocks + dirs * 2) * 4096 + n_inodes * 256 * 2 + (64ULL << 20);
  bytes += bytes / 5;
  ML_RETURN_IF_ERROR(runMke2fs(path, bytes / 1024, n_inodes));

  ext2_filsys fs = nullptr;
  errcode_t rc =
      ext2fs_open(path.c_str(), EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0, unix_io_manager, &fs);
  if (rc != 0) {
    return makeError(ext2Error(rc, "open " + path));
  }
  bool closed = false;
  ML_DEFER {
    if (!closed) {
      ext2fs_close_free(&fs);
    }
  };
  rc = ext2fs_read_bitmaps(fs);
  if (rc != 0) {
    return makeError(ext2Error(rc, "read bitmaps"));
  }
  Ext4Writer w(fs);
  inodes[0].ino = EXT2_ROOT_INO;
  ML_RETURN_IF_ERROR(w.setMeta(EXT2_ROOT_INO, inodes[0], true));
  ML_RETURN_IF_ERROR(w.setXattrs(EXT2_ROOT_INO, inodes[0]));

  // Pass 1: the namespace (directories first by walk order, which visits parents before children).
  Status status = ok();
  std::map<const Node*, ext2_ino_t> dir_ino{{&tree.root(), EXT2_ROOT_INO}};
  std::vector<uint32_t> linked_twice;
  tree.walk([&](const std::string& p, const Node& node, const Node& parent) {
    if (!status) {
      return;
    }
    ext2_ino_t parent_ino = dir_ino[&parent];
    std::string name = p.substr(p.rfind('/') + 1);
    Inode& in = inodes[node.inode];
    if (in.ino != 0) {
      status = w.link(parent_ino, name, in);
      return;
    }
    switch (in.mode & kTypeMask) {
      case S_IFDIR:
        status = w.createDir(parent_ino, name, in);
        dir_ino[&node] = in.ino;
        break;
      case S_IFLNK:
        status = w.createSymlink(parent_ino, name, in);
        if (status && in.nlink > 1) {
          status = w.fixLinkCount(in);
        }
        break;
      default:
        status = w.createOther(parent_ino, name, in);
        break;
    }
    if (!status) {
      status = makeError(std::move(status).error().withContext(p));
    }
  });
  ML_RETURN_IF_ERROR(status);

  // Pass 2: file contents, streamed from the layers again.
  std::map<std::pair<size_t, int64_t>, ext2_ino_t> data_map;
  for (const Inode& in : inodes) {
    if (in.ino != 0 && in.entry >= 0 && in.size > 0 && in.nlink > 0) {
      data_map[{in.layer, in.entry}] = in.ino;
    }
  }
  for (size_t li = 0; li < layers.size() && !data_map.empty(); ++li) {
    ML_ASSIGN_OR_RETURN(ArchivePtr a, openLayer(layers[li]));
    archive_entry* e = nullptr;
    for (int64_t index = 0;; ++index) {
      int arc = archive_read_next_header(a.get(), &e);
      if (arc == ARCHIVE_EOF) {
        break;
      }
      if (arc < ARCHIVE_WARN) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("layer {}: {}", layers[li].name, archiveError(a.get())));
      }
      auto it = data_map.find({li, index});
      if (it == data_map.end()) {
        continue;
      }
      const char* p = archive_entry_pathname(e);
      ML_RETURN_IF_ERROR(w.writeData(
          it->second, a.get(), fmt::format("layer {} entry '{}'", layers[li].name, p ? p : "")));
    }
  }
  closed = true;
  rc = ext2fs_close_free(&fs);
  if (rc != 0) {
    return makeError(ext2Error(rc, "close " + path));
  }
  return ok();
}

}  // namespace

Result<std::vector<MergedEntry>> mergeLayers(std::span<const LayerSource> layers) {
  ML_ASSIGN_OR_RETURN(Tree tree, merge(layers));
  std::vector<MergedEntry> out;
  const std::vector<Inode>& inodes = tree.inodes();
  tree.walk([&](const std::string& p, const Node& node, const Node&) {
    const Inode& in = inodes[node.inode];
    out.push_back(MergedEntry{p, in.mode, in.uid, in.gid, in.size, in.symlink, node.inode,
                              in.rdev_major, in.rdev_minor, in.xattrs});
  });
  return out;
}

Status buildExt4(std::span<const LayerSource> layers, const std::string& out_path,
                 const std::string& tmp_dir) {
  ML_ASSIGN_OR_RETURN(Tree tree, merge(layers));
  std::string tmp = tmp_dir + "/rootfs.XXXXXX";
  int fd = ::mkostemp(tmp.data(), O_CLOEXEC);
  if (fd < 0) {
    return makeError(Errc::System, "mkostemp " + tmp, errno);
  }
  Fd owned(fd);
  bool keep = false;
  ML_DEFER {
    if (!keep) {
      (void)::unlink(tmp.c_str());
    }
  };
  ML_RETURN_IF_ERROR(writeExt4(tree, layers, tmp));
  if (::fsync(owned.get()) != 0) {
    return makeError(Errc::System, "fsync " + tmp, errno);
  }
  if (::fchmod(owned.get(), 0444) != 0) {
    return makeError(Errc::System, "chmod " + tmp, errno);
  }
  if (::rename(tmp.c_str(), out_path.c_str()) != 0) {
    return makeError(Errc::System, fmt::format("rename {} -> {}", tmp, out_path), errno);
  }
  keep = true;
  return ok();
}

Result<std::string> ensureRootfs(Store& store, const ImageRecord& image) {
  ML_ASSIGN_OR_RETURN(Digest manifest, parseDigest(image.manifest_digest));
  std::string out =
      fmt::format("{}/{}-v{}.ext4", store.rootfsDir(), manifest.hex, kRootfsBuilderVersion);
  if (::access(out.c_str(), F_OK) == 0) {
    return out;
  }
  ML_ASSIGN_OR_RETURN(FileLock store_lock, store.lockStore(FileLock::Mode::Shared));
  ML_ASSIGN_OR_RETURN(FileLock lock, FileLock::acquire(fmt::format("{}/locks/{}.rootfs.lock",
                                                                   store.root(), manifest.hex),
                                                       FileLock::Mode::Exclusive));
  if (::access(out.c_str(), F_OK) == 0) {
    return out;  // built by a concurrent caller while we waited
  }
  std::vector<LayerSource> layers;
  for (const LayerRecord& l : image.layers) {
    ML_ASSIGN_OR_RETURN(Digest d, parseDigest(l.digest));
    if (!store.hasBlob(d)) {
      return makeError(Errc::NotFound, fmt::format("image {}: layer {} is missing from the store; "
                                                   "pull or import the image again",
                                                   image.name, l.digest));
    }
    layers.push_back(LayerSource{store.blobPath(d), l.digest});
  }
  ML_LOG(image, info, "building rootfs for {} ({} layers)", image.name, layers.size());
  auto built = buildExt4(layers, out, store.tmpDir());
  if (!built) {
    return makeError(std::move(built).error().withContext("building rootfs of " + image.name));
  }
  return out;
}

}  // namespace matchlock::image
