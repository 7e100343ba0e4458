/*
 * ThreadSanitizer driver for the heartbeat engine (tests/test_heartbeat_tsan.py
 * builds it with -fsanitize=thread together with csrc/heartbeat.c and
 * csrc/core.c): the engine threads of two engines run while this thread adds
 * and removes registrations and reads stats, and another collects deaths
 * (fl_hb_ready / peek / commit / rtt), then fl_hb_close wakes it.  Any data
 * race is a TSan report and a non-zero exit.  Loopback only, bounded rounds.
 */
#include "fl_prelude.h"
#include "fl_core.h"
#include "fl_heartbeat.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#include <errno.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

static int lst;
static struct fl_hb *a, *b;
static void mkpair(int *c, int *s) {
    struct sockaddr_in sa; socklen_t l = sizeof sa;
    getsockname(lst, (struct sockaddr*)&sa, &l);
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*c, (struct sockaddr*)&sa, sizeof sa) < 0) { perror("connect"); exit(1); }
    *s = accept(lst, NULL, NULL);
}
static void *collector(void *arg) {
    struct fl_hb_event ev[64]; int k, n, total = 0;
    (void)arg;
    for (int i = 0; i < 300; i++) {
        int r = fl_hb_ready(a, 5);
        if (r == -ESHUTDOWN) break;
        n = fl_hb_peek(a, ev, 64, &k);
        if (n < 0) break;
        if (k) fl_hb_commit(a, k);
        total += n;
        fl_hb_rtt(a, ev, 64);
    }
    return (void*)(long)total;
}
int main(void) {
    struct sockaddr_in sa = {0}; int c[40], s[40]; uint64_t tok[40];
    struct fl_hb_stats st; pthread_t th; void *ret;
    sa.sin_family = AF_INET; sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lst = socket(AF_INET, SOCK_STREAM, 0); bind(lst, (struct sockaddr*)&sa, sizeof sa); listen(lst, 64);
    if (fl_hb_new(1, 4, &a) || fl_hb_new(1, 4, &b)) return 1;
    for (int i = 0; i < 40; i++) { mkpair(&c[i], &s[i]); fl_hb_add(b, s[i], 3600000, 3, 0, 0, &tok[i]); }
    pthread_create(&th, NULL, collector, NULL);
    for (int round = 0; round < 30; round++) {
        for (int i = 0; i < 40; i++) fl_hb_add(a, c[i], 5, 3, FL_HB_RTT, 0, &tok[i]);
        usleep(20000);
        fl_hb_progress(a);
        fl_hb_get_stats(a, &st);
        for (int i = 0; i < 40; i += 2) fl_hb_remove(a, tok[i]);
        if (round == 20) { close(s[39]); }
        for (int i = 1; i < 40; i += 2) fl_hb_remove(a, tok[i]);
    }
    fl_hb_close(a);
    pthread_join(th, &ret);
    fl_hb_get_stats(b, &st);
    printf("collected %ld, b answered %llu\n", (long)ret, (unsigned long long)st.pings_answered);
    fl_hb_free(a); fl_hb_free(b);
    for (int i = 0; i < 40; i++) { close(c[i]); if (i != 39) close(s[i]); }
    close(lst);
    return st.pings_answered > 0 ? 0 : 3;
}
