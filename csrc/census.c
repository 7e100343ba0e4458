/*
 * fastlive census: the TCP sockets of the network namespace from one
 * NETLINK_SOCK_DIAG dump per address family, and the death log from the
 * kernel's socket-destroy multicast groups.
 *
 * The kernel side (net/ipv4/inet_diag.c): a SOCK_DIAG_BY_FAMILY request
 * with NLM_F_DUMP and a struct inet_diag_req_v2 walks the TCP hash tables
 * and answers one struct inet_diag_msg (+ attributes: INET_DIAG_INFO is
 * struct tcp_info) per socket whose state bit is in idiag_states and that
 * the INET_DIAG_REQ_BYTECODE program accepts.  Sockets the filter rejects
 * never become messages: a filtered dump costs the table walk plus what
 * matches.  Any user may dump; INET_DIAG_INFO is filled for every user's
 * sockets (only mark and class id are kept for CAP_NET_ADMIN).
 *
 * The destroy groups (SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY):
 * when a full TCP socket is freed and someone listens, the kernel
 * multicasts one message like a dump entry (uid and inode are not filled).
 * sock_diag's netlink family carries NL_CFG_F_NONROOT_RECV, so binding
 * needs no privilege.
 *
 * One receive buffer (64 KiB, larger than the 32 KiB skbs a dump fills,
 * grown if a datagram is ever truncated) and one record array, both
 * reused across dumps.  Every length is checked before it is used.
 */
#include "fl_prelude.h"
#include "sockutil.h"
#include "fl_core.h"
#include "fl_census.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>

#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
#ifndef SK_MEMINFO_DROPS
#define SK_MEMINFO_DROPS 8
#endif
#define SK_MEMINFO_N 9

#define BUF_START (64 * 1024)
#define BUF_MAX (4 * 1024 * 1024)
#define DUMP_RETRIES 3          /* restarts after NLM_F_DUMP_INTR */
#define DUMP_TIMEOUT_S 10       /* a dump that stalls this long fails */
#define FOLLOW_READS 256        /* datagrams read per follow_wait at most */
#define NEW_SYN_RECV 12         /* TCP_NEW_SYN_RECV: request sockets */
#define ALL_STATES 0xfffu       /* 1 << 0 .. 1 << 11 (TCPF_ALL) */

struct census_priv {
    unsigned char *buf;      /* receive buffer, bufcap bytes, 8-aligned */
    size_t bufcap;
    int dumpfd;              /* dump socket, opened on first use, -1 */
    int followfd;            /* destroy-group socket, -1 */
    int stopfd;              /* eventfd that wakes follow_wait, -1 */
    uint32_t seq;
    uint64_t drops0;         /* SO_MEMINFO drops when following began */
    uint64_t overruns;       /* ENOBUFS and truncated datagrams seen */
    int meminfo;             /* SO_MEMINFO works on the follow socket */
    int compat;              /* -1: the kernel refused the one-walk request */
};

int fl_census_new(struct fl_census **out)
{
    struct fl_census *c;
    struct census_priv *p;

    *out = NULL;
    c = calloc(1, sizeof *c);
    p = calloc(1, sizeof *p);
    if (!c || !p) {
        free(c);
        free(p);
        return -ENOMEM;
    }
    p->buf = malloc(BUF_START);
    if (!p->buf) {
        free(c);
        free(p);
        return -ENOMEM;
    }
    p->bufcap = BUF_START;
    c->bufsize = BUF_START;
    p->dumpfd = p->followfd = p->stopfd = -1;
    p->seq = (uint32_t)mono_us() | 1u;
    c->priv = p;
    *out = c;
    return 0;
}

void fl_census_free(struct fl_census *c)
{
    struct census_priv *p;

    if (!c)
        return;
    p = c->priv;
    if (p) {
        if (p->dumpfd >= 0)
            close(p->dumpfd);
        if (p->followfd >= 0)
            close(p->followfd);
        if (p->stopfd >= 0)
            close(p->stopfd);
        free(p->buf);
        free(p);
    }
    free(c->recs);
    free(c);
}

/* Room for one more record. */
static struct fl_census_rec *next_rec(struct fl_census *c)
{
    if (c->n >= c->cap) {
        int cap = c->cap ? c->cap : 256;
        struct fl_census_rec *r;

        if (cap > INT_MAX / 2 || (size_t)cap * 2 > SIZE_MAX / sizeof *r)
            return NULL;
        cap *= 2;
        r = realloc(c->recs, (size_t)cap * sizeof *r);
        if (!r)
            return NULL;
        c->recs = r;
        c->cap = cap;
    }
    return &c->recs[c->n];
}

/* One SOCK_DIAG_BY_FAMILY message (payload after the netlink header). */
static int parse_diag(struct fl_census *c, const unsigned char *pl, int plen)
{
    const struct inet_diag_msg *m = (const void *)pl;
    const struct rtattr *rta;
    struct fl_census_rec *r;
    int alen;

    if (plen < (int)sizeof *m) {
        c->bad++;
        c->flags |= FL_CENSUS_BAD;
        return 0;
    }
    if (m->idiag_family != AF_INET && m->idiag_family != AF_INET6) {
        c->bad++;
        c->flags |= FL_CENSUS_BAD;
        return 0;
    }
    r = next_rec(c);
    if (!r)
        return -ENOMEM;
    r->family = m->idiag_family;
    r->state = m->idiag_state;
    r->timer = m->idiag_timer;
    r->retrans = m->idiag_retrans;
    r->sport = ntohs(m->id.idiag_sport);
    r->dport = ntohs(m->id.idiag_dport);
    memcpy(r->src, m->id.idiag_src, 16);
    memcpy(r->dst, m->id.idiag_dst, 16);
    r->uid = m->idiag_uid;
    r->inode = m->idiag_inode;
    r->rqueue = m->idiag_rqueue;
    r->wqueue = m->idiag_wqueue;
    r->expires = m->idiag_expires;
    r->ifindex = m->id.idiag_if;
    r->cookie = (uint64_t)m->id.idiag_cookie[1] << 32 | m->id.idiag_cookie[0];
    r->fd = -1;
    r->info_len = 0;

    alen = plen - (int)NLMSG_ALIGN(sizeof *m);
    rta = (const struct rtattr *)(pl + NLMSG_ALIGN(sizeof *m));
    for (; alen > 0 && RTA_OK(rta, alen); rta = RTA_NEXT(rta, alen)) {
        if ((rta->rta_type & NLA_TYPE_MASK) == INET_DIAG_INFO) {
            size_t n = RTA_PAYLOAD(rta);

            if (n > sizeof r->info)
                n = sizeof r->info;
            memcpy(&r->info, RTA_DATA(rta), n);
            if (n < sizeof r->info)
                memset((unsigned char *)&r->info + n, 0, sizeof r->info - n);
            r->info_len = (uint32_t)n;
        }
        /* every other attribute (known or not) is skipped by its length */
    }
    if (alen > 0) {             /* a truncated attribute: keep what was read */
        c->bad++;
        c->flags |= FL_CENSUS_BAD;
    }
    c->n++;
    return 0;
}

int fl_census_parse(struct fl_census *c, const void *buf, size_t len, uint32_t seq)
{
    const struct nlmsghdr *h = buf;
    int left;

    if (len > INT_MAX)
        return -EMSGSIZE;
    if (((uintptr_t)buf & 3) != 0)
        return -EINVAL;                 /* the macros need an aligned buffer */
    left = (int)len;
    for (; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
        int plen = (int)(h->nlmsg_len - NLMSG_HDRLEN);

        c->messages++;
        if (seq != 0 && h->nlmsg_seq != seq)
            continue;                   /* a stale answer of an earlier dump */
        if (h->nlmsg_flags & NLM_F_DUMP_INTR)
            c->flags |= FL_CENSUS_INTR;
        if (h->nlmsg_type == NLMSG_DONE)
            return FL_PARSE_DONE;
        if (h->nlmsg_type == NLMSG_ERROR) {
            int err;

            if (h->nlmsg_len < NLMSG_HDRLEN + sizeof err)
                return -EBADMSG;
            memcpy(&err, NLMSG_DATA(h), sizeof err);
            if (err == 0)
                continue;               /* an acknowledgement */
            if (err > 0 || err < -4095)
                return -EPROTO;
            return err;
        }
        if ((h->nlmsg_type == SOCK_DIAG_BY_FAMILY || h->nlmsg_type == TCPDIAG_GETSOCK) &&
            plen >= 0) {
            int rc = parse_diag(c, NLMSG_DATA(h), plen);

            if (rc < 0)
                return rc;
        }
        /* NLMSG_NOOP, NLMSG_OVERRUN and unknown types are skipped */
    }
    if (left > 0) {                     /* a header or length that does not fit */
        c->bad++;
        c->flags |= FL_CENSUS_BAD;
        return -EBADMSG;
    }
    return FL_PARSE_MORE;
}

/*
 * (sport >= P && sport <= P) || (dport >= P && dport <= P), in the
 * opcodes every kernel since 2.6 knows (S_EQ/D_EQ are newer).  An op's
 * yes/no are byte offsets to jump; landing exactly on the end accepts,
 * jumping past it rejects (inet_diag_bc_run), and the kernel's audit
 * requires every no-target to lie on the yes-chain.
 */
int fl_census_port_bytecode(int port, uint8_t *out, int cap)
{
    struct inet_diag_bc_op ops[9] = {
        { INET_DIAG_BC_S_GE, 8, 20 }, { 0, 0, 0 },
        { INET_DIAG_BC_S_LE, 8, 12 }, { 0, 0, 0 },
        { INET_DIAG_BC_JMP, 4, 20 },
        { INET_DIAG_BC_D_GE, 8, 20 }, { 0, 0, 0 },
        { INET_DIAG_BC_D_LE, 8, 12 }, { 0, 0, 0 },
    };

    if (port < 0 || port > 65535)
        return -EINVAL;
    if (cap < (int)sizeof ops)
        return -ENOSPC;
    ops[1].no = ops[3].no = ops[6].no = ops[8].no = (uint16_t)port;
    memcpy(out, ops, sizeof ops);
    return (int)sizeof ops;
}

static int open_dump_socket(struct census_priv *p)
{
    struct timeval tv = { DUMP_TIMEOUT_S, 0 };
    int fd;

    if (p->dumpfd >= 0)
        return p->dumpfd;
    fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0)
        return -errno;
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    p->dumpfd = fd;
    return fd;
}

static void drop_dump_socket(struct census_priv *p)
{
    if (p->dumpfd >= 0)
        close(p->dumpfd);
    p->dumpfd = -1;
}

/*
 * family AF_UNSPEC: the compat request (TCPDIAG_GETSOCK, struct
 * inet_diag_req), which the kernel turns into one dump of both families -
 * one walk of the hash tables instead of two (the walk of the empty
 * buckets of the established table alone costs ~2 ms with 256 Ki buckets).
 */
static int send_request(int fd, uint32_t seq, int family, uint32_t states,
                        const uint8_t *bc, int bclen, int want_info)
{
    struct {
        struct nlmsghdr h;
        union {
            struct inet_diag_req_v2 v2;
            struct inet_diag_req v1;
        } r;
        struct rtattr a;
        uint8_t bc[64];
    } req;
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    size_t rlen = family == AF_UNSPEC ? sizeof req.r.v1 : sizeof req.r.v2;
    size_t len = NLMSG_LENGTH(rlen);
    unsigned char *at;
    ssize_t n;

    memset(&req, 0, sizeof req);
    if (family == AF_UNSPEC) {
        req.r.v1.idiag_states = states;
        if (want_info)
            req.r.v1.idiag_ext = 1u << (INET_DIAG_INFO - 1);
        req.h.nlmsg_type = TCPDIAG_GETSOCK;
    } else {
        req.r.v2.sdiag_family = (uint8_t)family;
        req.r.v2.sdiag_protocol = IPPROTO_TCP;
        req.r.v2.idiag_states = states;
        if (want_info)
            req.r.v2.idiag_ext = 1u << (INET_DIAG_INFO - 1);
        req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    }
    if (bclen > 0) {
        struct rtattr a;

        if (bclen > (int)sizeof req.bc)
            return -EINVAL;
        a.rta_type = INET_DIAG_REQ_BYTECODE;
        a.rta_len = (unsigned short)RTA_LENGTH(bclen);
        at = (unsigned char *)&req + NLMSG_ALIGN(len);
        memcpy(at, &a, sizeof a);
        memcpy(at + RTA_LENGTH(0), bc, (size_t)bclen);
        len = NLMSG_ALIGN(len) + RTA_ALIGN(a.rta_len);
    }
    req.h.nlmsg_len = (uint32_t)len;
    req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.h.nlmsg_seq = seq;
    do {
        n = sendto(fd, &req, len, 0, (struct sockaddr *)&sa, sizeof sa);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return (size_t)n == len ? 0 : -EIO;
}

/* Reads one datagram into the buffer; sets *trunc when it did not fit. */
static ssize_t recv_one(int fd, struct census_priv *p, int flags, int *trunc)
{
    struct iovec iov = { p->buf, p->bufcap };
    struct sockaddr_nl sa;
    struct msghdr msg = { .msg_name = &sa, .msg_namelen = sizeof sa,
                          .msg_iov = &iov, .msg_iovlen = 1 };
    ssize_t n;

    do {
        n = recvmsg(fd, &msg, flags);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    *trunc = (msg.msg_flags & MSG_TRUNC) != 0;
    if (msg.msg_namelen >= sizeof sa && sa.nl_pid != 0)
        return -ENOMSG;                 /* not from the kernel: ignore it */
    return n;
}

static int grow_buffer(struct fl_census *c)
{
    struct census_priv *p = c->priv;
    unsigned char *b;

    if (p->bufcap >= BUF_MAX)
        return -EMSGSIZE;
    b = malloc(p->bufcap * 2);
    if (!b)
        return -ENOMEM;
    free(p->buf);
    p->buf = b;
    p->bufcap *= 2;
    c->bufsize = (int)p->bufcap;
    return 0;
}

int fl_census_set_buffer(struct fl_census *c, int size)
{
    struct census_priv *p = c->priv;
    unsigned char *b;

    if (size < 256 || size > BUF_MAX)
        return -EINVAL;
    b = malloc((size_t)size);
    if (!b)
        return -ENOMEM;
    free(p->buf);
    p->buf = b;
    p->bufcap = (size_t)size;
    c->bufsize = size;
    return 0;
}

static int dump_family(struct fl_census *c, int family, uint32_t states,
                       const uint8_t *bc, int bclen, int want_info)
{
    struct census_priv *p = c->priv;
    int fd = open_dump_socket(p), rc, trunc = 0;
    uint32_t seq;

    if (fd < 0)
        return fd;
    seq = ++p->seq ? p->seq : ++p->seq;
    rc = send_request(fd, seq, family, states, bc, bclen, want_info);
    if (rc < 0)
        return rc;
    for (;;) {
        ssize_t n = recv_one(fd, p, 0, &trunc);

        if (n == -ENOMSG)
            continue;                   /* a datagram from a user process */
        if (n < 0) {
            drop_dump_socket(p);        /* the kernel forgets the dump with it */
            return n == -EAGAIN || n == -EWOULDBLOCK ? -ETIMEDOUT : (int)n;
        }
        c->recvs++;
        c->bytes += (uint64_t)n;
        if (trunc) {                    /* never with a 64 KiB buffer; still */
            drop_dump_socket(p);
            rc = grow_buffer(c);
            return rc < 0 ? rc : -EMSGSIZE;
        }
        if (n == 0) {
            drop_dump_socket(p);
            return -EPROTO;
        }
        rc = fl_census_parse(c, p->buf, (size_t)n, seq);
        if (rc < 0) {
            drop_dump_socket(p);
            return rc;
        }
        if (rc == FL_PARSE_DONE)
            return 0;
    }
}

int fl_census_dump(struct fl_census *c, int families, uint32_t states, int port,
                   int want_info)
{
    struct census_priv *p;
    uint8_t bc[64];
    int bclen = 0, attempt, rc = 0, grown = 0;

    if (!c || (families & ~3) || !families)
        return -EINVAL;
    p = c->priv;
    if (port >= 0) {
        bclen = fl_census_port_bytecode(port, bc, (int)sizeof bc);
        if (bclen < 0)
            return bclen;
    }
    states &= ALL_STATES;
    if (states == 0)
        states = ALL_STATES;
    if (states & (1u << TCP_SYN_RECV))
        states |= 1u << NEW_SYN_RECV;   /* request sockets show as SYN_RECV */
    c->retries = 0;
    for (attempt = 0;; attempt++) {
        c->n = 0;
        c->flags = 0;
        rc = 0;
        if (families == 3 && p->compat >= 0) {
            rc = dump_family(c, AF_UNSPEC, states, bc, bclen, want_info);
            if (rc == -EINVAL || rc == -ENOENT || rc == -EOPNOTSUPP) {
                p->compat = -1;         /* a kernel without it: two dumps */
                continue;
            }
        } else {
            if (families & 1)
                rc = dump_family(c, AF_INET, states, bc, bclen, want_info);
            if (rc == 0 && (families & 2))
                rc = dump_family(c, AF_INET6, states, bc, bclen, want_info);
        }
        if (rc == -EMSGSIZE && grown++ < 16)
            continue;                   /* buffer grown: read it all again */
        if (rc < 0) {
            c->n = 0;
            return rc;
        }
        if (!(c->flags & FL_CENSUS_INTR) || attempt >= DUMP_RETRIES)
            break;
        c->retries++;
    }
    for (int i = 0; i < c->n; i++)      /* NEW_SYN_RECV is SYN_RECV to users */
        if (c->recs[i].state == NEW_SYN_RECV)
            c->recs[i].state = TCP_SYN_RECV;
    return c->n;
}

/* --- suspects ------------------------------------------------------------- */

#define HAS(r, f) ((r)->info_len >= offsetof(struct fl_tcp_info, f) + sizeof((r)->info.f))

int fl_census_why(const struct fl_census_rec *r)
{
    const struct fl_tcp_info *i = &r->info;
    int why = 0;

    if (r->state == TCP_CLOSE_WAIT)
        why |= FL_WHY_CLOSE_WAIT;
    if (r->state == TCP_LISTEN || r->state == TCP_TIME_WAIT || r->info_len == 0)
        return why;
    if ((HAS(r, tcpi_retransmits) && i->tcpi_retransmits > 0) ||
        (HAS(r, tcpi_backoff) && i->tcpi_backoff > 0))
        why |= FL_WHY_RETRANS;
    if (r->timer == 4 ||
        (HAS(r, tcpi_snd_wnd) && i->tcpi_snd_wnd == 0 && r->state == TCP_ESTABLISHED &&
         HAS(r, tcpi_unacked) && i->tcpi_unacked == 0 && r->wqueue > 0))
        why |= FL_WHY_ZERO_WINDOW;
    if (HAS(r, tcpi_last_ack_recv) && i->tcpi_unacked > 0 && i->tcpi_rto > 0 &&
        (uint64_t)i->tcpi_last_ack_recv * 1000 > 2 * (uint64_t)i->tcpi_rto)
        why |= FL_WHY_NO_ACK;
    if (r->timer == 2 && HAS(r, tcpi_probes) && i->tcpi_probes > 0)
        why |= FL_WHY_KEEPALIVE;
    return why;
}

int fl_census_classify(const struct fl_census *c, uint8_t *out, uint32_t *states)
{
    int i, n = 0;

    if (states)
        memset(states, 0, 16 * sizeof *states);
    for (i = 0; i < c->n; i++) {
        int w = fl_census_why(&c->recs[i]);

        out[i] = (uint8_t)w;
        n += w != 0;
        if (states)
            states[c->recs[i].state & 15]++;
    }
    return n;
}

/* --- own sockets ---------------------------------------------------------- */

struct ino_fd {
    uint64_t ino;
    int fd;
};

static int cmp_ino(const void *a, const void *b)
{
    uint64_t x = ((const struct ino_fd *)a)->ino, y = ((const struct ino_fd *)b)->ino;

    return x < y ? -1 : x > y;
}

/* By inode, then fd: the first entry of an inode has its lowest fd. */
static int cmp_ino_fd(const void *a, const void *b)
{
    const struct ino_fd *x = a, *y = b;
    int c = cmp_ino(a, b);

    return c ? c : (x->fd > y->fd) - (x->fd < y->fd);
}

int fl_census_keep_own(struct fl_census *c)
{
    struct ino_fd *map = NULL, key;
    size_t nmap = 0, cap = 0;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int i, kept = 0;

    if (!d)
        return -errno;
    while ((e = readdir(d)) != NULL) {
        char link[64], *end;
        unsigned long long ino;
        long fd;
        ssize_t n;

        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        n = readlinkat(dirfd(d), e->d_name, link, sizeof link - 1);
        if (n < 9 || memcmp(link, "socket:[", 8) != 0)
            continue;
        link[n] = '\0';
        errno = 0;
        ino = strtoull(link + 8, &end, 10);
        if (errno || *end != ']')
            continue;
        fd = strtol(e->d_name, &end, 10);
        if (*end || fd < 0 || fd > INT_MAX)
            continue;
        if (nmap == cap) {
            size_t ncap = cap ? cap * 2 : 256;
            struct ino_fd *m = realloc(map, ncap * sizeof *m);

            if (!m) {
                free(map);
                closedir(d);
                return -ENOMEM;
            }
            map = m;
            cap = ncap;
        }
        map[nmap].ino = ino;
        map[nmap].fd = (int)fd;
        nmap++;
    }
    closedir(d);
    if (nmap)
        qsort(map, nmap, sizeof *map, cmp_ino_fd);
    for (i = 0; i < c->n; i++) {
        struct ino_fd *hit;

        if (c->recs[i].inode == 0 || nmap == 0)
            continue;
        key.ino = c->recs[i].inode;
        hit = bsearch(&key, map, nmap, sizeof *map, cmp_ino);
        if (!hit)
            continue;
        /* the lowest fd of that inode (dup'ed sockets share it) */
        while (hit > map && hit[-1].ino == key.ino)
            hit--;
        if (kept != i)
            c->recs[kept] = c->recs[i];
        c->recs[kept].fd = hit->fd;
        kept++;
    }
    free(map);
    c->n = kept;
    return kept;
}

/* --- the death log ---------------------------------------------------------- */

static int read_drops(int fd, uint64_t *drops)
{
    uint32_t mem[SK_MEMINFO_N];
    socklen_t len = sizeof mem;

    memset(mem, 0, sizeof mem);
    if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mem, &len) < 0 ||
        len < (SK_MEMINFO_DROPS + 1) * sizeof(uint32_t))
        return -1;
    *drops = mem[SK_MEMINFO_DROPS];
    return 0;
}

int fl_census_follow_open(struct fl_census *c, int families, int rcvbuf)
{
    struct census_priv *p = c->priv;
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    int fd, efd, err;

    if ((families & ~3) || !families || rcvbuf < 0)
        return -EINVAL;
    if (p->followfd >= 0)
        return -EALREADY;
    if (families & 1)
        sa.nl_groups |= 1u << (SKNLGRP_INET_TCP_DESTROY - 1);
    if (families & 2)
        sa.nl_groups |= 1u << (SKNLGRP_INET6_TCP_DESTROY - 1);
    fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_SOCK_DIAG);
    if (fd < 0)
        return -errno;
    /* SO_RCVBUFFORCE passes net.core.rmem_max with CAP_NET_ADMIN; without
     * it SO_RCVBUF is capped there */
    if (rcvbuf > 0 &&
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        err = -errno;
        close(fd);
        return err;
    }
    efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) {
        err = -errno;
        close(fd);
        return err;
    }
    p->followfd = fd;
    p->stopfd = efd;
    p->meminfo = read_drops(fd, &p->drops0) == 0;
    p->overruns = 0;
    c->lost = 0;
    c->n = 0;
    return 0;
}

int fl_census_follow_wait(struct fl_census *c, int timeout_ms)
{
    struct census_priv *p = c->priv;
    struct pollfd pfd[2];
    int rc, reads, trunc = 0, overrun = 0;
    uint64_t drops;

    if (p->followfd < 0 || p->stopfd < 0)
        return -EBADF;
    c->n = 0;
    c->flags = 0;
    pfd[0].fd = p->followfd;
    pfd[0].events = POLLIN;
    pfd[1].fd = p->stopfd;
    pfd[1].events = POLLIN;
    pfd[0].revents = pfd[1].revents = 0;
    rc = poll(pfd, 2, timeout_ms < 0 ? -1 : timeout_ms);
    if (rc < 0)
        return errno == EINTR ? 0 : -errno;     /* a signal: the caller loops */
    if (pfd[1].revents)
        return -ECANCELED;
    if (rc == 0)
        return 0;
    for (reads = 0; reads < FOLLOW_READS; reads++) {
        ssize_t n = recv_one(p->followfd, p, MSG_DONTWAIT, &trunc);

        if (n == -ENOBUFS) {            /* the queue overflowed: events lost */
            overrun++;
            continue;
        }
        if (n == -ENOMSG)
            continue;                   /* not from the kernel */
        if (n == -EAGAIN || n == -EWOULDBLOCK)
            break;
        if (n < 0)
            return (int)n;
        c->recvs++;
        c->bytes += (uint64_t)n;
        if (trunc) {                    /* that datagram is lost */
            overrun++;
            (void)grow_buffer(c);
            continue;
        }
        rc = fl_census_parse(c, p->buf, (size_t)n, 0);
        if (rc < 0 && rc != -EBADMSG && rc != -EPROTO)
            return rc;                  /* -ENOMEM */
    }
    p->overruns += (uint64_t)overrun;
    c->lost = p->overruns;
    if (p->meminfo && read_drops(p->followfd, &drops) == 0 && drops - p->drops0 > c->lost)
        c->lost = drops - p->drops0;    /* the kernel's own count of drops */
    return c->n;
}

void fl_census_follow_stop(struct fl_census *c)
{
    struct census_priv *p = c ? c->priv : NULL;
    uint64_t one = 1;

    if (p && p->stopfd >= 0)
        (void)!write(p->stopfd, &one, sizeof one);
}

void fl_census_follow_close(struct fl_census *c)
{
    struct census_priv *p = c ? c->priv : NULL;

    if (!p)
        return;
    if (p->followfd >= 0)
        close(p->followfd);
    if (p->stopfd >= 0)
        close(p->stopfd);
    p->followfd = p->stopfd = -1;
}
