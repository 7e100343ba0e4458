/*
 * fastlive census: every TCP socket of the network namespace from one
 * NETLINK_SOCK_DIAG dump, and the kernel's socket-destroy broadcasts
 * (see census.c).
 *
 * A census owns, in C memory, one receive buffer and one array of
 * compact records that every dump overwrites in place (grown, never
 * shrunk).  The kernel does the filtering: the state mask goes into
 * inet_diag_req_v2.idiag_states and a port into INET_DIAG_REQ_BYTECODE.
 *
 * The parser (fl_census_parse) is a plain function over a byte buffer so
 * it can be fed arbitrary bytes without the kernel; every length in a
 * netlink message and its attributes is checked before use.
 */

/* One TCP socket as sock_diag reported it. */
struct fl_census_rec {
    uint8_t  family;          /* AF_INET (2) or AF_INET6 (10) */
    uint8_t  state;           /* idiag_state (TCP_* of the kernel) */
    uint8_t  timer;           /* idiag_timer: 0 none, 1 retransmit, 2 keepalive,
                                 3 TIME_WAIT, 4 zero-window probe */
    uint8_t  retrans;         /* idiag_retrans (timer's retries / probes) */
    uint16_t sport;           /* local port, host order */
    uint16_t dport;           /* remote port, host order */
    uint8_t  src[16];         /* local address (IPv4: first 4 bytes) */
    uint8_t  dst[16];         /* remote address */
    uint32_t uid;
    uint32_t inode;           /* 0 for TIME_WAIT and request sockets */
    uint32_t rqueue;          /* idiag_rqueue */
    uint32_t wqueue;          /* idiag_wqueue */
    uint32_t expires;         /* idiag_expires, ms */
    uint32_t ifindex;         /* bound device, 0 none */
    uint64_t cookie;          /* the socket cookie (SO_COOKIE) */
    int32_t  fd;              /* own=1: this process's fd, else -1 */
    uint32_t info_len;        /* bytes of info the kernel gave, 0 none */
    struct fl_tcp_info info;
};

/* Bits of fl_census.flags. */
enum fl_census_flag {
    FL_CENSUS_INTR = 1,       /* a dump saw NLM_F_DUMP_INTR after its retries */
    FL_CENSUS_BAD = 2         /* malformed messages/attributes were skipped */
};

/* fl_census_parse results (>= 0); failures are -errno. */
enum fl_census_parse_rc {
    FL_PARSE_MORE = 0,        /* the dump continues: read again */
    FL_PARSE_DONE = 1         /* NLMSG_DONE seen */
};

struct fl_census {
    int n;                    /* records of the last dump */
    int cap;                  /* records allocated */
    struct fl_census_rec *recs;
    int flags;                /* enum fl_census_flag bits of the last dump */
    int retries;              /* dumps restarted after NLM_F_DUMP_INTR */
    int bad;                  /* malformed messages or attributes skipped */
    int messages;             /* netlink messages read (all dumps) */
    uint64_t bytes;           /* bytes received (all dumps) */
    int recvs;                /* recv calls (all dumps) */
    uint64_t lost;            /* follow: events lost to ENOBUFS */
    int bufsize;              /* bytes of the receive buffer now */
    void *priv;               /* buffer, sockets */
};

int  fl_census_new(struct fl_census **out);
void fl_census_free(struct fl_census *c);

/*
 * One dump of the TCP sockets of the calling thread's network namespace:
 * families is a bit mask (1: IPv4, 2: IPv6), states a mask of 1 << TCP_*
 * (0: all), port >= 0 keeps sockets whose local or remote port is port
 * (checked by the kernel's bytecode), -1 none; want_info asks for
 * INET_DIAG_INFO.  Replaces the records.  Returns the count or -errno.
 */
int  fl_census_dump(struct fl_census *c, int families, uint32_t states, int port,
                    int want_info);

/*
 * Parses len bytes of netlink messages into c's records (appending).  seq
 * != 0: messages of another sequence number are skipped.  Returns
 * FL_PARSE_MORE, FL_PARSE_DONE or -errno (an NLMSG_ERROR's code, -EBADMSG
 * for a message whose length does not fit, -ENOMEM).
 */
int  fl_census_parse(struct fl_census *c, const void *buf, size_t len, uint32_t seq);

/* Sets the receive buffer to size bytes (256 .. 4 MiB); a datagram that
 * does not fit (MSG_TRUNC) makes a dump double it and start again.  For
 * tests of that path; the default (64 KiB) fits every dump datagram. */
int  fl_census_set_buffer(struct fl_census *c, int size);

/* Why a socket looks dead or suspect (bits of fl_census_why's result). */
enum fl_census_why {
    FL_WHY_CLOSE_WAIT = 1,    /* the peer closed, this side did not */
    FL_WHY_RETRANS = 2,       /* RTO retransmissions or backoff outstanding */
    FL_WHY_ZERO_WINDOW = 4,   /* zero-window probe timer, or no send window
                                 with data queued */
    FL_WHY_NO_ACK = 8,        /* data unacknowledged, no ACK for > 2 RTOs */
    FL_WHY_KEEPALIVE = 16     /* keepalive probes sent and unanswered */
};

/* The reasons of one record (0: nothing suspect).  Fields beyond the
 * record's info_len count as absent. */
int  fl_census_why(const struct fl_census_rec *r);
/* fl_census_why of every record into out[0 .. c->n - 1]; counts per state
 * into states[0 .. 15] (may be NULL).  Returns how many records have a
 * reason. */
int  fl_census_classify(const struct fl_census *c, uint8_t *out, uint32_t *states);

/* Keeps only the records whose inode is a socket fd of this process
 * (/proc/self/fd) and sets their fd.  Returns the count kept or -errno. */
int  fl_census_keep_own(struct fl_census *c);

/* Bytecode for "local port == port or remote port == port" into out
 * (cap bytes); returns its length or -errno.  Exposed for tests. */
int  fl_census_port_bytecode(int port, uint8_t *out, int cap);

/*
 * The death log: a NETLINK_SOCK_DIAG socket bound to the TCP destroy
 * groups (families as in fl_census_dump).  fl_census_follow_wait waits up
 * to timeout_ms (< 0: forever) and reads what arrived into the records
 * (replacing them); it returns the count (0 on timeout), -ECANCELED once
 * fl_census_follow_stop was called (from any thread), or -errno.
 * ENOBUFS (the socket's queue overflowed) is not a failure: c->lost
 * counts the events lost (an estimate: the kernel tells only that some
 * were dropped; each ENOBUFS counts as at least one).
 */
int  fl_census_follow_open(struct fl_census *c, int families, int rcvbuf);
int  fl_census_follow_wait(struct fl_census *c, int timeout_ms);
void fl_census_follow_stop(struct fl_census *c);
void fl_census_follow_close(struct fl_census *c);
