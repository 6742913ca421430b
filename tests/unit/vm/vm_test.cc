// SPDX-License-Identifier: Apache-2.0
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "sys/process.h"
#include "vm/initramfs.h"
#include "vm/qemu/qemu.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)

namespace {

std::string tempDir() {
  char tmpl[] = "/tmp/ml-vm-test-XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  return tmpl;
}

std::string run(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");  // NOLINT(cert-env33-c): fixed test commands
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) {
    out.append(buf, n);
  }
  ::pclose(p);
  return out;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

TEST_CASE("the cpio writer produces an archive that cpio(1) reads back") {
  vm::CpioWriter w;
  w.addDirectory("dev");
  w.addCharDevice("dev/console", 5, 1);
  w.addDirectory("/etc");
  w.addFile("etc/hello", "hello world\n", 0640);
  w.addSymlink("etc/link", "hello");
  std::string archive = w.finish();
  CHECK(archive.size() % 512 == 0);
  CHECK(archive.rfind("070701", 0) == 0);
  std::string dir = tempDir();
  REQUIRE(writeFileAtomic(dir + "/a.cpio", archive).has_value());
  std::string listing = run("cpio -itv --quiet < " + dir + "/a.cpio");
  CHECK(listing.find("dev/console") != std::string::npos);
  CHECK(listing.find("crw-------") != std::string::npos);
  CHECK(listing.find("-rw-r-----") != std::string::npos);
  CHECK(listing.find("etc/link -> hello") != std::string::npos);
  run("cd " + dir + " && cpio -id --quiet etc/hello < a.cpio");
  CHECK(readFile(dir + "/etc/hello").value() == "hello world\n");
  run("rm -rf " + dir);
}

TEST_CASE("ensureInitramfs caches by the guest binary's digest") {
  std::string dir = tempDir();
  REQUIRE(writeFileAtomic(dir + "/guest", "binary v1").has_value());
  auto first = vm::ensureInitramfs(dir + "/guest", dir + "/cache");
  REQUIRE(first.has_value());
  CHECK(vm::ensureInitramfs(dir + "/guest", dir + "/cache").value() == *first);
  REQUIRE(writeFileAtomic(dir + "/guest", "binary v2").has_value());
  auto second = vm::ensureInitramfs(dir + "/guest", dir + "/cache");
  REQUIRE(second.has_value());
  CHECK(*second != *first);
  CHECK(run("cpio -it --quiet < " + *second).find("init") != std::string::npos);
  CHECK_FALSE(vm::ensureInitramfs(dir + "/missing", dir + "/cache").has_value());
  run("rm -rf " + dir);
}

TEST_CASE("QEMU argv for a microvm") {
  vm::VmConfig c;
  c.kernel = "/k/vmlinux";
  c.initramfs = "/k/init.cpio";
  c.cpus = 1.5;
  c.memory_mib = 1024;
  c.disks = {{"/d/image.ext4", "image", true}, {"/d/upper.ext4", "upper", false}};
  c.channel_socket = "/run/x/channel.sock";
  c.control_socket = "/run/x/qmp.sock";
  c.console_log = "/run/x/console.log";
  c.kernel_params = {"matchlock.root=serial:image"};
  auto argv = vm::qemu::buildArgv(c, "qemu-system-x86_64");
  CHECK(argv[0] == "qemu-system-x86_64");
  CHECK(contains(argv, "microvm,x-option-roms=off,rtc=off,acpi=off"));
  CHECK(contains(argv, "-no-reboot"));
  CHECK(contains(argv, "2"));  // ceil(1.5) vCPUs
  CHECK(contains(argv, "1024M"));
  CHECK(contains(argv, "tcg,tb-size=256"));
  CHECK(contains(argv, "matchlock"));  // -name: the sandbox id when there is one
  CHECK_FALSE(contains(argv, "-sandbox"));
  CHECK(contains(argv, "file=/d/image.ext4,if=none,id=disk0,format=raw,readonly=on"));
  CHECK(contains(argv, "virtio-blk-device,drive=disk1,serial=upper"));
  CHECK(contains(argv, "socket,id=channel,path=/run/x/channel.sock,server=on,wait=off"));
  CHECK(contains(argv, "virtserialport,chardev=channel,name=matchlock.0"));
  CHECK(contains(argv, "unix:/run/x/qmp.sock,server=on,wait=off"));
  CHECK(contains(argv, "console=ttyS0 reboot=t panic=-1 quiet matchlock.root=serial:image"));
  CHECK_FALSE(contains(argv, "vhost-user-fs-device,chardev=vfs,tag=matchlock,queue-size=1024"));
  // A virtio-fs device: shared memfd RAM, modern virtio-mmio, the vhost-user socket.
  c.vhost_user_fs_socket = "/run/x/vfs.sock";
  c.vhost_user_fs_tag = "matchlock";
  auto fs = vm::qemu::buildArgv(c, "qemu-system-x86_64");
  CHECK(contains(fs, "microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem"));
  CHECK(contains(fs, "memory-backend-memfd,id=mem,size=1024M,share=on"));
  CHECK(contains(fs, "virtio-mmio.force-legacy=false"));
  CHECK(contains(fs, "socket,id=vfs,path=/run/x/vfs.sock"));
  CHECK(contains(fs, "vhost-user-fs-device,chardev=vfs,tag=matchlock,queue-size=1024"));
  // Jailed: the VMM's paths are the jail's, disks come as fd sets, QEMU's filter is on.
  c.id = "vm-12345678";
  c.jail = vm::VmmJail{};
  c.jail->vmm_dir = "/run/x";
  c.disks[0].fd = 7;
  c.disks[1].fd = 8;
  c.disks[1].rw_fd = 9;
  auto jailed = vm::qemu::buildArgv(c, "/usr/bin/qemu-system-x86_64");
  CHECK(contains(jailed, "vm-12345678"));
  CHECK(
      contains(jailed, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
  CHECK(contains(jailed, "/boot/kernel"));
  CHECK(contains(jailed, "/boot/initramfs"));
  CHECK_FALSE(contains(jailed, "/k/vmlinux"));
  CHECK(contains(jailed, "fd=7,set=1"));
  CHECK(contains(jailed, "fd=8,set=2"));
  CHECK(contains(jailed, "fd=9,set=2"));
  CHECK(contains(jailed, "file=/dev/fdset/1,if=none,id=disk0,format=raw,readonly=on"));
  CHECK(contains(jailed, "file=/dev/fdset/2,if=none,id=disk1,format=raw"));
  CHECK(contains(jailed, "socket,id=channel,path=/run/vmm/channel.sock,server=on,wait=off"));
  CHECK(contains(jailed, "unix:/run/vmm/qmp.sock,server=on,wait=off"));
  CHECK(contains(jailed, "socket,id=vfs,path=/run/vmm/vfs.sock"));
  CHECK(contains(jailed, "file:/run/vmm/console.log"));
  c.jail.reset();
  c.id.clear();
  c.disks = {{"/d/image.ext4", "image", true}};
  c.vhost_user_fs_socket.clear();
  c.accel = vm::Accel::Kvm;
  auto kvm = vm::qemu::buildArgv(c, "qemu-system-x86_64");
  CHECK(contains(kvm, "kvm"));
  CHECK(contains(kvm, "host,arch-capabilities=off"));
  CHECK(vm::vcpuCount(0.25) == 1);
  CHECK(vm::vcpuCount(4) == 4);
  CHECK(vm::parseAccel("tcg").value() == vm::Accel::Tcg);
  CHECK_FALSE(vm::parseAccel("hvf").has_value());
}

TEST_CASE("ChildProcess: exit codes, signals, timeouts, terminate") {
  auto ok_child = sys::ChildProcess::spawn({"sh", "-c", "exit 3"});
  REQUIRE(ok_child.has_value());
  CHECK(ok_child->startTime() > 0);
  auto e = ok_child->waitFor(std::chrono::seconds(10));
  REQUIRE(e.has_value());
  REQUIRE(e->has_value());
  CHECK((*e)->code == 3);
  auto sleeper = sys::ChildProcess::spawn({"sleep", "100"});
  REQUIRE(sleeper.has_value());
  auto none = sleeper->waitFor(std::chrono::milliseconds(50));
  REQUIRE(none.has_value());
  CHECK_FALSE(none->has_value());
  auto t = sleeper->terminate(std::chrono::seconds(5));
  REQUIRE(t.has_value());
  CHECK(t->signal == SIGTERM);
  CHECK(sys::ChildProcess::spawn({"definitely-not-a-binary-xyz"}).error().code() == Errc::NotFound);
  // The destructor kills and reaps what it still owns.
  pid_t pid = 0;
  {
    auto c = sys::ChildProcess::spawn({"sleep", "100"});
    REQUIRE(c.has_value());
    pid = c->pid();
  }
  CHECK(::kill(pid, 0) != 0);
}

TEST_CASE("ChildProcess: a reduced environment keeps our own variables, drops the rest") {
  ::setenv("ML_TEST_SECRET_VALUE", "sk-in-env", 1);
  ::setenv("MATCHLOCK_TEST_KEEP", "kept", 1);
  auto env = sys::minimalEnvironment();
  CHECK(std::find(env.begin(), env.end(), "MATCHLOCK_TEST_KEEP=kept") != env.end());
  CHECK(std::none_of(env.begin(), env.end(),
                     [](const std::string& e) { return e.starts_with("ML_TEST_SECRET_VALUE="); }));
  std::string dir = tempDir();
  sys::SpawnOptions o;
  o.stdout_path = dir + "/env.txt";
  o.env = env;
  auto c = sys::ChildProcess::spawn({"sh", "-c", "env"}, o);
  REQUIRE(c.has_value());
  REQUIRE(c->waitFor(std::chrono::seconds(10)).has_value());
  auto out = readFile(dir + "/env.txt");
  REQUIRE(out.has_value());
  CHECK(out->find("MATCHLOCK_TEST_KEEP=kept") != std::string::npos);
  CHECK(out->find("sk-in-env") == std::string::npos);
  ::unsetenv("ML_TEST_SECRET_VALUE");
  ::unsetenv("MATCHLOCK_TEST_KEEP");
}

TEST_CASE("KVM probe falls back to TCG within its bound and caches the answer") {
  std::string dir = tempDir();
  auto start = std::chrono::steady_clock::now();
  // A kernel that cannot boot: whatever /dev/kvm says, the probe must answer "no" in time.
  auto r = vm::qemu::probeKvm("qemu-system-x86_64", dir + "/no-such-vmlinux", dir + "/none.cpio",
                              dir + "/accel", std::chrono::seconds(10));
  auto elapsed = std::chrono::steady_clock::now() - start;
  CHECK_FALSE(r.kvm_works);
  CHECK(r.detail.rfind("tcg: ", 0) == 0);
  CHECK(elapsed < std::chrono::seconds(20));
  CHECK(readFile(dir + "/accel").value().rfind("tcg", 0) == 0);
  auto cached = vm::qemu::probeKvm("qemu-system-x86_64", "/whatever", "/whatever", dir + "/accel",
                                   std::chrono::seconds(10));
  CHECK(cached.detail == r.detail);
  CHECK(vm::qemu::resolveAccel(vm::Accel::Tcg, "x", "y", "z", dir) == vm::Accel::Tcg);
  run("rm -rf " + dir);
}

TEST_CASE("backends by name") {
  auto qemu = vm::makeBackend("qemu");
  REQUIRE(qemu.has_value());
  CHECK((*qemu)->name() == "qemu");
  auto fc = vm::makeBackend("firecracker");
  REQUIRE_FALSE(fc.has_value());
  CHECK(fc.error().code() == Errc::NotFound);
  vm::VmConfig unresolved;
  unresolved.accel = vm::Accel::Auto;
  CHECK((*qemu)->start(unresolved, {}).error().code() == Errc::Internal);
}
