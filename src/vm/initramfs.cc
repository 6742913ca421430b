// SPDX-License-Identifier: Apache-2.0
#include "vm/initramfs.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include "common/fd.h"
#include "common/paths.h"
#include "common/sha256.h"

namespace matchlock::vm {

void CpioWriter::add(std::string_view path, uint32_t mode, std::string_view data, uint32_t rmajor,
                     uint32_t rminor) {
  std::string name(path);
  while (!name.empty() && name.front() == '/') {
    name.erase(0, 1);
  }
  name.push_back('\0');
  // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
  // namesize, check
  out_ += fmt::format(
      "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}"
      "{:08x}{:08x}",
      ++ino_, mode, 0, 0, 1, 0, data.size(), 0, 0, rmajor, rminor, name.size(), 0);
  out_ += name;
  out_.append((4 - out_.size() % 4) % 4, '\0');
  out_.append(data);
  out_.append((4 - out_.size() % 4) % 4, '\0');
}

void CpioWriter::addDirectory(std::string_view path, uint32_t mode) {
  add(path, S_IFDIR | mode, {});
}

void CpioWriter::addFile(std::string_view path, std::string_view data, uint32_t mode) {
  add(path, S_IFREG | mode, data);
}

void CpioWriter::addSymlink(std::string_view path, std::string_view target) {
  add(path, S_IFLNK | 0777, target);
}

void CpioWriter::addCharDevice(std::string_view path, uint32_t major, uint32_t minor,
                               uint32_t mode) {
  add(path, S_IFCHR | mode, {}, major, minor);
}

std::string CpioWriter::finish() {
  add("TRAILER!!!", 0, {});
  out_.append((512 - out_.size() % 512) % 512, '\0');
  std::string done;
  done.swap(out_);
  ino_ = 0;
  return done;
}

Result<std::string> ensureInitramfs(const std::string& guest_binary, const std::string& cache_dir) {
  auto binary = readFile(guest_binary);
  if (!binary) {
    return makeError(std::move(binary).error().withContext("reading the guest binary"));
  }
  std::string path =
      fmt::format("{}/initramfs-{}.cpio", cache_dir, sha256Hex(*binary).substr(0, 16));
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    return path;
  }
  ML_RETURN_IF_ERROR(makeDirs(cache_dir, 0755));
  CpioWriter w;
  w.addDirectory("dev");
  w.addCharDevice("dev/console", 5, 1);
  w.addFile("init", *binary, 0755);
  // Written atomically: concurrent starts of the first sandbox race harmlessly.
  ML_RETURN_IF_ERROR(writeFileAtomic(path, w.finish(), 0644));
  return path;
}

}  // namespace matchlock::vm
