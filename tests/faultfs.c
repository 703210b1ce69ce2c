/* Fault injection below SQLite, for tests only (LD_PRELOAD): while the file named by FAULT_FLAG exists,
 * writes and syncs of files under FAULT_DIR fail with EROFS, as they would on a file system remounted
 * read-only. Nothing else changes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static int faulty(int fd) {
    const char *flag = getenv("FAULT_FLAG"), *dir = getenv("FAULT_DIR");
    struct stat st;
    char link[64], path[4096];
    if (!flag || !dir || stat(flag, &st) != 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, dir, strlen(dir)) == 0;
}

#define REAL(name, ret, ...) static ret (*real)(__VA_ARGS__); if (!real) real = dlsym(RTLD_NEXT, name)

ssize_t write(int fd, const void *buf, size_t n) {
    REAL("write", ssize_t, int, const void *, size_t);
    if (faulty(fd)) { errno = EROFS; return -1; }
    return real(fd, buf, n);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL("pwrite", ssize_t, int, const void *, size_t, off_t);
    if (faulty(fd)) { errno = EROFS; return -1; }
    return real(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL("pwrite64", ssize_t, int, const void *, size_t, off_t);
    if (faulty(fd)) { errno = EROFS; return -1; }
    return real(fd, buf, n, off);
}
int fsync(int fd) {
    REAL("fsync", int, int);
    if (faulty(fd)) { errno = EROFS; return -1; }
    return real(fd);
}
int fdatasync(int fd) {
    REAL("fdatasync", int, int);
    if (faulty(fd)) { errno = EROFS; return -1; }
    return real(fd);
}
