/* connect(): route decision, registration, the header in the SYN, and what
 * the result means for the program. See docs/preload.md, "connect()". */
#define _GNU_SOURCE
#include "connect.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/stat.h>

#include "config.h"
#include "conn.h"
#include "fdstate.h"
#include "real.h"
#include "tlv.h"

#ifndef TCP_FASTOPEN_NO_COOKIE
#define TCP_FASTOPEN_NO_COOKIE 34
#endif

/* Where a connect() was going. */
struct dest {
    int family;        /* AF_INET or AF_INET6; 0: not IP */
    uint8_t addr[16];  /* IPv4 mapped */
    uint16_t port;     /* host order */
};

/* Where it goes instead, and with what header. */
struct route {
    struct sockaddr_in6 pep; /* or a sockaddr_in */
    socklen_t peplen;
    uint8_t hdr[sizeof ((struct pep_conn *)0)->hdr];
    size_t hdr_len;
};

/* Why a connect() is refused before anything is sent. */
struct refusal {
    int err;
    const char *why;
};

static struct dest dest_of(const struct sockaddr *sa, socklen_t len)
{
    struct dest d;
    memset(&d, 0, sizeof d);
    if (!sa || len < sizeof(sa_family_t))
        return d;
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        pep_v4_mapped(d.addr, (const uint8_t *)&s4->sin_addr);
        d.port = ntohs(s4->sin_port);
        d.family = AF_INET;
    } else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        memcpy(d.addr, &s6->sin6_addr, 16);
        d.port = ntohs(s6->sin6_port);
        d.family = AF_INET6;
    }
    return d;
}

/* ---- the route decision (pure) ----------------------------------------- */

/* Does this destination go straight to the kernel, before any look at the
 * socket? Not IP, PEP_NO_PROXY, libpep's own name lookup, or a destination
 * no Connect TLV may carry (port 0, 0.0.0.0 or ::, multicast, broadcast: a
 * PEP must refuse it; without libpep the kernel answers it). The header is
 * encoded here: it is the test. */
static int goes_direct(const struct dest *d, struct route *r)
{
    if (!d->family || pep_resolving || pep_config_bypass(&pep_cfg, NULL, d->addr, d->port))
        return 1;
    r->hdr_len = pep_encode_connect(r->hdr, sizeof r->hdr, d->addr, d->port, NULL, 0);
    return r->hdr_len == 0;
}

/* Which PEP address a socket of this family reaches. 0: r->pep is set;
 * 1: direct (no PEP address, or the PEP itself); -1: refused (*no). */
static int choose_pep(const struct pep_addrs *pa, const struct dest *d, int v6only,
                      struct route *r, struct refusal *no)
{
    if (!pa || pep_config_is_pep(&pep_cfg, pa, d->addr, d->port))
        return 1;
    memset(&r->pep, 0, sizeof r->pep);
    if (d->family == AF_INET) {
        if (!pa->have4) {
            no->err = ENETUNREACH;
            no->why = "IPv4 socket, but the PEP has no IPv4 address";
            return -1;
        }
        memcpy(&r->pep, &pa->v4, sizeof pa->v4);
        r->peplen = sizeof pa->v4;
    } else if (pa->have6) {
        r->pep = pa->v6;
        r->peplen = sizeof r->pep;
    } else {
        if (v6only) {
            no->err = ENETUNREACH;
            no->why = "IPV6_V6ONLY socket, but the PEP is IPv4 only";
            return -1;
        }
        r->pep.sin6_family = AF_INET6;
        r->pep.sin6_port = pa->v4.sin_port;
        pep_v4_mapped(r->pep.sin6_addr.s6_addr, (const uint8_t *)&pa->v4.sin_addr);
        r->peplen = sizeof r->pep;
    }
    return 0;
}

/* Only IPv4/IPv6 TCP stream sockets of the destination's family, not yet
 * connected. */
static int socket_eligible(int fd, int family)
{
    int v;
    struct tcp_info ti;
    return pep_sockopt_int(fd, SOL_SOCKET, SO_DOMAIN, &v) == 0 && v == family &&
           pep_sockopt_int(fd, SOL_SOCKET, SO_TYPE, &v) == 0 && v == SOCK_STREAM &&
           pep_sockopt_int(fd, SOL_SOCKET, SO_PROTOCOL, &v) == 0 && v == IPPROTO_TCP &&
           pep_tcp_state(fd, &ti) == TCP_CLOSE;
}

static int is_v6only(int fd, int family)
{
    int v = 0;
    return family == AF_INET6 && pep_sockopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v) == 0 && v;
}

/* ---- registration ------------------------------------------------------- */

/*
 * The setup holds a reference of its own on the connection from
 * PEP_ST_CONNECTING until it is done, so a close() of fd on another thread
 * while the lock is dropped (sendmsg, connect) cannot free it and hand it,
 * and the header being sent, to another connection. Back under pep_lock:
 * is fd still this connection's? If not, the setup is abandoned: its
 * reference goes, and any dup left fails with ECONNABORTED (as in a forked
 * child).
 */
static struct pep_conn *register_conn(int fd, const struct stat *st,
                                      const struct sockaddr *dest, socklen_t destlen,
                                      int family, const struct route *r)
{
    pep_lock();
    struct pep_conn *c = pep_conn_new(fd);
    if (!c) {
        pep_unlock();
        return NULL;
    }
    c->dev = st->st_dev;
    c->ino = st->st_ino;
    memcpy(&c->dest, dest, destlen < sizeof c->dest ? destlen : sizeof c->dest);
    c->destlen = family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    c->pep = r->pep;
    c->peplen = r->peplen;
    memcpy(c->hdr, r->hdr, r->hdr_len);
    c->hdr_len = (uint16_t)r->hdr_len;
    c->hdr_sent = 0;
    pep_reader_init(&c->rd);
    pep_conn_set_state(c, PEP_ST_CONNECTING);
    c->refs++; /* the setup's own, while the lock is dropped */
    pep_unlock();
    return c;
}

/* Under pep_lock: is fd still c's? If not, c is abandoned (see above). */
static int setup_kept(int fd, struct pep_conn *c)
{
    if (pep_conn_get(fd) == c)
        return 1;
    c->err = ECONNABORTED;
    pep_conn_set_state(c, PEP_ST_FAILED);
    pep_conn_put(c);
    return 0;
}

/* ---- the header in the SYN ---------------------------------------------- */

#define IOV_MAX_SENT 64

/* sendmsg(MSG_FASTOPEN) to the PEP with the header, then the program's bytes
 * if any. The result of sendmsg, errno in *err. */
static ssize_t send_in_syn(int fd, struct pep_conn *c, const struct msghdr *app, int appflags,
                           int *err)
{
    int v = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, &v, sizeof v);
    pep_lowat_hold(fd, c);

    struct iovec iov[IOV_MAX_SENT];
    struct msghdr m;
    size_t niov = 1, i;
    memset(&m, 0, sizeof m);
    iov[0].iov_base = c->hdr;
    iov[0].iov_len = c->hdr_len;
    if (app) {
        for (i = 0; i < app->msg_iovlen && niov < IOV_MAX_SENT; i++)
            iov[niov++] = app->msg_iov[i]; /* beyond 63: a short write, as allowed */
    }
    struct sockaddr_in6 pep = c->pep;
    m.msg_name = &pep;
    m.msg_namelen = c->peplen;
    m.msg_iov = iov;
    m.msg_iovlen = niov;
    int flags = MSG_FASTOPEN | (app ? (appflags & ~MSG_FASTOPEN) : MSG_NOSIGNAL);
    ssize_t n = pep_real.sendmsg(fd, &m, flags);
    *err = errno;
    return n;
}

/* ---- what the result means for the program ------------------------------ */

/* sendmsg took n >= 0 bytes: the SYN left (with the header, or part of it). */
static ssize_t sent(int fd, struct pep_conn *c, ssize_t n, const struct msghdr *app,
                    int nonblock, int saved)
{
    size_t hlen = c->hdr_len;
    size_t h = (size_t)n < hlen ? (size_t)n : hlen;
    c->hdr_sent = (uint16_t)h;
    pep_conn_set_state(c, h == hlen ? PEP_ST_AWAIT : PEP_ST_SENDING);
    pep_conn_put(c);
    pep_unlock();
    pep_log(PEP_LOG_DEBUG, "fd %d: Convert header (%zu of %zu bytes) sent with MSG_FASTOPEN",
            fd, h, hlen);
    if (app && (size_t)n > h) {
        errno = saved;
        return n - (ssize_t)h;
    }
    if (nonblock) {
        errno = EINPROGRESS;
        return -1;
    }
    /* Blocking: sendmsg waited for the handshake, unless SO_SNDTIMEO cut it short. */
    struct tcp_info ti;
    if (pep_tcp_state(fd, &ti) == TCP_SYN_SENT) {
        errno = EINPROGRESS;
        return -1;
    }
    if (pep_settle(fd, PEP_FOR_WRITE, 0) < 0)
        return -1;
    errno = saved;
    return 0;
}

/* Non-blocking, and the SYN left without data (no TFO cookie, TFO blackhole
 * logic...): the header follows the handshake. */
static ssize_t in_progress(struct pep_conn *c, int e)
{
    pep_conn_set_state(c, PEP_ST_SENDING);
    pep_conn_put(c);
    pep_unlock();
    if (e == EINPROGRESS)
        pep_warn_0rtt_lost("the kernel sent the SYN without data");
    errno = e;
    return -1;
}

/* The setup was abandoned (fd closed on another thread); the lock is held. */
#define ABORTED (-2)

/* TFO off on this host (net.ipv4.tcp_fastopen & 1 == 0): a plain connect,
 * the header after the handshake. Called with the lock held. */
static ssize_t without_tfo(int fd, struct pep_conn *c, const struct msghdr *app, int appflags,
                           int saved)
{
    pep_unlock();
    pep_warn_0rtt_lost("TCP Fast Open is off on this host (net.ipv4.tcp_fastopen)");
    struct sockaddr_in6 pep = c->pep;
    int rc = pep_real.connect(fd, (struct sockaddr *)&pep, c->peplen);
    int e = errno;
    pep_lock();
    if (!setup_kept(fd, c))
        return ABORTED;
    pep_conn_set_state(c, PEP_ST_SENDING);
    if (rc < 0 && e != EINPROGRESS && e != EINTR) {
        pep_lowat_release(fd, c);
        pep_fd_forget(fd);
    }
    pep_conn_put(c);
    pep_unlock();
    if (rc < 0) {
        errno = e;
        return -1;
    }
    if (pep_settle(fd, PEP_FOR_WRITE, 0) < 0)
        return -1;
    if (app)
        return pep_real.sendmsg(fd, app, appflags & ~MSG_FASTOPEN);
    errno = saved;
    return 0;
}

/* Could not reach the PEP at all: the program sees the kernel's errno. */
static ssize_t unreachable(int fd, struct pep_conn *c, int e)
{
    pep_lowat_release(fd, c);
    pep_fd_forget(fd);
    pep_conn_put(c);
    pep_unlock();
    pep_log(PEP_LOG_INFO, "fd %d: connecting to the PEP: %s", fd, strerror(e));
    errno = e;
    return -1;
}

enum pep_taken pep_connect_via_pep(int fd, const struct sockaddr *sa, socklen_t salen,
                                   const struct msghdr *app, int appflags, ssize_t *ret)
{
    int saved = errno;
    struct dest d = dest_of(sa, salen);
    struct route r;
    struct refusal no;
    struct stat st;

    if (goes_direct(&d, &r))
        return PEP_PASS;
    if (!socket_eligible(fd, d.family)) {
        errno = saved;
        return PEP_PASS;
    }
    int choice = choose_pep(pep_config_resolve(), &d, is_v6only(fd, d.family), &r, &no);
    if (choice > 0 || (choice == 0 && fstat(fd, &st) < 0)) {
        errno = saved;
        return PEP_PASS;
    }
    if (choice < 0) {
        pep_log(PEP_LOG_ERROR, "fd %d: %s", fd, no.why);
        *ret = -1;
        errno = no.err;
        return PEP_TAKEN;
    }

    struct pep_conn *c = register_conn(fd, &st, sa, salen, d.family, &r);
    if (!c) {
        pep_log(PEP_LOG_ERROR, "fd %d: out of memory for libpep's connection state", fd);
        *ret = -1;
        errno = ENOBUFS;
        return PEP_TAKEN;
    }

    int e;
    ssize_t n = send_in_syn(fd, c, app, appflags, &e);
    int nonblock = (appflags & MSG_DONTWAIT) || pep_is_nonblocking(fd);

    pep_lock();
    if (!setup_kept(fd, c)) {
        n = ABORTED;
    } else if (n >= 0) {
        n = sent(fd, c, n, app, nonblock, saved);
    } else if (e == EINPROGRESS || e == EINTR) {
        n = in_progress(c, e);
    } else if (e == EOPNOTSUPP) {
        n = without_tfo(fd, c, app, appflags, saved);
    } else {
        n = unreachable(fd, c, e);
    }
    if (n == ABORTED) {
        pep_unlock();
        pep_log(PEP_LOG_INFO, "fd %d: closed on another thread during its connect", fd);
        n = -1;
        errno = ECONNABORTED;
    }
    *ret = n;
    return PEP_TAKEN;
}

enum pep_taken pep_connect_again(int fd, const struct sockaddr *sa, socklen_t len, int *ret)
{
    struct tcp_info ti;
    int saved = errno;

    if (sa && len >= sizeof(sa_family_t) && sa->sa_family == AF_UNSPEC) {
        pep_forget(fd); /* the program disconnects the socket to reuse it */
        *ret = pep_real.connect(fd, sa, len);
        return PEP_TAKEN;
    }
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (!c)  {
        pep_unlock();
        return PEP_PASS;
    }
    if (!pep_same_socket(fd, c) || pep_tcp_state(fd, &ti) == TCP_CLOSE) {
        pep_fd_forget(fd); /* a fresh start on this socket */
        pep_unlock();
        errno = saved;
        return PEP_PASS;
    }
    struct sockaddr_in6 pep = c->pep;
    socklen_t peplen = c->peplen;
    pep_unlock();
    *ret = pep_real.connect(fd, (struct sockaddr *)&pep, peplen);
    return PEP_TAKEN;
}
