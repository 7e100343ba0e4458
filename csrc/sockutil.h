/*
 * Small helpers the C sources share.  Not part of the API (not read by
 * cffi): everything here is static inline, so each file keeps its own copy
 * and no symbol is exported.
 */
#ifndef FL_SOCKUTIL_H
#define FL_SOCKUTIL_H

#include <errno.h>
#include <stdint.h>
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

/* The kernel's id of the socket behind fd (SO_COOKIE, Linux 4.12+): unique
 * while the system runs, so it tells a socket from a later one that got
 * the same fd number.  0 with *cookie = 0 when the kernel has no cookies;
 * -errno when fd is not an open socket. */
static inline int sock_cookie(int fd, uint64_t *cookie)
{
    socklen_t len = sizeof *cookie;

    *cookie = 0;
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, cookie, &len) < 0) {
        if (errno == ENOPROTOOPT)
            return 0;
        return -errno;
    }
    return 0;
}

#endif
