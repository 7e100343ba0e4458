/*
 * Small helpers the C sources share.  Not part of the API (not read by
 * cffi): everything here is static inline, so each file keeps its own copy
 * and no symbol is exported.
 */
#ifndef FL_SOCKUTIL_H
#define FL_SOCKUTIL_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/socket.h>
#include <time.h>

/* Microseconds / milliseconds on the monotonic clock. */
static inline int64_t mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static inline int64_t mono_ms(void)
{
    return mono_us() / 1000;
}

/* SO_ERROR is the kernel's pending socket error; reading it clears it (the
 * kernel hands each error out once).  Returns the error, or the errno of a
 * failed getsockopt. */
static inline int take_so_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;

    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

/* The inode of a socket fd, from its /proc/self/fd link ("socket:[123]").
 * Not fstat(): glibc >= 2.33 versions that symbol, which would lift the
 * wheels' glibc floor for a fallback that new kernels never take. */
static inline int sock_inode(int fd, uint64_t *ino)
{
    char path[48], link[64];
    unsigned long long v;
    ssize_t n;

    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    n = readlink(path, link, sizeof link - 1);
    if (n < 0)
        return errno == ENOENT ? -EBADF : -errno;
    link[n] = '\0';
    if (sscanf(link, "socket:[%llu]", &v) != 1)
        return -ENOTSOCK;
    *ino = (uint64_t)v;
    return 0;
}

/* The identity of the socket behind fd, to tell it from a later socket that
 * got the same fd number: SO_COOKIE (Linux 4.12+, unique while the system
 * runs) when the kernel has it, else the socket's inode (unique among open
 * sockets; qemu-user has no SO_COOKIE either).  -errno when fd is not an
 * open socket. */
static inline int sock_identity(int fd, uint64_t *cookie, uint64_t *ino)
{
    socklen_t len = sizeof *cookie;
    int r;

    *cookie = 0;
    *ino = 0;
    r = getsockopt(fd, SOL_SOCKET, SO_COOKIE, cookie, &len);
    if (r == 0 && *cookie)
        return 0;
    if (r < 0 && (errno == EBADF || errno == ENOTSOCK))
        return -errno;
    *cookie = 0;
    return sock_inode(fd, ino);
}

#endif
