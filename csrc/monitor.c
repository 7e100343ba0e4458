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
 * a socket is closed the kernel drops it silently - no event, ever - and
 * the number may come back as another socket.  The rule: the monitor
 * stores each socket's SO_COOKIE (a per-socket id the kernel never reuses
 * while it runs; the socket's inode is the fallback) and compares it
 * before it acts on an fd number - on add() of a number it holds, on
 * remove(), on every event, in fl_monitor_verify() for all registrations,
 * and in the audit: while registrations exist a timerfd in the set fires
 * every FL_AUDIT_MS and the wait that sees it checks the next
 * FL_AUDIT_SLICE registrations.  So wait() itself reports a socket closed
 * behind the monitor's back within FL_AUDIT_MS * ceil(N / FL_AUDIT_SLICE).
 * A mismatch or EBADF is reported once, as INVALID/EBADF with
 * FL_F_BEHIND_BACK (the status every engine gives such a socket).
 *
 * Deaths queue: every death (from an event, verify, add or the audit) goes
 * into one FIFO and leaves it only when the caller acknowledges it (see
 * fl_monitor_wait in fl_monitor.h), so a signal handler that raises while
 * Python builds its result loses none.  The eventfd in the set is readable
 * while the queue holds deaths not yet handed out, so selectors/asyncio
 * see them.
 *
 * fork(): the child shares the epoll set with the parent.  Every entry
 * point compares the fork generation (fl_core.h) first and refuses in a
 * child without touching the mutex (a parent thread may have held it at
 * fork time) or the shared set.
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
#include <sys/timerfd.h>
#include <stdio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>

#ifndef EPOLLRDHUP
#define EPOLLRDHUP 0x2000
#endif

#define WAKE_TOKEN UINT64_MAX
#define TIMER_TOKEN (UINT64_MAX - 1)
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
    pthread_mutex_t lock;  /* everything below; never held across epoll_wait */
    pthread_cond_t left;   /* a waiter left fl_monitor_wait (for close) */
    unsigned int forkgen;  /* fl_fork_generation() at creation */
    int epfd, wakefd, timerfd;
    int wake_set, timer_on;
    int closing, closed;
    int inwait;            /* a waiter is between its entry and its exit */
    int fast;              /* callers inside wait(0)'s lock-free look (atomic) */
    struct fl_death *pyout;   /* fl_monitor_poll's out array (the caller's) */
    int pymax;
    int busy;              /* the waiter's turn: entry until ack or abort */
    pthread_t owner;
    int handed;            /* deaths at the queue's head handed to it */
    int acked;             /* written by the caller: deaths it has */
    int max_events;
    struct epoll_event *events;
    struct reg *regs;
    int nregs, cap;        /* slots used / allocated */
    int *freelist;
    int nfree;
    int live;
    int audit;             /* next slot the audit checks */
    int *byfd;             /* fd -> slot + 1, 0 for none */
    int byfd_cap;
    struct fl_death *q;    /* the deaths queue: q[qhead .. qhead + qlen) */
    int qhead, qlen, qcap;
    uint64_t counts[FL_COUNT_STATUSES][FL_COUNT_METHODS];  /* acked deaths */
};

static void take_ack(struct fl_monitor *m);

static uint64_t token_of(int slot, uint32_t gen)
{
    return (uint64_t)gen << 32 | (uint32_t)slot;
}

int fl_socket_inode(int fd, uint64_t *ino)
{
    return sock_inode(fd, ino);
}

int fl_monitor_forked(const struct fl_monitor *m)
{
    return m->forkgen != fl_fork_generation();
}

static int same_socket(const struct reg *r)
{
    uint64_t cookie, ino;

    if (sock_identity(r->fd, &cookie, &ino) < 0)
        return 0;
    return cookie == r->cookie && ino == r->ino;
}

static int add_to_set(int epfd, int fd, uint64_t token, uint32_t events)
{
    struct epoll_event ev;

    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = token;
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int fl_monitor_new(int max_events, struct fl_monitor **out)
{
    struct fl_monitor *m;
    int err = 0;

    *out = NULL;
    if (max_events < 1 || max_events > 65536)
        return -EINVAL;
    m = calloc(1, sizeof *m);
    if (!m)
        return -ENOMEM;
    m->epfd = m->wakefd = m->timerfd = -1;
    m->max_events = max_events;
    m->forkgen = fl_fork_generation();
    pthread_mutex_init(&m->lock, NULL);
    pthread_cond_init(&m->left, NULL);
    m->events = calloc((size_t)max_events, sizeof *m->events);
    if (!m->events)
        err = -ENOMEM;
    if (!err && (m->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
        err = -errno;
    if (!err && (m->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        err = -errno;
    if (!err && (m->timerfd = timerfd_create(CLOCK_MONOTONIC,
                                             TFD_CLOEXEC | TFD_NONBLOCK)) < 0)
        err = -errno;
    if (!err)
        err = add_to_set(m->epfd, m->wakefd, WAKE_TOKEN, EPOLLIN);
    if (!err)
        err = add_to_set(m->epfd, m->timerfd, TIMER_TOKEN, EPOLLIN);
    if (err) {
        fl_monitor_free(m);
        return err;
    }
    *out = m;
    return 0;
}

static void close_fds(struct fl_monitor *m)
{
    if (m->epfd >= 0)
        close(m->epfd);
    if (m->wakefd >= 0)
        close(m->wakefd);
    if (m->timerfd >= 0)
        close(m->timerfd);
    m->epfd = m->wakefd = m->timerfd = -1;
}

static void free_tables(struct fl_monitor *m)
{
    free(m->events);
    free(m->regs);
    free(m->freelist);
    free(m->byfd);
    free(m->q);
    m->events = NULL;
    m->regs = NULL;
    m->freelist = NULL;
    m->byfd = NULL;
    m->q = NULL;
    m->nregs = m->cap = m->nfree = m->live = m->byfd_cap = 0;
    m->qhead = m->qlen = m->qcap = 0;
}

void fl_monitor_free(struct fl_monitor *m)
{
    if (!m)
        return;
    if (fl_monitor_forked(m)) {
        /* The child's copies only; the mutex may be held by a parent
         * thread that does not exist here: neither used nor destroyed. */
        close_fds(m);
        free_tables(m);
        free(m);
        return;
    }
    fl_monitor_close(m);
    pthread_cond_destroy(&m->left);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

static void wake_locked(struct fl_monitor *m)
{
    if (!m->wake_set && m->wakefd >= 0) {
        uint64_t one = 1;
        if (write(m->wakefd, &one, sizeof one) == (ssize_t)sizeof one)
            m->wake_set = 1;
    }
}

static void unwake_locked(struct fl_monitor *m)
{
    uint64_t v;

    if (m->wake_set &&
        (read(m->wakefd, &v, sizeof v) == (ssize_t)sizeof v || errno == EAGAIN))
        m->wake_set = 0;
}

int fl_monitor_close(struct fl_monitor *m)
{
    if (fl_monitor_forked(m)) {
        if (!m->closed) {
            close_fds(m);
            free_tables(m);
            m->closed = m->closing = 1;
        }
        return 0;
    }
    pthread_mutex_lock(&m->lock);
    if (!m->closing) {
        __atomic_store_n(&m->closing, 1, __ATOMIC_SEQ_CST);
        m->wake_set = 0;
        wake_locked(m);              /* every sleeping waiter returns */
    }
    while (m->inwait)
        pthread_cond_wait(&m->left, &m->lock);
    if (!m->closed)
        take_ack(m);                 /* count what the caller already has */
    while (__atomic_load_n(&m->fast, __ATOMIC_SEQ_CST)) {
        /* a wait(0) look is a few microseconds: let it finish */
        struct timespec ts = { 0, 100000 };
        pthread_mutex_unlock(&m->lock);
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&m->lock);
    }
    if (!m->closed) {
        close_fds(m);
        free_tables(m);
        m->closed = 1;
    }
    pthread_mutex_unlock(&m->lock);
    return 0;
}

int fl_monitor_fileno(const struct fl_monitor *m)
{
    return m->closed ? -1 : m->epfd;
}

/* Entry of every call but wait: refuses in a forked child (before the
 * mutex) and once closed (under it).  Returns 0 with the lock held. */
static int enter(struct fl_monitor *m)
{
    if (fl_monitor_forked(m))
        return -FL_E_FORKED;
    pthread_mutex_lock(&m->lock);
    if (m->closing) {
        pthread_mutex_unlock(&m->lock);
        return -FL_E_CLOSED;
    }
    return 0;
}

int fl_monitor_count(struct fl_monitor *m)
{
    int n, rc = enter(m);

    if (rc < 0)
        return rc == -FL_E_CLOSED ? 0 : rc;
    n = m->live;
    pthread_mutex_unlock(&m->lock);
    return n;
}

uint64_t fl_monitor_token_of(struct fl_monitor *m, int fd)
{
    uint64_t tok = 0;
    int s;

    if (enter(m) < 0)
        return 0;
    if (fd >= 0 && fd < m->byfd_cap && (s = m->byfd[fd]) &&
        same_socket(&m->regs[s - 1]))
        tok = token_of(s - 1, m->regs[s - 1].gen);
    pthread_mutex_unlock(&m->lock);
    return tok;
}

/* --- the deaths queue ------------------------------------------------------ */

static int queue_push(struct fl_monitor *m, const struct fl_death *d)
{
    if (m->qhead + m->qlen == m->qcap) {
        if (m->qhead > 0) {             /* slide down before growing */
            memmove(m->q, m->q + m->qhead, (size_t)m->qlen * sizeof *m->q);
            m->qhead = 0;
        }
        if (m->qlen == m->qcap) {
            int cap = m->qcap ? 2 * m->qcap : 64;
            void *p = realloc(m->q, (size_t)cap * sizeof *m->q);
            if (!p)
                return -ENOMEM;
            m->q = p;
            m->qcap = cap;
        }
    }
    m->q[m->qhead + m->qlen++] = *d;
    return 0;
}

/* The eventfd's rule, applied after every change of the queue: readable
 * while deaths wait that no caller holds (so selectors/asyncio see them),
 * not readable otherwise.  While closing it stays readable. */
static void settle_wake(struct fl_monitor *m)
{
    if (m->closing)
        return;
    if (m->qlen > m->handed)
        wake_locked(m);
    else if (m->wake_set)
        unwake_locked(m);
}

/* The caller's ack: its deaths leave the queue (counted: the caller has
 * them) and its turn ends. */
static void take_ack(struct fl_monitor *m)
{
    int i, k = m->acked < m->handed ? m->acked : m->handed;

    if (!m->acked)
        return;
    for (i = 0; i < k; i++) {
        const struct fl_death *d = &m->q[m->qhead + i];
        if ((unsigned)d->status < FL_COUNT_STATUSES &&
            (unsigned)d->method < FL_COUNT_METHODS)
            m->counts[d->status][d->method]++;
    }
    m->qhead += k;
    m->qlen -= k;
    if (!m->qlen)
        m->qhead = 0;
    m->handed = 0;
    m->acked = 0;
    m->busy = 0;
}

int *fl_monitor_ack_cell(struct fl_monitor *m)
{
    return &m->acked;
}

void fl_monitor_counts(struct fl_monitor *m, uint64_t *out)
{
    int forked = fl_monitor_forked(m);

    if (!forked)
        pthread_mutex_lock(&m->lock);
    memcpy(out, m->counts, sizeof m->counts);
    if (!forked)
        pthread_mutex_unlock(&m->lock);
}

void fl_monitor_set_out(struct fl_monitor *m, struct fl_death *out, int max)
{
    m->pyout = out;
    m->pymax = max;
}

int fl_monitor_poll(struct fl_monitor *m)
{
    return fl_monitor_wait(m, 0, m->pyout, m->pymax);
}

void fl_monitor_abort(struct fl_monitor *m)
{
    if (fl_monitor_forked(m))
        return;
    pthread_mutex_lock(&m->lock);
    take_ack(m);
    if (m->busy && !m->inwait && pthread_equal(m->owner, pthread_self())) {
        m->busy = 0;
        m->handed = 0;
    }
    settle_wake(m);
    pthread_mutex_unlock(&m->lock);
}

/* --- registrations ---------------------------------------------------------- */

static void timer_arm(struct fl_monitor *m, int on)
{
    struct itimerspec its;

    if (m->timer_on == on)
        return;
    memset(&its, 0, sizeof its);
    if (on) {
        its.it_value.tv_sec = its.it_interval.tv_sec = FL_AUDIT_MS / 1000;
        its.it_value.tv_nsec = its.it_interval.tv_nsec =
            (long)(FL_AUDIT_MS % 1000) * 1000000L;
    }
    if (timerfd_settime(m->timerfd, 0, &its, NULL) == 0)
        m->timer_on = on;
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
    if (--m->live == 0)
        timer_arm(m, 0);
}

static void death_of(const struct fl_monitor *m, int slot, struct fl_death *d)
{
    const struct reg *r = &m->regs[slot];

    d->token = token_of(slot, r->gen);
    d->fd = r->fd;
    d->events = 0;
    d->tcp_state = -1;
    d->flags = r->armed ? FL_F_ARMED : 0;
    d->method = FL_M_EPOLL;
}

/* A registration whose fd number no longer names its socket: INVALID,
 * EBADF, BEHIND_BACK, queued; the slot is freed. */
static int behind_back(struct fl_monitor *m, int slot, int events)
{
    struct fl_death d;

    death_of(m, slot, &d);
    d.status = FL_INVALID;
    d.err = EBADF;
    d.flags |= FL_F_BEHIND_BACK;
    d.events = events;
    if (queue_push(m, &d) < 0)
        return -ENOMEM;                 /* the slot stays: the audit finds it again */
    free_slot(m, slot);
    return 0;
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

/* A free slot (from the freelist or a new one), or -errno. */
static int new_slot(struct fl_monitor *m)
{
    int rc;

    if (m->nfree)
        return m->freelist[--m->nfree];
    if (m->nregs == m->cap && (rc = grow_slots(m)) < 0)
        return rc;
    m->regs[m->nregs].gen = 1;
    return m->nregs++;
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
        r = &m->regs[m->byfd[fd] - 1];
        if (r->cookie == cookie && r->ino == ino) {
            r->armed |= armed;
            *token = token_of(m->byfd[fd] - 1, r->gen);
            return 0;
        }
        if ((rc = behind_back(m, m->byfd[fd] - 1, 0)) < 0)
            return rc;
    }
    if ((slot = new_slot(m)) < 0)
        return slot;
    r = &m->regs[slot];
    r->fd = fd;
    r->armed = armed;
    r->cookie = cookie;
    r->ino = ino;
    memset(&ev, 0, sizeof ev);
    ev.events = INTEREST;
    ev.data.u64 = token_of(slot, r->gen);
    rc = epoll_ctl(m->epfd, EPOLL_CTL_ADD, fd, &ev);
    if (rc < 0 && errno == EEXIST)       /* same open file, reported before */
        rc = epoll_ctl(m->epfd, EPOLL_CTL_MOD, fd, &ev);
    if (rc < 0) {
        rc = -errno;
        m->freelist[m->nfree++] = slot;
        return rc;
    }
    r->live = 1;
    if (m->live++ == 0)
        timer_arm(m, 1);
    m->byfd[fd] = slot + 1;
    *token = ev.data.u64;
    return 1;
}

int fl_monitor_add(struct fl_monitor *m, int fd, int armed, uint64_t *token)
{
    struct fl_verdict v;
    uint64_t cookie, ino;
    int st, rc, seen = 0;

    *token = 0;
    if (fd < 0)
        return -EBADF;
    if ((rc = sock_identity(fd, &cookie, &ino)) < 0)
        return rc;
    st = fl_tcp_state_seen(fd, &seen);
    if (st < 0)
        return st;
    v.flags = 0;
    fl_verdict_decide(0, st, seen, &v);
    if (v.status == FL_INVALID)          /* listening, connecting, never connected */
        return -v.err;
    if ((rc = enter(m)) < 0)
        return rc;
    rc = add_locked(m, fd, armed, cookie, ino, token);
    settle_wake(m);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static struct reg *lookup(struct fl_monitor *m, uint64_t token, int *slot)
{
    uint32_t s = (uint32_t)token, gen = (uint32_t)(token >> 32);

    if (token >= TIMER_TOKEN || s >= (uint32_t)m->nregs)
        return NULL;
    if (!m->regs[s].live || m->regs[s].gen != gen)
        return NULL;
    *slot = (int)s;
    return &m->regs[s];
}

int fl_monitor_remove(struct fl_monitor *m, uint64_t token)
{
    struct reg *r;
    int slot, rc = enter(m);

    if (rc < 0)
        return rc;
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

/* Checks up to max registrations from slot *cursor on; queues a death for
 * each one whose number no longer names its socket.  Count found. */
static int audit(struct fl_monitor *m, int *cursor, int max)
{
    int i, seen, found = 0;

    for (seen = 0; seen < max && seen < m->nregs; seen++) {
        i = (*cursor)++ % m->nregs;
        if (*cursor >= m->nregs)
            *cursor = 0;
        if (!m->regs[i].live || same_socket(&m->regs[i]))
            continue;
        if (behind_back(m, i, 0) < 0)
            return -ENOMEM;
        found++;
    }
    return found;
}

int fl_monitor_verify(struct fl_monitor *m)
{
    int cursor = 0, rc = enter(m);

    if (rc < 0)
        return rc;
    rc = audit(m, &cursor, m->nregs);
    settle_wake(m);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* --- wait ---------------------------------------------------------------------- */

/* Fills *d for an event on a live registration whose identity holds:
 * the pending error (EPOLLERR), the state, the event bits, decided by the
 * one rule (fl_verdict_decide). */
static void classify(const struct reg *r, uint32_t events, struct fl_death *d)
{
    struct fl_verdict v;
    int err = (events & EPOLLERR) ? take_so_error(r->fd) : 0;
    int st = fl_tcp_state(r->fd);

    v.flags = d->flags;
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
    d->tcp_state = v.tcp_state;
}

/* One event from epoll_wait, under the lock: queues the registration's
 * death (or a behind-back one), runs the audit for the timer, notes a
 * wakeup.  -ENOMEM if the queue cannot grow. */
static int on_event(struct fl_monitor *m, const struct epoll_event *e)
{
    struct fl_death d;
    struct reg *r;
    uint64_t v;
    int slot;

    if (e->data.u64 == WAKE_TOKEN)
        return 0;                       /* queued deaths, or close() */
    if (e->data.u64 == TIMER_TOKEN) {
        if (read(m->timerfd, &v, sizeof v) < 0 && errno != EAGAIN)
            return 0;
        return audit(m, &m->audit, FL_AUDIT_SLICE) < 0 ? -ENOMEM : 0;
    }
    r = lookup(m, e->data.u64, &slot);
    if (!r)
        return 0;                       /* a removed registration's event */
    if (!same_socket(r))
        return behind_back(m, slot, (int)e->events);
    death_of(m, slot, &d);
    d.events = (int)e->events;
    classify(r, e->events, &d);
    if (queue_push(m, &d) < 0) {
        /* No memory for the death: re-arm the registration, so the kernel
         * (level-triggered) reports it again to a later wait. */
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = INTEREST;
        ev.data.u64 = e->data.u64;
        epoll_ctl(m->epfd, EPOLL_CTL_MOD, r->fd, &ev);
        return -ENOMEM;
    }
    /* No EPOLL_CTL_DEL: ONESHOT already disarmed the registration, and the
     * kernel drops it when the socket closes (a syscall saved per death;
     * add() of the same socket again finds it and re-arms it with MOD). */
    free_slot(m, slot);
    return 0;
}

/* Sleeps in epoll_wait (unlocked) until a death is queued, close() runs,
 * a signal arrives or the deadline passes.  0, -EINTR or -errno. */
static int collect(struct fl_monitor *m, int timeout_ms)
{
    int64_t deadline = timeout_ms > 0 ? mono_ms() + timeout_ms : 0;
    int tmo = timeout_ms;
    int got, i, rc;

    for (;;) {
        got = epoll_wait(m->epfd, m->events, m->max_events, tmo);
        if (got < 0)
            return -errno;               /* -EINTR included: PEP 475 */
        if (got == 0 && tmo == 0)
            return 0;
        pthread_mutex_lock(&m->lock);
        for (i = 0, rc = 0; i < got; i++)     /* every event, even after ENOMEM */
            if (on_event(m, &m->events[i]) < 0)
                rc = -ENOMEM;
        got = got == m->max_events && !rc;  /* array full: look again */
        rc = rc ? rc : (m->qlen > 0 || m->closing);
        pthread_mutex_unlock(&m->lock);
        if (rc)
            return rc < 0 ? rc : 0;
        if (got) {
            tmo = 0;
        } else {
            int64_t left = timeout_ms > 0 ? deadline - mono_ms() : 0;
            if (left <= 0)
                return 0;
            tmo = (int)left;
        }
    }
}

/* The waiter's turn: taken at entry, given up by ack, abort or a call
 * that returns nothing.  Under the lock; 0 or -errno. */
static int take_turn(struct fl_monitor *m)
{
    if (m->closing)
        return -FL_E_CLOSED;
    take_ack(m);
    if (m->busy && !m->inwait && pthread_equal(m->owner, pthread_self()))
        m->busy = m->handed = 0;        /* our last call failed before its ack */
    if (m->busy)
        return -FL_E_BUSY;
    m->busy = 1;
    m->inwait = 1;
    m->owner = pthread_self();
    return 0;
}

/* wait(0) with nothing queued, the common case of a poller: one
 * epoll_wait into a stack array, no mutex.  Returns 0 when there was
 * nothing; 1 when the caller must take the full path (events were queued
 * here, or the monitor is closing).  close() waits for m->fast to drain
 * before it closes the fd (seq_cst on both sides: close stores closing
 * then reads fast; this increments fast then reads closing). */
static int look(struct fl_monitor *m)
{
    struct epoll_event ev[16];
    int got, i;

    __atomic_add_fetch(&m->fast, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&m->closing, __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&m->fast, 1, __ATOMIC_SEQ_CST);
        return 1;
    }
    got = epoll_wait(m->epfd, ev, 16, 0);
    if (got > 0) {
        pthread_mutex_lock(&m->lock);
        for (i = 0; i < got; i++)
            on_event(m, &ev[i]);        /* -ENOMEM re-arms: nothing lost */
        pthread_mutex_unlock(&m->lock); /* the caller hands them out (or wakes) */
    }
    __atomic_sub_fetch(&m->fast, 1, __ATOMIC_SEQ_CST);
    return got != 0;
}

int fl_monitor_wait(struct fl_monitor *m, int timeout_ms,
                    struct fl_death *out, int max)
{
    int rc, queued, n = 0;

    if (fl_monitor_forked(m))
        return -FL_E_FORKED;
    if (timeout_ms < 0 || max < 1)
        return -EINVAL;
    if (timeout_ms == 0 && !__atomic_load_n(&m->qlen, __ATOMIC_RELAXED) &&
        !__atomic_load_n(&m->acked, __ATOMIC_RELAXED) &&
        !__atomic_load_n(&m->busy, __ATOMIC_RELAXED) && !look(m))
        return 0;
    pthread_mutex_lock(&m->lock);
    rc = take_turn(m);
    queued = m->qlen > 0;
    if (rc < 0)
        settle_wake(m);                 /* deaths look() queued go to the waiter */
    pthread_mutex_unlock(&m->lock);
    if (rc < 0)
        return rc;
    /* Deaths already queued are returned at once (the kernel's newer
     * events stay readable in the set for the next call). */
    rc = queued ? 0 : collect(m, timeout_ms);
    pthread_mutex_lock(&m->lock);
    n = m->qlen < max ? m->qlen : max;
    if (n > 0)
        memcpy(out, m->q + m->qhead, (size_t)n * sizeof *out);
    m->handed = n;
    if (n == 0)
        m->busy = 0;
    settle_wake(m);
    m->inwait = 0;
    if (m->closing)
        pthread_cond_broadcast(&m->left);
    pthread_mutex_unlock(&m->lock);
    return n ? n : rc;
}
