/*
 * The article's client and server programs, ported (article.c).
 *
 * These are whole programs, not checks: they install SIGINT and SIGPIPE
 * handlers, print to the C stdout (fd 1, flushed line by line), sleep one
 * second per pass, fork one child per connection and, by default, never
 * return.  Call them from the main thread of a process you are willing to
 * hand over (the `fastlive client` / `fastlive server` commands do).
 *
 * Faithful mode (all zero below but host/port/method) does what the
 * reconstructed originals in tests/orig/ do, line for line.  The other
 * fields bound the loops for tests and add the "stop" mode.
 */

/* Server variants: sections 1..6 of the article. */
enum fl_article_method {
    FL_ART_RW = 0,         /* 1: read/write return values, errno, SIGPIPE */
    FL_ART_SELECT = 1,     /* 2: select() with 10 ms timeout before read */
    FL_ART_TCPINFO = 2,    /* 3: check_tcp_alive(): TCP_INFO state each second */
    FL_ART_KEEPALIVE = 3,  /* 4: SO_KEEPALIVE + TCP_KEEPIDLE/INTVL/CNT, then 1 */
    FL_ART_RCVTIMEO = 4,   /* 5: SO_RCVTIMEO/SO_SNDTIMEO 10.2 s, then 1 */
    FL_ART_HEARTBEAT = 5   /* 6: no data for heartbeat_s seconds = gone */
};

struct fl_article_opts {
    const char *host;      /* dotted IPv4 address (inet_pton), e.g. "127.0.0.1" */
    int port;              /* 1..65535 */
    int method;            /* enum fl_article_method (server only) */
    int stop_on_death;     /* 1: return where the article has "//return",
                              printing which method noticed what, when */
    int iterations;        /* passes per connection, 0 = forever */
    int connections;       /* server: accept this many, wait for their
                              children, return; 0 = forever */
    int keepalive_idle_s;  /* section 4: TCP_KEEPIDLE (<= 0: 10) */
    int keepalive_intvl_s; /* TCP_KEEPINTVL (<= 0: 1) */
    int keepalive_cnt;     /* TCP_KEEPCNT (<= 0: 3) */
    int heartbeat_s;       /* section 6: silence that means gone (<= 0: 3) */
};

/* Both return 0 when the loop ends (bounded or stop mode; in faithful mode
 * they never return: SIGINT exits the process with status 0), or -errno
 * when the setup failed (after printing the article's "socket error",
 * "bind error", ... line).  -EINVAL: bad host, port or method. */
int fl_article_client(const struct fl_article_opts *o);
int fl_article_server(const struct fl_article_opts *o);
