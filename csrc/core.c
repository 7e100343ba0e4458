/*
 * fastlive core: one socket, the six methods of the article (five here;
 * the heartbeat lives in heartbeat.c).  See fl_core.h for the contract.
 */
#include "fl_prelude.h"
#include "sockutil.h"
#include "fl_core.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
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
    case EPIPE:         /* after RST (see fl_verdict_decide for SHUT_WR) */
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

/* --- the one rule (see fl_core.h) --------------------------------------- */

static void set_status(struct fl_verdict *v, int status, int err)
{
    v->status = status;
    v->err = err;
}

/* Rules 1-2: not a connected TCP socket.  Nonzero when decided. */
static int decide_invalid(int err, int st, int seen, struct fl_verdict *v)
{
    if (seen & FL_EV_NVAL) {
        set_status(v, FL_INVALID, EBADF);
        return 1;
    }
    switch (err) {
    case EBADF: case ENOTSOCK: case EOPNOTSUPP: case ENOPROTOOPT:
    case EINVAL: case EFAULT:
        set_status(v, FL_INVALID, err);
        return 1;
    default:
        break;
    }
    if (st < 0)
        return 0;
    if (st == TCP_LISTEN) {
        set_status(v, FL_INVALID, EOPNOTSUPP);
        return 1;
    }
    if (st == TCP_SYN_SENT || st == TCP_SYN_RECV || st == 0 || st > TCP_CLOSING ||
        (st == TCP_CLOSE && (seen & FL_EV_UNCONNECTED))) {
        set_status(v, FL_INVALID, ENOTCONN);
        return 1;
    }
    return 0;
}

/* Rules 3-5: an errno (EAGAIN/EINTR already filtered out). */
static void decide_errno(int err, int st, struct fl_verdict *v)
{
    if (err == ENOTCONN) {
        if (st == TCP_CLOSE)
            set_status(v, FL_CLOSED, 0);
        else
            set_status(v, FL_INVALID, ENOTCONN);
        return;
    }
    if (err == EPIPE) {
        if (st == TCP_FIN_WAIT1 || st == TCP_FIN_WAIT2) {
            set_status(v, FL_CLOSED, EPIPE);
            v->flags |= FL_F_LOCAL_SHUTDOWN;
            return;
        }
        if (st == TCP_CLOSING || st == TCP_TIME_WAIT || st == TCP_LAST_ACK) {
            set_status(v, FL_PEER_CLOSED, EPIPE);
            v->flags |= FL_F_LOCAL_SHUTDOWN;
            return;
        }
    }
    set_status(v, fl_status_of_errno(err), err);
}

/* Rules 7-9: the state and the hangup bits.  Nonzero when decided. */
static int decide_hangup(int st, int seen, struct fl_verdict *v)
{
    int shut = seen & (FL_EV_HUP | FL_EV_RDHUP | FL_EV_EOF);

    switch (st) {
    case TCP_CLOSE:
        set_status(v, FL_CLOSED, 0);
        return 1;
    case TCP_CLOSE_WAIT:
        v->flags |= FL_F_WRITE_OPEN;
        /* fall through */
    case TCP_LAST_ACK:
    case TCP_CLOSING:
    case TCP_TIME_WAIT:
        set_status(v, FL_PEER_CLOSED, 0);
        return 1;
    default:
        break;
    }
    if (!shut)
        return 0;
    if (st >= 0) {              /* ESTABLISHED, FIN_WAIT1/2: no FIN came */
        set_status(v, FL_CLOSED, 0);
        v->flags |= FL_F_LOCAL_SHUTDOWN;
    } else {
        set_status(v, FL_PEER_CLOSED, 0);
        if ((seen & FL_EV_RDHUP) && !(seen & FL_EV_HUP))
            v->flags |= FL_F_WRITE_OPEN;
    }
    return 1;
}

void fl_verdict_decide(int err, int tcp_state, int seen, struct fl_verdict *v)
{
    int expired = seen & FL_EV_EXPIRED;

    v->tcp_state = tcp_state;
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
        err = expired ? err : 0;
    if (seen & FL_EV_DATA)
        v->flags |= FL_F_DATA_PENDING;
    if (decide_invalid(err, tcp_state, seen, v))
        return;
    if (expired) {
        set_status(v, FL_TIMED_OUT, err ? err : EAGAIN);
        return;
    }
    if (err) {
        decide_errno(err, tcp_state, v);
        return;
    }
    if (decide_hangup(tcp_state, seen, v))
        return;
    if (seen & FL_EV_ERR) {
        set_status(v, FL_CLOSED, 0);
        return;
    }
    set_status(v, FL_ALIVE, 0);
    if (seen & FL_EV_IN)
        v->flags |= FL_F_DATA_PENDING;
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

#define SEGS_END ((int)(offsetof(struct fl_tcp_info, tcpi_segs_in) + 4))

/* A record that says CLOSE and shows no segment ever: never connected. */
static int unconnected(const struct fl_tcp_info *ti, int len)
{
    return ti->tcpi_state == TCP_CLOSE && len >= SEGS_END &&
           ti->tcpi_segs_in == 0 && ti->tcpi_segs_out == 0;
}

int fl_tcp_state_seen(int fd, int *seen)
{
    struct fl_tcp_info ti;
    int len = fl_tcp_info(fd, &ti);

    if (len < 0)
        return len;
    if (len < 1)
        return -EOPNOTSUPP;
    if (unconnected(&ti, len))
        *seen |= FL_EV_UNCONNECTED;
    return ti.tcpi_state;
}

/* --- fork ---------------------------------------------------------------- */

static volatile unsigned int fork_generation;

static void in_child(void)
{
    fork_generation++;
}

__attribute__((constructor)) static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, in_child);
}

unsigned int fl_fork_generation(void)
{
    return fork_generation;
}

/* --- the checks ------------------------------------------------------------ */

/* Where a check starts: fills *v (INVALID) and returns nonzero when fd is
 * not a connected TCP socket, so the check stops there; else *st and
 * *seen hold what TCP_INFO said, for fl_verdict_decide. */
static int observe(int fd, int *st, int *seen, struct fl_verdict *v)
{
    *seen = 0;
    *st = fl_tcp_state_seen(fd, seen);
    if (*st < 0) {
        fl_verdict_decide(-*st, -1, 0, v);
        return 1;
    }
    v->tcp_state = *st;
    return decide_invalid(0, *st, *seen, v);
}

/* Peek one byte without waiting and decide from what came back: bytes
 * queued (DATA), 0 bytes (EOF: the peer's FIN, our SHUT_RD, or a closed
 * connection, told apart by the state), or the pending error.  Nothing is
 * consumed. */
static void peek_decide(int fd, int st, int seen, struct fl_verdict *v)
{
    char byte;
    ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    int err = n < 0 ? errno : 0;

    if (n > 0)
        seen |= FL_EV_DATA;
    else if (n == 0)
        seen |= FL_EV_EOF;
    fl_verdict_decide(err, st, seen, v);
}

void fl_check_peek(int fd, struct fl_verdict *v)
{
    int st, seen;

    verdict_init(v, FL_M_PEEK);
    if (!observe(fd, &st, &seen, v))
        peek_decide(fd, st, seen, v);
}

void fl_check_so_error(int fd, struct fl_verdict *v)
{
    int st, seen;

    verdict_init(v, FL_M_SO_ERROR);
    if (observe(fd, &st, &seen, v))
        return;
    fl_verdict_decide(take_so_error(fd), st, seen, v);
}

long fl_send(int fd, const void *buf, size_t len, int flags, struct fl_verdict *v)
{
    ssize_t n;
    int st, seen;

    verdict_init(v, FL_M_SEND);
    if (fd < 0) {
        set_status(v, FL_INVALID, EBADF);
        return -EBADF;
    }
    n = send(fd, buf, len, flags | MSG_NOSIGNAL);
    if (n < 0) {
        int err = errno;
        /* Only on this error path is the socket itself examined: EPIPE
         * means an RST, our own SHUT_WR, or "never connected"; the state
         * tells which. */
        if (!observe(fd, &st, &seen, v))
            fl_verdict_decide(err, st, seen, v);
        return -err;
    }
    return (long)n;
}


/* poll() one fd once: the count, or -errno (-EINTR included: the caller
 * hands the signal to Python and comes back with the time left). */
static int poll_one(int fd, short events, int timeout_ms, short *revents)
{
    struct pollfd p;
    int r;

    p.fd = fd;
    p.events = events;
    p.revents = 0;
    r = poll(&p, 1, timeout_ms);
    if (r < 0)
        return -errno;
    *revents = r ? p.revents : 0;
    return r;
}

/* The state again once there is news (it may have moved while poll
 * slept): nonzero with *v decided when the fd went bad meanwhile. */
static int observe_again(int fd, int *st, int *seen, struct fl_verdict *v)
{
    int s = fl_tcp_state_seen(fd, seen);

    if (s < 0) {
        fl_verdict_decide(-s, -1, 0, v);
        return 1;
    }
    *st = s;
    return 0;
}

int fl_check_poll(int fd, int timeout_ms, struct fl_verdict *v)
{
    short rev = 0;
    int r, st, seen, err;

    verdict_init(v, FL_M_POLL);
    if (observe(fd, &st, &seen, v))
        return 0;
    r = poll_one(fd, POLLIN | POLLRDHUP, timeout_ms, &rev);
    if (r == -EINTR)
        return r;
    if (r < 0) {
        fl_verdict_decide(-r, st, seen, v);
        return 0;
    }
    if (rev && observe_again(fd, &st, &seen, v))
        return 0;
    /* POLLERR brings the pending error, taken with SO_ERROR (which clears
     * it: the kernel hands it out once). */
    err = (rev & POLLERR) ? take_so_error(fd) : 0;
    fl_verdict_decide(err, st, seen | (rev & 0xffff), v);
    return 0;
}

/* select() once for readability: 1 readable, 0 not, -errno. */
static int select_one(int fd, int timeout_ms)
{
    fd_set rfds;
    struct timeval tv, *tvp = NULL;
    int r;

    FD_ZERO(&rfds);
    FD_SET(fd, &rfds);
    if (timeout_ms >= 0) {
        tv.tv_sec = (time_t)(timeout_ms / 1000);
        tv.tv_usec = (suseconds_t)((timeout_ms % 1000) * 1000);
        tvp = &tv;
    }
    r = select(fd + 1, &rfds, NULL, NULL, tvp);
    if (r < 0)
        return -errno;
    return r > 0 && FD_ISSET(fd, &rfds);
}

/* The article's method: select() for readability, then look at what is
 * there.  The article read()s; we peek, so the application's bytes stay.
 * select() can only name fds below FD_SETSIZE (FD_SET beyond it writes past
 * the fd_set); larger fds are checked with poll() and flagged. */
int fl_check_select(int fd, int timeout_ms, struct fl_verdict *v)
{
    int r, st, seen;

    verdict_init(v, FL_M_SELECT);
    if (observe(fd, &st, &seen, v))
        return 0;
    if (fd >= FD_SETSIZE) {
        short rev = 0;
        v->flags |= FL_F_SELECT_FALLBACK;
        r = poll_one(fd, POLLIN, timeout_ms, &rev);
        if (r >= 0)
            r = (rev & (POLLIN | POLLERR | POLLHUP)) != 0;
    } else {
        r = select_one(fd, timeout_ms);
    }
    if (r == -EINTR)
        return r;
    if (r < 0) {
        fl_verdict_decide(-r, st, seen, v);
        return 0;
    }
    if (r == 0)
        return 0;              /* nothing to read: no news */
    if (!observe_again(fd, &st, &seen, v))
        peek_decide(fd, st, seen, v);
    return 0;
}

/* TCP_INFO cannot see a peer that vanished silently: the state stays
 * ESTABLISHED until a kernel timer gives up.  What it can show before that
 * is the sender struggling: a retransmission or keepalive probe outstanding,
 * RTO backoff, or unacknowledged data with no ACK for several RTOs. */
void fl_check_tcp_info(int fd, struct fl_verdict *v)
{
    struct fl_tcp_info ti;
    int len, seen = 0;

    verdict_init(v, FL_M_TCP_INFO);
    len = fl_tcp_info(fd, &ti);
    if (len < 1) {
        fl_verdict_decide(len < 0 ? -len : EOPNOTSUPP, -1, 0, v);
        return;
    }
    if (unconnected(&ti, len))
        seen |= FL_EV_UNCONNECTED;
    fl_verdict_decide(0, ti.tcpi_state, seen, v);
    if (v->status != FL_INVALID && fl_tcp_info_suspect(&ti, len))
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
int fl_rcvtimeo_ms(int fd)
{
    int64_t rcv_us = 0, snd_us = 0, ms;
    int r = fl_get_timeouts(fd, &rcv_us, &snd_us);

    if (r < 0)
        return r;
    if (rcv_us <= 0)
        return -EINVAL;             /* no timeout: would block forever */
    ms = (rcv_us + 999) / 1000;     /* round up: never 0 (poll's "now") */
    if (ms > INT_MAX)
        return -EINVAL;             /* beyond what poll() can wait */
    return (int)ms;
}

int fl_check_rcvtimeo(int fd, int timeout_ms, struct fl_verdict *v)
{
    short rev = 0;
    int r, st, seen;

    verdict_init(v, FL_M_RCVTIMEO);
    if (observe(fd, &st, &seen, v))
        return 0;
    if (timeout_ms < 0 && (timeout_ms = fl_rcvtimeo_ms(fd)) < 0) {
        fl_verdict_decide(-timeout_ms, st, seen, v);
        return 0;
    }
    r = poll_one(fd, POLLIN, timeout_ms, &rev);
    if (r == -EINTR)
        return r;
    if (r < 0) {
        fl_verdict_decide(-r, st, seen, v);
        return 0;
    }
    if (r == 0) {
        fl_verdict_decide(EAGAIN, st, seen | FL_EV_EXPIRED, v);
        return 0;
    }
    if (!observe_again(fd, &st, &seen, v))
        peek_decide(fd, st, seen, v);
    return 0;
}
