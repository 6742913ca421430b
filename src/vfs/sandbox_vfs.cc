// SPDX-License-Identifier: Apache-2.0
#include "vfs/sandbox_vfs.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/log.h"
#include "vfs/fuse/server.h"

namespace matchlock::vfs {
namespace {

namespace fs = std::filesystem;

uint32_t getU32(std::string_view b, size_t at) {
  return (static_cast<uint32_t>(static_cast<unsigned char>(b[at])) << 24) |
         (static_cast<uint32_t>(static_cast<unsigned char>(b[at + 1])) << 16) |
         (static_cast<uint32_t>(static_cast<unsigned char>(b[at + 2])) << 8) |
         static_cast<uint32_t>(static_cast<unsigned char>(b[at + 3]));
}

bool isUnder(const std::string& path, const std::string& dir) {
  return path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
         path[dir.size()] == '/';
}

Error mountError(const MountConfig& m, const std::string& what, int err = 0) {
  return Error(Errc::InvalidSpec, fmt::format("mount {}: {}", m.target, what), err);
}

Status makeDir(const std::string& path, mode_t mode) {
  if (::mkdir(path.c_str(), mode) != 0 && errno != EEXIST) {
    return makeError(Errc::System, "creating " + path, errno);
  }
  return ok();
}

/// The overlay of `m`: the host tree as the read-only lower layer, upper/ and work/ in the
/// mount's overlay dir, mounted detached (fsmount without move_mount): the mount belongs to no
/// namespace, nothing outside this process can see it, and it goes away with our last fd of it,
/// a crash included.
Result<Fd> mountOverlay(const MountConfig& m, const struct stat& lower) {
  for (const char* bad : {":", ",", "\\"}) {
    if (m.source.find(bad) != std::string::npos || m.overlay_dir.find(bad) != std::string::npos) {
      return makeError(mountError(
          m, fmt::format("an overlay source path cannot contain '{}' (overlayfs options)", bad)));
    }
  }
  const std::string upper = m.overlay_dir + "/upper";
  const std::string work = m.overlay_dir + "/work";
  ML_RETURN_IF_ERROR(makeDir(m.overlay_dir, 0700));
  bool fresh = ::access(upper.c_str(), F_OK) != 0;
  ML_RETURN_IF_ERROR(makeDir(upper, 0700));
  ML_RETURN_IF_ERROR(makeDir(work, 0700));
  if (fresh) {
    // The merged root takes the upper root's owner and mode: make them the host tree's.
    if (::chown(upper.c_str(), lower.st_uid, lower.st_gid) != 0 ||
        ::chmod(upper.c_str(), lower.st_mode & 07777) != 0) {
      return makeError(mountError(m, "preparing the overlay's upper layer", errno));
    }
  }
  Fd fsfd(::fsopen("overlay", FSOPEN_CLOEXEC));
  if (!fsfd) {
    return makeError(mountError(m, "fsopen(overlay)", errno));
  }
  for (auto [key, value] : {std::pair{"lowerdir", m.source}, std::pair{"upperdir", upper},
                            std::pair{"workdir", work}}) {
    if (::fsconfig(fsfd.get(), FSCONFIG_SET_STRING, key, value.c_str(), 0) != 0) {
      return makeError(mountError(m, fmt::format("overlay {}={}", key, value), errno));
    }
  }
  if (::fsconfig(fsfd.get(), FSCONFIG_CMD_CREATE, nullptr, nullptr, 0) != 0) {
    return makeError(mountError(m, "creating the overlay", errno));
  }
  Fd mnt(::fsmount(fsfd.get(), FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV));
  if (!mnt) {
    return makeError(mountError(m, "fsmount(overlay)", errno));
  }
  return mnt;
}

}  // namespace

std::string_view toString(MountKind kind) {
  switch (kind) {
    case MountKind::ReadWrite:
      return "rw";
    case MountKind::ReadOnly:
      return "ro";
    case MountKind::Overlay:
      return "overlay";
    case MountKind::Memory:
      return "memory";
  }
  return "overlay";
}

std::optional<MountKind> mountKindFromString(std::string_view name) {
  for (MountKind k :
       {MountKind::ReadWrite, MountKind::ReadOnly, MountKind::Overlay, MountKind::Memory}) {
    if (toString(k) == name) {
      return k;
    }
  }
  return std::nullopt;
}

std::string_view toString(Transport transport) {
  return transport == Transport::Stream ? "stream" : "virtiofs";
}

std::optional<Transport> transportFromString(std::string_view name) {
  for (Transport t : {Transport::VirtioFs, Transport::Stream}) {
    if (toString(t) == name) {
      return t;
    }
  }
  return std::nullopt;
}

nlohmann::json toJson(const VfsConfig& config) {
  nlohmann::json mounts = nlohmann::json::array();
  for (const MountConfig& m : config.mounts) {
    nlohmann::json rules = nlohmann::json::array();
    for (const HookRule& r : m.hooks.rules) {
      nlohmann::json ops = nlohmann::json::array();
      for (Op op : r.ops) {
        ops.push_back(opName(op));
      }
      rules.push_back({{"name", r.name},
                       {"ops", ops},
                       {"path", r.path},
                       {"action", r.block ? "block" : "allow"},
                       {"errno", r.error}});
    }
    mounts.push_back({{"target", m.target},
                      {"kind", toString(m.kind)},
                      {"source", m.source},
                      {"overlay_dir", m.overlay_dir},
                      {"memory_max_bytes", m.memory_max_bytes},
                      {"hooks", {{"rules", rules}, {"emit_events", m.hooks.emit_events}}}});
  }
  return {{"mounts", mounts},
          {"events_path", config.events_path},
          {"transport", toString(config.transport)}};
}

Result<VfsConfig> vfsConfigFromJson(const nlohmann::json& j) {
  VfsConfig c;
  if (!j.is_object()) {
    return c;
  }
  try {
    c.events_path = j.value("events_path", "");
    auto transport = transportFromString(j.value("transport", "virtiofs"));
    if (!transport) {
      return makeError(Errc::InvalidSpec, "vfs: unknown transport " + j.value("transport", ""));
    }
    c.transport = *transport;
    for (const auto& m : j.value("mounts", nlohmann::json::array())) {
      MountConfig mc;
      mc.target = m.at("target").get<std::string>();
      auto kind = mountKindFromString(m.value("kind", "overlay"));
      if (!kind) {
        return makeError(Errc::InvalidSpec, "vfs: unknown mount kind for " + mc.target);
      }
      mc.kind = *kind;
      mc.source = m.value("source", "");
      mc.overlay_dir = m.value("overlay_dir", "");
      mc.memory_max_bytes = m.value("memory_max_bytes", mc.memory_max_bytes);
      const auto hooks = m.value("hooks", nlohmann::json::object());
      mc.hooks.emit_events = hooks.value("emit_events", false);
      for (const auto& r : hooks.value("rules", nlohmann::json::array())) {
        HookRule rule;
        rule.name = r.value("name", "");
        rule.path = r.value("path", "");
        rule.block = r.value("action", "block") == "block";
        rule.error = r.value("errno", 1);
        for (const auto& op : r.value("ops", nlohmann::json::array())) {
          if (auto o = opFromName(op.get<std::string>())) {
            rule.ops.push_back(*o);
          }
        }
        mc.hooks.rules.push_back(std::move(rule));
      }
      c.mounts.push_back(std::move(mc));
    }
  } catch (const nlohmann::json::exception& e) {
    return makeError(Errc::InvalidSpec, fmt::format("vfs config: {}", e.what()));
  }
  return c;
}

Result<std::unique_ptr<SandboxVfs>> SandboxVfs::create(const VfsConfig& config, Channel channel) {
  std::unique_ptr<SandboxVfs> v(new SandboxVfs(std::move(channel)));
  v->transport_ = config.transport;
  ML_RETURN_IF_ERROR(v->openMounts(config));
  if (!config.events_path.empty()) {
    ML_ASSIGN_OR_RETURN(v->events_, EventLog::shared(config.events_path));
  }
  return v;
}

SandboxVfs::~SandboxVfs() {
  streams_.clear();  // connections first: they hand their nodes back to the providers
  device_.reset();
}

Status SandboxVfs::openMounts(const VfsConfig& config) {
  for (const MountConfig& m : config.mounts) {
    Mount mount;
    mount.config = m;
    if (m.kind == MountKind::Memory) {
      mount.provider = makeMemoryProvider(m.memory_max_bytes, Caller{});
      mounts_.push_back(std::move(mount));
      continue;
    }
    // The source is the user's own path: it may go through symlinks. What lies below it is the
    // guest's and is reached without following any (the provider's job).
    Fd root(::open(m.source.c_str(), O_PATH | O_CLOEXEC));
    if (!root) {
      return makeError(mountError(m, fmt::format("source {}", m.source), errno));
    }
    struct stat st {};
    if (::fstat(root.get(), &st) != 0) {
      return makeError(mountError(m, fmt::format("source {}", m.source), errno));
    }
    if (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) {
      return makeError(
          mountError(m, fmt::format("source {} is neither a directory nor a file", m.source)));
    }
    if (m.kind == MountKind::Overlay) {
      if (S_ISREG(st.st_mode)) {
        // A single file: its snapshot is a private copy, made once, served read-write.
        ML_RETURN_IF_ERROR(makeDir(m.overlay_dir, 0700));
        std::string copy = m.overlay_dir + "/" + fs::path(m.source).filename().string();
        std::error_code ec;
        if (!fs::exists(copy, ec)) {
          // Copied aside, then renamed: an interrupted copy is never mistaken for the snapshot.
          const std::string partial = copy + ".partial";
          fs::copy_file(m.source, partial, fs::copy_options::overwrite_existing, ec);
          if (!ec) {
            fs::rename(partial, copy, ec);
          }
          if (ec) {
            const std::string why = ec.message();
            fs::remove(partial, ec);
            return makeError(mountError(m, fmt::format("copying {}: {}", m.source, why)));
          }
        }
        root.reset(::open(copy.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
        if (!root) {
          return makeError(mountError(m, "opening the snapshot copy", errno));
        }
      } else {
        ML_ASSIGN_OR_RETURN(mount.overlay, mountOverlay(m, st));
        ML_ASSIGN_OR_RETURN(root, mount.overlay.dup());
      }
    }
    auto provider =
        makeHostProvider(std::move(root), m.kind == MountKind::ReadOnly, Caller{0, 0, 0});
    if (!provider) {
      return makeError(mountError(m, "serving the source", provider.error()));
    }
    mount.provider = std::move(*provider);
    mounts_.push_back(std::move(mount));
  }
  // Trees: every mount that is not below another one is mounted by the guest; the nested ones
  // are served inside it.
  std::vector<size_t> order(mounts_.size());
  for (size_t i = 0; i < order.size(); ++i) {
    order[i] = i;
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return mounts_[a].config.target < mounts_[b].config.target;
  });
  for (size_t i : order) {
    const std::string& t = mounts_[i].config.target;
    auto parent = std::find_if(trees_.begin(), trees_.end(),
                               [&](const Tree& tree) { return isUnder(t, tree.target); });
    if (parent != trees_.end()) {
      parent->mounts.push_back(i);
      parent->read_only = parent->read_only && mounts_[i].config.kind == MountKind::ReadOnly;
    } else {
      trees_.push_back(Tree{t, {i}, mounts_[i].config.kind == MountKind::ReadOnly});
    }
  }
  tree_busy_.assign(trees_.size(), false);
  return ok();
}

nlohmann::json SandboxVfs::bootConfig() const {
  nlohmann::json out = nlohmann::json::array();
  for (size_t i = 0; i < trees_.size(); ++i) {
    // A tree whose root is one file is mounted on a file (FUSE's rootmode says which).
    Provider& root = *mounts_[trees_[i].mounts.front()].provider;
    auto st = root.getattr(root.rootNode());
    bool file = st && S_ISREG(st->st_mode);
    nlohmann::json tree = {
        {"index", i}, {"target", trees_[i].target}, {"ro", trees_[i].read_only}, {"file", file}};
    if (transport_ == Transport::VirtioFs) {
      tree["virtiofs"] = kVirtioFsTag;
    }
    out.push_back(std::move(tree));
  }
  return out;
}

std::vector<fuse::MountPoint> SandboxVfs::mountPoints(size_t tree,
                                                      const std::string& prefix) const {
  const Tree& t = trees_[tree];
  std::vector<fuse::MountPoint> points;
  for (size_t m : t.mounts) {
    const MountConfig& mc = mounts_[m].config;
    std::string rel = mc.target == t.target ? "" : mc.target.substr(t.target.size() + 1);
    if (!prefix.empty()) {
      rel = rel.empty() ? prefix : prefix + "/" + rel;
    }
    points.push_back(fuse::MountPoint{rel, mc.target, mounts_[m].provider.get(), &mc.hooks});
  }
  return points;
}

fuse::EventFn SandboxVfs::eventFn() {
  if (!events_) {
    return nullptr;
  }
  return [this](const FileEvent& e) {
    ++events_written_;
    events_->append(toJsonLine(e));
  };
}

Status SandboxVfs::serveVirtioFs(ev::Loop& loop, const std::string& socket_path,
                                 const std::string& name) {
  if (transport_ != Transport::VirtioFs) {
    return makeError(Errc::Internal, "vfs: serveVirtioFs on a stream-transport sandbox");
  }
  // One device for every tree: tree INDEX is the entry "INDEX" of a synthetic root, which the
  // guest never shows (it binds each entry onto its target). One device whatever the number of
  // trees: microvm has few virtio-mmio slots.
  std::vector<fuse::MountPoint> points;
  for (size_t i = 0; i < trees_.size(); ++i) {
    auto tree = mountPoints(i, std::to_string(i));
    points.insert(points.end(), tree.begin(), tree.end());
  }
  ML_ASSIGN_OR_RETURN(device_,
                      virtio::FsDevice::listen(loop, socket_path, name + ": vfs", std::move(points),
                                               eventFn(), fuse::Limits{}));
  return ok();
}

void SandboxVfs::onOpen(uint32_t stream) {
  streams_[stream] = Stream{};
}

Status SandboxVfs::startConnection(uint32_t stream, Stream& s) {
  std::string_view p = s.preamble;
  uint32_t magic = getU32(p, 0);
  uint32_t version_flags = getU32(p, 4);
  uint32_t index = getU32(p, 8);
  if (magic != kVfsMagic || (version_flags >> 16) != kVfsVersion) {
    return makeError(Errc::Protocol, "vfs: bad stream preamble");
  }
  if (transport_ != Transport::Stream) {
    return makeError(Errc::Protocol, "vfs: this sandbox's filesystems are served on virtio-fs");
  }
  if (index >= trees_.size() || tree_busy_[index]) {
    return makeError(Errc::Protocol, fmt::format("vfs: no free tree {}", index));
  }
  s.conn = std::make_unique<fuse::Connection>(
      mountPoints(index, ""),
      [this, stream](std::string&& b) { channel_.send(stream, std::move(b)); }, eventFn(),
      fuse::Limits{});
  s.conn->setGate([this, stream] { return channel_.pending(stream) < kMaxQueuedReplies; });
  tree_busy_[index] = true;
  stream_tree_[stream] = index;
  return ok();
}

Status SandboxVfs::onData(uint32_t stream, std::string_view data) {
  auto it = streams_.find(stream);
  if (it == streams_.end()) {
    return makeError(Errc::Protocol, "vfs: data on an unknown stream");
  }
  Stream& s = it->second;
  if (!s.conn) {
    size_t take = std::min(data.size(), kVfsPreambleSize - s.preamble.size());
    s.preamble.append(data.substr(0, take));
    data.remove_prefix(take);
    channel_.consumed(stream, take);
    if (s.preamble.size() < kVfsPreambleSize) {
      return ok();
    }
    ML_RETURN_IF_ERROR(startConnection(stream, s));
  }
  if (data.empty()) {
    return ok();
  }
  Status st = s.conn->receive(data);
  grant(stream, s);
  return st;
}

void SandboxVfs::grant(uint32_t stream, Stream& s) {
  if (size_t n = s.conn->takeConsumed(); n > 0) {
    channel_.consumed(stream, n);
  }
}

std::vector<std::pair<uint32_t, Error>> SandboxVfs::resume() {
  std::vector<std::pair<uint32_t, Error>> failed;
  for (auto& [stream, s] : streams_) {
    if (!s.conn || channel_.pending(stream) >= kMaxQueuedReplies) {
      continue;
    }
    if (Status st = s.conn->process(); !st) {
      failed.emplace_back(stream, st.error());
      continue;
    }
    grant(stream, s);
  }
  return failed;
}

void SandboxVfs::onClosed(uint32_t stream) {
  if (auto t = stream_tree_.find(stream); t != stream_tree_.end()) {
    tree_busy_[t->second] = false;
    stream_tree_.erase(t);
  }
  streams_.erase(stream);
}

std::optional<nlohmann::json> SandboxVfs::handleControl(const nlohmann::json& request) {
  if (request.value("op", "") != "vfs_status") {
    return std::nullopt;
  }
  nlohmann::json mounts = nlohmann::json::array();
  for (const Mount& m : mounts_) {
    mounts.push_back({{"target", m.config.target},
                      {"kind", toString(m.config.kind)},
                      {"source", m.config.source}});
  }
  nlohmann::json conns = nlohmann::json::array();
  for (const auto& [stream, s] : streams_) {
    if (s.conn) {
      conns.push_back({{"stream", stream},
                       {"requests", s.conn->requests()},
                       {"nodes", s.conn->liveNodes()},
                       {"handles", s.conn->openHandles()}});
    }
  }
  if (device_) {
    const auto& st = device_->stats();
    conns.push_back({{"transport", "virtiofs"},
                     {"vmm_connected", st.connected},
                     {"chains", st.chains},
                     {"broken_chains", st.broken_chains},
                     {"stopped_queues", st.stopped_queues},
                     {"interrupts", st.interrupts},
                     {"requests", device_->connection().requests()},
                     {"nodes", device_->connection().liveNodes()},
                     {"handles", device_->connection().openHandles()}});
  }
  return nlohmann::json{{"ok", true},
                        {"transport", toString(transport_)},
                        {"mounts", mounts},
                        {"connections", conns},
                        {"events", events_written_}};
}

}  // namespace matchlock::vfs
