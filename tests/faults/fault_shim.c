/* An LD_PRELOAD fault injector for colcrypt-keyd's files (the crash
 * consistency test, tests/integration/test_crash.cpp).
 *
 * Every call that changes a file under COLCRYPT_FAULT_DIR is an injection
 * point, numbered from 1 in the order keyd makes them: open with O_CREAT,
 * write, pwrite, ftruncate, fsync, fdatasync, close, rename, renameat,
 * renameat2 and unlink (a path under the directory, or an fd opened on one,
 * the directory itself included). At point COLCRYPT_FAULT_AT the call
 * fails or the process dies, as COLCRYPT_FAULT_MODE says:
 *   eio          the call fails with EIO (close: the fd is closed, then EIO)
 *   enospc       the call fails with ENOSPC
 *   kill-before  SIGKILL before the call
 *   kill-after   SIGKILL right after it succeeded
 * Without COLCRYPT_FAULT_AT (or 0) it only counts. Each point is appended to
 * COLCRYPT_FAULT_LOG as "N OP PATH" ("N OP PATH INJECTED MODE" for the one hit),
 * so the driver learns how many points a session has and which one it hit.
 * Only a process named colcrypt-keyd is affected: the shim is also loaded
 * into the shell and tools that start it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_TRACKED_FD 65536

static int active = -1; /* -1: not yet decided */
static char dir[PATH_MAX];
static size_t dir_len;
static long fault_at;
static int mode; /* 0 count, 1 eio, 2 enospc, 3 kill-before, 4 kill-after */
static int log_fd = -1;
static long counter;
static char fd_path[MAX_TRACKED_FD][128]; /* "" when the fd is not tracked */

static void init(void) {
  if (active >= 0) return;
  active = 0;
  const char* d = getenv("COLCRYPT_FAULT_DIR");
  if (!d || !*d || strcmp(program_invocation_short_name, "colcrypt-keyd") != 0) return;
  snprintf(dir, sizeof dir, "%s", d);
  dir_len = strlen(dir);
  while (dir_len > 1 && dir[dir_len - 1] == '/') dir[--dir_len] = '\0';
  const char* at = getenv("COLCRYPT_FAULT_AT");
  fault_at = at ? atol(at) : 0;
  const char* m = getenv("COLCRYPT_FAULT_MODE");
  if (m && strcmp(m, "eio") == 0) mode = 1;
  if (m && strcmp(m, "enospc") == 0) mode = 2;
  if (m && strcmp(m, "kill-before") == 0) mode = 3;
  if (m && strcmp(m, "kill-after") == 0) mode = 4;
  const char* log = getenv("COLCRYPT_FAULT_LOG");
  if (log && *log) {
    log_fd =
        (int)syscall(SYS_openat, AT_FDCWD, log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  }
  active = 1;
}

static int under_dir(const char* path) {
  if (!path || path[0] != '/') return 0;
  return strncmp(path, dir, dir_len) == 0 && (path[dir_len] == '\0' || path[dir_len] == '/');
}

static const char* tracked(int fd) {
  if (fd < 0 || fd >= MAX_TRACKED_FD || fd_path[fd][0] == '\0') return NULL;
  return fd_path[fd];
}

static void track(int fd, const char* path) {
  if (fd < 0 || fd >= MAX_TRACKED_FD) return;
  if (path) {
    snprintf(fd_path[fd], sizeof fd_path[fd], "%s", path + dir_len);
    if (fd_path[fd][0] == '\0') snprintf(fd_path[fd], sizeof fd_path[fd], "/");
  } else {
    fd_path[fd][0] = '\0';
  }
}

/* Numbers the point; returns the action for it: 0 proceed, 1 fail (errno
 * set), 4 kill after. kill-before does not return. */
static int point(const char* op, const char* path) {
  long n = __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST);
  const int hit = fault_at > 0 && n == fault_at && mode != 0;
  if (log_fd >= 0) {
    char line[512];
    int len = snprintf(line, sizeof line, "%ld %s %s%s%s\n", n, op, path, hit ? " INJECTED " : "",
                       hit ? getenv("COLCRYPT_FAULT_MODE") : "");
    if (len > 0)
      syscall(SYS_write, log_fd, line,
              (size_t)(len < (int)sizeof line ? len : (int)sizeof line - 1));
  }
  if (!hit) return 0;
  switch (mode) {
    case 1:
      errno = EIO;
      return 1;
    case 2:
      errno = ENOSPC;
      return 1;
    case 3:
      kill(getpid(), SIGKILL);
      for (;;) pause();
    default:
      return 4;
  }
}

static void die_now(void) {
  kill(getpid(), SIGKILL);
  for (;;) pause();
}

#define REAL(name)                      \
  static __typeof__(name)* real_##name; \
  if (!real_##name) real_##name = (__typeof__(name)*)dlsym(RTLD_NEXT, #name)

static int open_common(const char* op, int dirfd, const char* path, int flags, mode_t m) {
  REAL(openat);
  init();
  const int watched = active == 1 && under_dir(path);
  int action = 0;
  if (watched && (flags & O_CREAT)) action = point(op, path + dir_len);
  if (action == 1) return -1;
  int fd = real_openat(dirfd, path, flags, m);
  if (watched && fd >= 0) track(fd, path);
  if (action == 4) die_now();
  return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
  return (flags & (O_CREAT | __O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t m = mode_arg(flags, ap);
  va_end(ap);
  return open_common("open", AT_FDCWD, path, flags, m);
}
int open64(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t m = mode_arg(flags, ap);
  va_end(ap);
  return open_common("open", AT_FDCWD, path, flags, m);
}
int openat(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t m = mode_arg(flags, ap);
  va_end(ap);
  return open_common("open", dirfd, path, flags, m);
}
int openat64(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t m = mode_arg(flags, ap);
  va_end(ap);
  return open_common("open", dirfd, path, flags, m);
}
int __open_2(const char* path, int flags) { return open_common("open", AT_FDCWD, path, flags, 0); }
int __open64_2(const char* path, int flags) {
  return open_common("open", AT_FDCWD, path, flags, 0);
}

/* The fd calls: one macro per signature would hide little; spelled out. */
#define FD_POINT(op, fd)                                \
  init();                                               \
  const char* where = active == 1 ? tracked(fd) : NULL; \
  int action = where ? point(op, where) : 0;            \
  if (action == 1) return -1

ssize_t write(int fd, const void* buf, size_t n) {
  REAL(write);
  FD_POINT("write", fd);
  ssize_t r = real_write(fd, buf, n);
  if (action == 4) die_now();
  return r;
}
ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  REAL(pwrite);
  FD_POINT("pwrite", fd);
  ssize_t r = real_pwrite(fd, buf, n, off);
  if (action == 4) die_now();
  return r;
}
ssize_t pwrite64(int fd, const void* buf, size_t n, off_t off) { return pwrite(fd, buf, n, off); }
int ftruncate(int fd, off_t len) {
  REAL(ftruncate);
  FD_POINT("ftruncate", fd);
  int r = real_ftruncate(fd, len);
  if (action == 4) die_now();
  return r;
}
int ftruncate64(int fd, off_t len) { return ftruncate(fd, len); }
int fsync(int fd) {
  REAL(fsync);
  FD_POINT("fsync", fd);
  int r = real_fsync(fd);
  if (action == 4) die_now();
  return r;
}
int fdatasync(int fd) {
  REAL(fdatasync);
  FD_POINT("fdatasync", fd);
  int r = real_fdatasync(fd);
  if (action == 4) die_now();
  return r;
}
int close(int fd) {
  REAL(close);
  init();
  const char* where = active == 1 ? tracked(fd) : NULL;
  int action = where ? point("close", where) : 0;
  if (where) track(fd, NULL);
  int r = real_close(fd);
  if (action == 4) die_now();
  if (action == 1) return -1; /* Linux closes the fd whatever close() returns */
  return r;
}

static int path_point(const char* op, const char* a, const char* b) {
  init();
  if (active != 1) return 0;
  if (under_dir(b)) return point(op, b + dir_len);
  if (under_dir(a)) return point(op, a + dir_len);
  return 0;
}

int rename(const char* from, const char* to) {
  REAL(rename);
  int action = path_point("rename", from, to);
  if (action == 1) return -1;
  int r = real_rename(from, to);
  if (action == 4) die_now();
  return r;
}
int renameat(int fd1, const char* from, int fd2, const char* to) {
  REAL(renameat);
  int action = path_point("renameat", from, to);
  if (action == 1) return -1;
  int r = real_renameat(fd1, from, fd2, to);
  if (action == 4) die_now();
  return r;
}
int renameat2(int fd1, const char* from, int fd2, const char* to, unsigned flags) {
  REAL(renameat2);
  int action = path_point("renameat2", from, to);
  if (action == 1) return -1;
  int r = real_renameat2(fd1, from, fd2, to, flags);
  if (action == 4) die_now();
  return r;
}
int unlink(const char* path) {
  REAL(unlink);
  int action = path_point("unlink", path, NULL);
  if (action == 1) return -1;
  int r = real_unlink(path);
  if (action == 4) die_now();
  return r;
}
