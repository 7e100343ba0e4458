/*
 * fastlive monitor: an epoll set that reports deaths, O(events) per wait
 * (see monitor.c for the rules).
 *
 * Each registration has a token, slot | generation << 32, stored in the
 * epoll_event's data and handed back with every death.  The monitor also
 * remembers the socket's identity (SO_COOKIE, else the inode) and checks
 * it whenever it is about to act on an fd number, because the number may
 * by then name another socket.
 */

/* Bits of fl_death.flags beyond enum fl_flag. */
enum fl_monitor_flag {
    FL_F_ARMED = 512         /* keepalive/TCP_USER_TIMEOUT were armed */
};

/* Errors of the monitor's own, returned negated (see also FL_E_FORKED). */
enum fl_monitor_error {
    FL_E_CLOSED = 10002,     /* fl_monitor_close() ran */
    FL_E_BUSY = 10003        /* another thread is the waiter */
};

/* Behind-back audit: while registrations exist, a timerfd in the epoll set
 * fires every FL_AUDIT_MS and the wait that sees it checks the identity of
 * the next FL_AUDIT_SLICE registrations (round robin). */
enum fl_monitor_audit {
    FL_AUDIT_MS = 500,
    FL_AUDIT_SLICE = 1024
};

/* fl_monitor_counts' table: deaths by [status][method]. */
enum fl_monitor_counts {
    FL_COUNT_STATUSES = 8,
    FL_COUNT_METHODS = 16
};

struct fl_death {
    uint64_t token;          /* as returned by fl_monitor_add */
    int fd;                  /* the fd number when registered */
    int status;              /* enum fl_status */
    int err;                 /* errno behind it, 0 if none */
    int method;              /* enum fl_method */
    int flags;               /* enum fl_flag | enum fl_monitor_flag */
    int events;              /* epoll events that reported it, 0 if none */
    int tcp_state;           /* tcpi_state when decided, -1 if unknown */
};

struct fl_monitor;

/* max_events: size of the fixed event array epoll_wait fills (1..65536). */
int  fl_monitor_new(int max_events, struct fl_monitor **out);
/* Frees everything (closing first if needed).  In a forked child it only
 * closes the child's copies of the monitor's fds and frees memory: the
 * parent's epoll set is never touched. */
void fl_monitor_free(struct fl_monitor *m);
/* Wakes every waiter (each returns what it has, usually nothing), waits
 * until none is inside fl_monitor_wait, closes the fds and frees the
 * tables; every later call returns -FL_E_CLOSED.  The struct itself lives
 * until fl_monitor_free, so a thread racing close() never touches freed
 * memory.  Idempotent.  In a forked child: as fl_monitor_free's child case. */
int  fl_monitor_close(struct fl_monitor *m);
/* 1 when m was made in the parent of this forked process. */
int  fl_monitor_forked(const struct fl_monitor *m);
int  fl_monitor_fileno(const struct fl_monitor *m);   /* -1 once closed */
int  fl_monitor_count(struct fl_monitor *m);
/* Registers fd (a connected TCP socket) for EPOLLRDHUP|EPOLLERR|EPOLLHUP.
 * armed marks that the caller armed the kernel timers (reported in flags).
 * Returns 1 and *token for a new registration, 0 and the existing token
 * when this very socket is already registered, -errno on failure
 * (-ENOTCONN for a socket never connected or still connecting,
 * -EOPNOTSUPP for a listening one).  If the fd number is registered but
 * now names another socket, the old registration becomes a pending death
 * (FL_F_BEHIND_BACK). */
int  fl_monitor_add(struct fl_monitor *m, int fd, int armed, uint64_t *token);
/* Ends a registration; 0, or -ENOENT for an unknown or stale token. */
int  fl_monitor_remove(struct fl_monitor *m, uint64_t token);
/* The token registered for the socket fd names now, or 0 for none (also
 * when the number's registration belongs to a socket since closed). */
uint64_t fl_monitor_token_of(struct fl_monitor *m, int fd);

/* Deaths, waiting up to timeout_ms (>= 0) for the first.
 *
 * Deaths taken from the kernel are queued in the monitor and stay queued
 * until the caller confirms it has them: the call copies up to max queued
 * deaths into out and returns that count n; the caller then stores n into
 * *fl_monitor_ack_cell(m) (a plain store: no call, so nothing can interrupt
 * it), and the next call drops them.  If the caller fails before that
 * (a signal handler raised), it calls fl_monitor_abort() and the same
 * deaths are returned again.  A reported registration is removed.
 *
 * Returns n >= 0; -EINTR when a signal interrupted the sleep with nothing
 * to report (the caller runs its handlers and calls again with the time
 * left); -FL_E_BUSY when another thread is the waiter (from its call until
 * its ack or abort); -FL_E_CLOSED; -FL_E_FORKED; or -errno.  add, remove,
 * verify and close may run in other threads while it sleeps (the mutex
 * guards the tables, never the sleep); close() makes it return at once. */
int  fl_monitor_wait(struct fl_monitor *m, int timeout_ms,
                     struct fl_death *out, int max);
int *fl_monitor_ack_cell(struct fl_monitor *m);
/* fl_monitor_wait(m, 0, out, max) with the out array given once, for the
 * cheapest possible wait(0) (one argument to convert per call).  out must
 * live as long as m; pass it before the first fl_monitor_poll. */
void fl_monitor_set_out(struct fl_monitor *m, struct fl_death *out, int max);
int  fl_monitor_poll(struct fl_monitor *m);
/* Deaths the caller acknowledged (it has them), by status and method:
 * copies FL_COUNT_STATUSES * FL_COUNT_METHODS counters, row-major, into
 * out.  Readable after close. */
void fl_monitor_counts(struct fl_monitor *m, uint64_t *out);
/* Gives the deaths of the calling thread's last wait back to the queue
 * (unacknowledged) and ends its turn as the waiter; no-op otherwise. */
void fl_monitor_abort(struct fl_monitor *m);
/* O(N): checks every registration's identity and queues a pending death
 * for each fd closed or reused behind the monitor's back.  Count found. */
int  fl_monitor_verify(struct fl_monitor *m);

/* A socket's inode from /proc/self/fd (the monitor's identity on kernels
 * without SO_COOKIE): 0, -EBADF, -ENOTSOCK. */
int fl_socket_inode(int fd, uint64_t *ino);
