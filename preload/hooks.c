/* libpep.so: the hooks. See docs/preload.md.
 *
 * Every hook that does not concern us costs one predictable branch (init)
 * plus one load of the fd table, then calls the real symbol, resolved once
 * through dlsym(RTLD_NEXT) into the table `real`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "config.h"
#include "fdstate.h"
#include "tlv.h"

#define EXPORT __attribute__((visibility("default")))
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

#ifndef TCP_FASTOPEN_NO_COOKIE
#define TCP_FASTOPEN_NO_COOKIE 34
#endif
#ifndef TCPI_OPT_SYN_DATA
#define TCPI_OPT_SYN_DATA 32
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

extern __thread int pep_busy;

/* ---- the real symbols, resolved once ----------------------------------- */

static struct {
    int (*socket)(int, int, int);
    int (*connect)(int, const struct sockaddr *, socklen_t);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*writev)(int, const struct iovec *, int);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*readv)(int, const struct iovec *, int);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    ssize_t (*read_chk)(int, void *, size_t, size_t);
    ssize_t (*recv_chk)(int, void *, size_t, size_t, int);
    ssize_t (*recvfrom_chk)(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*close)(int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
    int (*close_range)(unsigned, unsigned, int);
    int (*poll)(struct pollfd *, nfds_t, int);
    int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *,
                   const sigset_t *);
    int (*epoll_wait)(int, struct epoll_event *, int, int);
    int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
    int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *,
                        const sigset_t *);
    int (*poll_chk)(struct pollfd *, nfds_t, int, size_t);
    int (*ppoll_chk)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *, size_t);
    int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
    int (*sendmmsg)(int, struct mmsghdr *, unsigned int, int);
} real;

static int ready;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

#define BIND(name) (*(void **)&real.name = dlsym(RTLD_NEXT, #name))
#define BIND_AS(field, sym) (*(void **)&real.field = dlsym(RTLD_NEXT, sym))

static void init_real(void)
{
    int saved = errno;
    BIND(socket);
    BIND(connect);
    BIND(accept);
    BIND(accept4);
    BIND(send);
    BIND(sendto);
    BIND(sendmsg);
    BIND(write);
    BIND(writev);
    BIND(read);
    BIND(readv);
    BIND(recv);
    BIND(recvfrom);
    BIND(recvmsg);
    BIND_AS(read_chk, "__read_chk");
    BIND_AS(recv_chk, "__recv_chk");
    BIND_AS(recvfrom_chk, "__recvfrom_chk");
    BIND(getpeername);
    BIND(getsockopt);
    BIND(close);
    BIND(dup);
    BIND(dup2);
    BIND(dup3);
    BIND(fcntl);
    BIND(fcntl64);
    BIND(close_range);
    BIND(poll);
    BIND(ppoll);
    BIND(select);
    BIND(pselect);
    BIND(epoll_wait);
    BIND(epoll_pwait);
    BIND(epoll_pwait2);
    BIND_AS(poll_chk, "__poll_chk");
    BIND_AS(ppoll_chk, "__ppoll_chk");
    BIND(recvmmsg);
    BIND(sendmmsg);
    if (!real.fcntl64)
        real.fcntl64 = real.fcntl;
    pep_config_load();
    pep_fdstate_atfork();
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    errno = saved;
}

/* Constructors of other libraries may call us before our own runs. */
#define INIT()                                        \
    do {                                              \
        if (UNLIKELY(!__atomic_load_n(&ready, __ATOMIC_ACQUIRE))) \
            pthread_once(&init_once, init_real);      \
    } while (0)

__attribute__((constructor)) static void pep_ctor(void)
{
    INIT();
}

/* ---- small helpers ------------------------------------------------------ */


/* The destination of a connect() as 16 bytes (IPv4 mapped); 0 if not IP. */
static int dest_of(const struct sockaddr *sa, socklen_t len, uint8_t a[16], uint16_t *port)
{
    if (!sa || len < sizeof(sa_family_t))
        return 0;
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        pep_v4_mapped(a, (const uint8_t *)&s4->sin_addr);
        *port = ntohs(s4->sin_port);
        return AF_INET;
    }
    if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        memcpy(a, &s6->sin6_addr, 16);
        *port = ntohs(s6->sin6_port);
        return AF_INET6;
    }
    return 0;
}

static int sockopt_int(int fd, int level, int name, int *v)
{
    socklen_t l = sizeof *v;
    return real.getsockopt(fd, level, name, v, &l);
}

static int tcp_state(int fd, struct tcp_info *ti)
{
    socklen_t l = sizeof *ti;
    memset(ti, 0, sizeof *ti);
    if (real.getsockopt(fd, IPPROTO_TCP, TCP_INFO, ti, &l) < 0)
        return -1;
    return ti->tcpi_state;
}

static int is_nonblocking(int fd)
{
    int fl = real.fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & O_NONBLOCK);
}

static int same_socket(int fd, const struct pep_conn *c)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == c->dev && st.st_ino == c->ino;
}

/* Wait for fd to be ready, honouring SO_RCVTIMEO / SO_SNDTIMEO. -1 + errno
 * (EAGAIN on timeout, EINTR) or 0. */
static int wait_fd(int fd, short events)
{
    struct timeval tv = {0, 0};
    socklen_t l = sizeof tv;
    int ms = -1;
    if (real.getsockopt(fd, SOL_SOCKET, events == POLLIN ? SO_RCVTIMEO : SO_SNDTIMEO, &tv,
                        &l) == 0 &&
        (tv.tv_sec || tv.tv_usec))
        ms = tv.tv_sec > 86400 * 20 ? -1 : (int)(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000);
    struct pollfd p = {fd, events, 0};
    int n = real.poll(&p, 1, ms);
    if (n < 0)
        return -1;
    if (n == 0) {
        errno = EAGAIN;
        return -1;
    }
    return 0;
}

static int warned_0rtt;

static void warn_0rtt_lost(const char *why)
{
    if (__atomic_exchange_n(&warned_0rtt, 1, __ATOMIC_RELAXED))
        return;
    pep_log(PEP_LOG_WARN, "0-RTT lost: %s; the Convert header went after the handshake "
            "(said once)", why);
}

/*
 * While the reply is outstanding the socket carries SO_RCVLOWAT = 5: a
 * success reply alone (4 bytes) does not make it readable, so poll/epoll do
 * not wake the program for bytes it will never see (wrk counts a read that
 * finds nothing after EPOLLIN as an error). An Error reply (8 bytes), data,
 * FIN or RST still wake it. The program's own value comes back after.
 */
static void lowat_hold(int fd, struct pep_conn *c)
{
    int v = 1, five = PEP_HDR_LEN + 1;
    if (sockopt_int(fd, SOL_SOCKET, SO_RCVLOWAT, &v) == 0 && v < five &&
        setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &five, sizeof five) == 0)
        c->lowat = v;
    else
        c->lowat = 0;
}

static void lowat_release(int fd, struct pep_conn *c)
{
    if (c->lowat) {
        setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &c->lowat, sizeof c->lowat);
        c->lowat = 0;
    }
}

/* The connection failed (Error TLV, bad reply): remember the errno and reset. */
static void conn_fail(int fd, struct pep_conn *c, int err, const char *why)
{
    lowat_release(fd, c);
    pep_conn_set_state(c, PEP_ST_FAILED);
    c->err = err;
    pep_log(PEP_LOG_INFO, "fd %d: %s: %s", fd, why, strerror(err));
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct sockaddr unspec;
    memset(&unspec, 0, sizeof unspec);
    unspec.sa_family = AF_UNSPEC;
    real.connect(fd, &unspec, sizeof unspec); /* TCP: disconnect with a RST */
}

/* Reply fully read and fine: pass-through from now on. */
static void conn_open(int fd, struct pep_conn *c)
{
    lowat_release(fd, c);
    pep_conn_set_state(c, PEP_ST_OPEN);
    if (pep_cfg.level >= PEP_LOG_WARN && !__atomic_load_n(&warned_0rtt, __ATOMIC_RELAXED)) {
        struct tcp_info ti;
        if (tcp_state(fd, &ti) >= 0 && !(ti.tcpi_options & TCPI_OPT_SYN_DATA))
            warn_0rtt_lost("the PEP did not take data in the SYN (TFO off on its side?)");
    }
    pep_log(PEP_LOG_DEBUG, "fd %d: PEP reply stripped", fd);
}

/* ---- the slow path: finish sending the header, strip the reply --------- */

/*
 * Bring fd's connection as far as it can go before an application read
 * (for_write = 0) or write (for_write = 1), or only send what is left of the
 * header (for_write = 2: SO_ERROR, waits). 0: the caller makes its real call;
 * -1: the call fails with errno. dontwait: the call must not block
 * (MSG_DONTWAIT); O_NONBLOCK is looked up only when it matters.
 */
#define SETTLE_HEADER_ONLY 2
static int settle(int fd, int for_write, int dontwait)
{
    int saved = errno, checked = 0;

    for (;;) {
        pep_lock();
        struct pep_conn *c = pep_conn_get(fd);
        if (c && !checked) {
            checked = 1;
            if (!same_socket(fd, c)) { /* closed behind our back, fd reused */
                pep_fd_forget(fd);
                c = NULL;
            }
        }
        if (!c || c->state == PEP_ST_OPEN ||
            (for_write == SETTLE_HEADER_ONLY && c->state != PEP_ST_SENDING)) {
            pep_unlock();
            errno = saved;
            return 0;
        }
        if (c->state == PEP_ST_FAILED) {
            int e = c->err;
            pep_unlock();
            errno = e;
            return -1;
        }
        short wait_for;
        int e;
        if (c->state == PEP_ST_CONNECTING) {
            /* Another thread is inside connect() on this socket (a header-only
             * flush never gets here: it returned above). */
            pep_unlock();
            e = EAGAIN;
            wait_for = POLLOUT;
        } else if (c->state == PEP_ST_SENDING) {
            if (for_write == SETTLE_HEADER_ONLY) {
                /* Not on the program's behalf: never take a pending socket
                 * error (send() would) that its SO_ERROR or read must see. */
                struct tcp_info ti;
                int st = tcp_state(fd, &ti);
                if (st != TCP_ESTABLISHED && st != TCP_CLOSE_WAIT) {
                    if (st != TCP_SYN_SENT) { /* failed: the kernel's story now */
                        lowat_release(fd, c);
                        pep_conn_set_state(c, PEP_ST_OPEN);
                    }
                    pep_unlock();
                    errno = saved;
                    return 0;
                }
            }
            ssize_t n = real.send(fd, c->hdr + c->hdr_sent, (size_t)(c->hdr_len - c->hdr_sent),
                                  MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0) {
                c->hdr_sent = (uint16_t)(c->hdr_sent + n);
                if (c->hdr_sent == c->hdr_len) {
                    pep_conn_set_state(c, PEP_ST_AWAIT);
                    pep_log(PEP_LOG_DEBUG, "fd %d: header sent after the handshake", fd);
                }
                pep_unlock();
                continue;
            }
            e = errno;
            if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR) {
                /* the connection to the PEP failed: this call reports it,
                 * then plain pass-through */
                lowat_release(fd, c);
                pep_conn_set_state(c, PEP_ST_OPEN);
            }
            pep_unlock();
            wait_for = POLLOUT;
        } else { /* PEP_ST_AWAIT */
            uint8_t tmp[PEP_MSG_MAX];
            size_t want = pep_reader_want(&c->rd), used;
            ssize_t n = real.recv(fd, tmp, want, MSG_DONTWAIT);
            if (n > 0) {
                struct pep_msg m;
                int code;
                int rc = pep_reader_feed(&c->rd, tmp, (size_t)n, &used, &m, &code);
                if (rc == PEP_OK && m.has_error) {
                    int err = pep_errno_for(m.error_code, m.error_value, m.error_len);
                    pep_log(PEP_LOG_INFO, "fd %d: PEP Error TLV code %u", fd, m.error_code);
                    conn_fail(fd, c, err, "PEP refused the connection");
                } else if (rc == PEP_OK) {
                    conn_open(fd, c);
                } else if (rc == PEP_REJECT) {
                    pep_log(PEP_LOG_ERROR, "fd %d: bad reply from the PEP (error code %d)", fd,
                            code);
                    conn_fail(fd, c, EPROTO, "bad PEP reply");
                }
                pep_unlock();
                continue;
            }
            if (n == 0) {
                pep_log(PEP_LOG_ERROR, "fd %d: the PEP closed before its reply was complete",
                        fd);
                conn_fail(fd, c, ECONNRESET, "PEP closed before its reply");
                pep_unlock();
                continue;
            }
            e = errno;
            pep_unlock();
            if (for_write && (e == EAGAIN || e == EWOULDBLOCK)) {
                errno = saved; /* a write may go before the reply is in */
                return 0;
            }
            wait_for = POLLIN;
        }
        if (e == EINTR)
            continue;
        if (e != EAGAIN && e != EWOULDBLOCK) {
            errno = e;
            return -1;
        }
        if (dontwait || is_nonblocking(fd)) {
            pep_log(PEP_LOG_DEBUG, "fd %d: %s: nothing for the program yet (EAGAIN)", fd,
                    wait_for == POLLIN ? "reply outstanding" : "header not sent");
            errno = EAGAIN;
            return -1;
        }
        if (wait_fd(fd, wait_for) < 0)
            return -1;
    }
}

/* An application write on one of ours (AFTER_WRITE checked) failed with
 * EPIPE/ECONNRESET while the reply was still outstanding: the PEP may have
 * said why. Returns the errno to use. */
static int failed_write_errno(int fd, int e)
{
    if ((e == EPIPE || e == ECONNRESET) && settle(fd, 0, 1) < 0 &&
        errno != EAGAIN)
        return errno;
    return e;
}

/* Take what the PEP sent (without blocking): did it refuse the connection
 * (Error TLV or a bad reply)? For waits and SO_ERROR, which then report the
 * socket ready so the program's read or write gets the mapped errno. */
static int failed_by_pep(int fd)
{
    settle(fd, 1, 1);
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    int failed = c && c->state == PEP_ST_FAILED;
    pep_unlock();
    return failed;
}

/* Header-pending connections are flushed whenever the program waits. */
static void flush_sending(void)
{
    unsigned i;
    if (!__atomic_load_n(&pep_nsending, __ATOMIC_RELAXED))
        return;
    int saved = errno;
    for (i = 0; i < PEP_CONN_MAX; i++) {
        if (__atomic_load_n(&pep_conns[i].state, __ATOMIC_ACQUIRE) == PEP_ST_SENDING &&
            pep_conns[i].fd >= 0)
            settle(pep_conns[i].fd, SETTLE_HEADER_ONLY, 1);
    }
    errno = saved;
}

/* ---- connect: put the socket on the PEP -------------------------------- */

/*
 * via_pep() holds a reference of its own on the slot from PEP_ST_CONNECTING
 * until the setup is done, so a close() of fd on another thread while the
 * lock is dropped (sendmsg, connect) cannot free the slot and hand it, and
 * the header being sent, to another connection. Back under pep_lock: is fd
 * still this connection's? If not, the setup is abandoned: its reference
 * goes, and any dup left fails with ECONNABORTED (as in a forked child).
 */
static int setup_kept(int fd, struct pep_conn *c)
{
    if (pep_conn_get(fd) == c)
        return 1;
    c->err = ECONNABORTED;
    pep_conn_set_state(c, PEP_ST_FAILED);
    pep_conn_put(c);
    return 0;
}

#define PASS 1

/*
 * fd is about to connect to dest — or, from sendto/sendmsg with
 * MSG_FASTOPEN, to send app bytes there. PASS: not for us, make the real
 * call. Otherwise *ret is the result (connect: 0/-1; send: app bytes or -1).
 */
static int via_pep(int fd, const struct sockaddr *dest, socklen_t destlen,
                   const struct msghdr *app, int appflags, ssize_t *ret)
{
    int saved = errno, v, family;
    struct tcp_info ti;
    uint8_t a[16];
    uint16_t port;

    /* Not IP, or bypassed: decided before anything else (no resolution). */
    family = dest_of(dest, destlen, a, &port);
    if (!family || pep_config_bypass(&pep_cfg, NULL, a, port) || pep_busy)
        return PASS;
    /* A destination no Connect TLV may carry (port 0, 0.0.0.0 or ::,
     * multicast, broadcast: a PEP must refuse it) is the kernel's to answer,
     * as without libpep; an empty header would leave the PEP waiting. */
    uint8_t hdr[sizeof ((struct pep_conn *)0)->hdr];
    size_t hlen = pep_encode_connect(hdr, sizeof hdr, a, port, NULL, 0);
    if (!hlen)
        return PASS;
    /* Only IPv4/IPv6 TCP stream sockets, not yet connected. */
    if (sockopt_int(fd, SOL_SOCKET, SO_DOMAIN, &v) < 0 || v != family ||
        sockopt_int(fd, SOL_SOCKET, SO_TYPE, &v) < 0 || v != SOCK_STREAM ||
        sockopt_int(fd, SOL_SOCKET, SO_PROTOCOL, &v) < 0 || v != IPPROTO_TCP ||
        tcp_state(fd, &ti) != TCP_CLOSE) {
        errno = saved;
        return PASS;
    }
    const struct pep_addrs *pa = pep_config_resolve();
    if (!pa || pep_config_is_pep(&pep_cfg, pa, a, port)) { /* PEP_NO_PROXY: checked above */
        errno = saved;
        return PASS;
    }

    struct sockaddr_in6 pep;
    socklen_t peplen;
    memset(&pep, 0, sizeof pep);
    if (family == AF_INET) {
        if (!pa->have4) {
            pep_log(PEP_LOG_ERROR, "fd %d: IPv4 socket, but the PEP has no IPv4 address", fd);
            *ret = -1;
            errno = ENETUNREACH;
            return 0;
        }
        memcpy(&pep, &pa->v4, sizeof pa->v4);
        peplen = sizeof pa->v4;
    } else if (pa->have6) {
        pep = pa->v6;
        peplen = sizeof pep;
    } else {
        if (sockopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v) == 0 && v) {
            pep_log(PEP_LOG_ERROR, "fd %d: IPV6_V6ONLY socket, but the PEP is IPv4 only", fd);
            *ret = -1;
            errno = ENETUNREACH;
            return 0;
        }
        pep.sin6_family = AF_INET6;
        pep.sin6_port = pa->v4.sin_port;
        pep_v4_mapped(pep.sin6_addr.s6_addr, (const uint8_t *)&pa->v4.sin_addr);
        peplen = sizeof pep;
    }

    struct stat st;
    if (fstat(fd, &st) < 0) {
        errno = saved;
        return PASS;
    }
    pep_lock();
    struct pep_conn *c = pep_conn_new(fd);
    if (!c) {
        pep_unlock();
        pep_log(PEP_LOG_ERROR, "fd %d: connection table full (%d) or fd too high", fd,
                PEP_CONN_MAX);
        *ret = -1;
        errno = ENOBUFS;
        return 0;
    }
    c->dev = st.st_dev;
    c->ino = st.st_ino;
    memcpy(&c->dest, dest, destlen < sizeof c->dest ? destlen : sizeof c->dest);
    c->destlen = family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    c->pep = pep;
    c->peplen = peplen;
    memcpy(c->hdr, hdr, hlen);
    c->hdr_len = (uint16_t)hlen;
    c->hdr_sent = 0;
    pep_reader_init(&c->rd);
    pep_conn_set_state(c, PEP_ST_CONNECTING);
    c->refs++; /* the setup's own, while the lock is dropped: see setup_kept() */
    pep_unlock();

    v = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, &v, sizeof v);
    lowat_hold(fd, c);

    struct iovec iov[64];
    struct msghdr m;
    size_t niov = 1, i;
    memset(&m, 0, sizeof m);
    iov[0].iov_base = c->hdr;
    iov[0].iov_len = c->hdr_len;
    if (app) {
        for (i = 0; i < app->msg_iovlen && niov < 64; i++)
            iov[niov++] = app->msg_iov[i]; /* beyond 63: a short write, as allowed */
    }
    m.msg_name = &pep;
    m.msg_namelen = peplen;
    m.msg_iov = iov;
    m.msg_iovlen = niov;
    int flags = MSG_FASTOPEN | (app ? (appflags & ~MSG_FASTOPEN) : MSG_NOSIGNAL);
    ssize_t n = real.sendmsg(fd, &m, flags);
    int e = errno;
    int nonblock = (appflags & MSG_DONTWAIT) || is_nonblocking(fd);

    pep_lock();
    if (!setup_kept(fd, c))
        goto aborted;
    if (n >= 0) {
        size_t h = (size_t)n < hlen ? (size_t)n : hlen;
        c->hdr_sent = (uint16_t)h;
        pep_conn_set_state(c, h == hlen ? PEP_ST_AWAIT : PEP_ST_SENDING);
        pep_conn_put(c);
        pep_unlock();
        pep_log(PEP_LOG_DEBUG, "fd %d: Convert header (%zu of %zu bytes) sent with MSG_FASTOPEN",
                fd, h, hlen);
        if (app && (size_t)n > h) {
            *ret = n - (ssize_t)h;
            errno = saved;
            return 0;
        }
        if (nonblock) {
            *ret = -1;
            errno = EINPROGRESS;
            return 0;
        }
        /* Blocking: sendmsg waited for the handshake, unless SO_SNDTIMEO cut it short. */
        int s = tcp_state(fd, &ti);
        if (s == TCP_SYN_SENT) {
            *ret = -1;
            errno = EINPROGRESS;
            return 0;
        }
        if (settle(fd, 1, 0) < 0) {
            *ret = -1;
            return 0;
        }
        *ret = 0;
        errno = saved;
        return 0;
    }
    if (e == EINPROGRESS || e == EINTR) {
        /* non-blocking, and the SYN left without data (no TFO cookie, TFO
         * blackhole logic...): the header follows the handshake. */
        pep_conn_set_state(c, PEP_ST_SENDING);
        pep_conn_put(c);
        pep_unlock();
        if (e == EINPROGRESS)
            warn_0rtt_lost("the kernel sent the SYN without data");
        *ret = -1;
        errno = e;
        return 0;
    }
    if (e == EOPNOTSUPP) {
        /* TFO off on this host (net.ipv4.tcp_fastopen & 1 == 0): plain connect. */
        pep_unlock();
        warn_0rtt_lost("TCP Fast Open is off on this host (net.ipv4.tcp_fastopen)");
        int rc = real.connect(fd, (struct sockaddr *)&pep, peplen);
        e = errno;
        pep_lock();
        if (!setup_kept(fd, c))
            goto aborted;
        pep_conn_set_state(c, PEP_ST_SENDING);
        if (rc < 0 && e != EINPROGRESS && e != EINTR) {
            lowat_release(fd, c);
            pep_fd_forget(fd);
        }
        pep_conn_put(c);
        pep_unlock();
        if (rc < 0) {
            *ret = -1;
            errno = e;
            return 0;
        }
        if (settle(fd, 1, 0) < 0) {
            *ret = -1;
            return 0;
        }
        if (app) {
            *ret = real.sendmsg(fd, app, appflags & ~MSG_FASTOPEN);
            return 0;
        }
        *ret = 0;
        errno = saved;
        return 0;
    }
    /* Could not reach the PEP at all: the program sees the kernel's errno. */
    lowat_release(fd, c);
    pep_fd_forget(fd);
    pep_conn_put(c);
    pep_unlock();
    pep_log(PEP_LOG_INFO, "fd %d: connecting to the PEP: %s", fd, strerror(e));
    *ret = -1;
    errno = e;
    return 0;

aborted:
    pep_unlock();
    pep_log(PEP_LOG_INFO, "fd %d: closed on another thread during its connect", fd);
    *ret = -1;
    errno = ECONNABORTED;
    return 0;
}

static void forget(int fd);

/* connect() again on one of ours (EALREADY / EISCONN polling, or a retry). */
static int connect_again(int fd, int *again)
{
    struct tcp_info ti;
    int saved = errno;
    *again = 0;
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (!c) {
        pep_unlock();
        *again = 1;
        return 0;
    }
    if (!same_socket(fd, c) || tcp_state(fd, &ti) == TCP_CLOSE) {
        pep_fd_forget(fd); /* a fresh start on this socket */
        pep_unlock();
        errno = saved;
        *again = 1;
        return 0;
    }
    struct sockaddr_in6 pep = c->pep;
    socklen_t peplen = c->peplen;
    pep_unlock();
    return real.connect(fd, (struct sockaddr *)&pep, peplen);
}

EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
    ssize_t ret;

    INIT();
    if (!pep_cfg.enabled)
        return real.connect(fd, sa, len);
    if (UNLIKELY(pep_fd_tracked(fd))) {
        if (sa && len >= sizeof(sa_family_t) && sa->sa_family == AF_UNSPEC) {
            forget(fd); /* the program disconnects the socket to reuse it */
            return real.connect(fd, sa, len);
        }
        int again;
        int r = connect_again(fd, &again);
        if (!again)
            return r;
    }
    if (via_pep(fd, sa, len, NULL, 0, &ret) == PASS)
        return real.connect(fd, sa, len);
    return (int)ret;
}

/* ---- sockets made or replaced: forget stale state ---------------------- */

static void forget(int fd)
{
    if (UNLIKELY(pep_fd_tracked(fd))) {
        pep_lock();
        pep_fd_forget(fd);
        pep_unlock();
    }
}

EXPORT int socket(int domain, int type, int protocol)
{
    INIT();
    int fd = real.socket(domain, type, protocol);
    if (fd >= 0)
        forget(fd);
    return fd;
}

EXPORT int accept(int fd, struct sockaddr *sa, socklen_t *len)
{
    INIT();
    int r = real.accept(fd, sa, len);
    if (r >= 0)
        forget(r);
    return r;
}

EXPORT int accept4(int fd, struct sockaddr *sa, socklen_t *len, int flags)
{
    INIT();
    int r = real.accept4(fd, sa, len, flags);
    if (r >= 0)
        forget(r);
    return r;
}

EXPORT int close(int fd)
{
    INIT();
    forget(fd);
    return real.close(fd);
}

static void dup_state(int oldfd, int newfd)
{
    if (newfd < 0 || oldfd == newfd)
        return;
    if (pep_fd_tracked(oldfd) || pep_fd_tracked(newfd)) {
        pep_lock();
        pep_fd_dup(oldfd, newfd);
        pep_unlock();
    }
}

EXPORT int dup(int fd)
{
    INIT();
    int r = real.dup(fd);
    dup_state(fd, r);
    return r;
}

EXPORT int dup2(int oldfd, int newfd)
{
    INIT();
    int r = real.dup2(oldfd, newfd);
    dup_state(oldfd, r);
    return r;
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    INIT();
    int r = real.dup3(oldfd, newfd, flags);
    dup_state(oldfd, r);
    return r;
}

static int do_fcntl(int (*fn)(int, int, ...), int fd, int cmd, void *arg)
{
    int r = fn(fd, cmd, arg);
    if ((cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && r >= 0)
        dup_state(fd, r);
    return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    INIT();
    return do_fcntl(real.fcntl, fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    INIT();
    return do_fcntl(real.fcntl64, fd, cmd, arg);
}

EXPORT int close_range(unsigned first, unsigned last, int flags)
{
    INIT();
    if (!(flags & CLOSE_RANGE_CLOEXEC) && __atomic_load_n(&pep_nmapped, __ATOMIC_RELAXED)) {
        pep_lock();
        pep_fd_forget_range(first, last);
        pep_unlock();
    }
    if (real.close_range)
        return real.close_range(first, last, flags);
    return (int)syscall(SYS_close_range, first, last, flags);
}

/* ---- reads: strip the PEP's reply -------------------------------------- */

#define BEFORE_READ(fd, dontwait)                                   \
    do {                                                            \
        INIT();                                                     \
        if (UNLIKELY(pep_fd_busy(fd)) && settle(fd, 0, dontwait) < 0) \
            return -1;                                              \
    } while (0)

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    BEFORE_READ(fd, 0);
    return real.read(fd, buf, n);
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    BEFORE_READ(fd, 0);
    return real.read_chk(fd, buf, n, buflen);
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
    BEFORE_READ(fd, 0);
    return real.readv(fd, iov, cnt);
}

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return real.recv(fd, buf, n, flags);
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return real.recv_chk(fd, buf, n, buflen, flags);
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *sa,
                        socklen_t *len)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return real.recvfrom(fd, buf, n, flags, sa, len);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *sa, socklen_t *len)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return real.recvfrom_chk(fd, buf, n, buflen, flags, sa, len);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return real.recvmsg(fd, msg, flags);
}

EXPORT int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *ts)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    if (!real.recvmmsg) {
        errno = ENOSYS;
        return -1;
    }
    return real.recvmmsg(fd, v, n, flags, ts);
}

/* ---- writes: header first, errors delivered ---------------------------- */

#define BEFORE_WRITE(fd, dontwait)                                  \
    do {                                                            \
        INIT();                                                     \
        if (UNLIKELY(pep_fd_busy(fd)) && settle(fd, 1, dontwait) < 0) \
            return -1;                                              \
    } while (0)

#define AFTER_WRITE(fd, r)                                          \
    do {                                                            \
        if (UNLIKELY((r) < 0) && pep_fd_tracked(fd))                \
            errno = failed_write_errno(fd, errno);                  \
    } while (0)

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    BEFORE_WRITE(fd, 0);
    ssize_t r = real.write(fd, buf, n);
    AFTER_WRITE(fd, r);
    return r;
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    BEFORE_WRITE(fd, 0);
    ssize_t r = real.writev(fd, iov, cnt);
    AFTER_WRITE(fd, r);
    return r;
}

EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    ssize_t r = real.send(fd, buf, n, flags);
    AFTER_WRITE(fd, r);
    return r;
}

/* sendto/sendmsg with MSG_FASTOPEN and an address (the callers check both)
 * on a fresh socket: the program's own TFO connect; the header goes in
 * front of its bytes. */
static int fastopen_send(int fd, const struct sockaddr *sa, socklen_t len,
                         const struct msghdr *app, int flags, ssize_t *ret)
{
    if (!pep_cfg.enabled || pep_fd_tracked(fd))
        return PASS;
    return via_pep(fd, sa, len, app, flags, ret);
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa,
                      socklen_t len)
{
    ssize_t ret;
    INIT();
    if (UNLIKELY(flags & MSG_FASTOPEN) && sa) {
        struct iovec iov = {(void *)buf, n};
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        if (fastopen_send(fd, sa, len, &m, flags, &ret) != PASS)
            return ret;
    }
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    ssize_t r = real.sendto(fd, buf, n, flags, sa, len);
    AFTER_WRITE(fd, r);
    return r;
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    ssize_t ret;
    INIT();
    if (UNLIKELY(flags & MSG_FASTOPEN) && msg && msg->msg_name &&
        fastopen_send(fd, msg->msg_name, msg->msg_namelen, msg, flags, &ret) != PASS)
        return ret;
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    ssize_t r = real.sendmsg(fd, msg, flags);
    AFTER_WRITE(fd, r);
    return r;
}

EXPORT int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    if (!real.sendmmsg) {
        errno = ENOSYS;
        return -1;
    }
    int r = real.sendmmsg(fd, v, n, flags);
    AFTER_WRITE(fd, r);
    return r;
}

/* ---- what the program asks about the socket ---------------------------- */

EXPORT int getpeername(int fd, struct sockaddr *sa, socklen_t *len)
{
    INIT();
    int r = real.getpeername(fd, sa, len);
    if (!pep_fd_tracked(fd) || !len || !sa)
        return r;
    /* Connected (or connected, then reset by us for an Error TLV, which the
     * program learns from its next read or write): the real destination. */
    int saved = errno;
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (c && (r == 0 || c->state == PEP_ST_FAILED) && same_socket(fd, c)) {
        socklen_t n = *len < c->destlen ? *len : c->destlen;
        memcpy(sa, &c->dest, n);
        *len = c->destlen;
        r = 0;
        saved = errno;
    }
    pep_unlock();
    errno = saved;
    return r;
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    INIT();
    int r = real.getsockopt(fd, level, name, val, len);
    /* SO_ERROR is how a non-blocking connect learns it is done. If the
     * header could not go in the SYN, it goes now. A PEP that sends its
     * Error TLV and resets at once shows up here as ECONNRESET, but the
     * connection did complete and its Error TLV is in the receive queue: the
     * connect is reported done, and the Error, as for any PEP error, is the
     * next read's or write's errno (curl: "Recv failure: Connection
     * refused", not "Couldn't connect to server"). */
    if (UNLIKELY(level == SOL_SOCKET && name == SO_ERROR) && r == 0 && pep_fd_busy(fd) &&
        val && len && *len >= sizeof(int)) {
        int saved = errno, kerr = *(int *)val;
        if (kerr == 0) {
            settle(fd, SETTLE_HEADER_ONLY, 1);
        } else if ((kerr == ECONNRESET || kerr == EPIPE) && failed_by_pep(fd)) {
            *(int *)val = 0;
        }
        errno = saved;
    }
    return r;
}

/* ---- waits: a header that missed the SYN goes out as soon as it can ---- */

/*
 * A PEP that resets right after its Error TLV makes the socket report
 * POLLERR|POLLHUP, and some programs (curl) then call the connect failed
 * without looking further ("Couldn't connect to server"). For our sockets
 * whose reply turns out to be an Error TLV, poll reports them ready instead,
 * so the program does its read or write and gets the mapped errno.
 */
static int after_poll(struct pollfd *fds, nfds_t n, int r)
{
    nfds_t i;
    if (r <= 0 || !__atomic_load_n(&pep_nmapped, __ATOMIC_RELAXED))
        return r;
    int saved = errno;
    for (i = 0; i < n; i++) {
        if (!(fds[i].revents & (POLLERR | POLLHUP)) || !pep_fd_busy(fds[i].fd))
            continue;
        /* Nothing received (a PEP that refused or never answered the SYN):
         * no Error TLV to find, and settle()'s recv would consume the
         * socket's pending ECONNREFUSED/ETIMEDOUT, so SO_ERROR would then say
         * 0 and the program would write into a dead socket (curl: "Send
         * failure: Protocol error" instead of "Couldn't connect").
         * tests/test_reliability_client_faults.py */
        int avail = 0;
        if (ioctl(fds[i].fd, FIONREAD, &avail) < 0 || avail <= 0)
            continue;
        if (failed_by_pep(fds[i].fd))
            fds[i].revents = (short)(fds[i].events & (POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM));
    }
    errno = saved;
    return r;
}

/*
 * While a header waits for its handshake (TFO off), a program may block in a
 * wait for EPOLLIN/POLLIN only (a server-speaks-first protocol): nobody
 * would send the header and both ends would wait. So while any header is
 * pending, waits run in slices of PEP_SLICE_MS with a flush in between.
 * Costs nothing otherwise (one load of a counter).
 */
#define PEP_SLICE_MS 10

static int pending_headers(void)
{
    return __atomic_load_n(&pep_nsending, __ATOMIC_RELAXED) != 0;
}

/* The next slice of a wait of `left` ms (-1: forever). */
static int slice_of(long long left)
{
    return left < 0 || left > PEP_SLICE_MS ? PEP_SLICE_MS : (int)left;
}

static int sliced_poll(struct pollfd *fds, nfds_t n, int timeout)
{
    flush_sending();
    int left = timeout, r;
    while (UNLIKELY(pending_headers()) && left != 0) {
        int slice = slice_of(left);
        r = real.poll(fds, n, slice);
        if (r != 0)
            return after_poll(fds, n, r);
        flush_sending();
        if (left > 0)
            left -= slice;
    }
    return after_poll(fds, n, real.poll(fds, n, left));
}

EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    INIT();
    return sliced_poll(fds, n, timeout);
}

static int sliced_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts,
                        const sigset_t *mask)
{
    flush_sending();
    if (UNLIKELY(pending_headers())) {
        /* rounded up: a sub-millisecond timeout is not cut to 0 */
        long long left = ts ? ts->tv_sec * 1000LL + (ts->tv_nsec + 999999) / 1000000 : -1;
        while (pending_headers() && left != 0) {
            int slice = slice_of(left);
            struct timespec st = {0, slice * 1000000L};
            int r = real.ppoll(fds, n, &st, mask);
            if (r != 0)
                return after_poll(fds, n, r);
            flush_sending();
            if (left > 0)
                left -= slice;
        }
        if (left >= 0) {
            struct timespec st = {left / 1000, (left % 1000) * 1000000L};
            return after_poll(fds, n, real.ppoll(fds, n, &st, mask));
        }
    }
    return after_poll(fds, n, real.ppoll(fds, n, ts, mask));
}

EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
    INIT();
    return sliced_ppoll(fds, n, ts, mask);
}

EXPORT int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
    INIT();
    flush_sending();
    return real.select(n, r, w, e, tv);
}

EXPORT int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts,
                   const sigset_t *mask)
{
    INIT();
    flush_sending();
    return real.pselect(n, r, w, e, ts, mask);
}

EXPORT int epoll_wait(int epfd, struct epoll_event *ev, int max, int timeout)
{
    INIT();
    flush_sending();
    int left = timeout, r;
    while (UNLIKELY(pending_headers()) && left != 0) {
        int slice = slice_of(left);
        r = real.epoll_wait(epfd, ev, max, slice);
        if (r != 0)
            return r;
        flush_sending();
        if (left > 0)
            left -= slice;
    }
    return real.epoll_wait(epfd, ev, max, left);
}

EXPORT int epoll_pwait(int epfd, struct epoll_event *ev, int max, int timeout,
                       const sigset_t *mask)
{
    INIT();
    flush_sending();
    int left = timeout, r;
    while (UNLIKELY(pending_headers()) && left != 0) {
        int slice = slice_of(left);
        r = real.epoll_pwait(epfd, ev, max, slice, mask);
        if (r != 0)
            return r;
        flush_sending();
        if (left > 0)
            left -= slice;
    }
    return real.epoll_pwait(epfd, ev, max, left, mask);
}

EXPORT int epoll_pwait2(int epfd, struct epoll_event *ev, int max, const struct timespec *ts,
                        const sigset_t *mask)
{
    INIT();
    flush_sending();
    if (!real.epoll_pwait2) {
        errno = ENOSYS;
        return -1;
    }
    return real.epoll_pwait2(epfd, ev, max, ts, mask);
}

/* _FORTIFY_SOURCE's poll/ppoll: glibc's check, then the same wait as
 * poll/ppoll (sliced while a header is pending, Error TLVs reported ready).
 * A failed check goes to glibc's own symbol, which aborts. */
EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
    INIT();
    if (fdslen / sizeof *fds < n)
        return real.poll_chk(fds, n, timeout, fdslen);
    return sliced_poll(fds, n, timeout);
}

EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts,
                       const sigset_t *mask, size_t fdslen)
{
    INIT();
    if (fdslen / sizeof *fds < n)
        return real.ppoll_chk(fds, n, ts, mask, fdslen);
    return sliced_ppoll(fds, n, ts, mask);
}
