/*
 * fastlive core: one socket, the six methods of the article (five here;
 * the heartbeat lives in heartbeat.c).  See fl_core.h for the contract.
 */
#include "fl_prelude.h"
#include "sockutil.h"
#include "fl_core.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>

#ifndef POLLRDHUP
#define POLLRDHUP 0x2000
#endif
#ifndef TCP_USER_TIMEOUT
#define TCP_USER_TIMEOUT 18
#endif

#ifndef FL_VERSION
#define FL_VERSION "unknown"
#endif

const char *fl_version(void)
{
    return FL_VERSION;
}

static void verdict_init(struct fl_verdict *v, int method)
{
    v->status = FL_ALIVE;
    v->err = 0;
    v->method = method;
    v->tcp_state = -1;
    v->flags = 0;
}

int fl_status_of_errno(int err)
{
    switch (err) {
    case 0:
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case EINTR:
        return FL_ALIVE;
    case ECONNRESET:
    case EPIPE:         /* after RST, or our own shutdown(SHUT_WR) */
    case ECONNABORTED:
        return FL_RESET;
    case ETIMEDOUT:
        return FL_TIMED_OUT;
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EHOSTDOWN:
    case ENETDOWN:
        return FL_UNREACHABLE;
    case EBADF:
    case ENOTSOCK:
    case ENOTCONN:
    case EOPNOTSUPP:
    case ENOPROTOOPT:
    case EINVAL:
    case EFAULT:
        return FL_INVALID;
    default:
        return FL_ERROR;
    }
}

/* EAGAIN and EINTR are "nothing to report", not errors: no errno kept. */
static void verdict_errno(struct fl_verdict *v, int err)
{
    v->status = fl_status_of_errno(err);
    v->err = v->status == FL_ALIVE ? 0 : err;
}

/* One getsockopt(TCP_INFO) of a single byte answers three questions at once:
 * is fd a socket (ENOTSOCK/EBADF), is it TCP (EOPNOTSUPP / ENOPROTOOPT for
 * UDP and unix sockets) and what state is it in. */
int fl_tcp_state(int fd)
{
    uint8_t state = 0;
    socklen_t len = sizeof state;

    if (fd < 0)
        return -EBADF;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &state, &len) < 0)
        return -errno;
    if (len < 1)
        return -EOPNOTSUPP;
    return state;
}

int fl_tcp_info(int fd, struct fl_tcp_info *out)
{
    socklen_t len = sizeof *out;

    memset(out, 0, sizeof *out);
    if (fd < 0)
        return -EBADF;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, out, &len) < 0)
        return -errno;
    return (int)len;
}

/* Returns nonzero and fills *v when fd is not a connected TCP socket.
 * One getsockopt(TCP_INFO) answers it: EBADF / ENOTSOCK for closed fds and
 * non-sockets, EOPNOTSUPP for UDP and unix sockets, the state for TCP.
 * LISTEN and SYN_SENT have no peer; CLOSE is a finished connection unless
 * no segment ever went either way (a socket never connected). */
static int reject_invalid(int fd, struct fl_verdict *v)
{
    struct fl_tcp_info ti;
    int len = fl_tcp_info(fd, &ti);

    if (len < 1) {
        v->status = FL_INVALID;
        v->err = len < 0 ? -len : EOPNOTSUPP;
        return 1;
    }
    v->tcp_state = ti.tcpi_state;
    if (ti.tcpi_state == TCP_LISTEN) {
        v->status = FL_INVALID;
        v->err = EOPNOTSUPP;
        return 1;
    }
    if (ti.tcpi_state == TCP_SYN_SENT ||
        (ti.tcpi_state == TCP_CLOSE &&
         len >= (int)(offsetof(struct fl_tcp_info, tcpi_segs_in) + 4) &&
         ti.tcpi_segs_in == 0 && ti.tcpi_segs_out == 0)) {
        v->status = FL_INVALID;
        v->err = ENOTCONN;
        return 1;
    }
    return 0;
}


/* Peek one byte without waiting and read the answer: bytes queued (alive,
 * DATA_PENDING), 0 = the peer's FIN (or, in state CLOSE, a connection the
 * kernel already closed), or the pending error.  Nothing is consumed. */
static void peek_verdict(int fd, struct fl_verdict *v)
{
    char byte;
    ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);

    if (n > 0) {
        v->flags |= FL_F_DATA_PENDING;
    } else if (n == 0) {
        v->status = v->tcp_state == TCP_CLOSE ? FL_CLOSED : FL_PEER_CLOSED;
    } else {
        verdict_errno(v, errno);
        if (v->status == FL_INVALID && v->tcp_state == TCP_CLOSE)
            v->status = FL_CLOSED, v->err = 0;      /* ENOTCONN after close */
    }
}

void fl_check_peek(int fd, struct fl_verdict *v)
{
    verdict_init(v, FL_M_PEEK);
    if (!reject_invalid(fd, v))
        peek_verdict(fd, v);
}

void fl_check_so_error(int fd, struct fl_verdict *v)
{
    verdict_init(v, FL_M_SO_ERROR);
    if (reject_invalid(fd, v))
        return;
    verdict_errno(v, take_so_error(fd));
    if (v->status == FL_ALIVE && v->tcp_state == TCP_CLOSE)
        v->status = FL_CLOSED;
}

long fl_send(int fd, const void *buf, size_t len, int flags, struct fl_verdict *v)
{
    ssize_t n;

    verdict_init(v, FL_M_SEND);
    if (fd < 0) {
        v->status = FL_INVALID;
        v->err = EBADF;
        return -EBADF;
    }
    n = send(fd, buf, len, flags | MSG_NOSIGNAL);
    if (n < 0) {
        int err = errno;
        /* EPIPE also means "never connected" or "not TCP": only on this
         * error path is the socket itself examined. */
        if (!reject_invalid(fd, v))
            verdict_errno(v, err);
        return -err;
    }
    return (long)n;
}


/* poll() one fd, retrying EINTR against the original deadline. */
static int poll_one(int fd, short events, int timeout_ms, short *revents)
{
    struct pollfd p;
    int64_t deadline = timeout_ms >= 0 ? mono_ms() + timeout_ms : 0;
    int r;

    for (;;) {
        p.fd = fd;
        p.events = events;
        p.revents = 0;
        r = poll(&p, 1, timeout_ms);
        if (r >= 0)
            break;
        if (errno != EINTR)
            return -errno;
        if (timeout_ms >= 0) {
            int64_t left = deadline - mono_ms();
            timeout_ms = left > 0 ? (int)left : 0;
        }
    }
    *revents = r ? p.revents : 0;
    return r;
}

/* Turns poll revents into a verdict.  POLLERR carries a pending error
 * (taken with SO_ERROR); POLLHUP means both directions are shut; POLLRDHUP
 * alone means the peer sent FIN and may still be reading (half-close). */
static void verdict_revents(int fd, short rev, struct fl_verdict *v)
{
    if (rev & POLLNVAL) {
        v->status = FL_INVALID;
        v->err = EBADF;
    } else if (rev & POLLERR) {
        int err = take_so_error(fd);
        if (err)
            verdict_errno(v, err);
        else
            v->status = FL_CLOSED;
    } else if (rev & POLLHUP) {
        v->status = v->tcp_state == TCP_CLOSE ? FL_CLOSED : FL_PEER_CLOSED;
    } else if (rev & POLLRDHUP) {
        v->status = FL_PEER_CLOSED;
        v->flags |= FL_F_WRITE_OPEN;
    }
    if (rev & POLLIN && !(rev & (POLLERR | POLLHUP | POLLRDHUP)))
        v->flags |= FL_F_DATA_PENDING;
}

void fl_check_poll(int fd, int timeout_ms, struct fl_verdict *v)
{
    short rev = 0;
    int r;

    verdict_init(v, FL_M_POLL);
    if (reject_invalid(fd, v))
        return;
    r = poll_one(fd, POLLIN | POLLRDHUP, timeout_ms, &rev);
    if (r < 0) {
        v->status = FL_INVALID;
        v->err = -r;
        return;
    }
    verdict_revents(fd, rev, v);
}

/* The article's method: select() for readability, then look at what is
 * there.  The article read()s; we peek, so the application's bytes stay.
 * select() can only name fds below FD_SETSIZE (FD_SET beyond it writes past
 * the fd_set); larger fds are checked with poll() and flagged. */
void fl_check_select(int fd, int timeout_ms, struct fl_verdict *v)
{
    fd_set rfds;
    struct timeval tv, *tvp = NULL;
    int64_t deadline = 0;
    int r;

    verdict_init(v, FL_M_SELECT);
    if (reject_invalid(fd, v))
        return;
    if (fd >= FD_SETSIZE) {
        short rev = 0;
        v->flags |= FL_F_SELECT_FALLBACK;
        r = poll_one(fd, POLLIN, timeout_ms, &rev);
        if (r < 0) {
            v->status = FL_INVALID;
            v->err = -r;
            return;
        }
        if (!(rev & (POLLIN | POLLERR | POLLHUP)))
            return;
    } else {
        if (timeout_ms >= 0)
            deadline = mono_ms() + timeout_ms;
        for (;;) {
            FD_ZERO(&rfds);
            FD_SET(fd, &rfds);
            if (timeout_ms >= 0) {
                int64_t left = deadline - mono_ms();
                if (left < 0)
                    left = 0;
                tv.tv_sec = (time_t)(left / 1000);
                tv.tv_usec = (suseconds_t)((left % 1000) * 1000);
                tvp = &tv;
            }
            r = select(fd + 1, &rfds, NULL, NULL, tvp);
            if (r >= 0)
                break;
            if (errno != EINTR) {
                verdict_errno(v, errno);
                return;
            }
        }
        if (r == 0 || !FD_ISSET(fd, &rfds))
            return;    /* nothing to read: no news */
    }
    peek_verdict(fd, v);
}

/* TCP_INFO cannot see a peer that vanished silently: the state stays
 * ESTABLISHED until a kernel timer gives up.  What it can show before that
 * is the sender struggling: a retransmission or keepalive probe outstanding,
 * RTO backoff, or unacknowledged data with no ACK for several RTOs. */
void fl_check_tcp_info(int fd, struct fl_verdict *v)
{
    struct fl_tcp_info ti;
    int len;

    verdict_init(v, FL_M_TCP_INFO);
    len = fl_tcp_info(fd, &ti);
    if (len < 0) {
        v->status = FL_INVALID;
        v->err = -len;
        return;
    }
    if (len < 1) {
        v->status = FL_INVALID;
        v->err = EOPNOTSUPP;
        return;
    }
    v->tcp_state = ti.tcpi_state;
    switch (ti.tcpi_state) {
    case TCP_ESTABLISHED:
    case TCP_FIN_WAIT1:
    case TCP_FIN_WAIT2:
        break;                          /* no news from the peer */
    case TCP_CLOSE_WAIT:
    case TCP_LAST_ACK:
    case TCP_CLOSING:
    case TCP_TIME_WAIT:
        v->status = FL_PEER_CLOSED;     /* its FIN arrived */
        break;
    case TCP_CLOSE:
        if (len >= (int)(offsetof(struct fl_tcp_info, tcpi_segs_in) + 4) &&
            ti.tcpi_segs_in == 0 && ti.tcpi_segs_out == 0) {
            v->status = FL_INVALID;     /* never connected */
            v->err = ENOTCONN;
            return;
        }
        v->status = FL_CLOSED;
        break;
    case TCP_LISTEN:
        v->status = FL_INVALID;
        v->err = EOPNOTSUPP;
        return;
    default:                            /* SYN_SENT, SYN_RECV */
        v->status = FL_INVALID;
        v->err = ENOTCONN;
        return;
    }
    if (fl_tcp_info_suspect(&ti, len))
        v->flags |= FL_F_SUSPECT;
}

int fl_tcp_info_suspect(const struct fl_tcp_info *ti, int len)
{
    if (len >= (int)(offsetof(struct fl_tcp_info, tcpi_rto) + 4)
        && (ti->tcpi_retransmits || ti->tcpi_probes || ti->tcpi_backoff))
        return 1;
    return len >= (int)(offsetof(struct fl_tcp_info, tcpi_last_ack_recv) + 4)
        && ti->tcpi_unacked > 0 && ti->tcpi_rto > 0
        && (uint64_t)ti->tcpi_last_ack_recv * 1000 > 2ull * ti->tcpi_rto;
}

/* --- keepalive -------------------------------------------------------- */

static int get_int(int fd, int level, int opt, int *val)
{
    socklen_t len = sizeof *val;

    *val = 0;
    if (getsockopt(fd, level, opt, val, &len) < 0)
        return -errno;
    return 0;
}

static int set_int(int fd, int level, int opt, int val)
{
    if (setsockopt(fd, level, opt, &val, sizeof val) < 0)
        return -errno;
    return 0;
}

int fl_get_keepalive(int fd, struct fl_keepalive *out)
{
    int r, ut = 0;

    memset(out, 0, sizeof *out);
    if ((r = get_int(fd, SOL_SOCKET, SO_KEEPALIVE, &out->enabled)) < 0)
        return r;
    if ((r = get_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, &out->idle_s)) < 0)
        return r;
    if ((r = get_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, &out->interval_s)) < 0)
        return r;
    if ((r = get_int(fd, IPPROTO_TCP, TCP_KEEPCNT, &out->count)) < 0)
        return r;
    if ((r = get_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ut)) < 0)
        return r;
    out->user_timeout_ms = (unsigned int)ut;
    return 0;
}

int fl_set_keepalive(int fd, int enabled, int idle_s, int interval_s, int count,
                     int set_ut, unsigned int user_timeout_ms)
{
    int r;

    /* Times before the switch: the kernel arms the timer with the idle
     * time in force when SO_KEEPALIVE turns on. */
    if (idle_s >= 0 && (r = set_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, idle_s)) < 0)
        return r;
    if (interval_s >= 0 &&
        (r = set_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, interval_s)) < 0)
        return r;
    if (count >= 0 && (r = set_int(fd, IPPROTO_TCP, TCP_KEEPCNT, count)) < 0)
        return r;
    if (set_ut && (r = set_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT,
                               (int)user_timeout_ms)) < 0)
        return r;
    if (enabled >= 0 &&
        (r = set_int(fd, SOL_SOCKET, SO_KEEPALIVE, enabled ? 1 : 0)) < 0)
        return r;
    return 0;
}

/* --- SO_RCVTIMEO / SO_SNDTIMEO -------------------------------------------- */

static int get_tv(int fd, int opt, int64_t *us)
{
    struct timeval tv;
    socklen_t len = sizeof tv;

    *us = 0;
    if (getsockopt(fd, SOL_SOCKET, opt, &tv, &len) < 0)
        return -errno;
    *us = (int64_t)tv.tv_sec * 1000000 + tv.tv_usec;
    return 0;
}

static int set_tv(int fd, int opt, int64_t us)
{
    struct timeval tv;

    if (us < 0)
        return -EINVAL;
    tv.tv_sec = (time_t)(us / 1000000);
    tv.tv_usec = (suseconds_t)(us % 1000000);
    if (setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv) < 0)
        return -errno;
    return 0;
}

int fl_get_timeouts(int fd, int64_t *rcv_us, int64_t *snd_us)
{
    int r = get_tv(fd, SO_RCVTIMEO, rcv_us);

    return r < 0 ? r : get_tv(fd, SO_SNDTIMEO, snd_us);
}

int fl_set_timeouts(int fd, int64_t rcv_us, int64_t snd_us)
{
    int r = rcv_us >= 0 ? set_tv(fd, SO_RCVTIMEO, rcv_us) : 0;

    if (r == 0 && snd_us >= 0)
        r = set_tv(fd, SO_SNDTIMEO, snd_us);
    return r;
}

/* The article's method 5: a read that gives up after SO_RCVTIMEO.  The
 * kernel's blocking recv sleeps until data, FIN, an error or the timeout;
 * poll() with the same timeout sleeps on the same wakeups and also works on
 * non-blocking sockets, and the final MSG_PEEK leaves the bytes in place.
 * EAGAIN here means only "nothing arrived in time": a live but quiet peer
 * looks exactly like a dead one. */
void fl_check_rcvtimeo(int fd, int timeout_ms, struct fl_verdict *v)
{
    int64_t rcv_us = 0, snd_us = 0;
    short rev = 0;
    int r;

    verdict_init(v, FL_M_RCVTIMEO);
    if (reject_invalid(fd, v))
        return;
    if (timeout_ms < 0) {
        r = fl_get_timeouts(fd, &rcv_us, &snd_us);
        if (r < 0 || rcv_us <= 0) {
            v->status = FL_INVALID;
            v->err = r < 0 ? -r : EINVAL;   /* no timeout: would block forever */
            return;
        }
        timeout_ms = (int)((rcv_us + 999) / 1000);
    }
    r = poll_one(fd, POLLIN, timeout_ms, &rev);
    if (r < 0) {
        v->status = FL_INVALID;
        v->err = -r;
        return;
    }
    if (r == 0) {
        v->status = FL_TIMED_OUT;
        v->err = EAGAIN;
        return;
    }
    peek_verdict(fd, v);
}
