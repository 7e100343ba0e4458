/*
 * fastlive heartbeat engine: one epoll set, one hashed timing wheel.
 *
 * Every watched connection has exactly one deadline, kept in the wheel
 * slot of its tick.  Receiving bytes does not touch the wheel: it only
 * stamps last_heard.  When a deadline comes due the connection is looked
 * at once: heard recently -> the deadline moves to last_heard + interval;
 * silent for an interval -> one PING; silent for misses * interval -> dead.
 * A tick therefore costs O(connections due in it), never O(all): idle but
 * healthy connections are touched once per interval, busy ones once per
 * interval too (and get no PING).
 *
 * The engine runs in its own thread (started by fl_hb_new, all signals
 * blocked), so PINGs go out and PONGs are answered while the application's
 * Python is busy or stopped in a GC pause: the thread never needs the GIL.
 * One mutex guards everything; the thread drops it only while it sleeps
 * (epoll_wait, or the coalescing sleep), so fl_hb_add/remove wait at most
 * one pass of the loop.  Deaths are a queue of connection records (each
 * registration dies at most once, so the queue needs no memory of its
 * own); the deaths eventfd is readable while the queue is not empty.
 *
 * Memory is allocated in fl_hb_new and fl_hb_add only; the thread does not
 * allocate.  All loops are bounded (events per pass, reads per event).
 */
#include "fl_prelude.h"
#include "sockutil.h"
#include "fl_core.h"
#include "fl_heartbeat.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>

#ifndef EPOLLRDHUP
#define EPOLLRDHUP 0x2000
#endif
#ifndef SIOCOUTQ
#define SIOCOUTQ TIOCOUTQ
#endif

#define WHEEL_BITS 12
#define NSLOTS (1u << WHEEL_BITS)          /* 4096 ticks: 41 s at 10 ms */
#define SLOT_MASK (NSLOTS - 1)
#define NIL (-1)
#define MAX_EVENTS 256                      /* epoll events per epoll_wait */
#define MAX_PASSES 64                       /* full passes before the timers run unhurried */
#define READS_PER_EVENT 4
#define RX_CHUNK 512
#define RTT_RING 1024
#define FRAME_MAX (FL_HB_HEADER_LEN + FL_HB_MAX_PAYLOAD)
#define TIMER_TAG UINT64_MAX
#define PREALLOC_MAX (1 << 16)              /* records allocated up front at most */
#define WAKE_TAG (UINT64_MAX - 1)

enum { C_FREE = 0, C_LIVE = 1, C_DEAD = 2, C_GONE = 3 };

struct conn {
    int fd;
    uint64_t cookie, ino;       /* the socket's identity at add() */
    int flags;
    int state;
    uint32_t gen;
    int misses;
    int64_t progress_us;        /* 0, or vouch only while the app progresses */
    int32_t next, prev;         /* wheel list, free list, dead list */
    int slot;                   /* wheel slot, -1 when not in the wheel */
    int64_t interval_us;
    int64_t last_heard_us;      /* anything at all arrived (death clock) */
    int64_t quiet_since_us;     /* PING clock: the peer's own traffic, or
                                   the send time of our last answered PING */
    int64_t deadline_us;
    int64_t deadline_tick;
    int64_t ping_sent_us;       /* 0: no PING outstanding */
    int64_t first_ping_us;      /* first PING since the last byte heard, or 0 */
    int64_t ping_due_us;        /* when that PING was due */
    uint64_t rx_bytes;          /* shared: tcpi_bytes_received at the last look */
    uint16_t seq, ping_seq;
    uint8_t rxlen, txlen;
    uint8_t collided;           /* both ends pinged in the same round */
    uint8_t rx[FRAME_MAX];      /* a frame split across reads */
    uint8_t tx[FL_HB_HEADER_LEN * 2]; /* rest of a partly sent frame */
    struct fl_verdict death;
    int64_t silent_us;
    int64_t detected_us;
};

struct fl_hb {
    pthread_mutex_t mu;
    pthread_t thread;
    unsigned int forkgen;       /* fl_fork_generation() of the owning process */
    int running;                /* the thread was started and not joined */
    int stop, closed;
    int signalled;              /* evfd holds a count (deaths queued) */
    int evfd;                   /* readable: deaths queued, or closed */
    int wakefd;                 /* in the epoll set: wakes the thread */
    int64_t progress_at_us;     /* the application's last fl_hb_progress */
    int epfd, tfd;
    int64_t tick_us;
    int64_t cur_tick;           /* every tick <= cur_tick is done */
    int64_t armed_tick;
    struct conn *c;
    int cap, nconn, free_head;
    int *fdmap;                 /* fd -> conn index, -1 */
    int fdmap_len;
    int32_t dead_head, dead_tail;
    int queued;
    int32_t head[NSLOTS];
    uint64_t bits[NSLOTS / 64];
    struct fl_hb_event rtt[RTT_RING];
    int rtt_head, rtt_len;
    uint64_t rng;
    struct fl_hb_stats st;
};


/* ---- wire format ---------------------------------------------------- */

int fl_hb_parse(const uint8_t *buf, size_t len, struct fl_hb_frame *out)
{
    unsigned ver, type, plen;

    if (len == 0)
        return 0;
    if (buf[0] != FL_HB_MAGIC)
        return -EPROTO;
    if (len < 2)
        return 0;
    ver = buf[1] >> 4;
    type = buf[1] & 0x0f;
    if (ver != FL_HB_VERSION)
        return -EPROTONOSUPPORT;
    if (type != FL_HB_PING && type != FL_HB_PONG)
        return -EPROTO;
    if (len < FL_HB_HEADER_LEN)
        return 0;
    plen = buf[4];
    if (plen > FL_HB_MAX_PAYLOAD)
        return -EMSGSIZE;
    if (out) {
        out->version = (int)ver;
        out->type = (int)type;
        out->seq = ((unsigned)buf[2] << 8) | buf[3];
        out->payload_len = plen;
    }
    if (len < FL_HB_HEADER_LEN + plen)
        return 0;
    return (int)(FL_HB_HEADER_LEN + plen);
}

int fl_hb_encode(int type, unsigned int seq, uint8_t *out, size_t len)
{
    if ((type != FL_HB_PING && type != FL_HB_PONG) || seq > 0xffff
        || !out || len < FL_HB_HEADER_LEN)
        return -EINVAL;
    out[0] = FL_HB_MAGIC;
    out[1] = (uint8_t)((FL_HB_VERSION << 4) | type);
    out[2] = (uint8_t)(seq >> 8);
    out[3] = (uint8_t)seq;
    out[4] = 0;
    return FL_HB_HEADER_LEN;
}

/* ---- timing wheel --------------------------------------------------- */

static void wheel_unlink(struct fl_hb *hb, int32_t i)
{
    struct conn *c = &hb->c[i];

    if (c->slot < 0)
        return;
    if (c->prev != NIL)
        hb->c[c->prev].next = c->next;
    else
        hb->head[c->slot] = c->next;
    if (c->next != NIL)
        hb->c[c->next].prev = c->prev;
    if (hb->head[c->slot] == NIL)
        hb->bits[c->slot >> 6] &= ~(1ull << (c->slot & 63));
    c->slot = -1;
    c->next = c->prev = NIL;
}

/* Puts connection i at deadline d (never at or before the current tick). */
static void wheel_schedule(struct fl_hb *hb, int32_t i, int64_t d)
{
    struct conn *c = &hb->c[i];
    int64_t tick = (d + hb->tick_us - 1) / hb->tick_us;
    int slot;

    wheel_unlink(hb, i);
    if (tick <= hb->cur_tick)
        tick = hb->cur_tick + 1;
    slot = (int)(tick & SLOT_MASK);
    c->deadline_us = d;
    c->deadline_tick = tick;
    c->slot = slot;
    c->prev = NIL;
    c->next = hb->head[slot];
    if (c->next != NIL)
        hb->c[c->next].prev = i;
    hb->head[slot] = i;
    hb->bits[slot >> 6] |= 1ull << (slot & 63);
}

/* The first tick after cur_tick whose slot holds anything, or -1. */
static int64_t wheel_next(const struct fl_hb *hb)
{
    int64_t t = hb->cur_tick + 1;
    unsigned k = 0;

    while (k < NSLOTS) {
        unsigned s = (unsigned)((t + k) & SLOT_MASK);
        uint64_t word = hb->bits[s >> 6] >> (s & 63);
        if (word)
            return t + k + (unsigned)__builtin_ctzll(word);
        k += 64 - (s & 63);
    }
    return -1;
}

static int arm_timer(struct fl_hb *hb)
{
    struct itimerspec its;
    int64_t t = wheel_next(hb);

    if (t == hb->armed_tick)
        return 0;
    memset(&its, 0, sizeof its);
    if (t >= 0) {
        int64_t at = t * hb->tick_us;
        its.it_value.tv_sec = (time_t)(at / 1000000);
        its.it_value.tv_nsec = (long)(at % 1000000) * 1000;
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
            its.it_value.tv_nsec = 1;
    }
    if (timerfd_settime(hb->tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
        return -errno;
    hb->armed_tick = t;
    return 0;
}

/* ---- connections ---------------------------------------------------- */

static int32_t lookup(const struct fl_hb *hb, int fd)
{
    if (fd < 0 || fd >= hb->fdmap_len)
        return NIL;
    return hb->fdmap[fd];
}

static void conn_free(struct fl_hb *hb, int32_t i)
{
    struct conn *c = &hb->c[i];

    if (c->fd >= 0 && c->fd < hb->fdmap_len && hb->fdmap[c->fd] == i)
        hb->fdmap[c->fd] = NIL;
    c->state = C_FREE;
    c->fd = -1;
    c->next = hb->free_head;
    hb->free_head = i;
    hb->nconn--;
}

/* Makes the deaths eventfd readable (once per non-empty queue). */
static void signal_deaths(struct fl_hb *hb)
{
    uint64_t one = 1;

    if (hb->signalled)
        return;
    if (write(hb->evfd, &one, sizeof one) == (ssize_t)sizeof one)
        hb->signalled = 1;
}

/* Ends watching connection i and queues its death for fl_hb_peek.  What
 * the engine saw (err: an errno or 0; seen: enum fl_seen bits) is turned
 * into the verdict by the one rule, fl_verdict_decide, with the socket's
 * TCP state - except for EBADF: the fd was closed (or its number reused)
 * behind the engine's back, so nothing is read from the number. */
static void conn_die(struct fl_hb *hb, int32_t i, int err, int seen, int method,
                     int64_t silent_us)
{
    struct conn *c = &hb->c[i];
    struct fl_verdict v;
    int st = -1;

    if (c->state != C_LIVE)
        return;
    memset(&v, 0, sizeof v);
    if (err != EBADF) {
        st = fl_tcp_state_seen(c->fd, &seen);
        if (st == -EBADF)
            err = EBADF;
        if (st < 0)
            st = -1;
    }
    fl_verdict_decide(err, st, seen, &v);
    if (v.status == FL_ALIVE) {     /* the engine gave up all the same */
        v.status = FL_ERROR;
        v.err = err ? err : EIO;
    }
    if (err == EBADF)
        v.flags |= FL_F_BEHIND_BACK;
    v.method = method;
    if (c->ping_sent_us)
        hb->st.misses++;        /* the last PING went unanswered */
    epoll_ctl(hb->epfd, EPOLL_CTL_DEL, c->fd, NULL); /* EBADF if closed: fine */
    wheel_unlink(hb, i);
    c->state = C_DEAD;
    c->death = v;
    c->silent_us = silent_us < 0 ? 0 : silent_us;
    c->detected_us = mono_us();
    c->next = NIL;
    if (hb->dead_tail != NIL)
        hb->c[hb->dead_tail].next = i;
    else
        hb->dead_head = i;
    hb->dead_tail = i;
    hb->queued++;
    hb->st.deaths++;
    signal_deaths(hb);
}

/* Sends what is left of a partly sent frame.  1 = clear, 0 = still pending,
 * <0 = -errno (dead). */
static int flush_tx(struct conn *c)
{
    ssize_t n;

    if (c->txlen == 0)
        return 1;
    n = send(c->fd, c->tx, c->txlen, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -errno;
    memmove(c->tx, c->tx + n, (size_t)(c->txlen - n));
    c->txlen = (uint8_t)(c->txlen - n);
    return c->txlen == 0;
}

/* Whether c->fd still names the socket that was added (not a later one
 * that got the same number after a close behind the engine's back). */
static int same_socket(const struct conn *c)
{
    uint64_t cookie, ino;

    return sock_identity(c->fd, &cookie, &ino) == 0
        && cookie == c->cookie && ino == c->ino;
}

/* Sends one frame; 1 = sent (or its rest queued), 0 = skipped, <0 = -errno.
 * Never writes into a socket other than the one added: -EBADF then. */
static int send_frame(struct conn *c, int type, unsigned seq)
{
    uint8_t f[FL_HB_HEADER_LEN];
    ssize_t n;
    int r;

    if (!same_socket(c))
        return -EBADF;
    r = flush_tx(c);
    if (r <= 0)
        return r;
    fl_hb_encode(type, seq, f, sizeof f);
    n = send(c->fd, f, sizeof f, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -errno;
    if ((size_t)n < sizeof f) {     /* keep the stream framed */
        memcpy(c->tx, f + n, sizeof f - (size_t)n);
        c->txlen = (uint8_t)(sizeof f - (size_t)n);
    }
    return 1;
}

static const int64_t rtt_bounds[FL_HB_RTT_BUCKETS] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
    250000, 500000, 1000000, 2500000, 10000000, -1
};

int64_t fl_hb_rtt_bound(int i)
{
    return i >= 0 && i < FL_HB_RTT_BUCKETS ? rtt_bounds[i] : -1;
}

/* Counts one RTT in the histogram; queues it too for FL_HB_RTT. */
static void push_rtt(struct fl_hb *hb, int32_t i, int64_t rtt)
{
    struct fl_hb_event *e;
    const struct conn *c = &hb->c[i];
    int b = 0;

    while (b < FL_HB_RTT_BUCKETS - 1 && rtt > rtt_bounds[b])
        b++;
    hb->st.rtt_hist[b]++;
    hb->st.rtt_sum_us += rtt;
    if (!(c->flags & FL_HB_RTT))
        return;
    if (hb->rtt_len == RTT_RING) {
        hb->st.rtt_dropped++;
        return;
    }
    e = &hb->rtt[(hb->rtt_head + hb->rtt_len) % RTT_RING];
    memset(e, 0, sizeof *e);
    e->kind = FL_HB_RTT_SAMPLE;
    e->fd = c->fd;
    e->token = ((uint64_t)c->gen << 32) | (uint32_t)i;
    e->detected_us = mono_us();
    e->verdict.status = FL_ALIVE;
    e->verdict.method = FL_M_HEARTBEAT;
    e->verdict.tcp_state = -1;
    e->rtt_us = rtt;
    hb->rtt_len++;
}

/* Whether the application stopped making progress for longer than this
 * registration allows (then the engine no longer vouches for this end). */
static int stalled(const struct fl_hb *hb, const struct conn *c, int64_t now)
{
    return c->progress_us
        && now - __atomic_load_n(&hb->progress_at_us, __ATOMIC_RELAXED) > c->progress_us;
}

/* One complete frame from connection i. */
static void on_frame(struct fl_hb *hb, int32_t i, const struct fl_hb_frame *f, int64_t now)
{
    struct conn *c = &hb->c[i];
    int r;

    hb->st.frames_received++;
    if (f->type == FL_HB_PING) {
        /* The peer pings too and we pinged within the last half interval:
         * both ends run the same schedule in step.  One PING per round is
         * enough (each end's PING is life for the other), so the next PING
         * of this end is pushed back by a random part of a quarter interval;
         * the end that comes first then keeps the other one quiet. */
        if (c->ping_sent_us && now - c->ping_sent_us < c->interval_us / 2)
            c->collided = 1;
        c->quiet_since_us = now;
        if (stalled(hb, c, now)) {
            hb->st.withheld++;
            return;
        }
        r = send_frame(c, FL_HB_PONG, f->seq);
        if (r < 0)
            conn_die(hb, i, -r, 0, FL_M_HEARTBEAT, now - c->last_heard_us);
        else if (r > 0)
            hb->st.pings_answered++;
    } else {
        hb->st.pongs_received++;
        if (c->ping_sent_us && f->seq == c->ping_seq) {
            /* The answer to our PING: the PING clock restarts at the time
             * the PING left, so one PING goes out per interval, not per
             * interval + round trip. */
            if (c->ping_due_us > c->quiet_since_us)
                c->quiet_since_us = c->ping_due_us;
            push_rtt(hb, i, now - c->ping_sent_us);
            c->ping_sent_us = 0;
        }
    }
}

/* Feeds received bytes through the strict parser: 0 or -errno. */
static int feed(struct fl_hb *hb, int32_t i, const uint8_t *p, size_t n, int64_t now)
{
    struct fl_hb_frame f;
    size_t off = 0;
    int r;

    while (off < n && hb->c[i].state == C_LIVE) {
        struct conn *c = &hb->c[i];
        if (c->rxlen == 0) {
            r = fl_hb_parse(p + off, n - off, &f);
            if (r < 0)
                return r;
            if (r == 0) {           /* n - off < a whole frame <= FRAME_MAX */
                memcpy(c->rx, p + off, n - off);
                c->rxlen = (uint8_t)(n - off);
                return 0;
            }
            off += (size_t)r;
        } else {
            size_t old = c->rxlen, take = n - off;
            if (take > sizeof c->rx - old)
                take = sizeof c->rx - old;
            memcpy(c->rx + old, p + off, take);
            r = fl_hb_parse(c->rx, old + take, &f);
            if (r < 0)
                return r;
            if (r == 0) {
                c->rxlen = (uint8_t)(old + take);
                off += take;
                continue;
            }
            off += (size_t)r - old;
            c->rxlen = 0;
        }
        on_frame(hb, i, &f, now);
    }
    return 0;
}

/* Dedicated connection readable (or hung up / in error): read it. */
static void on_readable(struct fl_hb *hb, int32_t i, int64_t now)
{
    uint8_t buf[RX_CHUNK];
    int k;

    /* The event is the added socket's; the fd number may name another one
     * now (closed behind our back while a dup kept the old one open): read
     * nothing that is not ours. */
    if (!same_socket(&hb->c[i])) {
        conn_die(hb, i, EBADF, 0, FL_M_HEARTBEAT, now - hb->c[i].last_heard_us);
        return;
    }
    for (k = 0; k < READS_PER_EVENT && hb->c[i].state == C_LIVE; k++) {
        struct conn *c = &hb->c[i];
        ssize_t n = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) {
            int r;
            c->last_heard_us = now;
            c->first_ping_us = 0;
            hb->st.bytes_received += (uint64_t)n;
            r = feed(hb, i, buf, (size_t)n, now);
            if (r < 0) {
                conn_die(hb, i, -r, FL_EV_DATA, FL_M_HEARTBEAT, 0);
                return;
            }
            if ((size_t)n < sizeof buf)
                return;
        } else if (n == 0) {
            if (c->rxlen)   /* EOF inside a frame */
                conn_die(hb, i, EPROTO, FL_EV_EOF, FL_M_HEARTBEAT, now - c->last_heard_us);
            else
                conn_die(hb, i, 0, FL_EV_EOF, FL_M_EPOLL, now - c->last_heard_us);
            return;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else {
            conn_die(hb, i, errno, 0, FL_M_EPOLL, now - c->last_heard_us);
            return;
        }
    }
}

/* Silence on a shared connection, from the kernel: ms since the last data
 * segment arrived (tcpi_last_data_recv), <0 = -errno.  *bytes gets
 * tcpi_bytes_received (Linux 4.1+), or UINT64_MAX where the kernel's
 * record is too short to have it. */
static int64_t shared_silence(int fd, int *state, uint64_t *bytes)
{
    struct fl_tcp_info ti;
    int len = fl_tcp_info(fd, &ti);

    if (len < 0)
        return len;
    *state = ti.tcpi_state;
    if ((size_t)len < offsetof(struct fl_tcp_info, tcpi_pmtu))
        return -ENOPROTOOPT;    /* kernel without tcpi_last_data_recv */
    *bytes = (size_t)len >= offsetof(struct fl_tcp_info, tcpi_segs_out)
        ? ti.tcpi_bytes_received : UINT64_MAX;
    return (int64_t)ti.tcpi_last_data_recv * 1000;
}

/* Moves last_heard to the kernel's "last data received", but only when
 * data did arrive since the last look: tcpi_last_data_recv counts whole
 * jiffies (1-10 ms), so on its own it can look a few ms younger than the
 * last byte really is, which is no news at all. */
static void shared_heard(struct conn *c, int64_t now, int64_t silence, uint64_t bytes)
{
    if (bytes != UINT64_MAX) {
        if (bytes == c->rx_bytes)
            return;
        c->rx_bytes = bytes;
    }
    if (now - silence > c->last_heard_us)
        c->last_heard_us = now - silence;
}

/* Shared connection: epoll says hang-up or error.  Nothing is read. */
static void on_shared_event(struct fl_hb *hb, int32_t i, uint32_t ev, int64_t now)
{
    struct conn *c = &hb->c[i];
    int st = -1;
    uint64_t bytes = 0;
    int64_t silent = shared_silence(c->fd, &st, &bytes);

    if (silent >= 0)
        shared_heard(c, now, silent, bytes);
    if (ev & (EPOLLHUP | EPOLLRDHUP | EPOLLERR))
        conn_die(hb, i, (ev & EPOLLERR) ? take_so_error(c->fd) : 0,
                 (int)(ev & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)), FL_M_EPOLL,
                 now - c->last_heard_us);
}

/* Lateness of a deadline: from its tick boundary to now. */
static void note_late(struct fl_hb *hb, const struct conn *c, int64_t now)
{
    int64_t late = now - c->deadline_tick * hb->tick_us;

    hb->st.timer_fires++;
    if (late > hb->st.late_max_us)
        hb->st.late_max_us = late;
    hb->st.late_sum_us += late;
    hb->st.late_count++;
}

/* Silence of connection i at its deadline; a shared one asks the kernel
 * (TCP_INFO).  -1 when the connection died on the way. */
static int64_t silence_at(struct fl_hb *hb, int32_t i, int64_t now)
{
    struct conn *c = &hb->c[i];
    int st = -1;
    uint64_t bytes = 0;
    int64_t s;

    if (!(c->flags & FL_HB_SHARED))
        return now - c->last_heard_us;
    s = shared_silence(c->fd, &st, &bytes);
    if (s < 0) {
        conn_die(hb, i, (int)-s, 0, FL_M_HEARTBEAT, now - c->last_heard_us);
        return -1;
    }
    /* life counts from fl_hb_add on: an old idle stretch is no miss */
    shared_heard(c, now, s, bytes);
    c->quiet_since_us = c->last_heard_us;   /* the kernel can't tell PONGs apart */
    return now - c->last_heard_us;
}

/* Sends connection i's PING; returns its next deadline, or -1 when the
 * connection died sending it. */
static int64_t ping_now(struct fl_hb *hb, int32_t i, int64_t now, int64_t silence)
{
    struct conn *c = &hb->c[i];
    int64_t limit = c->interval_us * c->misses, next;
    /* The PING is due at its deadline, not when the tick got to it: the
     * next one is due an interval later, so tick rounding and lateness do
     * not stretch the period. */
    int64_t due = now - c->deadline_us < c->interval_us ? c->deadline_us : now;
    int may = 1, r;

    if (c->flags & FL_HB_SHARED) {
        int queued = 0;
        may = ioctl(c->fd, SIOCOUTQ, &queued) == 0 && queued == 0;
    }
    r = may ? send_frame(c, FL_HB_PING, (uint16_t)(c->seq + 1)) : 0;
    if (r < 0) {
        conn_die(hb, i, -r, 0, FL_M_HEARTBEAT, silence);
        return -1;
    }
    if (r > 0) {
        if (c->ping_sent_us)
            hb->st.misses++;        /* the previous PING went unanswered */
        c->seq++;
        c->ping_seq = c->seq;
        c->ping_sent_us = now;
        c->ping_due_us = due;
        if (!c->first_ping_us)
            c->first_ping_us = now;
        hb->st.pings_sent++;
    } else {
        hb->st.pings_skipped++;
    }
    next = due + c->interval_us;
    if (c->collided && c->interval_us >= 4) {
        hb->rng ^= hb->rng << 13;
        hb->rng ^= hb->rng >> 7;
        hb->rng ^= hb->rng << 17;
        next += (int64_t)(hb->rng % (uint64_t)(c->interval_us / 4));
        c->collided = 0;
    }
    if (next > c->last_heard_us + limit)
        next = c->last_heard_us + limit;
    return next;
}

/* Whether a silent dedicated connection had a fair chance: a PING of ours
 * sent since the last byte heard, unanswered for a whole interval.  When this thread itself ran late (the
 * machine did not schedule it), the PING that should have gone out earlier
 * is sent now, and the peer gets an interval to answer it: a late engine
 * never blames the peer for its own lateness.  (Shared connections cannot
 * see PONGs and may skip PINGs; they are judged on silence alone.)
 * Returns 1 to judge now, 0 when rescheduled (or dead sending). */
static int fair_chance(struct fl_hb *hb, int32_t i, int64_t now, int64_t silence)
{
    struct conn *c = &hb->c[i];

    if ((c->flags & FL_HB_SHARED)
        || (c->first_ping_us && now - c->first_ping_us >= c->interval_us))
        return 1;
    if (!c->first_ping_us) {
        if (ping_now(hb, i, now, silence) < 0)
            return 0;                       /* died sending it */
        if (!c->first_ping_us)
            return 1;                       /* send queue full: not reading us */
    }
    hb->st.graced++;
    wheel_schedule(hb, i, c->first_ping_us + c->interval_us);
    return 0;
}

/* Connection i's deadline came due: heard recently -> reschedule; silent
 * for an interval -> PING; silent for misses intervals -> dead. */
static void on_deadline(struct fl_hb *hb, int32_t i, int64_t now)
{
    struct conn *c = &hb->c[i];
    int64_t silence, quiet, next;

    note_late(hb, c, now);
    silence = silence_at(hb, i, now);
    if (silence < 0)
        return;
    if (stalled(hb, c, now)) {
        /* The application is stuck: this end stops vouching for itself (no
         * PING; PINGs go unanswered) and stops judging the peer, whose
         * silence is then our doing.  Both clocks restart. */
        hb->st.withheld++;
        c->last_heard_us = c->quiet_since_us = now;
        c->ping_sent_us = c->first_ping_us = 0;
        wheel_schedule(hb, i, now + c->interval_us);
        return;
    }
    if (silence >= c->interval_us * c->misses) {
        if (!fair_chance(hb, i, now, silence))
            return;
        conn_die(hb, i, ETIMEDOUT, FL_EV_EXPIRED, FL_M_HEARTBEAT, silence);
        return;
    }
    quiet = now - c->quiet_since_us;
    if (quiet >= c->interval_us) {
        next = ping_now(hb, i, now, silence);
        if (next < 0)
            return;
    } else {
        next = now - quiet + c->interval_us;
    }
    wheel_schedule(hb, i, next);
}

/* Runs every deadline up to now. */
static void run_timers(struct fl_hb *hb, int64_t now)
{
    int64_t now_tick = now / hb->tick_us, t, from = hb->cur_tick + 1;

    if (now_tick < from)
        return;
    if (now_tick - from >= (int64_t)NSLOTS)
        from = now_tick - NSLOTS + 1;   /* each slot once */
    hb->cur_tick = now_tick;            /* reschedules land after now */
    for (t = from; t <= now_tick; t++) {
        unsigned s = (unsigned)(t & SLOT_MASK);
        int32_t i, nx;
        if (!(hb->bits[s >> 6] & (1ull << (s & 63))))
            continue;
        for (i = hb->head[s]; i != NIL; i = nx) {
            nx = hb->c[i].next;
            if (hb->c[i].deadline_tick <= now_tick)
                on_deadline(hb, i, now);
        }
    }
}

/* ---- the engine thread --------------------------------------------- */

/* Handles one epoll event (the mutex is held). */
static void on_event(struct fl_hb *hb, const struct epoll_event *ev, int64_t now)
{
    uint64_t tag = ev->data.u64, junk;
    int32_t i;

    if (tag == TIMER_TAG || tag == WAKE_TAG) {
        if (read(tag == TIMER_TAG ? hb->tfd : hb->wakefd, &junk, sizeof junk) < 0) {
            /* EAGAIN: already read */
        }
        if (tag == TIMER_TAG)
            hb->armed_tick = -2;    /* fired: re-arm next time */
        return;
    }
    i = (int32_t)(tag & 0xffffffffu);
    if (i < 0 || i >= hb->cap || hb->c[i].state != C_LIVE
        || hb->c[i].gen != (uint32_t)(tag >> 32))
        return;                     /* removed (and maybe re-added) meanwhile */
    if (hb->c[i].flags & FL_HB_SHARED)
        on_shared_event(hb, i, ev->events, now);
    else
        on_readable(hb, i, now);
}

/* Coalescing: when deadlines are due within the next tick anyway, sleep to
 * that tick and harvest everything that became ready meanwhile in one
 * pass, instead of waking for each PONG as it trickles in.  Costs at most
 * one tick of latency, and only while the engine is busy.  The sleep
 * watches wakefd, so fl_hb_close never waits for it.  Returns 1 when it
 * slept (epoll_wait then only looks). */
static int coalesce(struct fl_hb *hb)
{
    int64_t at, now = mono_us();
    struct pollfd pfd;
    struct timespec ts;

    if (hb->armed_tick < 0)
        return 0;
    at = hb->armed_tick * hb->tick_us;
    if (at - now > hb->tick_us)
        return 0;
    hb->st.coalesced++;
    if (at <= now)
        return 1;
    ts.tv_sec = (time_t)((at - now) / 1000000);
    ts.tv_nsec = (long)((at - now) % 1000000) * 1000;
    pfd.fd = hb->wakefd;
    pfd.events = POLLIN;
    pthread_mutex_unlock(&hb->mu);
    (void)ppoll(&pfd, 1, &ts, NULL);
    pthread_mutex_lock(&hb->mu);
    return 1;
}

static void *engine_thread(void *arg)
{
    struct fl_hb *hb = arg;
    struct epoll_event evs[MAX_EVENTS];
    int passes = 0, full = 0;

    pthread_mutex_lock(&hb->mu);
    while (!hb->stop) {
        int r, k, err, wait_ms = -1;
        int64_t now;

        (void)arm_timer(hb);
        if (!full && coalesce(hb))
            wait_ms = 0;
        else if (full)
            wait_ms = 0;
        if (hb->stop)
            break;
        pthread_mutex_unlock(&hb->mu);
        r = epoll_wait(hb->epfd, evs, MAX_EVENTS, wait_ms);
        err = errno;
        pthread_mutex_lock(&hb->mu);
        if (r < 0) {
            if (err != EINTR)       /* EBADF/EINVAL: cannot happen while we own epfd */
                hb->stop = 1;
            continue;
        }
        hb->st.wakeups++;
        now = mono_us();
        for (k = 0; k < r; k++)
            on_event(hb, &evs[k], now);
        run_timers(hb, now);
        full = r == MAX_EVENTS;
        passes = full ? passes + 1 : 0;
        if (passes >= MAX_PASSES) {
            full = 0;               /* let the timers breathe */
            passes = 0;
        }
    }
    pthread_mutex_unlock(&hb->mu);
    return NULL;
}

/* ---- collecting ----------------------------------------------------- */

/* 0, or the error every call returns: -FL_E_FORKED in a forked child (the
 * thread and the queue belong to the parent). */
static int unusable(const struct fl_hb *hb)
{
    if (!hb)
        return -EINVAL;
    if (hb->forkgen != fl_fork_generation())
        return -FL_E_FORKED;
    return 0;
}

/* Takes the engine's lock unless the engine is closed: 0 with hb->mu held,
 * or -ESHUTDOWN with it released. */
static int lock_open(struct fl_hb *hb)
{
    pthread_mutex_lock(&hb->mu);
    if (hb->closed) {
        pthread_mutex_unlock(&hb->mu);
        return -ESHUTDOWN;
    }
    return 0;
}

int fl_hb_ready(struct fl_hb *hb, int timeout_ms)
{
    struct pollfd pfd;
    int r = unusable(hb);

    if (r < 0)
        return r;
    if (timeout_ms < 0)
        return -EINVAL;
    pfd.fd = hb->evfd;
    pfd.events = POLLIN;
    r = poll(&pfd, 1, timeout_ms);
    if (r < 0)
        return -errno;
    if (__atomic_load_n(&hb->closed, __ATOMIC_ACQUIRE))
        return -ESHUTDOWN;
    return r > 0;
}

int fl_hb_peek(struct fl_hb *hb, struct fl_hb_event *out, int max, int *consumed)
{
    int n = 0, k = 0, r = unusable(hb);
    int32_t i;

    if (r < 0)
        return r;
    if (max < 0 || (max > 0 && !out) || !consumed)
        return -EINVAL;
    if ((r = lock_open(hb)) < 0)
        return r;
    for (i = hb->dead_head; i != NIL && n < max; i = hb->c[i].next, k++) {
        const struct conn *c = &hb->c[i];
        struct fl_hb_event *e;
        if (c->state != C_DEAD)
            continue;               /* removed before it was collected */
        e = &out[n++];
        memset(e, 0, sizeof *e);
        e->kind = FL_HB_DEATH;
        e->fd = c->fd;
        e->token = ((uint64_t)c->gen << 32) | (uint32_t)i;
        e->verdict = c->death;
        e->silent_us = c->silent_us;
        e->detected_us = c->detected_us;
    }
    pthread_mutex_unlock(&hb->mu);
    *consumed = k;
    return n;
}

int fl_hb_commit(struct fl_hb *hb, int consumed)
{
    int k, r = unusable(hb);
    uint64_t junk;

    if (r < 0)
        return r;
    if ((r = lock_open(hb)) < 0)
        return r;
    for (k = 0; k < consumed && hb->dead_head != NIL; k++) {
        int32_t i = hb->dead_head;
        hb->dead_head = hb->c[i].next;
        if (hb->dead_head == NIL)
            hb->dead_tail = NIL;
        hb->queued--;
        conn_free(hb, i);
    }
    if (hb->dead_head == NIL && hb->signalled) {
        if (read(hb->evfd, &junk, sizeof junk) == (ssize_t)sizeof junk)
            hb->signalled = 0;
    }
    pthread_mutex_unlock(&hb->mu);
    return k;
}

int fl_hb_rtt(struct fl_hb *hb, struct fl_hb_event *out, int max)
{
    int n = 0, r = unusable(hb);

    if (r < 0)
        return r;
    if (max < 0 || (max > 0 && !out))
        return -EINVAL;
    pthread_mutex_lock(&hb->mu);
    while (n < max && hb->rtt_len) {
        out[n++] = hb->rtt[hb->rtt_head];
        hb->rtt_head = (hb->rtt_head + 1) % RTT_RING;
        hb->rtt_len--;
    }
    pthread_mutex_unlock(&hb->mu);
    return n;
}

void fl_hb_progress(struct fl_hb *hb)
{
    if (hb)
        __atomic_store_n(&hb->progress_at_us, mono_us(), __ATOMIC_RELAXED);
}

/* ---- lifecycle ------------------------------------------------------ */

static int grow_conns(struct fl_hb *hb, int want)
{
    struct conn *nc;
    int i;

    if (want <= hb->cap)
        return 0;
    if (want > (1 << 24))
        return -ENOSPC;
    nc = realloc(hb->c, (size_t)want * sizeof *nc);
    if (!nc)
        return -ENOMEM;
    for (i = want - 1; i >= hb->cap; i--) {
        memset(&nc[i], 0, sizeof nc[i]);
        nc[i].fd = -1;
        nc[i].slot = -1;
        nc[i].state = C_FREE;
        nc[i].prev = NIL;
        nc[i].next = hb->free_head;
        hb->free_head = i;
    }
    hb->c = nc;
    hb->cap = want;
    return 0;
}

static int grow_fdmap(struct fl_hb *hb, int fd)
{
    int *nm, want = hb->fdmap_len ? hb->fdmap_len : 1024, i;

    if (fd < hb->fdmap_len)
        return 0;
    while (want <= fd)
        want = want > INT_MAX / 2 ? INT_MAX : want * 2;
    nm = realloc(hb->fdmap, (size_t)want * sizeof *nm);
    if (!nm)
        return -ENOMEM;
    for (i = hb->fdmap_len; i < want; i++)
        nm[i] = NIL;
    hb->fdmap = nm;
    hb->fdmap_len = want;
    return 0;
}

/* The thread starts with every signal blocked: signals belong to the
 * application's threads (Python runs its handlers in the main thread). */
static int start_thread(struct fl_hb *hb)
{
    sigset_t all, old;
    int r;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    r = pthread_create(&hb->thread, NULL, engine_thread, hb);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0)
        return -r;
    hb->running = 1;
    return 0;
}

/* Creates the kernel objects: epoll set, timerfd, the two eventfds. */
static int open_fds(struct fl_hb *hb)
{
    struct epoll_event ev;

    hb->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (hb->epfd < 0)
        return -errno;
    hb->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (hb->tfd < 0)
        return -errno;
    hb->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (hb->evfd < 0)
        return -errno;
    hb->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (hb->wakefd < 0)
        return -errno;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = TIMER_TAG;
    if (epoll_ctl(hb->epfd, EPOLL_CTL_ADD, hb->tfd, &ev) < 0)
        return -errno;
    ev.data.u64 = WAKE_TAG;
    if (epoll_ctl(hb->epfd, EPOLL_CTL_ADD, hb->wakefd, &ev) < 0)
        return -errno;
    return 0;
}

int fl_hb_new(int tick_ms, int capacity, struct fl_hb **out)
{
    struct fl_hb *hb;
    unsigned s;
    int r;

    if (!out || tick_ms < 1 || tick_ms > 1000 || capacity < 0 || capacity > (1 << 24))
        return -EINVAL;
    *out = NULL;
    hb = calloc(1, sizeof *hb);
    if (!hb)
        return -ENOMEM;
    hb->epfd = hb->tfd = hb->evfd = hb->wakefd = -1;
    hb->forkgen = fl_fork_generation();
    hb->free_head = hb->dead_head = hb->dead_tail = NIL;
    for (s = 0; s < NSLOTS; s++)
        hb->head[s] = NIL;
    hb->tick_us = (int64_t)tick_ms * 1000;
    hb->st.tick_us = hb->tick_us;
    hb->cur_tick = mono_us() / hb->tick_us;
    hb->armed_tick = -2;
    hb->progress_at_us = mono_us();
    hb->rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)mono_us() ^ ((uint64_t)getpid() << 32);
    pthread_mutex_init(&hb->mu, NULL);
    r = open_fds(hb);
    if (r == 0)
        r = grow_conns(hb, capacity <= 0 ? 64 : capacity > PREALLOC_MAX ? PREALLOC_MAX : capacity);
    if (r == 0)
        r = start_thread(hb);
    if (r < 0) {
        fl_hb_free(hb);
        return r;
    }
    *out = hb;
    return 0;
}

int fl_hb_close(struct fl_hb *hb)
{
    uint64_t one = 1;
    int r = unusable(hb);

    if (r < 0)
        return r;
    pthread_mutex_lock(&hb->mu);
    if (hb->closed) {
        pthread_mutex_unlock(&hb->mu);
        return 0;
    }
    hb->stop = 1;
    __atomic_store_n(&hb->closed, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&hb->mu);
    if (write(hb->wakefd, &one, sizeof one) < 0) {
        /* cannot fail: an eventfd far below its maximum */
    }
    if (hb->running) {
        pthread_join(hb->thread, NULL);
        hb->running = 0;
    }
    /* readable for good: every fl_hb_ready returns -ESHUTDOWN at once */
    if (write(hb->evfd, &one, sizeof one) < 0) {
        /* as above */
    }
    return 0;
}

void fl_hb_free(struct fl_hb *hb)
{
    if (!hb)
        return;
    if (hb->forkgen == fl_fork_generation()) {
        if (hb->running)
            (void)fl_hb_close(hb);
        pthread_mutex_destroy(&hb->mu);
    }
    /* A forked child only drops its copies: the parent's thread, epoll set
     * and mutex are left alone. */
    if (hb->epfd >= 0)
        close(hb->epfd);
    if (hb->tfd >= 0)
        close(hb->tfd);
    if (hb->evfd >= 0)
        close(hb->evfd);
    if (hb->wakefd >= 0)
        close(hb->wakefd);
    free(hb->c);
    free(hb->fdmap);
    free(hb);
}

int fl_hb_fileno(struct fl_hb *hb)
{
    int r = unusable(hb);

    return r < 0 ? r : hb->evfd;
}

/* Checks the socket fl_hb_add was given: connected TCP, its identity, and
 * takes its fd number over from an old registration whose socket was
 * closed behind the engine's back.  0 or -errno. */
static int adopt_fd(struct fl_hb *hb, int fd, uint64_t *cookie, uint64_t *ino)
{
    int32_t i;
    int r, st = fl_tcp_state(fd);

    if (st < 0)
        return st;
    if (st == TCP_LISTEN)
        return -EOPNOTSUPP;
    if (st == TCP_SYN_SENT || st == TCP_CLOSE)
        return -ENOTCONN;
    r = sock_identity(fd, cookie, ino);
    if (r < 0)
        return r;
    i = lookup(hb, fd);
    if (i == NIL)
        return 0;
    if (hb->c[i].state == C_LIVE) {
        struct conn *old = &hb->c[i];
        if (same_socket(old))
            return -EEXIST;
        /* Closed behind the engine's back and the number reused: the old
         * registration dies (INVALID, EBADF; its own token tells the
         * caller which socket that was) and the new socket takes the
         * number. */
        conn_die(hb, i, EBADF, 0, FL_M_HEARTBEAT, mono_us() - old->last_heard_us);
    }
    /* A death not yet collected keeps its record; conn_free() of it leaves
     * the fd map alone once the number is the new socket's. */
    hb->fdmap[fd] = NIL;
    return 0;
}

/* Fills a free record for a new registration and schedules it. */
static void init_conn(struct fl_hb *hb, int32_t i, int fd, int interval_ms, int misses,
                      int flags, int progress_ms)
{
    struct conn *c = &hb->c[i];
    int64_t now = mono_us();

    hb->free_head = c->next;
    c->gen++;
    c->fd = fd;
    c->flags = flags;
    c->state = C_LIVE;
    c->misses = misses;
    c->progress_us = (int64_t)progress_ms * 1000;
    c->next = c->prev = NIL;
    c->slot = -1;
    c->interval_us = (int64_t)interval_ms * 1000;
    c->last_heard_us = c->quiet_since_us = now;
    c->ping_sent_us = c->ping_due_us = c->first_ping_us = 0;
    c->seq = c->ping_seq = 0;
    c->rxlen = c->txlen = 0;
    c->collided = 0;
    hb->fdmap[fd] = i;
    hb->nconn++;
    wheel_schedule(hb, i, now + c->interval_us);
    (void)arm_timer(hb);    /* an earlier deadline wakes the thread (timerfd) */
}

/* fl_hb_add with the mutex held. */
static int add_locked(struct fl_hb *hb, int fd, int interval_ms, int misses, int flags,
                      int progress_ms, uint64_t *token)
{
    struct epoll_event ev;
    struct conn *c;
    int32_t i;
    int r, st;
    uint64_t bytes = UINT64_MAX, cookie = 0, ino = 0;

    r = adopt_fd(hb, fd, &cookie, &ino);
    if (r < 0)
        return r;
    if (flags & FL_HB_SHARED) {
        /* shared mode lives on tcpi_last_data_recv: refuse now, not at the
         * first deadline, where TCP_INFO is short (qemu-user: 4 bytes) */
        int64_t s = shared_silence(fd, &st, &bytes);
        if (s < 0)
            return (int)s;
    }
    r = grow_fdmap(hb, fd);
    if (r == 0 && hb->free_head == NIL)
        r = grow_conns(hb, hb->cap > (1 << 23) ? (1 << 24) : hb->cap * 2);
    if (r < 0)
        return r;
    if (hb->free_head == NIL)
        return -ENOSPC;
    i = hb->free_head;
    c = &hb->c[i];
    memset(&ev, 0, sizeof ev);
    ev.events = (flags & FL_HB_SHARED) ? EPOLLRDHUP : (EPOLLIN | EPOLLRDHUP);
    ev.data.u64 = ((uint64_t)(c->gen + 1) << 32) | (uint32_t)i;
    if (epoll_ctl(hb->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -errno;
    c->cookie = cookie;
    c->ino = ino;
    c->rx_bytes = bytes;     /* shared: what the kernel had received so far */
    init_conn(hb, i, fd, interval_ms, misses, flags, progress_ms);
    *token = ev.data.u64;
    return 0;
}

int fl_hb_add(struct fl_hb *hb, int fd, int interval_ms, int misses, int flags,
              int progress_ms, uint64_t *token)
{
    int r = unusable(hb);

    if (r < 0)
        return r;
    if (interval_ms < 1 || misses < 2 || misses > 1000 || progress_ms < 0 || !token
        || (flags & ~(FL_HB_SHARED | FL_HB_RTT)))
        return -EINVAL;
    if (fd < 0)
        return -EBADF;
    if ((r = lock_open(hb)) < 0)
        return r;
    r = add_locked(hb, fd, interval_ms, misses, flags, progress_ms, token);
    pthread_mutex_unlock(&hb->mu);
    return r;
}

int fl_hb_remove(struct fl_hb *hb, uint64_t token)
{
    int32_t i = (int32_t)(token & 0xffffffffu);
    int r = unusable(hb);
    struct conn *c;

    if (r < 0)
        return r;
    if ((r = lock_open(hb)) < 0)
        return r;
    c = i >= 0 && i < hb->cap ? &hb->c[i] : NULL;
    if (!c || c->gen != (uint32_t)(token >> 32)
        || (c->state != C_LIVE && c->state != C_DEAD)) {
        r = -ENOENT;
    } else if (c->state == C_LIVE) {
        epoll_ctl(hb->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        wheel_unlink(hb, i);
        conn_free(hb, i);
    } else {
        /* a death not yet collected: fl_hb_commit drops it, unreported */
        c->state = C_GONE;
        if (hb->fdmap[c->fd] == i)
            hb->fdmap[c->fd] = NIL;
    }
    pthread_mutex_unlock(&hb->mu);
    return r;
}

int fl_hb_get_stats(struct fl_hb *hb, struct fl_hb_stats *out)
{
    int r = unusable(hb);

    if (r < 0)
        return r;
    pthread_mutex_lock(&hb->mu);
    *out = hb->st;
    out->conns = hb->nconn;
    out->queued = hb->queued;
    pthread_mutex_unlock(&hb->mu);
    return 0;
}

int fl_hb_reset_stats(struct fl_hb *hb)
{
    int r = unusable(hb);

    if (r < 0)
        return r;
    pthread_mutex_lock(&hb->mu);
    memset(&hb->st, 0, sizeof hb->st);
    hb->st.tick_us = hb->tick_us;
    pthread_mutex_unlock(&hb->mu);
    return 0;
}
