/*
 * fastlive monitor: an epoll set that reports deaths, O(events) per wait
 * (see monitor.c for the rules).
 *
 * Each registration has a token, slot | generation << 32, stored in the
 * epoll_event's data and handed back with every death.  The monitor also
 * remembers the socket's identity (SO_COOKIE, else the inode from fstat)
 * and checks it whenever it is about to act on an fd number, because the
 * number may by then name another socket.
 */

/* Bits of fl_death.flags beyond enum fl_flag. */
enum fl_monitor_flag {
    FL_F_ARMED = 512         /* keepalive/TCP_USER_TIMEOUT were armed */
};

struct fl_death {
    uint64_t token;          /* as returned by fl_monitor_add */
    int fd;                  /* the fd number when registered */
    int status;              /* enum fl_status */
    int err;                 /* errno behind it, 0 if none */
    int method;              /* enum fl_method */
    int flags;               /* enum fl_flag | enum fl_monitor_flag */
    int events;              /* epoll events that reported it, 0 if none */
};

struct fl_monitor;

/* max_events: size of the fixed event array epoll_wait fills (1..65536). */
int  fl_monitor_new(int max_events, struct fl_monitor **out);
void fl_monitor_free(struct fl_monitor *m);
int  fl_monitor_fileno(const struct fl_monitor *m);
int  fl_monitor_count(struct fl_monitor *m);
/* Registers fd (a connected TCP socket) for EPOLLRDHUP|EPOLLERR|EPOLLHUP.
 * armed marks that the caller armed the kernel timers (reported in flags).
 * Returns 1 and *token for a new registration, 0 and the existing token
 * when this very socket is already registered, -errno on failure.  If the
 * fd number is registered but now names another socket, the old
 * registration becomes a pending death (FL_F_BEHIND_BACK). */
int  fl_monitor_add(struct fl_monitor *m, int fd, int armed, uint64_t *token);
/* Ends a registration; 0, or -ENOENT for an unknown or stale token. */
int  fl_monitor_remove(struct fl_monitor *m, uint64_t token);
/* The token registered for fd number fd (any socket), or 0 for none. */
uint64_t fl_monitor_token_of(struct fl_monitor *m, int fd);
/* Deaths since the last call, at most max, waiting up to timeout_ms (>= 0)
 * for the first.  A reported registration is removed.  Count or -errno.
 * One waiter at a time; add/remove/verify may run in other threads while
 * it sleeps in epoll_wait (a mutex guards the tables, never the sleep). */
int  fl_monitor_wait(struct fl_monitor *m, int timeout_ms,
                     struct fl_death *out, int max);
/* Makes a sleeping fl_monitor_wait return now (e.g. before freeing). */
void fl_monitor_wake(struct fl_monitor *m);
/* O(N): checks every registration's identity and queues a pending death
 * for each fd closed or reused behind the monitor's back.  Count found. */
int  fl_monitor_verify(struct fl_monitor *m);

/* A socket's inode from /proc/self/fd (the monitor's identity on kernels
 * without SO_COOKIE): 0, -EBADF, -ENOTSOCK. */
int fl_socket_inode(int fd, uint64_t *ino);
