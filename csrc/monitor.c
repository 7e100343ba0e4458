/*
 * fastlive monitor: deaths as epoll events.
 *
 * Trigger mode: level-triggered with EPOLLONESHOT.  Level-triggered because
 * a death is a state, not an edge: a socket that is already hung up when it
 * is added, or that dies while an earlier event is still unread, is
 * reported all the same (ep_insert and every epoll_wait re-poll the
 * socket).  EPOLLONESHOT because a dead socket stays "ready" forever: plain
 * level-triggered would hand it back on every wait (O(dead) per call) and
 * edge-triggered would hand it back again on every later wakeup of the
 * socket (an ACK, the RST after the FIN).  With ONESHOT the kernel disarms
 * the registration after its first event; the monitor then removes it.
 *
 * Tokens and reuse: epoll_event.data holds slot | generation << 32.  The
 * generation of a slot changes each time it is reused, so an event queued
 * for a registration that has since been removed is recognised and dropped.
 * epoll keys a registration by (fd number, open file): when the last fd of
 * a socket is closed the kernel drops it silently, and the fd number may
 * come back as another socket.  The rule: the monitor stores each socket's
 * SO_COOKIE (a per-socket id the kernel never reuses while it runs; the
 * socket's inode is the fallback) and compares it before it acts on an fd
 * number - on add() of a number it holds, on remove(), on every event, and
 * for all registrations in fl_monitor_verify().  A mismatch, or EBADF, is
 * reported once as a death with FL_F_BEHIND_BACK (status CLOSED, err EBADF).
 */
#include "fl_prelude.h"
#include "sockutil.h"
#include "fl_core.h"
#include "fl_monitor.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <stdio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>

#ifndef EPOLLRDHUP
#define EPOLLRDHUP 0x2000
#endif

#define WAKE_TOKEN UINT64_MAX
#define INTEREST (EPOLLRDHUP | EPOLLERR | EPOLLHUP | EPOLLONESHOT)

struct reg {
    int fd;
    uint32_t gen;          /* >= 1 while live; bumped when freed */
    int live;
    int armed;
    uint64_t cookie;       /* SO_COOKIE, 0 if the kernel has none */
    uint64_t ino;          /* socket inode (fallback identity) */
};

struct fl_monitor {
    pthread_mutex_t lock;  /* the tables; never held across epoll_wait */
    int epfd;
    int wakefd;            /* eventfd in the set: pending deaths wake it */
    int wake_set;
    int max_events;
    struct epoll_event *events;
    struct reg *regs;
    int nregs, cap;        /* slots used / allocated */
    int *freelist;
    int nfree;
    int live;
    int *byfd;             /* fd -> slot + 1, 0 for none */
    int byfd_cap;
    struct fl_death *pending;
    int npending, pending_cap;
};

static uint64_t token_of(int slot, uint32_t gen)
{
    return (uint64_t)gen << 32 | (uint32_t)slot;
}

int fl_socket_inode(int fd, uint64_t *ino)
{
    return sock_inode(fd, ino);
}

static int same_socket(const struct reg *r)
{
    uint64_t cookie, ino;

    if (sock_identity(r->fd, &cookie, &ino) < 0)
        return 0;
    return cookie == r->cookie && ino == r->ino;
}

int fl_monitor_new(int max_events, struct fl_monitor **out)
{
    struct fl_monitor *m;
    struct epoll_event ev;
    int err;

    *out = NULL;
    if (max_events < 1 || max_events > 65536)
        return -EINVAL;
    m = calloc(1, sizeof *m);
    if (!m)
        return -ENOMEM;
    m->epfd = m->wakefd = -1;
    m->max_events = max_events;
    pthread_mutex_init(&m->lock, NULL);
    m->events = calloc((size_t)max_events, sizeof *m->events);
    if (!m->events) {
        err = ENOMEM;
        goto fail;
    }
    m->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (m->epfd < 0) {
        err = errno;
        goto fail;
    }
    m->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (m->wakefd < 0) {
        err = errno;
        goto fail;
    }
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = WAKE_TOKEN;
    if (epoll_ctl(m->epfd, EPOLL_CTL_ADD, m->wakefd, &ev) < 0) {
        err = errno;
        goto fail;
    }
    *out = m;
    return 0;
fail:
    fl_monitor_free(m);
    return -err;
}

void fl_monitor_free(struct fl_monitor *m)
{
    if (!m)
        return;
    if (m->epfd >= 0)
        close(m->epfd);
    if (m->wakefd >= 0)
        close(m->wakefd);
    free(m->events);
    free(m->regs);
    free(m->freelist);
    free(m->byfd);
    free(m->pending);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

int fl_monitor_fileno(const struct fl_monitor *m)
{
    return m->epfd;
}

int fl_monitor_count(struct fl_monitor *m)
{
    int n;

    pthread_mutex_lock(&m->lock);
    n = m->live;
    pthread_mutex_unlock(&m->lock);
    return n;
}

uint64_t fl_monitor_token_of(struct fl_monitor *m, int fd)
{
    uint64_t tok = 0;
    int s;

    pthread_mutex_lock(&m->lock);
    if (fd >= 0 && fd < m->byfd_cap && (s = m->byfd[fd]))
        tok = token_of(s - 1, m->regs[s - 1].gen);
    pthread_mutex_unlock(&m->lock);
    return tok;
}

static void wake_locked(struct fl_monitor *m)
{
    if (!m->wake_set) {
        uint64_t one = 1;
        if (write(m->wakefd, &one, sizeof one) == (ssize_t)sizeof one)
            m->wake_set = 1;
    }
}

void fl_monitor_wake(struct fl_monitor *m)
{
    pthread_mutex_lock(&m->lock);
    wake_locked(m);
    pthread_mutex_unlock(&m->lock);
}

static void free_slot(struct fl_monitor *m, int slot)
{
    struct reg *r = &m->regs[slot];

    if (r->fd >= 0 && r->fd < m->byfd_cap && m->byfd[r->fd] == slot + 1)
        m->byfd[r->fd] = 0;
    r->live = 0;
    r->gen++;
    if (r->gen == 0)
        r->gen = 1;
    m->freelist[m->nfree++] = slot;   /* freelist has room for every slot */
    m->live--;
}

static int queue_pending(struct fl_monitor *m, const struct fl_death *d)
{
    if (m->npending == m->pending_cap) {
        int cap = m->pending_cap ? 2 * m->pending_cap : 16;
        void *p = realloc(m->pending, (size_t)cap * sizeof *m->pending);
        if (!p)
            return -ENOMEM;
        m->pending = p;
        m->pending_cap = cap;
    }
    m->pending[m->npending++] = *d;
    wake_locked(m);
    return 0;
}

/* A registration whose fd number no longer names its socket. */
static int behind_back(struct fl_monitor *m, int slot, int events)
{
    struct reg *r = &m->regs[slot];
    struct fl_death d;

    d.token = token_of(slot, r->gen);
    d.fd = r->fd;
    d.status = FL_CLOSED;
    d.err = EBADF;
    d.method = FL_M_EPOLL;
    d.flags = FL_F_BEHIND_BACK | (r->armed ? FL_F_ARMED : 0);
    d.events = events;
    free_slot(m, slot);
    return queue_pending(m, &d);
}

static int grow_slots(struct fl_monitor *m)
{
    int cap = m->cap ? 2 * m->cap : 64;
    void *p;

    p = realloc(m->regs, (size_t)cap * sizeof *m->regs);
    if (!p)
        return -ENOMEM;
    m->regs = p;
    p = realloc(m->freelist, (size_t)cap * sizeof *m->freelist);
    if (!p)
        return -ENOMEM;
    m->freelist = p;
    m->cap = cap;
    return 0;
}

static int grow_byfd(struct fl_monitor *m, int fd)
{
    int cap = m->byfd_cap ? m->byfd_cap : 1024;
    int *p;

    while (cap <= fd) {
        if (cap > 0x3fffffff)
            return -ENOMEM;
        cap *= 2;
    }
    p = realloc(m->byfd, (size_t)cap * sizeof *p);
    if (!p)
        return -ENOMEM;
    memset(p + m->byfd_cap, 0, (size_t)(cap - m->byfd_cap) * sizeof *p);
    m->byfd = p;
    m->byfd_cap = cap;
    return 0;
}

static int add_locked(struct fl_monitor *m, int fd, int armed, uint64_t cookie,
                      uint64_t ino, uint64_t *token);

int fl_monitor_add(struct fl_monitor *m, int fd, int armed, uint64_t *token)
{
    uint64_t cookie, ino;
    int st, rc;

    *token = 0;
    if (fd < 0)
        return -EBADF;
    if ((rc = sock_identity(fd, &cookie, &ino)) < 0)
        return rc;
    {
        struct fl_verdict v;
        int seen = 0;

        st = fl_tcp_state_seen(fd, &seen);
        if (st < 0)
            return st;
        v.flags = 0;
        fl_verdict_decide(0, st, seen, &v);
        if (v.status == FL_INVALID)     /* listening, connecting, never connected */
            return -v.err;
    }
    pthread_mutex_lock(&m->lock);
    rc = add_locked(m, fd, armed, cookie, ino, token);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static int add_locked(struct fl_monitor *m, int fd, int armed, uint64_t cookie,
                      uint64_t ino, uint64_t *token)
{
    struct epoll_event ev;
    struct reg *r;
    int slot, rc;

    if (fd >= m->byfd_cap && (rc = grow_byfd(m, fd)) < 0)
        return rc;
    if (m->byfd[fd]) {
        slot = m->byfd[fd] - 1;
        r = &m->regs[slot];
        if (r->cookie == cookie && r->ino == ino) {
            r->armed |= armed;
            *token = token_of(slot, r->gen);
            return 0;
        }
        if ((rc = behind_back(m, slot, 0)) < 0)
            return rc;
    }
    if (m->nfree) {
        slot = m->freelist[--m->nfree];
    } else {
        if (m->nregs == m->cap && (rc = grow_slots(m)) < 0)
            return rc;
        slot = m->nregs++;
        m->regs[slot].gen = 1;
    }
    r = &m->regs[slot];
    r->fd = fd;
    r->live = 1;
    r->armed = armed;
    r->cookie = cookie;
    r->ino = ino;
    memset(&ev, 0, sizeof ev);
    ev.events = INTEREST;
    ev.data.u64 = token_of(slot, r->gen);
    rc = epoll_ctl(m->epfd, EPOLL_CTL_ADD, fd, &ev);
    if (rc < 0 && errno == EEXIST)       /* same open file, lost track */
        rc = epoll_ctl(m->epfd, EPOLL_CTL_MOD, fd, &ev);
    if (rc < 0) {
        rc = -errno;
        r->live = 0;
        m->freelist[m->nfree++] = slot;
        return rc;
    }
    m->live++;
    m->byfd[fd] = slot + 1;
    *token = ev.data.u64;
    return 1;
}

static struct reg *lookup(struct fl_monitor *m, uint64_t token, int *slot)
{
    uint32_t s = (uint32_t)token, gen = (uint32_t)(token >> 32);

    if (token == WAKE_TOKEN || s >= (uint32_t)m->nregs)
        return NULL;
    if (!m->regs[s].live || m->regs[s].gen != gen)
        return NULL;
    *slot = (int)s;
    return &m->regs[s];
}

int fl_monitor_remove(struct fl_monitor *m, uint64_t token)
{
    struct reg *r;
    int slot;

    pthread_mutex_lock(&m->lock);
    r = lookup(m, token, &slot);
    if (!r) {
        pthread_mutex_unlock(&m->lock);
        return -ENOENT;
    }
    /* Only a number that still names this socket may be deleted: another
     * socket's registration could sit under the same number.  EBADF and
     * ENOENT mean the kernel already dropped it. */
    if (same_socket(r))
        epoll_ctl(m->epfd, EPOLL_CTL_DEL, r->fd, NULL);
    free_slot(m, slot);
    pthread_mutex_unlock(&m->lock);
    return 0;
}

int fl_monitor_verify(struct fl_monitor *m)
{
    int i, found = 0, rc = 0;

    pthread_mutex_lock(&m->lock);
    for (i = 0; i < m->nregs; i++) {
        if (!m->regs[i].live || same_socket(&m->regs[i]))
            continue;
        if ((rc = behind_back(m, i, 0)) < 0)
            break;
        found++;
    }
    pthread_mutex_unlock(&m->lock);
    return rc < 0 ? rc : found;
}


/* Fills *d for an event on a live registration whose identity holds:
 * the pending error (EPOLLERR), the state, the event bits, decided by the
 * one rule (fl_verdict_decide). */
static void classify(const struct reg *r, uint32_t events, struct fl_death *d)
{
    struct fl_verdict v;
    int err = (events & EPOLLERR) ? take_so_error(r->fd) : 0;
    int st = fl_tcp_state(r->fd);

    v.flags = r->armed ? FL_F_ARMED : 0;
    v.method = FL_M_EPOLL;
    if (st < 0)
        fl_verdict_decide(-st, -1, 0, &v);
    else
        fl_verdict_decide(err, st, (int)(events & 0xffff), &v);
    if (err == ETIMEDOUT && r->armed) {
        /* Which timer gave up: keepalive counts its probes in
         * tcpi_probes; the retransmission timer (bounded by
         * TCP_USER_TIMEOUT) in tcpi_retransmits / tcpi_backoff. */
        struct fl_tcp_info ti;
        int len = fl_tcp_info(r->fd, &ti);
        if (len >= (int)offsetof(struct fl_tcp_info, tcpi_probes) + 1)
            v.method = ti.tcpi_probes ? FL_M_KEEPALIVE : FL_M_USER_TIMEOUT;
    }
    d->status = v.status;
    d->err = v.err;
    d->method = v.method;
    d->flags = v.flags;
}


/* Moves pending deaths into out; clears the wake signal once none are
 * left.  Under the lock. */
static int drain_pending(struct fl_monitor *m, struct fl_death *out, int room)
{
    int k = m->npending < room ? m->npending : room;

    if (k > 0) {
        memcpy(out, m->pending, (size_t)k * sizeof *out);
        memmove(m->pending, m->pending + k,
                (size_t)(m->npending - k) * sizeof *out);
        m->npending -= k;
    }
    if (!m->npending && m->wake_set) {
        uint64_t v;
        if (read(m->wakefd, &v, sizeof v) == (ssize_t)sizeof v || errno == EAGAIN)
            m->wake_set = 0;
    }
    return k;
}

int fl_monitor_wait(struct fl_monitor *m, int timeout_ms,
                    struct fl_death *out, int max)
{
    int64_t deadline = 0;
    int n = 0;

    if (timeout_ms < 0 || max < 1)
        return -EINVAL;
    if (timeout_ms > 0)
        deadline = mono_ms() + timeout_ms;
    pthread_mutex_lock(&m->lock);
    if (m->npending || m->wake_set) {
        /* wake_set with nothing pending is a bare fl_monitor_wake(): it
         * asks this very call to return at once. */
        int bare = !m->npending;
        n = drain_pending(m, out, max);
        if (bare) {
            pthread_mutex_unlock(&m->lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&m->lock);
    for (;;) {
        int want = max - n < m->max_events ? max - n : m->max_events;
        int tmo = 0, got, i, woken = 0;

        if (!n && timeout_ms > 0) {
            int64_t left = deadline - mono_ms();
            tmo = left > 0 ? (int)left : 0;
        }
        if (want < 1)
            break;
        got = epoll_wait(m->epfd, m->events, want, tmo);   /* unlocked */
        if (got < 0) {
            if (errno != EINTR)
                return n ? n : -errno;
            got = 0;                    /* retry against the deadline */
        }
        pthread_mutex_lock(&m->lock);
        for (i = 0; i < got; i++) {
            uint64_t tok = m->events[i].data.u64;
            uint32_t evs = m->events[i].events;
            struct fl_death *d = &out[n];
            struct reg *r;
            int slot;

            if (tok == WAKE_TOKEN) {
                woken = 1;              /* pending deaths, or a wake() */
                continue;
            }
            r = lookup(m, tok, &slot);
            if (!r)
                continue;               /* a removed registration's event */
            d->token = tok;
            d->fd = r->fd;
            d->events = (int)evs;
            if (!same_socket(r)) {
                d->status = FL_CLOSED;
                d->err = EBADF;
                d->method = FL_M_EPOLL;
                d->flags = FL_F_BEHIND_BACK | (r->armed ? FL_F_ARMED : 0);
            } else {
                classify(r, evs, d);
                epoll_ctl(m->epfd, EPOLL_CTL_DEL, r->fd, NULL);
            }
            free_slot(m, slot);
            n++;
        }
        if (woken)
            n += drain_pending(m, out + n, max - n);
        pthread_mutex_unlock(&m->lock);
        if (n >= max)
            break;
        if (got == want)
            continue;                   /* array came back full: look again */
        if (n || tmo == 0 || woken)
            break;
        /* only stale events (or EINTR) before the deadline: wait the rest */
    }
    return n;
}
