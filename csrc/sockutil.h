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

#endif
