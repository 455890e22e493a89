/* tests/reliability_load_client.c: load client for tests/test_reliability_load.py: N concurrent TCP connections
 * with epoll, each sending `size` pseudo-random bytes (seeded per connection)
 * and reading the echo back, comparing every byte.  Run under libpep.so, each
 * connect() goes through the PEP in 0-RTT.
 *
 *   load_client HOST PORT N MINSIZE MAXSIZE TIMEOUT_S
 * Prints "ok N bytes B" or "fail ..." and exits 0/1. Never blocks: non-blocking
 * sockets, one epoll loop, an overall deadline.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    uint32_t seed_tx, seed_rx;
    size_t size, sent, got;
    int done, connected;
};

static uint8_t next_byte(uint32_t *s)
{
    *s = *s * 1103515245u + 12345u;
    return (uint8_t)(*s >> 16);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT N MINSIZE MAXSIZE TIMEOUT\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), n = atoi(argv[3]);
    size_t minsz = strtoul(argv[4], 0, 10), maxsz = strtoul(argv[5], 0, 10);
    double deadline = now() + atof(argv[6]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    int ep = epoll_create1(0);
    struct conn *c = calloc(n, sizeof *c);
    uint32_t rng = 0x9e3779b9u;
    long long total = 0;
    for (int i = 0; i < n; i++) {
        c[i].seed_tx = c[i].seed_rx = 0x1234567u + (uint32_t)i * 7919u;
        rng = rng * 1664525u + 1013904223u;
        c[i].size = minsz + (maxsz > minsz ? rng % (maxsz - minsz + 1) : 0);
        total += c[i].size;
        c[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (c[i].fd < 0) {
            printf("fail socket %d: %s\n", i, strerror(errno));
            return 1;
        }
        if (connect(c[i].fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
            printf("fail connect %d: %s\n", i, strerror(errno));
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    int left = n;
    uint8_t buf[65536];
    struct epoll_event evs[256];
    while (left > 0) {
        double rem = deadline - now();
        if (rem <= 0) {
            int stuck = 0;
            for (int i = 0; i < n; i++)
                stuck += !c[i].done;
            printf("fail timeout: %d connections stuck\n", stuck);
            return 1;
        }
        int k = epoll_wait(ep, evs, 256, (int)(rem * 1000) + 1);
        for (int e = 0; e < k; e++) {
            struct conn *x = &c[evs[e].data.u32];
            if (x->done)
                continue;
            if (evs[e].events & EPOLLOUT && x->sent < x->size) {
                size_t m = x->size - x->sent;
                if (m > sizeof buf)
                    m = sizeof buf;
                uint32_t s = x->seed_tx;
                for (size_t j = 0; j < m; j++)
                    buf[j] = next_byte(&s);
                ssize_t w = send(x->fd, buf, m, MSG_NOSIGNAL);
                if (w > 0) {
                    /* advance the generator by what was really sent */
                    for (ssize_t j = 0; j < w; j++)
                        next_byte(&x->seed_tx);
                    x->sent += (size_t)w;
                    if (x->sent == x->size) {
                        shutdown(x->fd, SHUT_WR);
                        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[e].data.u32};
                        epoll_ctl(ep, EPOLL_CTL_MOD, x->fd, &ev);
                    }
                } else if (w < 0 && errno != EAGAIN && errno != ENOTCONN) {
                    printf("fail send %ld: %s\n", (long)(x - c), strerror(errno));
                    return 1;
                }
            }
            if (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t r = recv(x->fd, buf, sizeof buf, 0);
                    if (r > 0) {
                        for (ssize_t j = 0; j < r; j++)
                            if (buf[j] != next_byte(&x->seed_rx)) {
                                printf("fail corrupt conn %ld at byte %zu\n", (long)(x - c),
                                       x->got + (size_t)j);
                                return 1;
                            }
                        x->got += (size_t)r;
                        continue;
                    }
                    if (r == 0) {
                        if (x->got != x->size) {
                            printf("fail short conn %ld: %zu of %zu\n", (long)(x - c), x->got,
                                   x->size);
                            return 1;
                        }
                        x->done = 1;
                        left--;
                        close(x->fd);
                    } else if (errno != EAGAIN && errno != ENOTCONN) {
                        printf("fail recv conn %ld: %s\n", (long)(x - c), strerror(errno));
                        return 1;
                    }
                    break;
                }
            }
        }
    }
    printf("ok %d bytes %lld\n", n, total * 2);
    return 0;
}
