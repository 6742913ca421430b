// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/result.h"
#include "vfs/hooks.h"
#include "vfs/provider.h"

namespace matchlock::vfs::fuse {

/// One mounted tree inside a connection's filesystem.
struct MountPoint {
  std::string rel;         ///< path below the connection's root, "" for the root itself ("a/b")
  std::string guest_path;  ///< the absolute guest path, for hooks and events
  Provider* provider = nullptr;  ///< not owned; outlives the connection
  const Hooks* hooks = nullptr;  ///< may be null
};

struct Limits {
  uint32_t max_write = 1U << 20;  ///< largest WRITE payload we accept (and announce)
  uint32_t attr_timeout_ms = 1000;
  uint32_t entry_timeout_ms = 1000;
  size_t max_dir_snapshot = 1U << 20;  ///< entries of one directory listing
  bool direct_writes = true;           ///< write-only opens bypass the guest page cache
  /// Read-only opens of files at least this large bypass it too, when the guest kernel allows
  /// shared mappings of such files (FUSE_DIRECT_IO_ALLOW_MMAP); 0 = never.
  uint64_t direct_read_min = 8U << 20;
};

using EventFn = std::function<void(const FileEvent&)>;

/// The FUSE protocol server for one guest FUSE connection, relayed raw over a channel stream
/// (docs/vfs.md). Requests are parsed strictly: every length is checked against the bytes that
/// arrived, every name against its terminator, every node and handle id against our tables, so
/// a hostile guest can make requests fail but not make the server read or write outside its
/// buffers or its mounts. Sans-I/O and single-threaded: bytes in through receive(), replies out
/// through `send`.
///
/// The connection's filesystem is a router: the mount at rel "" is its root (or, when there is
/// none, a synthetic directory), and nested mounts appear at their paths, with synthetic
/// directories for missing parents (shadowing a host entry of the same name).
class Connection {
 public:
  using SendFn = std::function<void(std::string&&)>;

  Connection(std::vector<MountPoint> mounts, SendFn send, EventFn events, Limits limits);
  Connection(std::vector<MountPoint> mounts, SendFn send)
      : Connection(std::move(mounts), std::move(send), nullptr, Limits{}) {}
  /// Forgets every node and releases every handle the guest still held.
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  /// Feeds bytes of the stream. Fails (and refuses further input) when the stream cannot be
  /// framed: a length below a header or above the largest request we accept. Requests that
  /// frame but do not parse are answered with an errno.
  Status receive(std::string_view bytes);
  /// Serves one request that arrived whole, as on a virtqueue: its header's length must be the
  /// message's (else it is answered EINVAL). The reply, if the request has one, has gone out
  /// through `send` when this returns. Fails only for a message shorter than a header.
  /// `write_data`, for a FUSE_WRITE only: its data, left where it lies (guest memory), after the
  /// header and fuse_write_in that `msg` holds; the header's length counts both.
  /// `read_into`, for a FUSE_READ only: where its data goes (guest memory after the reply
  /// header's room); the reply through the sink then carries the header alone, its length
  /// counting the data already in place.
  Status handleMessage(std::string_view msg,
                       const std::vector<std::string_view>* write_data = nullptr,
                       const std::vector<Span>* read_into = nullptr);
  /// The largest request we accept (a WRITE of max_write with its headers).
  size_t maxRequestSize() const { return maxRequest(); }
  /// Processes requests that were held back (see setGate()).
  Status process();
  /// Bytes the stream may grant back to the guest since the last call: those of requests served,
  /// plus those buffered up to one largest request (so that a request larger than the window
  /// can arrive). Credit follows processing, so a guest that does not read its replies stops
  /// being served instead of making the host buffer them.
  size_t takeConsumed();
  /// Replies go to `sink` (the header and the payload, unjoined) instead of `send`: a transport
  /// that copies them into place (a virtqueue chain) saves building each reply twice.
  using SinkFn = std::function<void(std::string_view header, std::string_view payload)>;
  void setSink(SinkFn sink) { sink_ = std::move(sink); }
  /// Requests are processed only while `may_reply` says so (e.g. while the stream's queued
  /// output is below a bound); the rest stays buffered until process().
  void setGate(std::function<bool()> may_reply) { may_reply_ = std::move(may_reply); }

  uint64_t requests() const { return requests_; }
  size_t liveNodes() const { return nodes_.size(); }
  size_t openHandles() const { return handles_.size(); }

 private:
  struct Node {
    int mount = -1;  ///< index into mounts_, -1 = synthetic directory
    uint64_t local = 0;
    uint64_t refs = 0;
    bool pinned = false;  ///< mount roots and synthetic directories live as long as we do
    std::string rel;
  };
  struct DirItem {
    std::string name;
    uint64_t ino = 0;
    uint32_t type = 0;
  };
  struct Handle {
    uint64_t node = 0;
    int mount = -1;
    uint64_t local = 0;  ///< the provider's handle (0 for a synthetic directory)
    bool dir = false;
    bool snapshot_valid = false;
    std::vector<DirItem> snapshot;
  };
  struct Request;

  void handle(std::string_view msg);
  void dispatch(Request& r);
  void reply(uint64_t unique, int error, std::string_view payload = {});
  void replyError(uint64_t unique, int error) { reply(unique, -error, {}); }

  // Router.
  Node* findNode(uint64_t id);
  uint64_t addRef(int mount, uint64_t local, const std::string& rel);
  void dropRef(uint64_t id, uint64_t n);
  Ret<uint64_t> lookupChild(uint64_t parent, std::string_view name, struct stat* attr);
  Ret<struct stat> attrOf(uint64_t id);
  struct stat syntheticAttr(uint64_t id) const;
  uint64_t inoOf(int mount, uint64_t ino) const;
  bool isFixedRel(const std::string& rel) const;
  std::vector<std::string> fixedChildren(const std::string& rel) const;
  std::string childRel(const Node& parent, std::string_view name) const;
  std::string guestPath(const std::string& rel) const;
  void renameRel(const std::string& from, const std::string& to);
  int hook(Op op, const std::string& rel, int mount);
  void event(Op op, const std::string& rel, int mount, uint64_t size, int error);
  std::string entryOut(uint64_t id, const struct stat& attr) const;
  uint32_t openFlags(uint32_t flags, uint64_t size) const;
  std::string attrOut(const struct stat& attr) const;

  std::vector<MountPoint> mounts_;
  SendFn send_;
  SinkFn sink_;
  std::string read_buf_;  ///< reused by every READ: no megabyte allocation per request
  const std::vector<std::string_view>* write_data_ = nullptr;  ///< see handleMessage()
  const std::vector<Span>* read_into_ = nullptr;               ///< see handleMessage()
  std::vector<Span> read_parts_;
  EventFn events_;
  Limits limits_;
  std::string in_;
  uint64_t processed_ = 0;  ///< request bytes served
  uint64_t granted_ = 0;    ///< request bytes credited back
  size_t maxRequest() const;
  std::function<bool()> may_reply_;
  bool failed_ = false;
  bool initialized_ = false;
  bool direct_io_mmap_ = false;  ///< the guest kernel allows MAP_SHARED on FOPEN_DIRECT_IO files
  uint32_t proto_minor_ = 0;
  uint64_t requests_ = 0;
  uint64_t next_node_ = 2;  // 1 is FUSE_ROOT_ID
  uint64_t next_handle_ = 1;
  std::unordered_map<uint64_t, Node> nodes_;
  std::map<std::pair<int, uint64_t>, uint64_t> by_local_;
  std::map<std::string, uint64_t> fixed_;  ///< rel -> pinned node (mount roots, synthetic dirs)
  std::unordered_map<uint64_t, Handle> handles_;
};

}  // namespace matchlock::vfs::fuse
