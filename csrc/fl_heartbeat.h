/*
 * fastlive heartbeat: an application-level PING/PONG over many TCP
 * connections, run by one epoll set and one hashed timing wheel.
 *
 * Wire format v1 (docs/heartbeat.md has the reasoning):
 *
 *     byte 0     magic 0xFB
 *     byte 1     version (high nibble, 1) | type (low nibble: 1 PING, 2 PONG)
 *     bytes 2-3  sequence, unsigned 16-bit big-endian (a PONG echoes its PING's)
 *     byte 4     payload length L, 0..FL_HB_MAX_PAYLOAD (v1 sends 0)
 *     L bytes    payload (v1 receivers skip it)
 *
 * A v1 PING or PONG is 5 bytes.  Anything else is a protocol error for that
 * connection: bad magic or unknown type -> EPROTO, another version ->
 * EPROTONOSUPPORT, L > FL_HB_MAX_PAYLOAD -> EMSGSIZE, EOF inside a frame ->
 * EPROTO.  The verdict is FL_ERROR with that errno, method FL_M_HEARTBEAT.
 *
 * Who owns the bytes: a connection added without FL_HB_SHARED is a
 * heartbeat connection; the engine reads and writes it and every byte must
 * be a frame.  With FL_HB_SHARED the engine never reads: the application
 * reads its own stream (its framing reserves first byte 0xFB for heartbeat
 * frames), any data the kernel received counts as life (TCP_INFO
 * tcpi_last_data_recv, read only when the connection's deadline is due),
 * and a PING is written only when the kernel send queue is empty.
 */

enum fl_hb_wire {
    FL_HB_MAGIC = 251,          /* 0xFB */
    FL_HB_VERSION = 1,
    FL_HB_PING = 1,
    FL_HB_PONG = 2,
    FL_HB_HEADER_LEN = 5,       /* a v1 PING/PONG is exactly this long */
    FL_HB_MAX_PAYLOAD = 32
};

/* One parsed frame header. */
struct fl_hb_frame {
    int version;
    int type;
    unsigned int seq;
    unsigned int payload_len;
};

/* Parses the frame at the start of buf[0..len).  Returns the length of the
 * whole frame (header + payload) when all of it is there, 0 when more bytes
 * are needed, or -EPROTO / -EPROTONOSUPPORT / -EMSGSIZE as soon as the
 * bytes present prove the frame bad.  *out is filled once the header is
 * complete. */
int fl_hb_parse(const uint8_t *buf, size_t len, struct fl_hb_frame *out);
/* Writes a v1 frame without payload; returns FL_HB_HEADER_LEN or -EINVAL. */
int fl_hb_encode(int type, unsigned int seq, uint8_t *out, size_t len);

/* fl_hb_add flags. */
enum fl_hb_flag {
    FL_HB_SHARED = 1,   /* the application owns the read side (see above) */
    FL_HB_RTT = 2       /* queue an RTT sample for every PONG (fl_hb_rtt) */
};

/* What the queues hold. */
enum fl_hb_kind {
    FL_HB_DEATH = 1,    /* the connection is gone; the engine dropped it */
    FL_HB_RTT_SAMPLE = 2
};

struct fl_hb_event {
    int kind;                   /* enum fl_hb_kind */
    int fd;                     /* the fd number at fl_hb_add */
    uint64_t token;             /* the registration: slot | generation << 32 */
    struct fl_verdict verdict;  /* FL_HB_DEATH: why (method HEARTBEAT or EPOLL) */
    int64_t silent_us;          /* time since anything was last heard */
    int64_t rtt_us;             /* FL_HB_RTT_SAMPLE */
    int64_t detected_us;        /* CLOCK_MONOTONIC when the engine found it */
};

enum { FL_HB_RTT_BUCKETS = 16 };   /* RTT histogram: fl_hb_rtt_bound() */

struct fl_hb_stats {
    uint64_t pings_sent;
    uint64_t pings_skipped;     /* send queue full / not empty (shared) */
    uint64_t pongs_received;
    uint64_t pings_answered;
    uint64_t misses;            /* PINGs with no answer before the next PING or death */
    uint64_t withheld;          /* PINGs/PONGs not sent: the application made no progress */
    uint64_t graced;            /* deaths put off: our own PING had gone out late */
    uint64_t frames_received;
    uint64_t bytes_received;
    uint64_t timer_fires;       /* connections whose deadline came due */
    uint64_t wakeups;           /* epoll_wait returns */
    uint64_t coalesced;         /* sleeps to a due tick instead of epoll_wait */
    uint64_t deaths;
    uint64_t rtt_dropped;       /* samples lost because the RTT ring was full */
    uint64_t rtt_hist[FL_HB_RTT_BUCKETS];  /* every PONG's RTT, by bucket */
    int64_t rtt_sum_us;
    int64_t late_max_us;        /* tick boundary -> handled (a deadline waits
                                   for the next tick boundary: < tick_us more) */
    int64_t late_sum_us;
    uint64_t late_count;
    int64_t tick_us;
    int conns;
    int queued;                 /* deaths waiting to be collected */
};

struct fl_hb;

/*
 * Threading: fl_hb_new starts the engine's own thread (all signals
 * blocked), which runs PINGs, PONGs, reads and deadlines with no help from
 * the caller.  Deaths wait in a queue in C (bounded: a registration dies
 * once) until fl_hb_peek/fl_hb_commit take them; fl_hb_fileno is an
 * eventfd, readable while deaths are queued and after fl_hb_close.  Every
 * call is thread-safe (one mutex, which the engine thread drops while it
 * sleeps).  In a forked child every call returns -FL_E_FORKED and touches
 * nothing (the engine thread exists only in the parent).
 */

/* tick_ms: timer granularity (1..1000); capacity (0..2^24): connections
 * before the first grow, allocated up front up to 65536 (the arrays grow
 * in fl_hb_add, never in the engine thread; at most 2^24 registrations). */
int  fl_hb_new(int tick_ms, int capacity, struct fl_hb **out);
/* Stops and joins the engine thread, wakes every fl_hb_ready at once; the
 * memory stays valid until fl_hb_free.  Later calls return -ESHUTDOWN. */
int  fl_hb_close(struct fl_hb *hb);
void fl_hb_free(struct fl_hb *hb);
int  fl_hb_fileno(struct fl_hb *hb);
/* interval_ms >= 1, misses 2..1000 (PINGs at 1..misses-1 intervals of
 * silence, dead at misses); progress_ms 0 (off) or the longest time
 * without fl_hb_progress for which the engine still vouches for this end
 * (answers and sends PINGs).  -EEXIST if the socket is already watched;
 * with FL_HB_SHARED, -ENOPROTOOPT where TCP_INFO lacks tcpi_last_data_recv.
 * *token names the registration for fl_hb_remove and in its death. */
int  fl_hb_add(struct fl_hb *hb, int fd, int interval_ms, int misses, int flags,
               int progress_ms, uint64_t *token);
int  fl_hb_remove(struct fl_hb *hb, uint64_t token);
/* Sleeps until a death is queued (1), timeout_ms passes (0), a signal
 * arrives (-EINTR) or the engine is closed (-ESHUTDOWN). */
int  fl_hb_ready(struct fl_hb *hb, int timeout_ms);
/* Copies up to max queued deaths to out[] without taking them; *consumed
 * gets how many queue entries they span (removed registrations' deaths are
 * skipped).  fl_hb_commit(consumed) then takes them. */
int  fl_hb_peek(struct fl_hb *hb, struct fl_hb_event *out, int max, int *consumed);
int  fl_hb_commit(struct fl_hb *hb, int consumed);
/* Takes up to max RTT samples (connections added with FL_HB_RTT). */
int  fl_hb_rtt(struct fl_hb *hb, struct fl_hb_event *out, int max);
/* The application made progress (see progress_ms in fl_hb_add). */
void fl_hb_progress(struct fl_hb *hb);
/* Upper bound in microseconds of RTT histogram bucket i (the last: -1, +Inf). */
int64_t fl_hb_rtt_bound(int i);
int  fl_hb_get_stats(struct fl_hb *hb, struct fl_hb_stats *out);
int  fl_hb_reset_stats(struct fl_hb *hb);    /* counters to 0 (conns stays) */
