/*
 * fastlive core: single-socket liveness checks and TCP_INFO.
 *
 * This header is the one declaration of the C API.  cffi's cdef reads it
 * (build_ffi.py) and the C sources #include it, so the compiler checks the
 * two agree.  Keep it cdef-clean: no #include, no #if, no macros; constants
 * are enums.  Every exported name starts with fl_ / FL_.
 *
 * Conventions: functions return 0 (or a count) on success and -errno on
 * failure; errno is never left for the caller to read.  Per-socket problems
 * are verdicts (struct fl_verdict), not failures.
 */

/* The project's own copy of the Linux UAPI struct tcp_info (linux/tcp.h as
 * of 6.19), so a build against an old libc still knows the newest fields.
 * The kernel copies min(len, its own size) bytes: a field lies beyond the
 * returned length on an older kernel (or under qemu-user, which returns 4
 * bytes) and must then be treated as absent. */
struct fl_tcp_info {
    uint8_t  tcpi_state;
    uint8_t  tcpi_ca_state;
    uint8_t  tcpi_retransmits;
    uint8_t  tcpi_probes;
    uint8_t  tcpi_backoff;
    uint8_t  tcpi_options;
    uint8_t  tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;
    uint8_t  tcpi_delivery_rate_app_limited : 1, tcpi_fastopen_client_fail : 2;

    uint32_t tcpi_rto;
    uint32_t tcpi_ato;
    uint32_t tcpi_snd_mss;
    uint32_t tcpi_rcv_mss;

    uint32_t tcpi_unacked;
    uint32_t tcpi_sacked;
    uint32_t tcpi_lost;
    uint32_t tcpi_retrans;
    uint32_t tcpi_fackets;

    uint32_t tcpi_last_data_sent;
    uint32_t tcpi_last_ack_sent;
    uint32_t tcpi_last_data_recv;
    uint32_t tcpi_last_ack_recv;

    uint32_t tcpi_pmtu;
    uint32_t tcpi_rcv_ssthresh;
    uint32_t tcpi_rtt;
    uint32_t tcpi_rttvar;
    uint32_t tcpi_snd_ssthresh;
    uint32_t tcpi_snd_cwnd;
    uint32_t tcpi_advmss;
    uint32_t tcpi_reordering;

    uint32_t tcpi_rcv_rtt;
    uint32_t tcpi_rcv_space;

    uint32_t tcpi_total_retrans;

    uint64_t tcpi_pacing_rate;
    uint64_t tcpi_max_pacing_rate;
    uint64_t tcpi_bytes_acked;
    uint64_t tcpi_bytes_received;
    uint32_t tcpi_segs_out;
    uint32_t tcpi_segs_in;

    uint32_t tcpi_notsent_bytes;
    uint32_t tcpi_min_rtt;
    uint32_t tcpi_data_segs_in;
    uint32_t tcpi_data_segs_out;

    uint64_t tcpi_delivery_rate;

    uint64_t tcpi_busy_time;
    uint64_t tcpi_rwnd_limited;
    uint64_t tcpi_sndbuf_limited;

    uint32_t tcpi_delivered;
    uint32_t tcpi_delivered_ce;

    uint64_t tcpi_bytes_sent;
    uint64_t tcpi_bytes_retrans;
    uint32_t tcpi_dsack_dups;
    uint32_t tcpi_reord_seen;

    uint32_t tcpi_rcv_ooopack;

    uint32_t tcpi_snd_wnd;
    uint32_t tcpi_rcv_wnd;

    uint32_t tcpi_rehash;

    uint16_t tcpi_total_rto;
    uint16_t tcpi_total_rto_recoveries;
    uint32_t tcpi_total_rto_time;

    uint32_t tcpi_received_ce;
    uint32_t tcpi_delivered_e1_bytes;
    uint32_t tcpi_delivered_e0_bytes;
    uint32_t tcpi_delivered_ce_bytes;
    uint32_t tcpi_received_e1_bytes;
    uint32_t tcpi_received_e0_bytes;
    uint32_t tcpi_received_ce_bytes;
    uint32_t tcpi_ecn_mode : 2, tcpi_accecn_opt_seen : 2,
             tcpi_accecn_fail_mode : 4, tcpi_options2 : 24;
};

/* What a check concluded about the peer. */
enum fl_status {
    FL_ALIVE = 0,        /* no sign of death (not proof of life) */
    FL_PEER_CLOSED = 1,  /* FIN received: the peer will send nothing more */
    FL_RESET = 2,        /* RST received (ECONNRESET / EPIPE after RST) */
    FL_TIMED_OUT = 3,    /* a kernel or socket timer expired */
    FL_UNREACHABLE = 4,  /* ICMP said host/net unreachable */
    FL_ERROR = 5,        /* some other socket error, see err */
    FL_CLOSED = 6,       /* the kernel already closed the connection */
    FL_INVALID = 7       /* not a connected TCP socket: see err */
};

/* Which method produced a verdict. */
enum fl_method {
    FL_M_PEEK = 0, FL_M_SEND = 1, FL_M_SO_ERROR = 2, FL_M_SELECT = 3,
    FL_M_POLL = 4, FL_M_TCP_INFO = 5, FL_M_KEEPALIVE = 6, FL_M_RCVTIMEO = 7,
    FL_M_HEARTBEAT = 8, FL_M_EPOLL = 9, FL_M_USER_TIMEOUT = 10
};

/* Bits of fl_verdict.flags. */
enum fl_flag {
    FL_F_DATA_PENDING = 1,   /* unread bytes wait in the receive queue */
    FL_F_SUSPECT = 2,        /* TCP_INFO: retransmits/probes/backoff climbing */
    FL_F_SELECT_FALLBACK = 4,/* fd >= FD_SETSIZE: select() replaced by poll() */
    FL_F_WRITE_OPEN = 8,     /* peer half-closed; our direction still open */
    FL_F_LOCAL_SHUTDOWN = 16,/* our own shutdown() (or close) explains what
                                was seen: the peer is not blamed */
    FL_F_BEHIND_BACK = 256   /* the fd was closed (or its number reused)
                                behind an engine's back: INVALID, EBADF */
};

struct fl_verdict {
    int status;      /* enum fl_status */
    int err;         /* errno behind the verdict, 0 if none */
    int method;      /* enum fl_method */
    int tcp_state;   /* tcpi_state when the method saw it, else -1 */
    int flags;       /* enum fl_flag bits */
};

/* ---- The one rule: what an observation of a socket means ---------------
 *
 * Every path that concludes something about a peer (the check_* functions,
 * every Batch sweep, the Monitor, the heartbeat engine) collects what it saw
 * - an errno, the TCP state, poll/epoll bits, what a read returned - and
 * hands it to fl_verdict_decide(), which alone turns it into a status.
 * Callers never map errno or state to a status themselves.
 *
 * seen: bits of enum fl_seen.  The poll bits have their poll(2)/epoll(7)
 * values (POLLIN = EPOLLIN, ...), so revents can be passed as they are.
 */
enum fl_seen {
    FL_EV_IN = 0x1,            /* readable (POLLIN / EPOLLIN) */
    FL_EV_ERR = 0x8,           /* POLLERR: an error is pending (pass it as err) */
    FL_EV_HUP = 0x10,          /* POLLHUP: both directions are shut */
    FL_EV_NVAL = 0x20,         /* POLLNVAL: fd not open */
    FL_EV_RDHUP = 0x2000,      /* POLLRDHUP: the read side is shut */
    FL_EV_EOF = 0x10000,       /* a read returned 0 bytes */
    FL_EV_DATA = 0x20000,      /* a read/peek returned bytes */
    FL_EV_UNCONNECTED = 0x40000, /* TCP_INFO: CLOSE, and no segment ever went
                                    either way: a socket never connected */
    FL_EV_EXPIRED = 0x80000    /* the method's own deadline passed with
                                  nothing heard (SO_RCVTIMEO, heartbeat) */
};

/* Decides status, err and flags of *v from one observation; sets
 * v->tcp_state = tcp_state; leaves v->method alone and keeps flags the
 * caller already set (only ORs).  err: the errno the path saw (SO_ERROR,
 * a failed recv/send/getsockopt), 0 for none; EAGAIN/EWOULDBLOCK/EINTR
 * count as none.  tcp_state: tcpi_state, or -1 when the path did not read
 * it.  The rule, first match wins:
 *
 *   1. NVAL, EBADF, ENOTSOCK, EOPNOTSUPP, ENOPROTOOPT, EINVAL, EFAULT:
 *      INVALID with that errno (EBADF for NVAL).  Callers add
 *      FL_F_BEHIND_BACK when they know the fd was closed under them.
 *   2. state LISTEN: INVALID/EOPNOTSUPP.  SYN_SENT, SYN_RECV, an unknown
 *      state, or CLOSE + FL_EV_UNCONNECTED: INVALID/ENOTCONN (no peer yet).
 *   3. ENOTCONN: CLOSED (err 0) in state CLOSE (it was connected: the
 *      kernel closed it and an earlier call took the reason); else
 *      INVALID/ENOTCONN.
 *   4. EPIPE in FIN_WAIT1/FIN_WAIT2: our own SHUT_WR stopped the write and
 *      the peer has sent nothing: CLOSED + LOCAL_SHUTDOWN, err EPIPE.
 *      EPIPE in CLOSING/TIME_WAIT/LAST_ACK: both sides sent FIN:
 *      PEER_CLOSED + LOCAL_SHUTDOWN, err EPIPE.  Any other EPIPE (state
 *      CLOSE: the kernel sets EPIPE for an RST received in CLOSE_WAIT, and
 *      every write after an RST fails so) is RESET.
 *   5. Any other errno: ECONNRESET/ECONNABORTED RESET, ETIMEDOUT TIMED_OUT,
 *      EHOSTUNREACH/ENETUNREACH/EHOSTDOWN/ENETDOWN UNREACHABLE, else ERROR.
 *   6. FL_EV_EXPIRED: TIMED_OUT (err EAGAIN unless the caller gave one).
 *   7. state CLOSE: CLOSED (err 0; the reason, if any, was taken earlier).
 *   8. state CLOSE_WAIT (+ WRITE_OPEN: we may still send), LAST_ACK,
 *      CLOSING, TIME_WAIT: the peer's FIN arrived: PEER_CLOSED.
 *   9. HUP, RDHUP or EOF in ESTABLISHED/FIN_WAIT1/FIN_WAIT2: the read side
 *      is shut but no FIN came: our own shutdown(SHUT_RD): CLOSED +
 *      LOCAL_SHUTDOWN.  With the state unknown: PEER_CLOSED (+ WRITE_OPEN
 *      for RDHUP without HUP) - callers that can read the state do.
 *  10. ERR with no errno left to take: CLOSED.
 *  11. Otherwise ALIVE (err 0), DATA_PENDING when DATA, or IN without any
 *      hangup/error bit, was seen.  FIN_WAIT1/2 alone (our SHUT_WR, the
 *      peer still there) is ALIVE. */
void fl_verdict_decide(int err, int tcp_state, int seen, struct fl_verdict *v);

/* Socket validation and errno classification. */
int  fl_status_of_errno(int err);          /* rule 5 alone, for errno only */
int  fl_tcp_state(int fd);                 /* >= 0 state, or -errno */
/* The state for fl_verdict_decide, from a TCP_INFO read long enough to
 * tell a never-connected socket (Linux 4.2+ tcpi_segs_in/out): returns
 * tcpi_state (or -errno; -EOPNOTSUPP for a non-TCP socket) and ORs
 * FL_EV_UNCONNECTED into *seen for CLOSE with no segment ever. */
int  fl_tcp_state_seen(int fd, int *seen);

/* Errors of fastlive's own, returned negated like -errno. */
enum fl_error {
    FL_E_FORKED = 10001      /* the object was made in the parent of this
                                forked process: the child must make its own */
};

/* fork(): a counter the child increments (pthread_atfork), so an object
 * can tell it is being used in a forked child of the process that made it. */
unsigned int fl_fork_generation(void);

/* TCP_INFO: fills *out (zeroed first), returns bytes the kernel gave or -errno. */
int  fl_tcp_info(int fd, struct fl_tcp_info *out);

/* Method 1: read/write errors. */
void fl_check_peek(int fd, struct fl_verdict *v);
void fl_check_so_error(int fd, struct fl_verdict *v);
long fl_send(int fd, const void *buf, size_t len, int flags, struct fl_verdict *v);

/* Method 2: readiness.  timeout_ms < 0 waits forever (the Python layer
 * never passes that).  select() falls back to poll() for fd >= FD_SETSIZE.
 * Return 0, or -EINTR when a signal interrupted the wait (*v is then not
 * filled): the caller runs its signal handlers and calls again with the
 * time left (PEP 475). */
int  fl_check_select(int fd, int timeout_ms, struct fl_verdict *v);
int  fl_check_poll(int fd, int timeout_ms, struct fl_verdict *v);

/* Method 3: TCP_INFO state, with the suspect signal.  The signal itself,
 * on a record of len bytes: retransmissions, keepalive probes or RTO
 * backoff outstanding, or data unacknowledged with no ACK for > 2 RTOs. */
void fl_check_tcp_info(int fd, struct fl_verdict *v);
int  fl_tcp_info_suspect(const struct fl_tcp_info *ti, int len);

/* Method 4: keepalive and TCP_USER_TIMEOUT. */
struct fl_keepalive {
    int enabled;            /* SO_KEEPALIVE */
    int idle_s;             /* TCP_KEEPIDLE */
    int interval_s;         /* TCP_KEEPINTVL */
    int count;              /* TCP_KEEPCNT */
    unsigned int user_timeout_ms; /* TCP_USER_TIMEOUT, 0 = off */
};
int  fl_get_keepalive(int fd, struct fl_keepalive *out);
/* Any field < 0 is left as it is; user_timeout_ms is set when set_ut != 0. */
int  fl_set_keepalive(int fd, int enabled, int idle_s, int interval_s, int count,
                      int set_ut, unsigned int user_timeout_ms);

/* Method 5: SO_RCVTIMEO / SO_SNDTIMEO, in microseconds (0 = no timeout). */
int  fl_get_timeouts(int fd, int64_t *rcv_us, int64_t *snd_us);
int  fl_set_timeouts(int fd, int64_t rcv_us, int64_t snd_us);
/* SO_RCVTIMEO in whole milliseconds, rounded up: >= 1, or -errno:
 * -EINVAL for none (0) and for one longer than 2**31 - 1 ms (24.8 days,
 * what poll() takes): either would wait practically forever. */
int  fl_rcvtimeo_ms(int fd);
/* Waits up to SO_RCVTIMEO (timeout_ms < 0) or timeout_ms for data,
 * peeking only.  0, or -EINTR as for fl_check_poll. */
int  fl_check_rcvtimeo(int fd, int timeout_ms, struct fl_verdict *v);

/* Build identity, checked at import against the Python package version. */
const char *fl_version(void);
