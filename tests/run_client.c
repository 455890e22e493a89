/* A small HTTP/1.0 client for the `pep run` tests, built with gcc -static so
 * libpep.so cannot enter it (the seccomp supervisor must carry it).
 *
 *   run_client [-n] [-6] [-d OUT] [-c N] HOST PORT PATH   GET http://HOST:PORT/PATH N times
 *   run_client -s                                        signals: see below
 *
 * -n  non-blocking socket registered with epoll BEFORE connect(): the
 *     registration must survive what pep run does to the socket
 * -6  AF_INET6 socket (HOST may then be an IPv4 address: sent v4-mapped)
 * -d  daemon: double-fork and return at once (exit 0); the grandchild fetches
 *     after 300 ms and writes the response to OUT (via OUT.tmp + rename)
 * -c  fetch N times, writing only the last response
 * -i  a SIGALRM every 50 us (SA_RESTART, as Go's preemption signals): connects
 *     get interrupted while the supervisor is deciding, and restarted
 * -s  print "pid <getpid()>", then: SIGHUP prints "HUP", SIGTERM prints
 *     "TERM" and exits 7; otherwise waits (at most 60 s)
 * The response (headers and body) goes to stdout; errors to stderr, exit 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "run_client: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void on_signal(int sig) {
    if (sig == SIGHUP) {
        write(1, "HUP\n", 4);
    } else {
        write(1, "TERM\n", 5);
        _exit(7);
    }
}

static void on_alarm(int sig) {
    (void)sig;
}

static void interrupt_often(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, NULL);
}

static int signals_mode(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    printf("pid %d\n", (int)getpid());
    fflush(stdout);
    for (int i = 0; i < 600; i++)
        usleep(100000);
    return 0;
}

static void wait_for(int ep, int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) != 0)
        die("epoll_ctl MOD");
    struct epoll_event got;
    int n;
    do
        n = epoll_wait(ep, &got, 1, 20000);
    while (n < 0 && errno == EINTR);    /* epoll_wait is never restarted */
    if (n < 0)
        die("epoll_wait");
    if (n == 0) {
        fprintf(stderr, "run_client: epoll_wait timed out (registration lost?)\n");
        exit(1);
    }
}

static size_t fetch(int v6, int nonblock, const char *host, int port, const char *path,
                    char **out) {
    int s = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (s < 0)
        die("socket");
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof ss);
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) {
            struct in_addr v4;
            if (inet_pton(AF_INET, host, &v4) != 1)
                die("bad address");
            a->sin6_addr.s6_addr[10] = a->sin6_addr.s6_addr[11] = 0xff;
            memcpy(&a->sin6_addr.s6_addr[12], &v4, 4);
        }
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            die("bad address");
        len = sizeof *a;
    }
    int ep = -1;
    if (nonblock) {
        ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLOUT, .data.fd = s};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) != 0)
            die("epoll_ctl ADD");
    }
    if (connect(s, (struct sockaddr *)&ss, len) != 0) {
        if (!nonblock || errno != EINPROGRESS)
            die("connect");
        wait_for(ep, s, EPOLLOUT);
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            errno = err;
            die("connect (SO_ERROR)");
        }
    }
    char req[512];
    int n = snprintf(req, sizeof req, "GET /%s HTTP/1.0\r\nHost: %s\r\n\r\n", path, host);
    for (int off = 0; off < n;) {
        ssize_t w = write(s, req + off, n - off);
        if (w < 0 && errno == EAGAIN) {
            wait_for(ep, s, EPOLLOUT);
            continue;
        }
        if (w < 0)
            die("write");
        off += w;
    }
    size_t cap = 1 << 20, got = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (got == cap)
            buf = realloc(buf, cap *= 2);
        ssize_t r = read(s, buf + got, cap - got);
        if (r < 0 && errno == EAGAIN) {
            wait_for(ep, s, EPOLLIN);
            continue;
        }
        if (r < 0)
            die("read");
        if (r == 0)
            break;
        got += r;
    }
    close(s);
    if (ep >= 0)
        close(ep);
    *out = buf;
    return got;
}

int main(int argc, char **argv) {
    int v6 = 0, nonblock = 0, count = 1, opt;
    const char *daemon_out = NULL;
    while ((opt = getopt(argc, argv, "n6d:c:si")) != -1) {
        switch (opt) {
        case 'i': interrupt_often(); break;
        case 'n': nonblock = 1; break;
        case '6': v6 = 1; break;
        case 'd': daemon_out = optarg; break;
        case 'c': count = atoi(optarg); break;
        case 's': return signals_mode();
        default: return 2;
        }
    }
    if (argc - optind != 3) {
        fprintf(stderr, "usage: run_client [-n] [-6] [-d OUT] [-c N] HOST PORT PATH | -s\n");
        return 2;
    }
    const char *host = argv[optind], *path = argv[optind + 2];
    int port = atoi(argv[optind + 1]);
    if (daemon_out) {
        pid_t p = fork();
        if (p < 0)
            die("fork");
        if (p > 0)
            return 0;               /* the parent returns: Type=forking's "started" */
        setsid();
        p = fork();
        if (p < 0)
            die("fork");
        if (p > 0)
            _exit(0);
        usleep(300000);
    }
    char *buf = NULL;
    size_t got = 0;
    for (int i = 0; i < count; i++) {
        free(buf);
        got = fetch(v6, nonblock, host, port, path, &buf);
    }
    if (daemon_out) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", daemon_out);
        FILE *f = fopen(tmp, "wb");
        if (!f || fwrite(buf, 1, got, f) != got || fclose(f) != 0 || rename(tmp, daemon_out) != 0)
            die(daemon_out);
        return 0;
    }
    if (fwrite(buf, 1, got, stdout) != got)
        die("stdout");
    return 0;
}
