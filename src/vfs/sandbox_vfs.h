// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/event_log.h"
#include "common/result.h"
#include "ev/loop.h"
#include "vfs/fuse/server.h"
#include "vfs/hooks.h"
#include "vfs/provider.h"
#include "vfs/virtio/fs_device.h"

namespace matchlock::vfs {

enum class MountKind { ReadWrite, ReadOnly, Overlay, Memory };

std::string_view toString(MountKind kind);
std::optional<MountKind> mountKindFromString(std::string_view name);

struct MountConfig {
  std::string target;  ///< absolute guest path
  MountKind kind = MountKind::Overlay;
  std::string source;       ///< absolute host path (not for Memory)
  std::string overlay_dir;  ///< Overlay: holds upper/ and work/ (created when missing)
  uint64_t memory_max_bytes = 512ULL << 20;
  Hooks hooks;
};

/// How the guest reaches the server (docs/vfs.md): a virtio-fs device served over vhost-user (the
/// default: bulk data moves through shared guest memory), or FUSE messages relayed over channel
/// streams on port 5001 (no shared memory needed; the fallback, and what hostile-guest tests
/// speak).
enum class Transport { VirtioFs, Stream };
std::string_view toString(Transport transport);
std::optional<Transport> transportFromString(std::string_view name);

struct VfsConfig {
  std::vector<MountConfig> mounts;
  Transport transport = Transport::VirtioFs;
  std::string events_path;  ///< file events are appended here ("" = none)
};

nlohmann::json toJson(const VfsConfig& config);
Result<VfsConfig> vfsConfigFromJson(const nlohmann::json& j);

/// The VFS layer of one sandbox, in its supervisor (docs/vfs.md): opens every mount's host tree
/// before the guest boots (a missing source fails the start, naming the mount), tells the guest
/// which FUSE filesystems to mount (bootConfig()), and serves each one's FUSE connection on a
/// guest-opened channel stream of port 5001. Runs on the supervisor's loop thread.
class SandboxVfs {
 public:
  /// The channel as the layer uses it: send bytes on a stream, grant the guest credit for bytes
  /// processed, and how much output waits for the guest's credit.
  struct Channel {
    std::function<void(uint32_t stream, std::string&& bytes)> send;
    std::function<void(uint32_t stream, size_t n)> consumed;
    std::function<size_t(uint32_t stream)> pending;
  };
  /// Replies queued beyond this on a stream pause its requests (a guest that stops reading
  /// cannot make the host buffer without bound).
  static constexpr size_t kMaxQueuedReplies = 4U << 20;

  [[nodiscard]] static Result<std::unique_ptr<SandboxVfs>> create(const VfsConfig& config,
                                                                  Channel channel);
  ~SandboxVfs();
  SandboxVfs(const SandboxVfs&) = delete;
  SandboxVfs& operator=(const SandboxVfs&) = delete;

  /// The "vfs" entry of the boot config: [{"index","target","ro","file"}], one FUSE mount per
  /// tree that is not nested inside another ("file": its root is a single file). With the
  /// virtio-fs transport each entry also names the device's tag ("virtiofs"): the guest mounts the
  /// device once and binds tree INDEX (the directory or file INDEX at its root) onto its target.
  nlohmann::json bootConfig() const;

  /// Serves every tree on one virtio-fs device whose vhost-user socket is `socket_path`, on
  /// `loop` (the VMM connects to it at start). Only for the VirtioFs transport.
  Status serveVirtioFs(ev::Loop& loop, const std::string& socket_path, const std::string& name);

  void onOpen(uint32_t stream);
  /// Data of a VFS stream. An error means the stream broke the protocol: reset it.
  Status onData(uint32_t stream, std::string_view data);
  void onClosed(uint32_t stream);
  /// The channel sent queued output: paused streams go on. Errors as for onData (the stream
  /// must be reset); returns the streams that failed.
  std::vector<std::pair<uint32_t, Error>> resume();
  bool owns(uint32_t stream) const { return streams_.contains(stream); }

  /// Control verbs of the layer ("vfs_status"); nullopt for a verb that is not ours.
  std::optional<nlohmann::json> handleControl(const nlohmann::json& request);

 private:
  struct Mount {
    MountConfig config;
    ProviderPtr provider;
    Fd overlay;  ///< the detached overlay mount an Overlay provider is rooted in
  };
  struct Stream {
    std::string preamble;
    std::unique_ptr<fuse::Connection> conn;
  };
  struct Tree {
    std::string target;
    std::vector<size_t> mounts;  ///< the top mount first, then the nested ones
    bool read_only = false;
  };

  explicit SandboxVfs(Channel channel) : channel_(std::move(channel)) {}
  std::vector<fuse::MountPoint> mountPoints(size_t tree, const std::string& prefix) const;
  fuse::EventFn eventFn();
  void grant(uint32_t stream, Stream& s);
  Status openMounts(const VfsConfig& config);
  Status startConnection(uint32_t stream, Stream& s);

  Channel channel_;
  Transport transport_ = Transport::VirtioFs;
  std::unique_ptr<virtio::FsDevice> device_;
  std::vector<Mount> mounts_;
  std::vector<Tree> trees_;
  std::vector<bool> tree_busy_;
  std::map<uint32_t, Stream> streams_;
  std::map<uint32_t, size_t> stream_tree_;
  std::shared_ptr<EventLog> events_;
  uint64_t events_written_ = 0;
};

/// The 12-byte preamble a guest writes first on a VFS stream: magic "MLVF", u16 version (1),
/// u16 flags (0), u32 tree index (big-endian).
inline constexpr uint32_t kVfsMagic = 0x4d4c5646;
inline constexpr uint16_t kVfsVersion = 1;
inline constexpr size_t kVfsPreambleSize = 12;
/// The virtio-fs device's tag (what the guest passes to mount -t virtiofs).
inline constexpr std::string_view kVirtioFsTag = "matchlock";

}  // namespace matchlock::vfs
