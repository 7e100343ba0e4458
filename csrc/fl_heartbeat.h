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
    FL_HB_RTT = 2       /* report an RTT sample for every PONG */
};

/* What fl_hb_wait reports. */
enum fl_hb_kind {
    FL_HB_DEATH = 1,    /* the connection is gone; the engine dropped it */
    FL_HB_RTT_SAMPLE = 2
};

struct fl_hb_event {
    int kind;                   /* enum fl_hb_kind */
    int fd;
    struct fl_verdict verdict;  /* FL_HB_DEATH: why (method HEARTBEAT or EPOLL) */
    int64_t silent_us;          /* time since anything was last heard */
    int64_t rtt_us;             /* FL_HB_RTT_SAMPLE */
};

struct fl_hb_stats {
    uint64_t pings_sent;
    uint64_t pings_skipped;     /* send queue full / not empty (shared) */
    uint64_t pongs_received;
    uint64_t pings_answered;
    uint64_t frames_received;
    uint64_t bytes_received;
    uint64_t timer_fires;       /* connections whose deadline came due */
    uint64_t wakeups;           /* epoll_wait returns */
    uint64_t coalesced;         /* sleeps to a due tick instead of epoll_wait */
    uint64_t deaths;
    uint64_t rtt_dropped;       /* samples lost because the queue was full */
    int64_t late_max_us;        /* tick boundary -> handled (a deadline waits
                                   for the next tick boundary: < tick_us more) */
    int64_t late_sum_us;
    uint64_t late_count;
    int64_t tick_us;
    int conns;
};

struct fl_hb;

/* tick_ms: timer granularity (1..1000); capacity: connections before the
 * first grow (the arrays grow in fl_hb_add, never in fl_hb_wait). */
int  fl_hb_new(int tick_ms, int capacity, struct fl_hb **out);
void fl_hb_free(struct fl_hb *hb);
/* The epoll fd: readable when fl_hb_wait(0) has work (a timerfd in the set
 * fires at the next deadline), for use inside another event loop. */
int  fl_hb_fileno(struct fl_hb *hb);
/* interval_ms >= 1, misses 2..1000 (PINGs at 1..misses-1 intervals of
 * silence, dead at misses); -EEXIST if fd is already watched; with
 * FL_HB_SHARED, -ENOPROTOOPT where TCP_INFO lacks tcpi_last_data_recv. */
int  fl_hb_add(struct fl_hb *hb, int fd, int interval_ms, int misses, int flags);
int  fl_hb_remove(struct fl_hb *hb, int fd);
/* Runs the engine for up to timeout_ms (0 = one non-blocking pass) and
 * returns as soon as at least one death is in out[], or out[] is full;
 * returns the number of events written or -errno. */
int  fl_hb_wait(struct fl_hb *hb, int timeout_ms, struct fl_hb_event *out, int max);
void fl_hb_get_stats(struct fl_hb *hb, struct fl_hb_stats *out);
void fl_hb_reset_stats(struct fl_hb *hb);    /* counters to 0 (conns stays) */
