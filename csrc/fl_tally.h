/*
 * fastlive tally: the figures a metrics scrape needs, computed in one pass
 * over a census's records (see tally.c), so a scrape costs no Python
 * object per socket.
 */

/* Suspect reasons, in the order fl_tcp_info_suspect tests them; a socket
 * counts under the first that applies. */
enum fl_tally_reason {
    FL_SUSPECT_RETRANSMITS = 0,   /* tcpi_retransmits: RTO retransmissions unanswered */
    FL_SUSPECT_PROBES = 1,        /* tcpi_probes: keepalive / zero-window probes unanswered */
    FL_SUSPECT_BACKOFF = 2,       /* tcpi_backoff: RTO backed off */
    FL_SUSPECT_NO_ACK = 3,        /* data unacknowledged, no ACK for over 2 RTOs */
    FL_SUSPECT_REASONS = 4
};

struct fl_tally {
    uint32_t sockets;             /* records tallied */
    uint32_t states[16];          /* by kernel state number (TCP_ESTABLISHED = 1 ...) */
    uint32_t suspect[4];          /* by enum fl_tally_reason */
    uint32_t retransmitting;      /* retransmit timer pending with retries > 0 */
    uint32_t zero_window;         /* zero-window probe timer pending, or the peer's
                                     window is 0 with data queued to send */
    uint32_t close_wait_ports;    /* distinct local ports with CLOSE_WAIT sockets */
    uint32_t close_wait_rest;     /* CLOSE_WAIT sockets on ports beyond the top k */
};

/*
 * Tallies c's records into t.  The k local ports with the most CLOSE_WAIT
 * sockets go to top_port/top_count (most first; ties: lower port first)
 * and the rest are summed in t->close_wait_rest.  scratch is 65536 zeroed
 * uint32_t the caller owns; it is zeroed again on return.  Returns how
 * many top entries were filled (<= k), or -EINVAL.
 */
int fl_census_tally(const struct fl_census *c, struct fl_tally *t, uint32_t *scratch,
                    uint16_t *top_port, uint32_t *top_count, int k);
