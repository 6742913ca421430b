// SPDX-License-Identifier: Apache-2.0
#include "vfs/fuse/server.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/fuse.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

namespace matchlock::vfs::fuse {
namespace {

// FUSE_DIRECT_IO_ALLOW_MMAP (1 << 36: bit 4 of flags2), newer than the host's <linux/fuse.h>.
constexpr uint32_t kDirectIoAllowMmap2 = 1U << 4;
constexpr uint32_t kMinMinor = 26;  // Linux 4.20: every request layout below is fixed from here
constexpr size_t kInHeader = sizeof(fuse_in_header);
constexpr size_t kNameMax = 255;
constexpr size_t kPathMax = 4096;

/// Bounds-checked reads from a request body. Every getter fails (false) instead of reading past
/// the end; names must be NUL-terminated inside the body.
class Body {
 public:
  explicit Body(std::string_view data) : data_(data) {}
  template <class T>
  bool get(T* out) {
    if (data_.size() - pos_ < sizeof(T)) {
      return false;
    }
    std::memcpy(out, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  /// A NUL-terminated string (the NUL consumed, not returned).
  bool str(std::string_view* out, size_t max) {
    std::string_view rest = data_.substr(pos_);
    size_t nul = rest.find('\0');
    if (nul == std::string_view::npos || nul > max) {
      return false;
    }
    *out = rest.substr(0, nul);
    pos_ += nul + 1;
    return true;
  }
  bool bytes(size_t n, std::string_view* out) {
    if (data_.size() - pos_ < n) {
      return false;
    }
    *out = data_.substr(pos_, n);
    pos_ += n;
    return true;
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

/// A single path component the providers may see.
bool validName(std::string_view name) {
  return !name.empty() && name.size() <= kNameMax && name != "." && name != ".." &&
         name.find('/') == std::string_view::npos && name.find('\0') == std::string_view::npos;
}

template <class T>
std::string_view asBytes(const T& v) {
  return {reinterpret_cast<const char*>(&v), sizeof(T)};
}

uint64_t nowMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

bool parentOf(const std::string& rel, std::string* parent) {
  if (rel.empty()) {
    return false;
  }
  size_t slash = rel.rfind('/');
  *parent = slash == std::string::npos ? std::string() : rel.substr(0, slash);
  return true;
}

}  // namespace

struct Connection::Request {
  fuse_in_header h{};
  Body body{{}};
  Caller caller() const { return Caller{h.uid, h.gid, h.pid}; }
};

Connection::Connection(std::vector<MountPoint> mounts, SendFn send, EventFn events, Limits limits)
    : mounts_(std::move(mounts)),
      send_(std::move(send)),
      events_(std::move(events)),
      limits_(limits) {
  // Pinned nodes: every mount root and every missing parent of a nested mount.
  for (size_t i = 0; i < mounts_.size(); ++i) {
    const MountPoint& m = mounts_[i];
    uint64_t id = m.rel.empty() ? FUSE_ROOT_ID : next_node_++;
    nodes_[id] = Node{static_cast<int>(i), m.provider->rootNode(), 1, true, m.rel};
    by_local_[{static_cast<int>(i), m.provider->rootNode()}] = id;
    fixed_[m.rel] = id;
  }
  for (const MountPoint& m : mounts_) {
    std::string p = m.rel;
    while (parentOf(p, &p)) {
      if (!fixed_.contains(p)) {
        uint64_t id = p.empty() ? FUSE_ROOT_ID : next_node_++;
        nodes_[id] = Node{-1, 0, 1, true, p};
        fixed_[p] = id;
      }
    }
  }
  if (!fixed_.contains("")) {
    nodes_[FUSE_ROOT_ID] = Node{-1, 0, 1, true, ""};
    fixed_[""] = FUSE_ROOT_ID;
  }
}

Connection::~Connection() {
  for (auto& [id, h] : handles_) {
    if (h.mount >= 0) {
      Provider* p = mounts_[static_cast<size_t>(h.mount)].provider;
      if (h.dir) {
        p->releasedir(h.local);
      } else {
        p->release(h.local);
      }
    }
  }
  for (auto& [id, n] : nodes_) {
    if (n.mount >= 0 && !n.pinned) {
      mounts_[static_cast<size_t>(n.mount)].provider->forget(n.local);
    }
  }
}

Status Connection::receive(std::string_view bytes) {
  if (failed_) {
    return makeError(Errc::Protocol, "vfs: the stream already broke its framing");
  }
  in_.append(bytes);
  return process();
}

Status Connection::process() {
  if (failed_) {
    return makeError(Errc::Protocol, "vfs: the stream already broke its framing");
  }
  size_t pos = 0;
  const size_t max_len = maxRequest();
  while (in_.size() - pos >= sizeof(uint32_t)) {
    if (may_reply_ && !may_reply_()) {
      break;  // replies are piling up: the rest waits (and so does the guest's credit)
    }
    uint32_t len = 0;
    std::memcpy(&len, in_.data() + pos, sizeof(len));
    if (len < kInHeader || len > max_len) {
      failed_ = true;
      in_.clear();
      return makeError(Errc::Protocol,
                       fmt::format("vfs: a request of {} bytes cannot be framed", len));
    }
    if (in_.size() - pos < len) {
      break;
    }
    handle(std::string_view(in_).substr(pos, len));
    pos += len;
  }
  in_.erase(0, pos);
  processed_ += pos;
  return ok();
}

Status Connection::handleMessage(std::string_view msg,
                                 const std::vector<std::string_view>* write_data,
                                 const std::vector<Span>* read_into) {
  if (msg.size() < kInHeader) {
    return makeError(Errc::Protocol, fmt::format("vfs: a request of {} bytes", msg.size()));
  }
  fuse_in_header h{};
  std::memcpy(&h, msg.data(), kInHeader);
  uint64_t total = msg.size();
  if (write_data != nullptr) {
    for (std::string_view part : *write_data) {
      total += part.size();
    }
  }
  if (h.len != total || total > maxRequest() ||
      (write_data != nullptr &&
       (h.opcode != FUSE_WRITE || msg.size() != kInHeader + sizeof(fuse_write_in))) ||
      (read_into != nullptr && (h.opcode != FUSE_READ || !sink_))) {
    ++requests_;
    replyError(h.unique, EINVAL);
    return ok();
  }
  write_data_ = write_data;
  read_into_ = read_into;
  handle(msg);
  write_data_ = nullptr;
  read_into_ = nullptr;
  return ok();
}

uint32_t Connection::openFlags(uint32_t flags, uint64_t size) const {
  // A write-only file bypasses the guest's page cache: FUSE writes are write-through anyway
  // (no writeback cache), so this only drops the guest's copy into the cache and lets the kernel
  // hand the writer's own pages to the transport. A write-only descriptor cannot be mmap()ed, so
  // nothing is lost; a reader elsewhere revalidates on the new mtime (FUSE_AUTO_INVAL_DATA).
  if (limits_.direct_writes && (flags & O_ACCMODE) == O_WRONLY) {
    return FOPEN_DIRECT_IO;
  }
  // A large file read-only: reads go straight into the reader's buffer (one copy, on the host)
  // instead of through the guest's page cache (two, one of them emulated under TCG). Only when
  // the guest kernel still allows MAP_SHARED mappings of such a file; small files stay cached.
  if (direct_io_mmap_ && limits_.direct_read_min != 0 && (flags & O_ACCMODE) == O_RDONLY &&
      size >= limits_.direct_read_min) {
    return FOPEN_DIRECT_IO;
  }
  return 0;
}

size_t Connection::takeConsumed() {
  // Credit for what was served, plus for what is buffered up to one largest request: a request
  // larger than the stream window must be able to arrive whole before it can be served.
  const uint64_t may = processed_ + std::min<uint64_t>(in_.size(), maxRequest());
  if (may <= granted_) {
    return 0;
  }
  size_t n = static_cast<size_t>(may - granted_);
  granted_ = may;
  return n;
}

size_t Connection::maxRequest() const {
  return kInHeader + sizeof(fuse_write_in) + limits_.max_write + 4096;
}

void Connection::reply(uint64_t unique, int error, std::string_view payload) {
  fuse_out_header out{};
  out.len = static_cast<uint32_t>(sizeof(out) + (error == 0 ? payload.size() : 0));
  out.error = error;
  out.unique = unique;
  if (sink_) {
    sink_(asBytes(out), error == 0 ? payload : std::string_view());
    return;
  }
  std::string msg;
  msg.reserve(out.len);
  msg.append(asBytes(out));
  if (error == 0) {
    msg.append(payload);
  }
  send_(std::move(msg));
}

void Connection::handle(std::string_view msg) {
  ++requests_;
  Request r;
  std::memcpy(&r.h, msg.data(), kInHeader);
  r.body = Body(msg.substr(kInHeader));
  if (!initialized_ && r.h.opcode != FUSE_INIT) {
    if (r.h.opcode != FUSE_FORGET && r.h.opcode != FUSE_BATCH_FORGET &&
        r.h.opcode != FUSE_INTERRUPT) {
      replyError(r.h.unique, EIO);
    }
    return;
  }
  dispatch(r);
}

// ---- Router ------------------------------------------------------------------------------------

Connection::Node* Connection::findNode(uint64_t id) {
  auto it = nodes_.find(id);
  return it == nodes_.end() ? nullptr : &it->second;
}

uint64_t Connection::addRef(int mount, uint64_t local, const std::string& rel) {
  auto key = std::pair{mount, local};
  if (auto it = by_local_.find(key); it != by_local_.end()) {
    Node& n = nodes_[it->second];
    if (!n.pinned) {
      ++n.refs;  // the provider's node lives until our single forget()
    }
    return it->second;
  }
  uint64_t id = next_node_++;
  nodes_[id] = Node{mount, local, 1, false, rel};
  by_local_[key] = id;
  return id;
}

void Connection::dropRef(uint64_t id, uint64_t n) {
  auto it = nodes_.find(id);
  if (it == nodes_.end() || it->second.pinned) {
    return;
  }
  Node& node = it->second;
  node.refs = n >= node.refs ? 0 : node.refs - n;
  if (node.refs == 0) {
    // An open handle keeps the provider's object alive on its own (the provider's contract).
    mounts_[static_cast<size_t>(node.mount)].provider->forget(node.local);
    by_local_.erase({node.mount, node.local});
    nodes_.erase(it);
  }
}

std::string Connection::childRel(const Node& parent, std::string_view name) const {
  return parent.rel.empty() ? std::string(name) : parent.rel + "/" + std::string(name);
}

std::string Connection::guestPath(const std::string& rel) const {
  // The deepest mount whose root is `rel` or above it names the path: its guest path plus the
  // rest. Mount rels and guest paths need not share their tails (the virtio-fs root holds tree
  // INDEX at rel "INDEX").
  const MountPoint* owner = nullptr;
  for (const MountPoint& m : mounts_) {
    const bool covers =
        m.rel.empty() || rel == m.rel ||
        (rel.size() > m.rel.size() && rel.starts_with(m.rel) && rel[m.rel.size()] == '/');
    if (covers && (owner == nullptr || m.rel.size() > owner->rel.size())) {
      owner = &m;
    }
  }
  if (owner != nullptr) {
    if (rel.size() == owner->rel.size()) {
      return owner->guest_path;
    }
    return owner->guest_path + "/" + rel.substr(owner->rel.empty() ? 0 : owner->rel.size() + 1);
  }
  // A synthetic directory above mounts: strip the components below it from a mount's path.
  for (const MountPoint& m : mounts_) {
    if (rel.empty() || (m.rel.starts_with(rel) && m.rel[rel.size()] == '/')) {
      std::string base = m.guest_path.substr(0, m.guest_path.size() - (m.rel.size() - rel.size()));
      while (base.size() > 1 && base.back() == '/') {
        base.pop_back();
      }
      return base;
    }
  }
  return "/" + rel;
}

bool Connection::isFixedRel(const std::string& rel) const {
  return fixed_.contains(rel);
}

std::vector<std::string> Connection::fixedChildren(const std::string& rel) const {
  std::vector<std::string> out;
  for (const auto& [r, id] : fixed_) {
    if (r.empty() || r == rel) {
      continue;
    }
    std::string parent;
    parentOf(r, &parent);
    if (parent == rel) {
      out.push_back(r.substr(rel.empty() ? 0 : rel.size() + 1));
    }
  }
  return out;
}

uint64_t Connection::inoOf(int mount, uint64_t ino) const {
  // Inode numbers stay unique across the connection's mounts: the mount in the top byte.
  return (ino & 0x00FFFFFFFFFFFFFFULL) | (static_cast<uint64_t>(mount + 1) << 56);
}

struct stat Connection::syntheticAttr(uint64_t id) const {
  struct stat st {};
  st.st_ino = (0xFFULL << 56) | id;
  st.st_mode = S_IFDIR | 0755;
  st.st_nlink = 2;
  st.st_blksize = 4096;
  return st;
}

Ret<struct stat> Connection::attrOf(uint64_t id) {
  Node* n = findNode(id);
  if (n == nullptr) {
    return fail(ESTALE);
  }
  if (n->mount < 0) {
    return syntheticAttr(id);
  }
  auto st = mounts_[static_cast<size_t>(n->mount)].provider->getattr(n->local);
  if (st) {
    st->st_ino = inoOf(n->mount, st->st_ino);
  }
  return st;
}

Ret<uint64_t> Connection::lookupChild(uint64_t parent_id, std::string_view name,
                                      struct stat* attr) {
  Node* parent = findNode(parent_id);
  if (parent == nullptr) {
    return fail(ESTALE);
  }
  if (!validName(name)) {
    return fail(name.size() > kNameMax ? ENAMETOOLONG : EINVAL);
  }
  std::string rel = childRel(*parent, name);
  if (auto it = fixed_.find(rel); it != fixed_.end()) {
    ML_ASSIGN_OR_RETURN(*attr, attrOf(it->second));
    return it->second;
  }
  if (parent->mount < 0) {
    return fail(ENOENT);
  }
  int mount = parent->mount;
  auto e = mounts_[static_cast<size_t>(mount)].provider->lookup(parent->local, name);
  if (!e) {
    return fail(e.error());
  }
  *attr = e->attr;
  attr->st_ino = inoOf(mount, attr->st_ino);
  return addRef(mount, e->node, rel);
}

void Connection::renameRel(const std::string& from, const std::string& to) {
  for (auto& [id, n] : nodes_) {
    if (n.pinned) {
      continue;
    }
    if (n.rel == from) {
      n.rel = to;
    } else if (n.rel.size() > from.size() && n.rel.compare(0, from.size(), from) == 0 &&
               n.rel[from.size()] == '/') {
      n.rel = to + n.rel.substr(from.size());
    }
  }
}

int Connection::hook(Op op, const std::string& rel, int mount) {
  if (mount < 0) {
    return 0;
  }
  const Hooks* hooks = mounts_[static_cast<size_t>(mount)].hooks;
  if (hooks == nullptr || hooks->empty()) {
    return 0;
  }
  std::string path = guestPath(rel);
  HookDecision d = decide(*hooks, op, path);
  if (d.error != 0 && events_) {
    FileEvent e;
    e.timestamp_ms = static_cast<int64_t>(nowMs());
    e.op = op;
    e.path = path;
    e.error = d.error;
    e.rule = d.rule != nullptr ? d.rule->name : "";
    events_(e);
  }
  return d.error;
}

void Connection::event(Op op, const std::string& rel, int mount, uint64_t size, int error) {
  if (mount < 0 || !events_) {
    return;
  }
  const Hooks* hooks = mounts_[static_cast<size_t>(mount)].hooks;
  if (hooks == nullptr || hooks->empty()) {
    return;
  }
  std::string path = guestPath(rel);
  HookDecision d = decide(*hooks, op, path);
  if (!d.report) {
    return;
  }
  FileEvent e;
  e.timestamp_ms = static_cast<int64_t>(nowMs());
  e.op = op;
  e.path = std::move(path);
  e.size = size;
  e.error = error;
  e.rule = d.rule != nullptr ? d.rule->name : "";
  events_(e);
}

std::string Connection::attrOut(const struct stat& st) const {
  fuse_attr a{};
  a.ino = st.st_ino;
  a.size = static_cast<uint64_t>(st.st_size);
  a.blocks = static_cast<uint64_t>(st.st_blocks);
  a.atime = static_cast<uint64_t>(st.st_atim.tv_sec);
  a.mtime = static_cast<uint64_t>(st.st_mtim.tv_sec);
  a.ctime = static_cast<uint64_t>(st.st_ctim.tv_sec);
  a.atimensec = static_cast<uint32_t>(st.st_atim.tv_nsec);
  a.mtimensec = static_cast<uint32_t>(st.st_mtim.tv_nsec);
  a.ctimensec = static_cast<uint32_t>(st.st_ctim.tv_nsec);
  a.mode = st.st_mode;
  a.nlink = static_cast<uint32_t>(st.st_nlink);
  a.uid = st.st_uid;
  a.gid = st.st_gid;
  a.rdev = 0;  // device numbers mean nothing across the boundary
  a.blksize = st.st_blksize > 0 ? static_cast<uint32_t>(st.st_blksize) : 4096;
  return std::string(asBytes(a));
}

std::string Connection::entryOut(uint64_t id, const struct stat& attr) const {
  fuse_entry_out e{};
  e.nodeid = id;
  e.generation = 0;
  e.entry_valid = limits_.entry_timeout_ms / 1000;
  e.entry_valid_nsec = (limits_.entry_timeout_ms % 1000) * 1000000;
  e.attr_valid = limits_.attr_timeout_ms / 1000;
  e.attr_valid_nsec = (limits_.attr_timeout_ms % 1000) * 1000000;
  std::string out(asBytes(e));
  std::string a = attrOut(attr);
  std::memcpy(out.data() + offsetof(fuse_entry_out, attr), a.data(), a.size());
  return out;
}

// ---- Dispatch
// ------------------------------------------------------------------------------------

void Connection::dispatch(Request& r) {
  const uint64_t u = r.h.unique;
  auto err = [&](int e) { replyError(u, e); };
  Node* node = nullptr;
  // Requests that name a node: refuse unknown ids before anything else.
  switch (r.h.opcode) {
    case FUSE_INIT:
    case FUSE_DESTROY:
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:
    case FUSE_STATFS:
    case FUSE_NOTIFY_REPLY:
      break;
    default:
      node = findNode(r.h.nodeid);
      if (node == nullptr) {
        err(ESTALE);
        return;
      }
  }
  Provider* p = node != nullptr && node->mount >= 0
                    ? mounts_[static_cast<size_t>(node->mount)].provider
                    : nullptr;
  const int mount = node != nullptr ? node->mount : -1;

  // The provider node of a directory request's parent; synthetic directories are read-only.
  auto needProvider = [&]() -> bool {
    if (p == nullptr) {
      err(EROFS);
      return false;
    }
    return true;
  };
  auto entryReply = [&](const Ret<Entry>& e, const std::string& rel, Op op) {
    if (!e) {
      event(op, rel, mount, 0, e.error());
      err(e.error());
      return;
    }
    struct stat attr = e->attr;
    attr.st_ino = inoOf(mount, attr.st_ino);
    uint64_t id = addRef(mount, e->node, rel);
    event(op, rel, mount, 0, 0);
    reply(u, 0, entryOut(id, attr));
  };
  auto nameArg = [&](std::string_view* name) -> bool {
    if (!r.body.str(name, kNameMax + 1) || !validName(*name)) {
      err(name->size() > kNameMax ? ENAMETOOLONG : EINVAL);
      return false;
    }
    return true;
  };
  auto findHandle = [&](uint64_t fh, bool dir) -> Handle* {
    auto it = handles_.find(fh);
    if (it == handles_.end() || it->second.dir != dir || it->second.node != r.h.nodeid) {
      err(EBADF);
      return nullptr;
    }
    return &it->second;
  };

  auto arg = [&](auto* in) -> bool {
    if (!r.body.get(in)) {
      err(EINVAL);
      return false;
    }
    return true;
  };
  auto allowed = [&](Op op, const std::string& rel) -> bool {
    if (int e = hook(op, rel, mount); e != 0) {
      err(e);
      return false;
    }
    return true;
  };
  // A new name in this directory: valid, not a mount point or synthetic directory, in a
  // provider, and allowed by the hooks.
  auto newChild = [&](std::string_view* name, std::string* rel, Op op) -> bool {
    if (!nameArg(name)) {
      return false;
    }
    *rel = childRel(*node, *name);
    if (isFixedRel(*rel)) {
      err(EEXIST);
      return false;
    }
    return needProvider() && allowed(op, *rel);
  };
  auto attrReply = [&](const struct stat& st) {
    fuse_attr_out out{};
    out.attr_valid = limits_.attr_timeout_ms / 1000;
    out.attr_valid_nsec = (limits_.attr_timeout_ms % 1000) * 1000000;
    std::string bytes(asBytes(out));
    std::string a = attrOut(st);
    std::memcpy(bytes.data() + offsetof(fuse_attr_out, attr), a.data(), a.size());
    reply(u, 0, bytes);
  };

  switch (r.h.opcode) {
    case FUSE_INIT: {
      uint32_t major = 0;
      uint32_t minor = 0;
      uint32_t max_readahead = 0;
      uint32_t flags = 0;
      if (!r.body.get(&major) || !r.body.get(&minor) || !r.body.get(&max_readahead) ||
          !r.body.get(&flags)) {
        err(EINVAL);
        return;
      }
      fuse_init_out out{};
      out.major = FUSE_KERNEL_VERSION;
      out.minor = FUSE_KERNEL_MINOR_VERSION;
      if (major < FUSE_KERNEL_VERSION) {
        err(EPROTO);
        return;
      }
      if (major > FUSE_KERNEL_VERSION) {
        // The kernel retries with our major.
        reply(u, 0, std::string_view(reinterpret_cast<const char*>(&out), 8));
        return;
      }
      if (minor < kMinMinor) {
        err(EPROTO);
        return;
      }
      proto_minor_ = std::min<uint32_t>(minor, FUSE_KERNEL_MINOR_VERSION);
      const uint32_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ATOMIC_O_TRUNC |
                            FUSE_AUTO_INVAL_DATA | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO |
                            FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES | FUSE_CACHE_SYMLINKS |
                            FUSE_ASYNC_DIO;
      out.flags = flags & want;
      // INIT's second flag word (7.36+): a guest kernel that lets FOPEN_DIRECT_IO files be
      // mmap()ed MAP_SHARED (ours does, docs/vfs.md) gets large reads without its page cache.
      uint32_t flags2 = 0;
      if ((flags & FUSE_INIT_EXT) != 0 && r.body.get(&flags2) &&
          (flags2 & kDirectIoAllowMmap2) != 0) {
        out.flags |= FUSE_INIT_EXT;
        out.flags2 = kDirectIoAllowMmap2;
        direct_io_mmap_ = true;
      }
      out.max_readahead = std::min<uint32_t>(max_readahead, limits_.max_write);
      out.max_background = 64;
      out.congestion_threshold = 48;
      out.max_write = limits_.max_write;
      out.time_gran = 1;
      out.max_pages = static_cast<uint16_t>(limits_.max_write / 4096);
      initialized_ = true;
      reply(u, 0, asBytes(out));
      return;
    }
    case FUSE_DESTROY:
      reply(u, 0);
      return;
    case FUSE_INTERRUPT:
    case FUSE_NOTIFY_REPLY:
      return;  // every request is answered at once: nothing to interrupt
    case FUSE_FORGET: {
      fuse_forget_in in{};
      if (r.body.get(&in)) {
        dropRef(r.h.nodeid, in.nlookup);
      }
      return;
    }
    case FUSE_BATCH_FORGET: {
      fuse_batch_forget_in in{};
      if (!r.body.get(&in)) {
        return;
      }
      for (uint32_t i = 0; i < in.count; ++i) {
        fuse_forget_one one{};
        if (!r.body.get(&one)) {
          return;
        }
        dropRef(one.nodeid, one.nlookup);
      }
      return;
    }
    case FUSE_LOOKUP: {
      std::string_view name;
      if (!r.body.str(&name, kNameMax + 1)) {
        err(EINVAL);
        return;
      }
      std::string rel = childRel(*node, name);
      if (!allowed(Op::Stat, rel)) {
        return;
      }
      struct stat attr {};
      auto id = lookupChild(r.h.nodeid, name, &attr);
      if (!id) {
        if (id.error() == ENOENT) {
          // A negative entry the kernel may cache for the entry timeout.
          fuse_entry_out e{};
          e.entry_valid = limits_.entry_timeout_ms / 1000;
          e.entry_valid_nsec = (limits_.entry_timeout_ms % 1000) * 1000000;
          reply(u, 0, asBytes(e));
          return;
        }
        err(id.error());
        return;
      }
      reply(u, 0, entryOut(*id, attr));
      return;
    }
    case FUSE_GETATTR: {
      if (!allowed(Op::Stat, node->rel)) {
        return;
      }
      auto st = attrOf(r.h.nodeid);
      if (!st) {
        err(st.error());
        return;
      }
      attrReply(*st);
      return;
    }
    case FUSE_SETATTR: {
      fuse_setattr_in in{};
      if (!arg(&in)) {
        return;
      }
      if (!needProvider()) {
        return;
      }
      Op op = (in.valid & FATTR_SIZE) != 0 ? Op::Truncate : Op::Chmod;
      if (int e = hook(op, node->rel, mount); e != 0) {
        err(e);
        return;
      }
      SetAttr sa;
      sa.valid = in.valid;
      sa.mode = in.mode;
      sa.uid = in.uid;
      sa.gid = in.gid;
      sa.size = in.size;
      sa.atime = {static_cast<time_t>(in.atime), static_cast<long>(in.atimensec)};
      sa.mtime = {static_cast<time_t>(in.mtime), static_cast<long>(in.mtimensec)};
      if ((in.valid & FATTR_ATIME_NOW) != 0) {
        sa.atime.tv_nsec = UTIME_NOW;
      }
      if ((in.valid & FATTR_MTIME_NOW) != 0) {
        sa.mtime.tv_nsec = UTIME_NOW;
      }
      uint64_t local_fh = 0;
      if ((in.valid & FATTR_FH) != 0) {
        Handle* h = findHandle(in.fh, false);
        if (h == nullptr) {
          return;
        }
        local_fh = h->local;
      }
      auto st = p->setattr(node->local, sa, local_fh);
      event(op, node->rel, mount, 0, st ? 0 : st.error());
      if (!st) {
        err(st.error());
        return;
      }
      st->st_ino = inoOf(mount, st->st_ino);
      attrReply(*st);
      return;
    }
    case FUSE_READLINK: {
      if (p == nullptr) {
        err(EINVAL);
        return;
      }
      if (!allowed(Op::Readlink, node->rel)) {
        return;
      }
      auto target = p->readlink(node->local);
      if (!target) {
        err(target.error());
        return;
      }
      reply(u, 0, *target);
      return;
    }
    case FUSE_SYMLINK: {
      std::string_view name;
      std::string_view target;
      if (!nameArg(&name)) {
        return;
      }
      if (!r.body.str(&target, kPathMax) || target.empty()) {
        err(target.size() >= kPathMax ? ENAMETOOLONG : EINVAL);
        return;
      }
      std::string rel = childRel(*node, name);
      if (isFixedRel(rel)) {
        err(EEXIST);
        return;
      }
      if (!needProvider()) {
        return;
      }
      if (!allowed(Op::Symlink, rel)) {
        return;
      }
      entryReply(p->symlink(node->local, name, target, r.caller()), rel, Op::Symlink);
      return;
    }
    case FUSE_MKNOD: {
      fuse_mknod_in in{};
      std::string_view name;
      if (!arg(&in)) {
        return;
      }
      std::string rel;
      if (!newChild(&name, &rel, Op::Create)) {
        return;
      }
      uint32_t mode = (in.mode & S_IFMT) | (in.mode & ~in.umask & 07777);
      entryReply(p->mknod(node->local, name, mode, in.rdev, r.caller()), rel, Op::Create);
      return;
    }
    case FUSE_MKDIR: {
      fuse_mkdir_in in{};
      std::string_view name;
      if (!arg(&in)) {
        return;
      }
      std::string rel;
      if (!newChild(&name, &rel, Op::Mkdir)) {
        return;
      }
      entryReply(p->mkdir(node->local, name, in.mode & ~in.umask & 07777, r.caller()), rel,
                 Op::Mkdir);
      return;
    }
    case FUSE_UNLINK:
    case FUSE_RMDIR: {
      std::string_view name;
      if (!nameArg(&name)) {
        return;
      }
      std::string rel = childRel(*node, name);
      if (isFixedRel(rel)) {
        err(EBUSY);
        return;
      }
      if (!needProvider()) {
        return;
      }
      if (!allowed(Op::Remove, rel)) {
        return;
      }
      auto res =
          r.h.opcode == FUSE_UNLINK ? p->unlink(node->local, name) : p->rmdir(node->local, name);
      event(Op::Remove, rel, mount, 0, res ? 0 : res.error());
      if (!res) {
        err(res.error());
        return;
      }
      reply(u, 0);
      return;
    }
    case FUSE_RENAME:
    case FUSE_RENAME2: {
      uint64_t newdir = 0;
      uint32_t flags = 0;
      if (r.h.opcode == FUSE_RENAME) {
        fuse_rename_in in{};
        if (!r.body.get(&in)) {
          err(EINVAL);
          return;
        }
        newdir = in.newdir;
      } else {
        fuse_rename2_in in{};
        if (!r.body.get(&in)) {
          err(EINVAL);
          return;
        }
        newdir = in.newdir;
        flags = in.flags;
      }
      std::string_view name;
      std::string_view new_name;
      if (!nameArg(&name) || !nameArg(&new_name)) {
        return;
      }
      Node* to = findNode(newdir);
      if (to == nullptr) {
        err(ESTALE);
        return;
      }
      std::string from_rel = childRel(*node, name);
      std::string to_rel = childRel(*to, new_name);
      if (isFixedRel(from_rel) || isFixedRel(to_rel)) {
        err(EBUSY);
        return;
      }
      if (!needProvider()) {
        return;
      }
      if (to->mount != mount) {
        err(EXDEV);
        return;
      }
      if (!allowed(Op::Rename, from_rel)) {
        return;
      }
      auto res = p->rename(node->local, name, to->local, new_name, flags);
      event(Op::Rename, from_rel, mount, 0, res ? 0 : res.error());
      if (!res) {
        err(res.error());
        return;
      }
      if ((flags & RENAME_EXCHANGE) != 0) {
        renameRel(to_rel, from_rel + "\x01");
        renameRel(from_rel, to_rel);
        renameRel(from_rel + "\x01", from_rel);
      } else {
        renameRel(from_rel, to_rel);
      }
      reply(u, 0);
      return;
    }
    case FUSE_LINK: {
      fuse_link_in in{};
      std::string_view name;
      if (!arg(&in)) {
        return;
      }
      if (!nameArg(&name)) {
        return;
      }
      Node* target = findNode(in.oldnodeid);
      if (target == nullptr) {
        err(ESTALE);
        return;
      }
      std::string rel = childRel(*node, name);
      if (isFixedRel(rel)) {
        err(EEXIST);
        return;
      }
      if (!needProvider()) {
        return;
      }
      if (target->mount != mount || target->pinned) {
        err(EXDEV);
        return;
      }
      if (!allowed(Op::Link, rel)) {
        return;
      }
      entryReply(p->link(target->local, node->local, name), rel, Op::Link);
      return;
    }
    case FUSE_OPEN: {
      fuse_open_in in{};
      if (!arg(&in)) {
        return;
      }
      if (p == nullptr) {
        err(EISDIR);
        return;
      }
      int flags = static_cast<int>(in.flags) & ~(O_CREAT | O_EXCL | O_NOCTTY);
      if (!allowed(Op::Open, node->rel)) {
        return;
      }
      auto fh = p->open(node->local, flags);
      event(Op::Open, node->rel, mount, 0, fh ? 0 : fh.error());
      if (!fh) {
        err(fh.error());
        return;
      }
      uint64_t id = next_handle_++;
      handles_[id] = Handle{r.h.nodeid, mount, *fh, false, false, {}};
      fuse_open_out out{};
      out.fh = id;
      uint64_t size = 0;
      if (auto st = p->getattr(node->local); st) {
        size = static_cast<uint64_t>(st->st_size);
      }
      out.open_flags = openFlags(in.flags, size);
      reply(u, 0, asBytes(out));
      return;
    }
    case FUSE_CREATE: {
      fuse_create_in in{};
      std::string_view name;
      if (!arg(&in)) {
        return;
      }
      std::string rel;
      if (!newChild(&name, &rel, Op::Create)) {
        return;
      }
      int flags = static_cast<int>(in.flags) & ~(O_CREAT | O_NOCTTY);
      auto res = p->create(node->local, name, in.mode & ~in.umask & 07777, flags, r.caller());
      event(Op::Create, rel, mount, 0, res ? 0 : res.error());
      if (!res) {
        err(res.error());
        return;
      }
      struct stat attr = res->first.attr;
      attr.st_ino = inoOf(mount, attr.st_ino);
      uint64_t id = addRef(mount, res->first.node, rel);
      uint64_t fh = next_handle_++;
      handles_[fh] = Handle{id, mount, res->second, false, false, {}};
      fuse_open_out open_out{};
      open_out.fh = fh;
      open_out.open_flags = openFlags(in.flags, 0);
      reply(u, 0, entryOut(id, attr) + std::string(asBytes(open_out)));
      return;
    }
    case FUSE_READ: {
      fuse_read_in in{};
      if (!arg(&in)) {
        return;
      }
      Handle* h = findHandle(in.fh, false);
      if (h == nullptr) {
        return;
      }
      if (p == nullptr) {
        err(EBADF);  // file handles belong to provider nodes only
        return;
      }
      if (!allowed(Op::Read, node->rel)) {
        return;
      }
      const size_t want = std::min(in.size, limits_.max_write);
      if (read_into_ != nullptr) {
        // Straight into the caller's buffers, cut at what was asked for.
        read_parts_.clear();
        size_t room = want;
        for (const Span& part : *read_into_) {
          if (room == 0) {
            break;
          }
          read_parts_.push_back(Span{part.data, std::min(part.len, room)});
          room -= read_parts_.back().len;
        }
        auto n = p->readParts(h->local, in.offset, read_parts_);
        event(Op::Read, node->rel, mount, n ? *n : 0, n ? 0 : n.error());
        if (!n) {
          err(n.error());
          return;
        }
        fuse_out_header out{};
        out.len = static_cast<uint32_t>(sizeof(out) + *n);
        out.unique = u;
        sink_(asBytes(out), {});
        return;
      }
      std::string& data = read_buf_;
      auto res = p->read(h->local, in.offset, want, data);
      event(Op::Read, node->rel, mount, data.size(), res ? 0 : res.error());
      if (!res) {
        err(res.error());
        return;
      }
      reply(u, 0, data);
      return;
    }
    case FUSE_WRITE: {
      fuse_write_in in{};
      std::string_view data;
      uint64_t scattered = 0;
      if (write_data_ != nullptr) {
        for (std::string_view part : *write_data_) {
          scattered += part.size();
        }
      }
      if (!r.body.get(&in) || in.size > limits_.max_write ||
          (write_data_ != nullptr ? in.size != scattered : !r.body.bytes(in.size, &data))) {
        err(EINVAL);
        return;
      }
      Handle* h = findHandle(in.fh, false);
      if (h == nullptr) {
        return;
      }
      if (p == nullptr) {
        err(EBADF);  // file handles belong to provider nodes only
        return;
      }
      if (!allowed(Op::Write, node->rel)) {
        return;
      }
      auto n = write_data_ != nullptr ? p->writeParts(h->local, in.offset, *write_data_)
                                      : p->write(h->local, in.offset, data);
      event(Op::Write, node->rel, mount, n ? *n : 0, n ? 0 : n.error());
      if (!n) {
        err(n.error());
        return;
      }
      fuse_write_out out{};
      out.size = static_cast<uint32_t>(*n);
      reply(u, 0, asBytes(out));
      return;
    }
    case FUSE_STATFS: {
      Node* n = findNode(r.h.nodeid);
      Provider* sp = (n != nullptr && n->mount >= 0)
                         ? mounts_[static_cast<size_t>(n->mount)].provider
                         : mounts_.front().provider;
      auto vfs = sp->statfs();
      if (!vfs) {
        err(vfs.error());
        return;
      }
      fuse_statfs_out out{};
      out.st.blocks = vfs->f_blocks;
      out.st.bfree = vfs->f_bfree;
      out.st.bavail = vfs->f_bavail;
      out.st.files = vfs->f_files;
      out.st.ffree = vfs->f_ffree;
      out.st.bsize = static_cast<uint32_t>(vfs->f_bsize);
      out.st.namelen = 255;
      out.st.frsize = static_cast<uint32_t>(vfs->f_frsize);
      reply(u, 0, asBytes(out));
      return;
    }
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR: {
      fuse_release_in in{};
      if (!arg(&in)) {
        return;
      }
      bool dir = r.h.opcode == FUSE_RELEASEDIR;
      Handle* h = findHandle(in.fh, dir);
      if (h == nullptr) {
        return;
      }
      if (h->mount >= 0) {
        Provider* hp = mounts_[static_cast<size_t>(h->mount)].provider;
        if (dir) {
          hp->releasedir(h->local);
        } else {
          hp->release(h->local);
          event(Op::Close, node->rel, mount, 0, 0);
        }
      }
      handles_.erase(in.fh);
      reply(u, 0);
      return;
    }
    case FUSE_FLUSH: {
      fuse_flush_in in{};
      if (!arg(&in)) {
        return;
      }
      Handle* h = findHandle(in.fh, false);
      if (h == nullptr) {
        return;
      }
      if (p == nullptr) {
        err(EBADF);  // file handles belong to provider nodes only
        return;
      }
      auto res = p->flush(h->local);
      if (!res) {
        err(res.error());
        return;
      }
      reply(u, 0);
      return;
    }
    case FUSE_FSYNC:
    case FUSE_FSYNCDIR: {
      fuse_fsync_in in{};
      if (!arg(&in)) {
        return;
      }
      if (r.h.opcode == FUSE_FSYNCDIR) {
        reply(u, 0);  // directory entries are written through on the host already
        return;
      }
      Handle* h = findHandle(in.fh, false);
      if (h == nullptr) {
        return;
      }
      if (p == nullptr) {
        err(EBADF);  // file handles belong to provider nodes only
        return;
      }
      if (!allowed(Op::Sync, node->rel)) {
        return;
      }
      auto res = p->fsync(h->local, (in.fsync_flags & 1) != 0);
      event(Op::Sync, node->rel, mount, 0, res ? 0 : res.error());
      if (!res) {
        err(res.error());
        return;
      }
      reply(u, 0);
      return;
    }
    case FUSE_OPENDIR: {
      fuse_open_in in{};
      if (!arg(&in)) {
        return;
      }
      if (!allowed(Op::Readdir, node->rel)) {
        return;
      }
      uint64_t local = 0;
      if (p != nullptr) {
        auto fh = p->opendir(node->local);
        if (!fh) {
          err(fh.error());
          return;
        }
        local = *fh;
      }
      uint64_t id = next_handle_++;
      handles_[id] = Handle{r.h.nodeid, mount, local, true, false, {}};
      fuse_open_out out{};
      out.fh = id;
      reply(u, 0, asBytes(out));
      return;
    }
    case FUSE_READDIR:
    case FUSE_READDIRPLUS: {
      fuse_read_in in{};
      if (!arg(&in)) {
        return;
      }
      Handle* h = findHandle(in.fh, true);
      if (h == nullptr) {
        return;
      }
      const bool plus = r.h.opcode == FUSE_READDIRPLUS;
      if (in.offset == 0 || !h->snapshot_valid) {
        // One listing per pass: provider entries, then the nested mounts and synthetic
        // directories below this one (which shadow provider entries of the same name).
        h->snapshot.clear();
        std::vector<std::string> extra = fixedChildren(node->rel);
        if (h->mount >= 0) {
          bool too_many = false;
          auto res = p->readdir(h->local, 0, [&](const DirEntry& d) {
            if (h->snapshot.size() >= limits_.max_dir_snapshot) {
              too_many = true;
              return false;
            }
            if (std::find(extra.begin(), extra.end(), d.name) == extra.end()) {
              uint64_t ino = d.name == "." || d.name == ".." ? 0 : inoOf(mount, d.ino);
              h->snapshot.push_back(DirItem{std::string(d.name), ino, d.type});
            }
            return true;
          });
          if (!res || too_many) {
            err(res ? EOVERFLOW : res.error());
            return;
          }
        } else {
          h->snapshot.push_back(DirItem{".", 0, DT_DIR});
          h->snapshot.push_back(DirItem{"..", 0, DT_DIR});
        }
        for (const std::string& name : extra) {
          h->snapshot.push_back(
              DirItem{name, (0xFFULL << 56) | fixed_[childRel(*node, name)], DT_DIR});
        }
        h->snapshot_valid = true;
      }
      std::string out;
      const size_t cap = std::min<size_t>(in.size, 1U << 20);
      for (uint64_t i = in.offset; i < h->snapshot.size(); ++i) {
        const DirItem& item = h->snapshot[i];
        size_t entlen = FUSE_NAME_OFFSET + item.name.size();
        size_t padded = FUSE_DIRENT_ALIGN(entlen);
        size_t need = plus ? FUSE_NAME_OFFSET_DIRENTPLUS + item.name.size() : entlen;
        need = FUSE_DIRENT_ALIGN(need);
        if (out.size() + need > cap) {
          break;
        }
        std::string entry_out(sizeof(fuse_entry_out), '\0');
        uint64_t ino = item.ino;
        uint32_t type = item.type;
        if (plus && item.name != "." && item.name != "..") {
          struct stat attr {};
          auto id = lookupChild(r.h.nodeid, item.name, &attr);
          if (id) {
            entry_out = entryOut(*id, attr);
            ino = attr.st_ino;
            type = (attr.st_mode & S_IFMT) >> 12;
          }
        }
        if (ino == 0) {
          ino = (0xFEULL << 56) | i;  // "." and "..": any non-zero number will do
        }
        fuse_dirent d{};
        d.ino = ino;
        d.off = i + 1;
        d.namelen = static_cast<uint32_t>(item.name.size());
        d.type = type;
        if (plus) {
          out.append(entry_out);
        }
        out.append(reinterpret_cast<const char*>(&d), FUSE_NAME_OFFSET);
        out.append(item.name);
        out.append(padded - entlen, '\0');
      }
      event(Op::Readdir, node->rel, mount, 0, 0);
      reply(u, 0, out);
      return;
    }
    case FUSE_FALLOCATE: {
      fuse_fallocate_in in{};
      if (!arg(&in)) {
        return;
      }
      Handle* h = findHandle(in.fh, false);
      if (h == nullptr) {
        return;
      }
      if (p == nullptr) {
        err(EBADF);  // file handles belong to provider nodes only
        return;
      }
      if (!allowed(Op::Write, node->rel)) {
        return;
      }
      auto res = p->fallocate(h->local, static_cast<int>(in.mode), in.offset, in.length);
      if (!res) {
        err(res.error());
        return;
      }
      reply(u, 0);
      return;
    }
    case FUSE_LSEEK: {
      fuse_lseek_in in{};
      if (!arg(&in)) {
        return;
      }
      Handle* h = findHandle(in.fh, false);
      if (h == nullptr) {
        return;
      }
      if (p == nullptr) {
        err(EBADF);  // file handles belong to provider nodes only
        return;
      }
      auto res = p->lseek(h->local, in.offset, static_cast<int>(in.whence));
      if (!res) {
        err(res.error());
        return;
      }
      fuse_lseek_out out{};
      out.offset = *res;
      reply(u, 0, asBytes(out));
      return;
    }
    case FUSE_SYNCFS:
      reply(u, 0);
      return;
    default:
      // xattrs, locks (the guest kernel then keeps them local), ioctl, poll, copy_file_range,
      // DAX mappings, tmpfile: not served.
      err(ENOSYS);
      return;
  }
}

}  // namespace matchlock::vfs::fuse
