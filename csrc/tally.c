/*
 * fastlive tally: one pass over a census (fl_census.h) for the metrics
 * exporters.  Reads only the records; no system call, no allocation.
 *
 * What the kernel's fields mean here (net/ipv4/inet_diag.c, tcp_diag.c):
 * idiag_timer 1 with idiag_retrans > 0 is a retransmission timer that has
 * already fired (icsk_retransmits); idiag_timer 4 is the zero-window probe
 * (persist) timer, pending while the peer advertises a zero window and we
 * have data to send.  tcp_info's suspect rule is fl_tcp_info_suspect's.
 */
#include "fl_prelude.h"
#include "fl_core.h"
#include "fl_census.h"
#include "fl_tally.h"

#include <errno.h>
#include <string.h>

#define TIMER_RETRANSMIT 1
#define TIMER_ZERO_WINDOW 4
#define ST_ESTABLISHED 1
#define ST_CLOSE_WAIT 8

#define HAS(len, field) ((len) >= (uint32_t)(offsetof(struct fl_tcp_info, field) \
                                              + sizeof(((struct fl_tcp_info *)0)->field)))

static int reason_of(const struct fl_tcp_info *ti, uint32_t len)
{
    if (HAS(len, tcpi_rto)) {
        if (ti->tcpi_retransmits)
            return FL_SUSPECT_RETRANSMITS;
        if (ti->tcpi_probes)
            return FL_SUSPECT_PROBES;
        if (ti->tcpi_backoff)
            return FL_SUSPECT_BACKOFF;
    }
    if (HAS(len, tcpi_last_ack_recv) && ti->tcpi_unacked > 0 && ti->tcpi_rto > 0
        && (uint64_t)ti->tcpi_last_ack_recv * 1000 > 2ull * ti->tcpi_rto)
        return FL_SUSPECT_NO_ACK;
    return -1;
}

/* Inserts (port, n) into the top list (len *have of cap k), most first. */
static void top_insert(uint16_t *port, uint32_t *cnt, int *have, int k,
                       uint16_t p, uint32_t n, uint32_t *rest)
{
    int i = *have;

    if (i == k) {
        if (k == 0 || n < cnt[k - 1] || (n == cnt[k - 1] && p > port[k - 1])) {
            *rest += n;
            return;
        }
        *rest += cnt[k - 1];        /* the last one is pushed out */
        i = k - 1;
    } else {
        (*have)++;
    }
    while (i > 0 && (cnt[i - 1] < n || (cnt[i - 1] == n && port[i - 1] > p))) {
        port[i] = port[i - 1];
        cnt[i] = cnt[i - 1];
        i--;
    }
    port[i] = p;
    cnt[i] = n;
}

int fl_census_tally(const struct fl_census *c, struct fl_tally *t, uint32_t *scratch,
                    uint16_t *top_port, uint32_t *top_count, int k)
{
    const struct fl_census_rec *r, *end;
    uint32_t closewait = 0;
    int have = 0;

    if (!c || !t || !scratch || k < 0 || k > 65536 || (k > 0 && (!top_port || !top_count))
        || c->n < 0 || (c->n > 0 && !c->recs))
        return -EINVAL;
    memset(t, 0, sizeof *t);
    end = c->recs + c->n;
    for (r = c->recs; r < end; r++) {
        uint32_t len = r->info_len;
        int why;

        if (len > sizeof r->info)
            len = sizeof r->info;
        t->states[r->state & 15]++;
        if (r->state == ST_CLOSE_WAIT) {
            if (scratch[r->sport]++ == 0)
                t->close_wait_ports++;
            closewait++;
        }
        if (r->timer == TIMER_RETRANSMIT && r->retrans > 0)
            t->retransmitting++;
        if (r->timer == TIMER_ZERO_WINDOW
            || (r->state == ST_ESTABLISHED && r->wqueue > 0 && HAS(len, tcpi_snd_wnd)
                && r->info.tcpi_snd_wnd == 0))
            t->zero_window++;
        if (len > 0 && (why = reason_of(&r->info, len)) >= 0)
            t->suspect[why]++;
    }
    t->sockets = (uint32_t)c->n;
    /* Second pass over the CLOSE_WAIT records only: each port once. */
    for (r = c->recs; closewait > 0 && r < end; r++) {
        uint32_t n;

        if (r->state != ST_CLOSE_WAIT)
            continue;
        closewait--;
        n = scratch[r->sport];
        if (n == 0)
            continue;               /* already placed */
        scratch[r->sport] = 0;
        top_insert(top_port, top_count, &have, k, r->sport, n, &t->close_wait_rest);
    }
    return have;
}
