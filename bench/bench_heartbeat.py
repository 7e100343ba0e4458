#!/usr/bin/env python3
"""Heartbeat cost on many idle (and busy) connections, side by side.

For N connections and a 1 s interval it measures the CPU (user + sys,
getrusage of the pinging process over a fixed window) of four pinging
sides, each against a fresh C peer process that answers PINGs:

* ``engine``  - fastlive.heartbeat.HeartbeatEngine (C: epoll + timing wheel)
* ``asyncio`` - asyncio written the common way: streams, a task per
  connection (sleep, write, drain, read the PONG)
* ``pyepoll`` - the best plain-Python design: one epoll loop, one timer
  for everybody, idle-only bookkeeping in lists indexed by fd
* ``floor``   - the same 5-byte sends and receives in a plain C loop
  (compiled here with gcc): one burst of sends per interval, one recv per
  PONG, nothing else

and then ``engine-busy``: the engine on N connections the peer keeps
sending application data on (shared mode), where idle-only pinging sends
(almost) nothing; and ``engine-gil``: the engine while the main Python
thread spins 100% of the time holding the GIL and never calls the engine
(its CPU is the process's minus the main thread's; the PINGs come from the
engine's own thread, and their lateness is the number to watch).

Tick lateness: how long after its due time a PING was actually sent (for the
engine: after the tick boundary its deadline rounds up to; the tick is
10 ms).  ``--quick`` runs 200 connections at a 0.5 s interval for 0.6 s
windows (the test suite runs it: every case end to end in a few seconds;
its numbers mean little); the full run takes about two minutes.

Peers run in helper processes (RLIMIT_NOFILE is 20000 per process), each
on its own loopback address so ports in TIME_WAIT never collide.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PING_SEQ1 = bytes([0xFB, 0x11, 0x00, 0x01, 0x00])
PONG_HEAD = bytes([0xFB, 0x12])

# --------------------------------------------------------------------------
# The C side: "peer" answers PINGs (and in busy mode sends app data);
# "floor" is the plain C pinging loop.
C_SRC = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
         + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

#define MAXFD 40000
static uint8_t rx[MAXFD][8];
static uint8_t rxlen[MAXFD];
static uint8_t live[MAXFD];

/* peer IP BUSY_MS LIFETIME_S: listen on IP:0, print the port, answer PINGs
 * with PONGs; every BUSY_MS (0 = never) send 16 bytes to every connection. */
static int peer(const char *ip, int busy_ms, int lifetime)
{
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    struct epoll_event ev, evs[512];
    int lfd, ep, one = 1, n, k, nconn = 0, hi = 0;
    int64_t end = now_us() + (int64_t)lifetime * 1000000, next_busy = 0;
    static const uint8_t app[16] = "application-data";
    uint64_t pongs = 0;

    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    inet_pton(AF_INET, ip, &a.sin_addr);
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) {
        perror("peer listen");
        return 1;
    }
    getsockname(lfd, (struct sockaddr *)&a, &al);
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    ep = epoll_create1(0);
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = 0;                     /* stdin closes when the bench dies */
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    if (busy_ms)
        next_busy = now_us() + busy_ms * 1000;
    while (now_us() < end) {
        int timeout = 200;
        if (busy_ms) {
            int64_t left = (next_busy - now_us()) / 1000;
            timeout = left < 0 ? 0 : (int)left;
        }
        n = epoll_wait(ep, evs, 512, timeout);
        for (k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == 0)
                return 0;
            if (fd == lfd) {
                for (int j = 0; j < 256; j++) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0)
                        break;
                    if (c >= MAXFD) { close(c); continue; }
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                    rxlen[c] = 0;
                    live[c] = 1;
                    nconn++;
                    if (c > hi) hi = c;
                }
                continue;
            }
            {
                uint8_t buf[4096], out[4096];
                size_t o = 0;
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN)
                        continue;
                    close(fd);
                    live[fd] = 0;
                    nconn--;
                    continue;
                }
                for (ssize_t i = 0; i < r; i++) {
                    rx[fd][rxlen[fd]++] = buf[i];
                    if (rxlen[fd] == 5) {
                        if (rx[fd][0] == 0xFB && (rx[fd][1] & 0x0f) == 1
                            && o + 5 <= sizeof out) {
                            memcpy(out + o, rx[fd], 5);
                            out[o + 1] = (uint8_t)((rx[fd][1] & 0xf0) | 2);
                            o += 5;
                            pongs++;
                        }
                        rxlen[fd] = 0;
                    }
                }
                if (o)
                    send(fd, out, o, MSG_NOSIGNAL | MSG_DONTWAIT);
            }
        }
        if (busy_ms && now_us() >= next_busy) {
            for (int fd = 0; fd <= hi; fd++)
                if (live[fd])
                    send(fd, app, sizeof app, MSG_NOSIGNAL | MSG_DONTWAIT);
            next_busy += busy_ms * 1000;
        }
    }
    (void)pongs;
    return 0;
}

/* floor IP PORT N INTERVAL_MS WARMUP_S SECONDS: N connections, one burst
 * of 5-byte PINGs per interval, one recv per readable connection. */
/* nconn non-blocking TCP_NODELAY connections to ip:port, in epoll set ep. */
static int connect_all(const char *ip, int port, int nconn, int *fds, int ep)
{
    struct sockaddr_in a;
    struct epoll_event ev;
    int i;

    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    for (i = 0; i < nconn; i++) {
        int one = 1;
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&a, sizeof a) < 0) {
            perror("floor connect");
            return -1;
        }
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        ev.events = EPOLLIN;
        ev.data.fd = fds[i];
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    return 0;
}

static int floor_loop(const char *ip, int port, int nconn, int interval_ms,
                      double warmup, double seconds)
{
    struct epoll_event evs[512];
    int *fds = calloc((size_t)nconn, sizeof *fds);
    int ep = epoll_create1(0), i, n, k;
    uint8_t ping[5] = {0xFB, 0x11, 0, 1, 0};
    int64_t t0, start, stop, tick, interval = (int64_t)interval_ms * 1000, w0 = 0, w1;
    double cpu0 = 0, cpu1 = 0;
    uint64_t pings = 0, pongs = 0, late_n = 0, tick_n = 0, wakeups = 0;
    int64_t late_max = 0, late_sum = 0;
    int measuring = 0;

    if (connect_all(ip, port, nconn, fds, ep) < 0)
        return 1;
    t0 = now_us();
    start = t0 + (int64_t)(warmup * 1e6);
    stop = start + (int64_t)(seconds * 1e6);
    tick = t0 + interval;
    for (;;) {
        int64_t now = now_us(), left;
        if (!measuring && now >= start) {
            cpu0 = cpu_s();
            w0 = now;
            measuring = 1;
            pings = pongs = late_n = tick_n = wakeups = 0;
            late_max = late_sum = 0;
        }
        if (now >= stop)
            break;
        if (now >= tick) {
            for (i = 0; i < nconn; i++) {
                int64_t late = now_us() - tick;
                if (send(fds[i], ping, 5, MSG_NOSIGNAL | MSG_DONTWAIT) == 5)
                    pings++;
                if (late > late_max) late_max = late;
                late_sum += late;
                late_n++;
            }
            tick += interval;
            tick_n++;
        }
        {
            int64_t wake = measuring ? stop : start;
            left = (tick < wake ? tick : wake) - now_us();
        }
        n = epoll_wait(ep, evs, 512, left > 0 ? (int)((left + 999) / 1000) : 0);
        wakeups++;
        for (k = 0; k < n; k++) {
            uint8_t buf[64];
            if (recv(evs[k].data.fd, buf, sizeof buf, MSG_DONTWAIT) > 0)
                pongs++;
        }
    }
    cpu1 = cpu_s();
    w1 = now_us();
    printf("{\"cpu\": %.6f, \"pings\": %llu, \"pongs\": %llu, \"late_max\": %.6f, "
           "\"late_mean\": %.6f, \"window\": %.3f, \"wakeups\": %llu}\n",
           cpu1 - cpu0, (unsigned long long)pings, (unsigned long long)pongs,
           late_max / 1e6, late_n ? late_sum / 1e6 / late_n : 0.0, (w1 - w0) / 1e6,
           (unsigned long long)wakeups);
    return 0;
}

/* floor-spread IP PORT N INTERVAL_MS WARMUP_S SECONDS: the same sends and
 * receives on the engine's schedule.  Connection i is due at phase
 * i * interval / N; every 10 ms tick: sleep to the boundary, harvest every
 * PONG with epoll_wait(0), send the PINGs that are due.  No timer
 * structure at all: the phases are fixed, so a cursor finds the due ones. */
static int floor_spread(const char *ip, int port, int nconn, int interval_ms,
                        double warmup, double seconds)
{
    struct epoll_event evs[512];
    int *fds = calloc((size_t)nconn, sizeof *fds);
    int ep = epoll_create1(0), n, k, next = 0, measuring = 0;
    uint8_t ping[5] = {0xFB, 0x11, 0, 1, 0};
    const int64_t tick_us = 10000, interval = (int64_t)interval_ms * 1000;
    int64_t t0, start, stop, cycle, boundary, w0 = 0, w1;
    int64_t late_max = 0, late_sum = 0;
    uint64_t pings = 0, pongs = 0, late_n = 0, wakeups = 0;
    double cpu0 = 0, cpu1;

    if (connect_all(ip, port, nconn, fds, ep) < 0)
        return 1;
    t0 = now_us();
    start = t0 + (int64_t)(warmup * 1e6);
    stop = start + (int64_t)(seconds * 1e6);
    cycle = t0 + interval;
    boundary = (t0 / tick_us + 1) * tick_us;
    for (;;) {
        struct timespec ts;
        int64_t now;
        ts.tv_sec = (time_t)(boundary / 1000000);
        ts.tv_nsec = (long)(boundary % 1000000) * 1000;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        now = now_us();
        if (!measuring && now >= start) {
            cpu0 = cpu_s();
            w0 = now;
            measuring = 1;
            pings = pongs = late_n = wakeups = 0;
            late_max = late_sum = 0;
        }
        if (now >= stop)
            break;
        do {
            n = epoll_wait(ep, evs, 512, 0);
            wakeups++;
            for (k = 0; k < n; k++) {
                uint8_t buf[64];
                if (recv(evs[k].data.fd, buf, sizeof buf, MSG_DONTWAIT) > 0)
                    pongs++;
            }
        } while (n == 512);
        while (cycle + (int64_t)next * interval / nconn <= now) {
            int64_t late = now_us() - boundary;
            if (send(fds[next], ping, 5, MSG_NOSIGNAL | MSG_DONTWAIT) == 5)
                pings++;
            if (late > late_max) late_max = late;
            late_sum += late;
            late_n++;
            if (++next == nconn) {
                next = 0;
                cycle += interval;
            }
        }
        boundary += tick_us;
    }
    cpu1 = cpu_s();
    w1 = now_us();
    printf("{\"cpu\": %.6f, \"pings\": %llu, \"pongs\": %llu, \"late_max\": %.6f, "
           "\"late_mean\": %.6f, \"window\": %.3f, \"wakeups\": %llu}\n",
           cpu1 - cpu0, (unsigned long long)pings, (unsigned long long)pongs,
           late_max / 1e6, late_n ? late_sum / 1e6 / late_n : 0.0, (w1 - w0) / 1e6,
           (unsigned long long)wakeups);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    if (argc == 5 && !strcmp(argv[1], "peer"))
        return peer(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc == 8 && !strcmp(argv[1], "floor"))
        return floor_loop(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]),
                          atof(argv[6]), atof(argv[7]));
    if (argc == 8 && !strcmp(argv[1], "floor-spread"))
        return floor_spread(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]),
                            atof(argv[6]), atof(argv[7]));
    fprintf(stderr, "usage: peer IP BUSY_MS LIFETIME | floor IP PORT N INTERVAL_MS WARMUP SECONDS\n");
    return 2;
}
"""


def build_c(tmp: Path) -> Path:
    src = tmp / "hbbench.c"
    exe = tmp / "hbbench"
    src.write_text(C_SRC)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_now() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_main_thread() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def spin_until(t: float) -> int:
    """Hold the GIL in pure Python until monotonic time ``t``."""
    n = 0
    while time.monotonic() < t:
        for _ in range(10000):
            n += 1
    return n


def connect_all(host: str, port: int, n: int) -> List[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    return socks


# --------------------------------------------------------------------------
# Pinging sides (each runs in its own process: --role)

def role_engine(a: argparse.Namespace) -> Dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from fastlive.heartbeat import HeartbeatEngine

    socks = connect_all(a.host, a.port, a.n)
    eng = HeartbeatEngine(tick=0.01, capacity=a.n)
    deaths = 0
    # Connections come and go at all times on a real server, so their
    # deadlines are spread over the interval: add them paced over one
    # interval (with --burst, all at once, like the floor's single timer).
    t_add = time.monotonic()
    for k, s in enumerate(socks):
        eng.add(s, a.interval, 3, shared=a.shared)
        if not a.burst and k % 100 == 99:
            deaths += len(eng.wait(max(0.0, t_add + a.interval * (k + 1) / a.n
                                       - time.monotonic())))
    t0 = time.monotonic()
    if a.gil_busy:          # the application never calls in and holds the GIL
        spin_until(t0 + a.warmup)
    while time.monotonic() < t0 + a.warmup:
        deaths += len(eng.wait(max(0.0, t0 + a.warmup - time.monotonic())))
    eng.reset_stats()
    m0 = cpu_main_thread()
    c0, w0 = cpu_now(), time.monotonic()
    end = w0 + a.seconds
    if a.gil_busy:
        spin_until(end)
    while time.monotonic() < end:
        deaths += len(eng.wait(max(0.0, end - time.monotonic())))
    m1 = cpu_main_thread()
    c1, w1 = cpu_now(), time.monotonic()
    st = eng.stats()
    deaths += len(eng.wait(0))
    if a.gil_busy:          # the engine thread's share: the process minus the spinner
        # (process and thread clocks tick separately: tiny negative -> 0)
        c1 = max(c0, c1 - (m1 - m0))
    eng.close()
    for s in socks:
        s.close()
    return {"cpu": c1 - c0, "window": w1 - w0, "pings": st.pings_sent,
            "pongs": st.pongs_received, "late_max": st.late_max, "late_mean": st.late_mean,
            "deaths": deaths, "timer_fires": st.timer_fires, "wakeups": st.wakeups,
            "skipped": st.pings_skipped, "graced": st.graced}


def role_pyepoll(a: argparse.Namespace) -> Dict[str, Any]:
    """One epoll loop; every connection on one schedule; idle-only."""
    socks = connect_all(a.host, a.port, a.n)
    ep = select.epoll()
    by_fd: Dict[int, socket.socket] = {}
    top = max(s.fileno() for s in socks) + 1
    last = [0.0] * top
    now = time.monotonic()
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
        last[s.fileno()] = now
    interval = a.interval
    ping = PING_SEQ1
    flags = socket.MSG_DONTWAIT
    pings = pongs = wakeups = 0
    late_max = late_sum = 0.0
    late_n = 0
    t0 = time.monotonic()
    start, stop = t0 + a.warmup, t0 + a.warmup + a.seconds
    tick = t0 + interval
    measuring = False
    c0 = w0 = 0.0
    mono = time.monotonic
    while True:
        now = mono()
        if not measuring and now >= start:
            c0, w0, measuring = cpu_now(), now, True
            pings = pongs = late_n = wakeups = 0
            late_max = late_sum = 0.0
        if now >= stop:
            break
        if now >= tick:
            quiet_since = tick - interval       # idle-only: the peer's own data
            for fd, s in by_fd.items():         # postpones our PING; PONGs do not
                if last[fd] <= quiet_since:
                    s.send(ping, flags)
                    pings += 1
                    late = mono() - tick
                    late_sum += late
                    late_n += 1
                    if late > late_max:
                        late_max = late
            tick += interval
        wake = min(tick, stop) if measuring else min(tick, start)
        wakeups += 1
        for fd, _ev in ep.poll(max(0.0, wake - mono())):
            data = by_fd[fd].recv(64, flags)
            if data[:2] == PONG_HEAD:
                pongs += 1
            elif data:
                last[fd] = mono()
    c1, w1 = cpu_now(), mono()
    ep.close()
    for s in socks:
        s.close()
    return {"cpu": c1 - c0, "window": w1 - w0, "pings": pings, "pongs": pongs,
            "late_max": late_max, "late_mean": late_sum / late_n if late_n else 0.0,
            "wakeups": wakeups}


def role_asyncio(a: argparse.Namespace) -> Dict[str, Any]:
    """Streams and a task per connection: the way it is usually written."""
    res: Dict[str, Any] = {}

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   stats: Dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + a.interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            late = loop.time() - due
            writer.write(PING_SEQ1)
            await writer.drain()
            stats["pings"] += 1
            stats["late_sum"] += late
            stats["late_n"] += 1
            if late > stats["late_max"]:
                stats["late_max"] = late
            data = await asyncio.wait_for(reader.read(64), timeout=3 * a.interval)
            if not data:
                return
            stats["pongs"] += 1
            due += a.interval

    async def main() -> None:
        stats = {"pings": 0, "pongs": 0, "late_sum": 0.0, "late_n": 0, "late_max": 0.0}
        streams = []
        for _ in range(a.n):
            r, w = await asyncio.open_connection(a.host, a.port)
            streams.append((r, w))
        tasks = [asyncio.create_task(conn(r, w, stats)) for r, w in streams]
        assert len(tasks) == a.n      # kept referenced: the loop holds tasks weakly
        await asyncio.sleep(a.warmup)
        for k in stats:
            stats[k] = 0 if isinstance(stats[k], int) else 0.0
        c0, w0 = cpu_now(), time.monotonic()
        await asyncio.sleep(a.seconds)
        c1, w1 = cpu_now(), time.monotonic()
        res.update(cpu=c1 - c0, window=w1 - w0, pings=stats["pings"], pongs=stats["pongs"],
                   late_max=stats["late_max"],
                   late_mean=stats["late_sum"] / stats["late_n"] if stats["late_n"] else 0.0)

    # No orderly shutdown: on 3.11 wait_for() can swallow a cancel (gh-86296),
    # so cancelling 10,000 such tasks may never finish.  Report and leave.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
    print(json.dumps(res), flush=True)
    os._exit(0)


ROLES = {"engine": role_engine, "pyepoll": role_pyepoll, "asyncio": role_asyncio}


# --------------------------------------------------------------------------
# Orchestration

class Peer:
    def __init__(self, exe: Path, ip: str, busy_ms: int, lifetime: int) -> None:
        self.proc = subprocess.Popen([str(exe), "peer", ip, str(busy_ms), str(lifetime)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip():
            self.close()
            raise RuntimeError("peer did not start")
        self.port = int(line)
        self.ip = ip

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


def run_case(name: str, exe: Path, ip: str, a: argparse.Namespace,
             busy_ms: int = 0) -> Dict[str, Any]:
    budget = int(a.warmup + a.seconds + 120)
    peer = Peer(exe, ip, busy_ms, budget)
    try:
        if name in ("floor", "floor-spread"):
            cmd = [str(exe), name, ip, str(peer.port), str(a.n),
                   str(int(a.interval * 1000)), str(a.warmup), str(a.seconds)]
        else:
            role = "engine" if name.startswith("engine") else name
            cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role,
                   "--host", ip, "--port", str(peer.port), "--n", str(a.n),
                   "--interval", str(a.interval), "--warmup", str(a.warmup),
                   "--seconds", str(a.seconds)]
            if busy_ms:
                cmd.append("--shared")
            if name == "engine-burst":
                cmd.append("--burst")
            if name == "engine-gil":
                cmd.append("--gil-busy")
        out = subprocess.run(cmd, capture_output=True, timeout=budget, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed: {out.stderr.decode()[-2000:]}")
        res = json.loads(out.stdout.decode().strip().splitlines()[-1])
    finally:
        peer.close()
    res["name"] = name
    res["cpu_pct"] = 100.0 * res["cpu"] / res["window"]
    res["us_per_ping"] = 1e6 * res["cpu"] / res["pings"] if res["pings"] else None
    return res


def fill_defaults(a: argparse.Namespace) -> None:
    """The sizes left unset on the command line, full or ``--quick`` (also
    bench_aio.py's)."""
    if a.n is None:
        a.n = 200 if a.quick else 10000
    if a.interval is None:
        a.interval = 0.5 if a.quick else 1.0
    if a.seconds is None:         # the window holds at least one interval
        a.seconds = 0.6 if a.quick else 10.0
    if a.warmup is None:          # at least one interval: spread schedules start after one
        a.warmup = 0.5 if a.quick else 3.0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="200 connections, interval 0.5 s, 0.6 s windows (a smoke run)")
    ap.add_argument("--n", type=int, default=None, help="connections (default 10000)")
    ap.add_argument("--interval", type=float, default=None,
                    help="heartbeat interval, seconds (default 1; --quick 0.5)")
    ap.add_argument("--seconds", type=float, default=None, help="measured window")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--cases",
                    default="floor,floor-spread,engine,engine-burst,pyepoll,asyncio,engine-busy,"
                            "engine-gil",
                    help="comma-separated, from: floor, floor-spread, engine, engine-burst, "
                         "pyepoll, asyncio, engine-busy, engine-gil")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of all cases (the summary takes medians)")
    # internal: one pinging side
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--burst", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gil-busy", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    raise_nofile()
    fill_defaults(a)
    if a.role:
        print(json.dumps(ROLES[a.role](a)))
        return 0

    if not shutil.which("gcc"):
        print("gcc is needed for the floor and the peer", file=sys.stderr)
        return 2
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    print(f"# {a.n} connections, interval {a.interval:g} s, window {a.seconds:g} s "
          f"(warmup {a.warmup:g} s), {os.cpu_count()} CPUs, {a.repeat} round(s), "
          f"load {loadavg()}", flush=True)
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fl-hb-bench-") as tmp:
        exe = build_c(Path(tmp))
        for rnd in range(a.repeat):
            for k, name in enumerate(cases):
                ip = f"127.{rnd + 1}.{os.getpid() % 200 + 1}.{k + 2}"
                # engine-busy: application data every half interval (500 ms at 1 s)
                busy = round(a.interval * 500) if name == "engine-busy" else 0
                res = run_case(name, exe, ip, a, busy)
                res["round"] = rnd
                res["load"] = loadavg()
                results.append(res)
                print(f"  {name:12s} cpu {res['cpu_pct']:6.2f}% of a core  "
                      f"{res['pings'] / res['window']:8.0f} pings/s  "
                      + (f"{res['us_per_ping']:6.2f} us/ping  " if res["us_per_ping"] else
                         "     - us/ping  ")
                      + f"late max {1000 * res['late_max']:7.1f} ms "
                        f"mean {1000 * res['late_mean']:6.2f} ms"
                      + (f"  {res['wakeups'] / res['window']:6.0f} wakeups/s"
                         if "wakeups" in res else ""),
                      flush=True)
    summary = summarize(results, cases)
    print("# median over rounds: CPU % of a core; x floor (burst schedule); "
          "x the floor with the same schedule")
    for name, row in summary.items():
        print(f"  {name:12s} {row['cpu_pct']:6.2f}%  {row['x_floor']:6.2f}x"
              + (f"  {row['x_same']:6.2f}x ({row['same']})" if row.get("x_same") else ""))
    print(f"# load after: {loadavg()}")
    if a.json:
        print(json.dumps({"results": results, "summary": summary}, indent=1))
    return 0


SAME_SCHEDULE = {"engine": "floor-spread", "engine-busy": "floor-spread", "engine-gil": "floor-spread",
                 "engine-burst": "floor", "pyepoll": "floor", "asyncio": "floor"}


def summarize(results: List[Dict[str, Any]], cases: List[str]) -> Dict[str, Dict[str, Any]]:
    def median(xs: List[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    pct = {name: median([r["cpu_pct"] for r in results if r["name"] == name]) for name in cases}
    out: Dict[str, Dict[str, Any]] = {}
    for name in cases:
        row: Dict[str, Any] = {"cpu_pct": pct[name]}
        row["x_floor"] = pct[name] / pct["floor"] if pct.get("floor") else None
        same = SAME_SCHEDULE.get(name)
        if same and pct.get(same):
            row["same"] = same
            row["x_same"] = pct[name] / pct[same]
        runs = [r for r in results if r["name"] == name]
        row["late_max_ms"] = max(1000 * r["late_max"] for r in runs)
        row["late_mean_ms"] = median([1000 * r["late_mean"] for r in runs])
        row["pings_per_s"] = median([r["pings"] / r["window"] for r in runs])
        out[name] = row
    return out


if __name__ == "__main__":
    sys.exit(main())
