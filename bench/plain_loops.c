/*
 * The baseline for bench_sweeps.py: the same syscalls as fastlive's batch
 * sweeps, in the plainest C loop, one call per sweep.  Compiled by the
 * benchmark at run time (gcc -O2 -shared) and called through cffi's ABI
 * mode.  Arrays are set up once (pl_setup), like a batch's.
 */
#define _GNU_SOURCE 1
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define INFO_SIZE 280           /* overwritten by pl_setup's info_size */

static int n_;
static int *fds_;
static struct pollfd *pfd_;
static unsigned char *out_;
static unsigned char *info_;
static unsigned int *len_;
static size_t info_size_ = INFO_SIZE;
static struct epoll_event events_[256];

int pl_setup(const int *fds, int n, int info_size)
{
    int i;

    free(fds_);
    free(pfd_);
    free(out_);
    free(info_);
    free(len_);
    n_ = n;
    info_size_ = (size_t)info_size;
    fds_ = malloc((size_t)(n ? n : 1) * sizeof *fds_);
    pfd_ = malloc((size_t)(n ? n : 1) * sizeof *pfd_);
    out_ = malloc((size_t)(n ? n : 1));
    info_ = malloc((size_t)(n ? n : 1) * info_size_);
    len_ = malloc((size_t)(n ? n : 1) * sizeof *len_);
    if (!fds_ || !pfd_ || !out_ || !info_ || !len_)
        return -ENOMEM;
    memcpy(fds_, fds, (size_t)n * sizeof *fds);
    for (i = 0; i < n; i++) {
        pfd_[i].fd = fds[i];
        pfd_[i].events = POLLIN | POLLRDHUP;
    }
    return 0;
}

/* poll() once; SO_ERROR for entries with POLLERR; count the non-quiet. */
int pl_poll(void)
{
    int i, dead = 0;

    if (poll(pfd_, (nfds_t)n_, 0) < 0)
        return -errno;
    for (i = 0; i < n_; i++) {
        short rev = pfd_[i].revents;
        if (rev) {
            if (rev & POLLERR) {
                int err;
                socklen_t l = sizeof err;
                getsockopt(pfd_[i].fd, SOL_SOCKET, SO_ERROR, &err, &l);
            }
            if (rev & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL))
                dead++;
        }
    }
    return dead;
}

/* getsockopt(TCP_INFO) of one byte per fd. */
int pl_states(void)
{
    int i, dead = 0;

    for (i = 0; i < n_; i++) {
        unsigned char st = 0;
        socklen_t l = 1;
        if (getsockopt(fds_[i], IPPROTO_TCP, TCP_INFO, &st, &l) < 0)
            st = 0;
        out_[i] = st;
        dead += st != TCP_ESTABLISHED;
    }
    return dead;
}

/* getsockopt(TCP_INFO) of the whole record per fd, into one array. */
int pl_tcp_info(void)
{
    int i, dead = 0;

    for (i = 0; i < n_; i++) {
        socklen_t l = (socklen_t)info_size_;
        unsigned char *rec = info_ + (size_t)i * info_size_;
        if (getsockopt(fds_[i], IPPROTO_TCP, TCP_INFO, rec, &l) < 0)
            l = 0;
        len_[i] = l;
        dead += l == 0 || rec[0] != TCP_ESTABLISHED;
    }
    return dead;
}

/* recv(MSG_PEEK|MSG_DONTWAIT) of one byte per fd. */
int pl_peek(void)
{
    int i, dead = 0;

    for (i = 0; i < n_; i++) {
        char b;
        ssize_t r = recv(fds_[i], &b, 1, MSG_PEEK | MSG_DONTWAIT);
        out_[i] = r == 0 || (r < 0 && errno != EAGAIN);
        dead += out_[i];
    }
    return dead;
}

/* One epoll_wait(0) on a set the caller filled. */
int pl_epoll_wait(int epfd)
{
    int r = epoll_wait(epfd, events_, 256, 0);
    return r < 0 ? -errno : r;
}
