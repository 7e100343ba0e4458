/*
 * fastlive batch: one C call checks many sockets (see batch.c).
 *
 * A batch is built once from an array of fds.  It owns, in C memory, its
 * copy of the fds, the struct pollfd array poll() takes, and the result
 * arrays every sweep overwrites in place; nothing is allocated per sweep.
 * Rebuild (fl_batch_set) only when the set of connections changes.
 *
 * Results per entry i (valid after any sweep):
 *   status[i]    enum fl_status (FL_ALIVE for no sign of death)
 *   err[i]       errno behind the status, 0 if none
 *   tcp_state[i] tcpi_state when the sweep saw it, else 0
 *   flags[i]     enum fl_flag bits (DATA_PENDING, SUSPECT, WRITE_OPEN)
 * and dead[0 .. ndead-1]: the indices, ascending, whose status is not
 * FL_ALIVE (dead peers and bad entries alike).  A sweep returns ndead or
 * -errno (for a failure of the sweep itself, not of one socket).
 *
 * Every verdict is decided by fl_verdict_decide (fl_core.h), the rule
 * the single-socket checks and the Monitor use too.
 *
 * Bad entries never fail a sweep: -1 and other negative fds, fds that are
 * not open, not sockets, not TCP, listening, still connecting or never
 * connected get an FL_INVALID verdict (err EBADF, ENOTSOCK, EOPNOTSUPP,
 * EOPNOTSUPP, ENOTCONN, ENOTCONN) when the batch is built; the second and later copies of the same fd get
 * FL_INVALID with EEXIST.  Those entries are skipped by every sweep.  An fd
 * closed after the build shows up per sweep (POLLNVAL, EBADF).
 *
 * Every sweep returns -FL_E_FORKED in a forked child of the process that
 * built the batch (it would take the parent's pending errors).
 */

struct fl_batch {
    int n;                      /* entries */
    int ndead;                  /* entries in dead[] after the last sweep */
    int nbad;                   /* entries found bad when built */
    int method;                 /* enum fl_method of the last sweep, -1 none */
    int *fds;                   /* [n] the fds as given */
    uint8_t *status;            /* [n] enum fl_status */
    uint8_t *tcp_state;         /* [n] */
    uint8_t *flags;             /* [n] */
    int32_t *err;               /* [n] */
    int32_t *dead;              /* [n], ndead used */
    struct fl_tcp_info *info;   /* [n] records of the last tcp_info sweep */
    uint32_t *info_len;         /* [n] bytes the kernel returned, 0 if none */
    void *priv;                 /* pollfds and the build-time verdicts */
};

/* Builds a batch from n fds (n >= 0); *out is NULL on failure. */
int  fl_batch_new(const int *fds, int n, struct fl_batch **out);
void fl_batch_free(struct fl_batch *b);
/* Replaces the set (arrays are reused when large enough); re-validates. */
int  fl_batch_set(struct fl_batch *b, const int *fds, int n);

/* One poll() of every entry for POLLIN|POLLRDHUP, timeout_ms >= 0 (0: just
 * look).  POLLERR takes the pending error with SO_ERROR; on a hangup the
 * state is read to tell the peer's FIN (PEER_CLOSED, WRITE_OPEN while we
 * may still send) from our own SHUT_RD (CLOSED, LOCAL_SHUTDOWN).  -EINTR
 * at once when a signal interrupts the wait (the arrays keep the last
 * sweep's results): the caller runs the handler and calls again. */
int  fl_batch_sweep_poll(struct fl_batch *b, int timeout_ms);
/* One getsockopt(TCP_INFO) of one byte per entry: the state only. */
int  fl_batch_sweep_states(struct fl_batch *b);
/* One getsockopt(TCP_INFO) of the whole record per entry, into info[i]
 * (info_len[i] bytes valid); state verdict plus the SUSPECT flag. */
int  fl_batch_sweep_tcp_info(struct fl_batch *b);
/* One recv(MSG_PEEK|MSG_DONTWAIT) of one byte per entry. */
int  fl_batch_sweep_peek(struct fl_batch *b);
