/*
 * fastlive batch sweeps: one C call checks every fd of a batch.
 *
 * The batch owns its arrays (fl_batch.h); a sweep only reads the kernel's
 * answer into them.  Hot loops do the syscall, a table lookup and a few
 * byte stores per fd; anything more (SO_ERROR, the dead list) is paid only
 * for entries that are not alive.
 */
#include "fl_prelude.h"
#include "sockutil.h"
#include "fl_core.h"
#include "fl_batch.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>

#ifndef POLLRDHUP
#define POLLRDHUP 0x2000
#endif

struct batch_priv {
    int cap;                 /* capacity of every array */
    int ngood;               /* entries that sweeps check */
    struct pollfd *pfd;      /* [ngood] the good entries' fds, in order */
    int *map;                /* [ngood] pfd slot -> entry index (ascending) */
    int *badlist;            /* [nbad] entries bad at build (ascending) */
    int *scratch;            /* [cap] good entries found dead by a sweep */
    uint8_t *bad;            /* [cap] build-time marks */
    short *lastrev;          /* [cap] revents behind each entry's poll verdict */
    unsigned int gen;        /* fl_fork_generation() when built */
};

/* A sweep in a forked child would take the parent's pending errors
 * (SO_ERROR, recv) from the shared sockets: refused. */
#define CHECK_FORK(pv) do {                                  \
        if ((pv)->gen != fl_fork_generation())               \
            return -FL_E_FORKED;                             \
    } while (0)

/* One entry's verdict from fl_verdict_decide into the result arrays.
 * keep: the entry's reason (RESET, TIMED_OUT, ...) stays when this sweep
 * sees only the hangup it left (the kernel hands an error out once). */
static void put(struct fl_batch *b, int i, const struct fl_verdict *v, int keep)
{
    b->flags[i] = (uint8_t)v->flags;
    b->tcp_state[i] = (uint8_t)(v->tcp_state > 0 ? v->tcp_state : 0);
    if (keep && v->err == 0 &&
        (v->status == FL_CLOSED || v->status == FL_PEER_CLOSED))
        return;
    b->status[i] = (uint8_t)v->status;
    b->err[i] = v->err;
}

static void decide(struct fl_batch *b, int i, int err, int st, int seen, int keep)
{
    struct fl_verdict v;

    v.flags = 0;
    fl_verdict_decide(err, st, seen, &v);
    put(b, i, &v, keep);
}

/* A reason worth keeping across sweeps of the same method: the kernel
 * reports a pending error once (SO_ERROR, recv take it), after which the
 * same socket only shows the hangup. */
static int sticky(const struct fl_batch *b, int i, int method)
{
    int s = b->status[i];

    return b->method == method && s != FL_ALIVE && s != FL_PEER_CLOSED
        && s != FL_INVALID;
}

/* Alive, no flags, state unknown.  err is 0 whenever status is FL_ALIVE
 * (every path keeps it so), so an entry already in that state is left
 * untouched: repeated sweeps of a quiet batch dirty no cache lines. */
static inline void set_alive(struct fl_batch *b, int i)
{
    if (b->status[i] | b->flags[i] | b->tcp_state[i]) {
        b->status[i] = FL_ALIVE;
        b->err[i] = 0;
        b->flags[i] = 0;
        b->tcp_state[i] = 0;
    }
}

static void *grow(void *p, size_t count, size_t size)
{
    if (count == 0)
        count = 1;
    return realloc(p, count * size);
}

static int reserve(struct fl_batch *b, int n)
{
    struct batch_priv *pv = b->priv;
    void *p;

    if (n <= pv->cap && b->fds)
        return 0;                /* arrays exist (never NULL, even for n = 0) */
#define GROW(field) do {                                               \
        p = grow(field, (size_t)n, sizeof *(field));                   \
        if (!p)                                                        \
            return -ENOMEM;                                            \
        field = p;                                                     \
    } while (0)
    GROW(b->fds);
    GROW(b->status);
    GROW(b->tcp_state);
    GROW(b->flags);
    GROW(b->err);
    GROW(b->dead);
    GROW(b->info_len);
    GROW(pv->pfd);
    GROW(pv->map);
    GROW(pv->badlist);
    GROW(pv->scratch);
    GROW(pv->bad);
    GROW(pv->lastrev);
    if (b->info)
        GROW(b->info);
#undef GROW
    pv->cap = n > 0 ? n : 1;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static void mark_bad(struct fl_batch *b, int i, int err)
{
    struct batch_priv *pv = b->priv;

    pv->bad[i] = 1;
    b->status[i] = FL_INVALID;
    b->err[i] = err;
}

/* Duplicates: sort (fd, index) and mark every copy after the first. */
static int mark_duplicates(struct fl_batch *b, const int *fds, int n)
{
    uint64_t *keys;
    int i;

    if (n < 2)
        return 0;
    keys = malloc((size_t)n * sizeof *keys);
    if (!keys)
        return -ENOMEM;
    for (i = 0; i < n; i++)
        keys[i] = ((uint64_t)(uint32_t)fds[i] << 32) | (uint32_t)i;
    qsort(keys, (size_t)n, sizeof *keys, cmp_u64);
    for (i = 1; i < n; i++)
        if ((keys[i] >> 32) == (keys[i - 1] >> 32) && fds[keys[i] & 0xffffffffu] >= 0)
            mark_bad(b, (int)(keys[i] & 0xffffffffu), EEXIST);
    free(keys);
    return 0;
}

/* Every entry not already bad: one TCP_INFO read, decided by the rule
 * (not open, not a socket, not TCP, listening, connecting, never
 * connected: bad). */
static void mark_invalid(struct fl_batch *b, const int *fds, int n)
{
    struct batch_priv *pv = b->priv;
    struct fl_verdict v;
    int i, st, seen;

    for (i = 0; i < n; i++) {
        if (pv->bad[i])
            continue;
        if (fds[i] < 0) {
            mark_bad(b, i, EBADF);
            continue;
        }
        seen = 0;
        st = fl_tcp_state_seen(fds[i], &seen);
        v.flags = 0;
        fl_verdict_decide(st < 0 ? -st : 0, st < 0 ? -1 : st, seen, &v);
        if (v.status == FL_INVALID) {
            mark_bad(b, i, v.err);
            b->tcp_state[i] = (uint8_t)(st > 0 ? st : 0);
        }
    }
}

int fl_batch_set(struct fl_batch *b, const int *fds, int n)
{
    struct batch_priv *pv = b->priv;
    int i, r, nd, ng;

    if (n < 0)
        return -EINVAL;
    if ((r = reserve(b, n)) < 0)
        return r;
    b->n = n;
    b->method = -1;
    if (n > 0)
        memcpy(b->fds, fds, (size_t)n * sizeof *fds);
    memset(b->info_len, 0, (size_t)n * sizeof *b->info_len);
    for (i = 0; i < n; i++) {
        set_alive(b, i);
        pv->bad[i] = 0;
    }
    if (mark_duplicates(b, fds, n) < 0) {
        b->n = b->ndead = b->nbad = pv->ngood = 0;  /* empty, not half-built */
        return -ENOMEM;
    }
    mark_invalid(b, fds, n);
    /* Sweeps walk only the good entries, packed; the bad ones keep their
     * build-time verdict and are merged into dead[] in order. */
    for (i = 0, nd = 0, ng = 0; i < n; i++) {
        if (pv->bad[i]) {
            pv->badlist[nd] = i;
            b->dead[nd++] = i;
        } else {
            pv->pfd[ng].fd = fds[i];
            pv->pfd[ng].events = POLLIN | POLLRDHUP;
            pv->pfd[ng].revents = 0;
            pv->lastrev[ng] = 0;
            pv->map[ng++] = i;
        }
    }
    pv->ngood = ng;
    pv->gen = fl_fork_generation();
    b->ndead = b->nbad = nd;
    return 0;
}

int fl_batch_new(const int *fds, int n, struct fl_batch **out)
{
    struct fl_batch *b;
    int r;

    *out = NULL;
    if (n < 0)
        return -EINVAL;
    b = calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    b->priv = calloc(1, sizeof(struct batch_priv));
    if (!b->priv) {
        free(b);
        return -ENOMEM;
    }
    r = fl_batch_set(b, fds, n);
    if (r < 0) {
        fl_batch_free(b);
        return r;
    }
    *out = b;
    return 0;
}

void fl_batch_free(struct fl_batch *b)
{
    struct batch_priv *pv;

    if (!b)
        return;
    pv = b->priv;
    if (pv) {
        free(pv->pfd);
        free(pv->map);
        free(pv->badlist);
        free(pv->scratch);
        free(pv->bad);
        free(pv->lastrev);
        free(pv);
    }
    free(b->fds);
    free(b->status);
    free(b->tcp_state);
    free(b->flags);
    free(b->err);
    free(b->dead);
    free(b->info);
    free(b->info_len);
    free(b);
}



/* The slow path of the poll sweep: revents != 0 on a good entry.  A
 * hangup or error needs the state to be read (the peer's FIN and our own
 * SHUT_RD raise the same bits); data alone does not. */
static void poll_verdict(struct fl_batch *b, int i, short rev)
{
    int keep = sticky(b, i, FL_M_POLL), err = 0, st = -1;

    if (rev & POLLNVAL) {
        decide(b, i, 0, -1, FL_EV_NVAL, 0);
        return;
    }
    if (rev & POLLERR)
        err = take_so_error(b->fds[i]);
    if (rev & (POLLERR | POLLHUP | POLLRDHUP)) {
        st = fl_tcp_state(b->fds[i]);
        if (st < 0) {
            decide(b, i, -st, -1, 0, 0);
            return;
        }
    }
    decide(b, i, err, st, rev, keep);
}

/* dead[] = the good entries a sweep found dead (scratch[0..ng), ascending)
 * merged with the bad ones (badlist, ascending). */
static int finish(struct fl_batch *b, int ng, int method)
{
    struct batch_priv *pv = b->priv;
    const int *g = pv->scratch, *bad = pv->badlist;
    int kg = 0, kb = 0, nd = 0, nb = b->nbad;

    while (kg < ng && kb < nb)
        b->dead[nd++] = g[kg] < bad[kb] ? g[kg++] : bad[kb++];
    while (kg < ng)
        b->dead[nd++] = g[kg++];
    while (kb < nb)
        b->dead[nd++] = bad[kb++];
    b->ndead = nd;
    b->method = method;
    return nd;
}

int fl_batch_sweep_poll(struct fl_batch *b, int timeout_ms)
{
    struct batch_priv *pv = b->priv;
    struct pollfd *pfd = pv->pfd;
    const int *map = pv->map;
    int j, r, ng = 0, n = pv->ngood;

    CHECK_FORK(pv);
    if (timeout_ms < 0)
        return -EINVAL;
    /* -EINTR goes back to the caller at once (PEP 475: Python runs the
     * signal handler and calls again with the time left); the arrays keep
     * the previous sweep's results. */
    r = poll(pfd, (nfds_t)n, timeout_ms);
    if (r < 0)
        return -errno;
    for (j = 0; j < n; j++) {
        short rev = pfd[j].revents;
        int i = map[j];

        if (!rev) {
            set_alive(b, i);
            continue;
        }
        /* A hangup seen by the last poll sweep with the same bits: its
         * verdict stands (a FIN or an RST does not go away) and costs no
         * syscall.  Our own SHUT_RD is re-decided: the peer's FIN may have
         * come since, with the same bits. */
        if (rev == pv->lastrev[j] && b->method == FL_M_POLL &&
            b->status[i] != FL_ALIVE && !(b->flags[i] & FL_F_LOCAL_SHUTDOWN)) {
            pv->scratch[ng++] = i;
            continue;
        }
        pv->lastrev[j] = rev;
        poll_verdict(b, i, rev);
        if (b->status[i] != FL_ALIVE)
            pv->scratch[ng++] = i;
    }
    return finish(b, ng, FL_M_POLL);
}

/* The verdict of entry i from one getsockopt(TCP_INFO): err is its errno
 * (0 on success), len the bytes the kernel wrote, st the state byte.  The
 * common case, ESTABLISHED, is decided here without the state rule.
 * Returns 1 when the entry is alive. */
static inline int state_verdict(struct fl_batch *b, int i, int err, socklen_t len, int st)
{
    if (err) {
        decide(b, i, err, -1, 0, 0);
        return 0;
    }
    if (len >= 1 && st == TCP_ESTABLISHED) {
        b->tcp_state[i] = TCP_ESTABLISHED;
        b->status[i] = FL_ALIVE;
        b->err[i] = 0;
        b->flags[i] = 0;
        return 1;
    }
    decide(b, i, len < 1 ? EOPNOTSUPP : 0, len < 1 ? -1 : st, 0, 0);
    return b->status[i] == FL_ALIVE;
}

int fl_batch_sweep_states(struct fl_batch *b)
{
    struct batch_priv *pv = b->priv;
    const struct pollfd *pfd = pv->pfd;
    const int *map = pv->map;
    int j, ng = 0, n = pv->ngood;

    CHECK_FORK(pv);
    for (j = 0; j < n; j++) {
        int i = map[j];
        uint8_t st = 0;
        socklen_t len = 1;
        int e = getsockopt(pfd[j].fd, IPPROTO_TCP, TCP_INFO, &st, &len) < 0 ? errno : 0;

        if (!state_verdict(b, i, e, len, st))
            pv->scratch[ng++] = i;
    }
    return finish(b, ng, FL_M_TCP_INFO);
}

int fl_batch_sweep_tcp_info(struct fl_batch *b)
{
    struct batch_priv *pv = b->priv;
    const struct pollfd *pfd = pv->pfd;
    const int *map = pv->map;
    struct fl_tcp_info *info;
    int j, ng = 0, n = pv->ngood;

    CHECK_FORK(pv);
    if (!b->info) {
        /* Once per batch: the record array is only needed by this sweep. */
        b->info = calloc((size_t)pv->cap, sizeof *b->info);
        if (!b->info)
            return -ENOMEM;
    }
    info = b->info;
    for (j = 0; j < n; j++) {
        int i = map[j];
        socklen_t len = sizeof *info;
        struct fl_tcp_info *ti = &info[i];

        int e = getsockopt(pfd[j].fd, IPPROTO_TCP, TCP_INFO, ti, &len) < 0 ? errno : 0;

        b->info_len[i] = e ? 0 : (uint32_t)len;
        if (!state_verdict(b, i, e, len, e ? 0 : ti->tcpi_state)) {
            pv->scratch[ng++] = i;
            continue;
        }
        if (fl_tcp_info_suspect(ti, (int)len))
            b->flags[i] = FL_F_SUSPECT;
    }
    return finish(b, ng, FL_M_TCP_INFO);
}

/* The slow path of the peek sweep: recv returned 0 or an error other than
 * EAGAIN.  The state tells the peer's FIN from our own SHUT_RD. */
static void peek_verdict(struct fl_batch *b, int i, int fd, ssize_t r, int err)
{
    int st = fl_tcp_state(fd);

    if (st < 0) {
        decide(b, i, -st, -1, 0, 0);
        return;
    }
    decide(b, i, r < 0 ? err : 0, st, r == 0 ? FL_EV_EOF : 0,
           sticky(b, i, FL_M_PEEK));
}

int fl_batch_sweep_peek(struct fl_batch *b)
{
    struct batch_priv *pv = b->priv;
    const struct pollfd *pfd = pv->pfd;
    const int *map = pv->map;
    int j, ng = 0, n = pv->ngood;

    CHECK_FORK(pv);
    for (j = 0; j < n; j++) {
        int i = map[j];
        char byte;
        ssize_t r = recv(pfd[j].fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        int err = r < 0 ? errno : 0;

        if (r > 0) {
            set_alive(b, i);
            b->flags[i] = FL_F_DATA_PENDING;
            continue;
        }
        if (r < 0 && (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)) {
            set_alive(b, i);
            continue;
        }
        peek_verdict(b, i, pfd[j].fd, r, err);
        if (b->status[i] != FL_ALIVE)
            pv->scratch[ng++] = i;
    }
    return finish(b, ng, FL_M_PEEK);
}
