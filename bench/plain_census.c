/*
 * The baseline for bench_census.py: the plainest C loop that dumps every
 * TCP socket with sock_diag and keeps, per socket, the inet_diag_msg and
 * its tcp_info in an array - what fastlive.census does, minus every
 * check and the Python object around it.  The same request as fastlive
 * (one compat TCPDIAG_GETSOCK dump for both families, or one v2 dump per
 * family with pc_dump_v2).  Compiled by the benchmark at run time
 * (gcc -O2 -shared) and called through cffi's ABI mode.
 */
#define _GNU_SOURCE 1
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>

struct pc_rec {
    struct inet_diag_msg m;
    uint32_t info_len;
    unsigned char info[280];
};

static unsigned char buf_[65536] __attribute__((aligned(8)));
static struct pc_rec *recs_;
static int cap_;

static int add(const struct nlmsghdr *h, int n)
{
    const struct inet_diag_msg *m = NLMSG_DATA(h);
    int alen = (int)h->nlmsg_len - NLMSG_LENGTH(sizeof *m);
    const struct rtattr *a = (const void *)((const char *)m + NLMSG_ALIGN(sizeof *m));
    struct pc_rec *r;

    if (n >= cap_) {
        int cap = cap_ ? cap_ * 2 : 1024;
        struct pc_rec *nr = realloc(recs_, (size_t)cap * sizeof *nr);
        if (!nr)
            return -ENOMEM;
        recs_ = nr;
        cap_ = cap;
    }
    r = &recs_[n];
    r->m = *m;
    r->info_len = 0;
    for (; RTA_OK(a, alen); a = RTA_NEXT(a, alen)) {
        if (a->rta_type == INET_DIAG_INFO) {
            size_t l = RTA_PAYLOAD(a);
            if (l > sizeof r->info)
                l = sizeof r->info;
            memcpy(r->info, RTA_DATA(a), l);
            r->info_len = (uint32_t)l;
        }
    }
    return 0;
}

static int dump(int fd, int family, uint32_t states, int want_info, int n)
{
    struct {
        struct nlmsghdr h;
        union { struct inet_diag_req_v2 v2; struct inet_diag_req v1; } r;
    } req;
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    size_t rlen = family ? sizeof req.r.v2 : sizeof req.r.v1;

    memset(&req, 0, sizeof req);
    req.h.nlmsg_len = NLMSG_LENGTH(rlen);
    req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.h.nlmsg_seq = 1;
    if (family) {
        req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
        req.r.v2.sdiag_family = (uint8_t)family;
        req.r.v2.sdiag_protocol = IPPROTO_TCP;
        req.r.v2.idiag_states = states;
        req.r.v2.idiag_ext = want_info ? 1 << (INET_DIAG_INFO - 1) : 0;
    } else {
        req.h.nlmsg_type = TCPDIAG_GETSOCK;
        req.r.v1.idiag_states = states;
        req.r.v1.idiag_ext = want_info ? 1 << (INET_DIAG_INFO - 1) : 0;
    }
    if (sendto(fd, &req, req.h.nlmsg_len, 0, (struct sockaddr *)&sa, sizeof sa) < 0)
        return -errno;
    for (;;) {
        ssize_t len = recv(fd, buf_, sizeof buf_, 0);
        const struct nlmsghdr *h = (const void *)buf_;
        int left = (int)len;

        if (len < 0)
            return -errno;
        for (; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
            if (h->nlmsg_type == NLMSG_DONE)
                return n;
            if (h->nlmsg_type == NLMSG_ERROR)
                return -EPROTO;
            if (add(h, n) < 0)
                return -ENOMEM;
            n++;
        }
    }
}

/* One dump of both families (compat request); returns sockets or -errno. */
int pc_dump(uint32_t states, int want_info)
{
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    int n;

    if (fd < 0)
        return -errno;
    n = dump(fd, 0, states, want_info, 0);
    close(fd);
    return n;
}

/* One v2 dump per family. */
int pc_dump_v2(uint32_t states, int want_info)
{
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    int n;

    if (fd < 0)
        return -errno;
    n = dump(fd, AF_INET, states, want_info, 0);
    if (n >= 0)
        n = dump(fd, AF_INET6, states, want_info, n);
    close(fd);
    return n;
}
