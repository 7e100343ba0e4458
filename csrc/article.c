/*
 * The article's client_tcp.c and server_tcp.c (with the server loops of
 * sections 2, 3 and 5, and sections 4 and 6 written in the same style),
 * ported to the C core.  The reconstructed originals are in tests/orig/;
 * tests/test_article.py checks that both print the same lines for the same
 * events.  See fl_article.h for the contract and docs/article.md for what
 * the article gets wrong.
 *
 * Faithful means the same system calls in the same order, so the kernel
 * gives the same answers and errno holds the same (sometimes stale) value
 * when it is printed.  Where the original has undefined behaviour the port
 * picks the harmless reading and says so:
 *   - buffers are zeroed once and one byte longer than the read size, so
 *     "%s" never runs past them (the original prints an uninitialised
 *     buffer on its first pass if the peer sends no NUL);
 *   - struct tcp_info is zeroed before getsockopt (the original prints
 *     stack garbage if getsockopt fails);
 *   - select() is replaced by an equivalent poll() for fd >= FD_SETSIZE
 *     (the original's FD_SET writes out of bounds there).
 * The loops never return in faithful mode; the additions (stop mode,
 * iteration and connection bounds) change nothing unless asked for.
 */
#include "fl_prelude.h"
#include "fl_article.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ART_BACKLOG 2     /* 侦听队列长度 */
#define ART_BUFSIZE 1024  /* the article's read size */

/* Set once stdout's reader has gone (EPIPE): from then on nothing is
 * printed.  The original, line-buffered, spins forever instead: each failed
 * write raises SIGPIPE, whose handler prints, which fails again... */
static volatile sig_atomic_t stdout_gone;

/* printf, then flush: lines reach a pipe as they are printed.  errno is
 * preserved, because the article prints errno values that earlier calls
 * left behind and the port must print the same ones. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;

    if (!stdout_gone) {
        int rc;

        va_start(ap, fmt);
        rc = vprintf(fmt, ap); /* writes already if stdout is unbuffered
                                  (python -u / PYTHONUNBUFFERED) */
        va_end(ap);
        if (rc >= 0)
            rc = fflush(stdout) == EOF ? -1 : 0;
        if (rc < 0 && errno == EPIPE) {
            stdout_gone = 1;
            clearerr(stdout);
        }
    }
    errno = saved;
}

/* The article's handlers (printf in a handler is not async-signal-safe;
 * kept, as in the original). */
static void sig_proccess(int signo)
{
    (void)signo;
    say("Catch a exit signal\n");
    exit(0);
}

static void sig_pipe(int sign)
{
    (void)sign;
    say("Catch a SIGPIPE signal\n");
    /* 释放资源 */
}

/* ---- stop mode: who noticed what, and when ----------------------------- */

struct life {
    int stop;               /* stop_on_death */
    int iterations;         /* 0 = forever */
    const char *method;     /* name printed in the stop line */
    struct timespec begin;  /* connection start */
    struct timespec last;   /* last sign of life from the peer */
};

static void now(struct timespec *t)
{
    clock_gettime(CLOCK_MONOTONIC, t);
}

static double since(const struct timespec *t)
{
    struct timespec n;

    now(&n);
    return (double)(n.tv_sec - t->tv_sec) + (double)(n.tv_nsec - t->tv_nsec) / 1e9;
}

static void life_init(struct life *lf, const struct fl_article_opts *o, const char *method)
{
    lf->stop = o->stop_on_death;
    lf->iterations = o->iterations > 0 ? o->iterations : 0;
    lf->method = method;
    now(&lf->begin);
    lf->last = lf->begin;
}

static void alive(struct life *lf)
{
    now(&lf->last);
}

/* "stop: <method> noticed <what> after <s> s without a sign of life
 * (<s> s into the connection)" */
static void stop_line(const struct life *lf, const char *what, int err)
{
    if (err)
        say("stop: %s noticed %s (errno %d, %s) after %.3f s without a sign of life "
            "(%.3f s into the connection)\n", lf->method, what, err, strerror(err),
            since(&lf->last), since(&lf->begin));
    else
        say("stop: %s noticed %s after %.3f s without a sign of life "
            "(%.3f s into the connection)\n", lf->method, what,
            since(&lf->last), since(&lf->begin));
}

/* 1 when the bounded mode has done its passes. */
static int bounded_done(const struct life *lf, int *passes)
{
    return lf->iterations && ++*passes >= lf->iterations;
}

/* ---- client (client_tcp.c) --------------------------------------------- */

static void process_conn_client(int s32SocketFd, struct life *lf)
{
    int size = 0;
    char buffer[ART_BUFSIZE + 1] = {0};
    const char *sendData = "I am client";
    int passes = 0;

    for (;;) {
        size = (int)write(s32SocketFd, sendData, strlen(sendData) + 1);
        if (size != (int)strlen(sendData) + 1) {
            say("write data error size=%d errno=%d \n", size, errno);
            if (lf->stop) {
                stop_line(lf, "write() failed", size < 0 ? errno : 0);
                return;
            }
        }

        size = (int)read(s32SocketFd, buffer, ART_BUFSIZE);
        if (size <= 0) {
            say("read data error size=%d errno=%d \n", size, errno);
            if (lf->stop) {
                if (size == 0)
                    stop_line(lf, "read() returned 0: the peer closed (FIN)", 0);
                else
                    stop_line(lf, "read() failed", errno);
                return;
            }
        } else {
            alive(lf);
            say("recv Data: %s\n", buffer);
        }
        sleep(1);
        if (bounded_done(lf, &passes))
            return;
    }
}

static int parse_addr(const struct fl_article_opts *o, struct sockaddr_in *addr)
{
    if (!o || !o->host || o->port <= 0 || o->port > 65535)
        return -EINVAL;
    memset(addr, 0, sizeof *addr); /* 清0 */
    addr->sin_family = AF_INET;
    addr->sin_port = htons((uint16_t)o->port);
    if (inet_pton(AF_INET, o->host, &addr->sin_addr) != 1)
        return -EINVAL;
    return 0;
}

struct saved_signals {
    void (*sigint)(int);
    void (*sigpipe)(int);
};

static void install_signals(struct saved_signals *s)
{
    s->sigint = signal(SIGINT, sig_proccess);
    s->sigpipe = signal(SIGPIPE, sig_pipe);
}

/* Only reached in bounded/stop mode: hand the caller its handlers back. */
static void restore_signals(const struct saved_signals *s)
{
    if (s->sigint != SIG_ERR)
        signal(SIGINT, s->sigint);
    if (s->sigpipe != SIG_ERR)
        signal(SIGPIPE, s->sigpipe);
}

int fl_article_client(const struct fl_article_opts *o)
{
    struct sockaddr_in server_addr;
    struct saved_signals saved;
    struct life lf;
    int l_s32SocketFd, rc;

    rc = parse_addr(o, &server_addr);
    if (rc < 0)
        return rc;
    errno = 0; /* as in a freshly started process */
    install_signals(&saved);

    /* 建立一个流式套接字 */
    l_s32SocketFd = socket(AF_INET, SOCK_STREAM, 0);
    if (l_s32SocketFd < 0) { /* 出错 */
        rc = -errno;
        say("socket error\n");
        restore_signals(&saved);
        return rc;
    }
    /* 连接服务器: unchecked, as in the article (docs/article.md) */
    connect(l_s32SocketFd, (struct sockaddr *)&server_addr, sizeof(struct sockaddr));
    life_init(&lf, o, "client (read/write)");
    process_conn_client(l_s32SocketFd, &lf); /* 客户端处理过程 */
    close(l_s32SocketFd); /* 关闭连接 */
    restore_signals(&saved);
    return 0;
}

/* ---- server loops ------------------------------------------------------ */

/* The section-1 loop body: read, print, reply "I am server", sleep(1).
 * Returns 1 when stop mode ends the loop. */
static int serve_once(int s32SocketFd, char *buffer, struct life *lf)
{
    int size;

    /* 从套接字中读取数据放到缓冲区buffer中 */
    size = (int)read(s32SocketFd, buffer, ART_BUFSIZE);
    if (size == 0) { /* 没有数据 */
        say("read size = %d, error %d \n", size, errno);
        if (lf->stop) {
            stop_line(lf, "read() returned 0: the peer closed (FIN)", 0);
            return 1;
        }
    } else if (size < 0) {
        say("read size = %d, error %d \n", size, errno);
        if (lf->stop) {
            stop_line(lf, "read() failed", errno);
            return 1;
        }
    } else {
        alive(lf);
        say("recv data:%s \n", buffer);
    }

    memset(buffer, 0, ART_BUFSIZE);
    /* 构建响应字符 */
    strcpy(buffer, "I am server");
    size = (int)write(s32SocketFd, buffer, strlen(buffer) + 1); /* 发给客户端 */
    if ((int)strlen(buffer) + 1 == size) {
    } else {
        say("write data error size = %d, errno=%d\n", size, errno);
        if (lf->stop) {
            stop_line(lf, "write() failed", size < 0 ? errno : 0);
            return 1;
        }
    }
    sleep(1);
    return 0;
}

/* Section 1 (and the loop of sections 4 and 5). */
static void serve_rw(int fd, struct life *lf)
{
    char buffer[ART_BUFSIZE + 1] = {0};
    int passes = 0;

    for (;;) {
        if (serve_once(fd, buffer, lf) || bounded_done(lf, &passes))
            return;
    }
}

/* select() on one fd for readability; poll() where FD_SET cannot go.
 * Same return values for the same socket state. */
static int wait_readable(int fd, long sec, long usec)
{
    if (fd < FD_SETSIZE) {
        fd_set l_stReadfd;
        struct timeval l_stTimeout;
        int ret;

        l_stTimeout.tv_sec = sec;
        l_stTimeout.tv_usec = usec;
        FD_ZERO(&l_stReadfd);
        FD_SET(fd, &l_stReadfd);
        ret = select(fd + 1, &l_stReadfd, NULL, NULL, &l_stTimeout);
        /* with a single fd, ret > 0 implies FD_ISSET */
        return ret;
    } else {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        return poll(&p, 1, (int)(sec * 1000 + usec / 1000));
    }
}

/* Section 2. */
static void serve_select(int fd, struct life *lf)
{
    char buffer[ART_BUFSIZE + 1] = {0};
    int l_s32Ret, passes = 0;

    for (;;) {
        l_s32Ret = wait_readable(fd, 0, 10000);
        if (l_s32Ret <= 0) {
            say("select error l_s32Ret=%d errno=%d\n", l_s32Ret, errno);
            if (lf->stop && l_s32Ret < 0) {
                stop_line(lf, "select() failed", errno);
                return;
            }
            usleep(100000);
        } else {
            say("l_s32Ret = %d \n", l_s32Ret);
            if (serve_once(fd, buffer, lf))
                return;
        }
        if (bounded_done(lf, &passes))
            return;
    }
}

static const char *tcp_state_name(int st)
{
    static const char *const names[] = {
        "?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
        "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING",
    };
    return st >= 0 && st < (int)(sizeof names / sizeof names[0]) ? names[st] : "?";
}

/* Section 3: check_tcp_alive(), run by the child instead of a read loop. */
static void check_tcp_alive(int s32SocketFd, struct life *lf)
{
    int passes = 0;

    for (;;) {
        say("alive s32SocketFd = %d \n", s32SocketFd);
        if (s32SocketFd > 0) {
            struct tcp_info info;
            socklen_t len = sizeof(info);

            memset(&info, 0, sizeof info);
            getsockopt(s32SocketFd, IPPROTO_TCP, TCP_INFO, &info, &len);
            say("info.tcpi_state = %d\n", info.tcpi_state);
            if (info.tcpi_state == TCP_ESTABLISHED) {
                alive(lf);
                say("connect ok \r\n");
            }
            /* no else in the article: printed on every pass */
            say("connect error\r\n");
            if (lf->stop && info.tcpi_state != TCP_ESTABLISHED) {
                char what[64];
                snprintf(what, sizeof what, "tcpi_state = %d (%s)",
                         info.tcpi_state, tcp_state_name(info.tcpi_state));
                stop_line(lf, what, 0);
                return;
            }
        }
        sleep(1);
        say("\n\n");
        if (bounded_done(lf, &passes))
            return;
    }
}

/* Section 4 (no code in the article): keepalive on the connection, then
 * the section-1 loop.  A dead peer that stays silent ends the blocking
 * read() with ETIMEDOUT after idle + intvl * cnt seconds. */
static void serve_keepalive(int s32SocketFd, const struct fl_article_opts *o, struct life *lf)
{
    int on = 1;
    int idle = o->keepalive_idle_s > 0 ? o->keepalive_idle_s : 10;
    int intvl = o->keepalive_intvl_s > 0 ? o->keepalive_intvl_s : 1;
    int cnt = o->keepalive_cnt > 0 ? o->keepalive_cnt : 3;

    if (setsockopt(s32SocketFd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on)) == -1) {
        say("设置KEEPALIVE失败\n");
    }
    if (setsockopt(s32SocketFd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) == -1) {
        say("设置KEEPIDLE失败\n");
    }
    if (setsockopt(s32SocketFd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl)) == -1) {
        say("设置KEEPINTVL失败\n");
    }
    if (setsockopt(s32SocketFd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt)) == -1) {
        say("设置KEEPCNT失败\n");
    }
    serve_rw(s32SocketFd, lf);
}

/* Section 5. */
static void serve_rcvtimeo(int s32SocketFd, struct life *lf)
{
    struct timeval tv;
    int optlen, l_s32Ret;

    /* 设置发送和接收超时时间 */
    tv.tv_sec = 10; /* 1秒 (sic: 10 s) */
    tv.tv_usec = 200000; /* 200ms */
    optlen = sizeof(tv);
    l_s32Ret = setsockopt(s32SocketFd, SOL_SOCKET, SO_RCVTIMEO, &tv, optlen);
    if (l_s32Ret == -1) { /* 设置接收超时时间失败 */
        say("设置接收超时时间失败\n");
    }
    l_s32Ret = setsockopt(s32SocketFd, SOL_SOCKET, SO_SNDTIMEO, &tv, optlen);
    if (l_s32Ret == -1) {
        say("设置发送超时时间失败\n");
    }
    serve_rw(s32SocketFd, lf);
}

/* Section 6 (no code in the article): the client's one-per-second
 * "I am client" is the heartbeat; heartbeat_s seconds without one means
 * the peer is gone. */
static void serve_heartbeat(int fd, const struct fl_article_opts *o, struct life *lf)
{
    char buffer[ART_BUFSIZE + 1] = {0};
    int hb = o->heartbeat_s > 0 ? o->heartbeat_s : 3;
    int l_s32Ret, passes = 0;

    for (;;) {
        l_s32Ret = wait_readable(fd, hb, 0);
        if (l_s32Ret == 0) {
            say("heartbeat timeout %d s\n", hb);
            if (lf->stop) {
                stop_line(lf, "no heartbeat within the timeout", 0);
                return;
            }
        } else if (l_s32Ret < 0) {
            say("select error l_s32Ret=%d errno=%d\n", l_s32Ret, errno);
            if (lf->stop) {
                stop_line(lf, "select() failed", errno);
                return;
            }
            usleep(100000);
        } else {
            if (serve_once(fd, buffer, lf))
                return;
        }
        if (bounded_done(lf, &passes))
            return;
    }
}

static const char *const method_names[] = {
    "rw (read/write)", "select", "tcpinfo (TCP_INFO)", "keepalive (SO_KEEPALIVE)",
    "rcvtimeo (SO_RCVTIMEO)", "heartbeat",
};

/* The child's whole life: one method's loop on one connection. */
static void process_conn_server(int fd, const struct fl_article_opts *o)
{
    struct life lf;

    life_init(&lf, o, method_names[o->method]);
    switch (o->method) {
    case FL_ART_RW:        serve_rw(fd, &lf); break;
    case FL_ART_SELECT:    serve_select(fd, &lf); break;
    case FL_ART_TCPINFO:   check_tcp_alive(fd, &lf); break;
    case FL_ART_KEEPALIVE: serve_keepalive(fd, o, &lf); break;
    case FL_ART_RCVTIMEO:  serve_rcvtimeo(fd, &lf); break;
    case FL_ART_HEARTBEAT: serve_heartbeat(fd, o, &lf); break;
    }
}

/* The article's main(): a stream socket with SO_REUSEADDR, bound and
 * listening (backlog 2).  Returns the fd, or -errno after printing the
 * article's error line. */
static int open_listener(const struct sockaddr_in *server_addr)
{
    int l_s32ServerFd, l_s32Ret, rc;
    int l_s32UseAddr = 1;

    /* 建立一个流式套接字 */
    l_s32ServerFd = socket(AF_INET, SOCK_STREAM, 0);
    if (l_s32ServerFd < 0) { /* 出错 */
        rc = -errno;
        say("socket error\n");
        return rc;
    }
    /* 设置IP地址可以重复绑定 */
    if (setsockopt(l_s32ServerFd, SOL_SOCKET, SO_REUSEADDR, &l_s32UseAddr, sizeof(int)) < 0) {
        rc = -errno;
        say("%s %d\tsetsockopt error! Error code: %d,Error message: %s\n",
            "main", __LINE__, -rc, strerror(-rc));
        close(l_s32ServerFd);
        return rc;
    }
    /* 绑定地址结构到套接字描述符 */
    l_s32Ret = bind(l_s32ServerFd, (const struct sockaddr *)server_addr, sizeof(*server_addr));
    if (l_s32Ret < 0) { /* 出错 */
        rc = -errno;
        say("bind error\n");
        close(l_s32ServerFd);
        return rc;
    }
    /* 设置侦听 */
    l_s32Ret = listen(l_s32ServerFd, ART_BACKLOG);
    if (l_s32Ret < 0) { /* 出错 */
        rc = -errno;
        say("listen error\n");
        close(l_s32ServerFd);
        return rc;
    }
    return l_s32ServerFd;
}

/* The article's accept loop: fork one child per connection, which runs the
 * method's loop and exits.  Forever, or (bounded mode, children != NULL)
 * until o->connections children were started; returns how many. */
static int accept_loop(int l_s32ServerFd, const struct fl_article_opts *o, pid_t *children)
{
    struct sockaddr_in client_addr;
    int l_s32ClientrFd, accepted = 0;
    pid_t pid;

    /* 主循环过程 */
    for (;;) {
        socklen_t addrlen = sizeof(struct sockaddr);

        /* 接收客户端连接 */
        l_s32ClientrFd = accept(l_s32ServerFd, (struct sockaddr *)&client_addr, &addrlen);
        if (l_s32ClientrFd < 0) { /* 出错 */
            continue; /* 结束本次循环 */
        }
        /* 建立一个新的进程处理到来的连接 */
        pid = fork(); /* 分叉进程 */
        if (pid == 0) { /* 子进程中 */
            close(l_s32ServerFd); /* 在子进程中关闭服务器的侦听 */
            process_conn_server(l_s32ClientrFd, o); /* 处理连接 */
            /* Only in stop/bounded mode: never go back into the caller
             * (a Python interpreter that is the parent's, not ours). */
            fflush(stdout);
            _exit(0);
        } else {
            close(l_s32ClientrFd); /* 在父进程中关闭客户端的连接 */
        }
        /* Bounded mode: after the last connection, wait for the children. */
        if (children) {
            children[accepted++] = pid;
            if (accepted >= o->connections)
                return accepted;
        }
    }
}

static void wait_children(const pid_t *children, int n)
{
    for (int i = 0; i < n; i++) {
        if (children[i] <= 0)
            continue;
        while (waitpid(children[i], NULL, 0) < 0 && errno == EINTR)
            ;
    }
}

int fl_article_server(const struct fl_article_opts *o)
{
    struct sockaddr_in server_addr;
    struct saved_signals saved;
    pid_t *children = NULL;
    int fd, rc;

    rc = parse_addr(o, &server_addr);
    if (rc < 0)
        return rc;
    if (o->method < FL_ART_RW || o->method > FL_ART_HEARTBEAT || o->connections < 0)
        return -EINVAL;
    if (o->connections > 0) {
        children = calloc((size_t)o->connections, sizeof *children);
        if (!children)
            return -ENOMEM;
    }
    errno = 0; /* as in a freshly started process */
    install_signals(&saved);
    fd = open_listener(&server_addr);
    if (fd < 0) {
        rc = fd;
    } else {
        wait_children(children, accept_loop(fd, o, children));
        close(fd);
        rc = 0;
    }
    restore_signals(&saved);
    free(children);
    return rc;
}
