/* tests/reliability_probe_client.c: one connection through libpep.so to a PEP
 * that may misbehave (tests/test_reliability_hostile_pep.py).
 *
 *   probe_client HOST PORT block|nonblock
 * Connects, writes "hello", reads until EOF with a 3 s budget, and prints one
 * line: "ok <bytes read>" or "err <errno name> at <connect|poll|sockerr|send|recv>".
 * Never waits past its budget: SO_RCVTIMEO/SO_SNDTIMEO or poll timeouts.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char *name(int e)
{
    switch (e) {
    case EPROTO: return "EPROTO";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EACCES: return "EACCES";
    case ENOBUFS: return "ENOBUFS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EAGAIN: return "EAGAIN";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EPIPE: return "EPIPE";
    default: return "OTHER";
    }
}

static int fail(const char *where, int e)
{
    printf("err %s at %s (%d)\n", name(e), where, e);
    return 1;
}

int main(int argc, char **argv)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    int nb = strcmp(argv[3], "nonblock") == 0;
    int fd = socket(AF_INET, SOCK_STREAM | (nb ? SOCK_NONBLOCK : 0), 0);
    struct timeval tv = {.tv_sec = 3};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (!nb || errno != EINPROGRESS)
            return fail("connect", errno);
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, 3000) != 1)
            return fail("poll", ETIMEDOUT);
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err)
            return fail("sockerr", err);
    }
    if (send(fd, "hello", 5, MSG_NOSIGNAL) < 0)
        return fail("send", errno);
    char buf[70000];
    size_t got = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (t1.tv_sec - t0.tv_sec > 4)
            return fail("deadline", ETIMEDOUT);
        if (nb) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, 3000) != 1)
                return fail("poll", ETIMEDOUT);
        }
        ssize_t r = recv(fd, buf + got, sizeof buf - got, 0);
        if (r == 0)
            break;
        if (r < 0) {
            if (nb && errno == EAGAIN)
                continue;
            return fail("recv", errno);
        }
        got += (size_t)r;
        if (got == sizeof buf)
            break;
    }
    printf("ok %.*s\n", (int)(got > 64 ? 64 : got), buf);
    return 0;
}
