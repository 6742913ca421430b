// SPDX-License-Identifier: Apache-2.0
// Built static by test_confinement.py and run inside a guest: tries what the in-guest seccomp
// filter refuses and prints one word per call ("ok" or the errno's name).
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char* what, long rc, int err) {
  const char* name = "ok";
  char other[32];
  if (rc < 0) {
    switch (err) {
      case EPERM: name = "EPERM"; break;
      case ENOSYS: name = "ENOSYS"; break;
      case EINVAL: name = "EINVAL"; break;
      case EBADF: name = "EBADF"; break;
      default: snprintf(other, sizeof(other), "errno%d", err); name = other;
    }
  }
  printf("%s=%s\n", what, name);
}

int main(void) {
  pid_t child = fork();
  if (child == 0) {
    pause();
    _exit(0);
  }
  long rc = ptrace(PTRACE_ATTACH, child, 0, 0);
  report("ptrace", rc, errno);
  kill(child, SIGKILL);
  waitpid(child, NULL, 0);

  char from[16] = "probe", to[16] = {0};
  struct iovec local = {to, sizeof(to)}, remote = {from, sizeof(from)};
  rc = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
  report("process_vm_readv", rc, errno);
  rc = syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL);
  report("kexec_load", rc, errno);
  rc = syscall(SYS_kexec_file_load, -1, -1, 0UL, "", 0UL);
  report("kexec_file_load", rc, errno);
  return 0;
}
