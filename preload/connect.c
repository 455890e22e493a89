/* connect(): route decision, registration, the header in the SYN, what the
 * result means for the program; and the attempt machinery that moves a
 * connection to the next PEP (failover, Error 64/65, Error 3) or to the
 * destination, on the program's own fd. See docs/preload.md, "connect()". */
#define _GNU_SOURCE
#include "connect.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>

#include "config.h"
#include "conn.h"
#include "fdstate.h"
#include "state.h"
#include "real.h"
#include "tlv.h"

#ifndef TCPI_OPT_SYN_DATA
#define TCPI_OPT_SYN_DATA 32
#endif

/* Where a connect() was going. */
struct dest {
    int family;        /* AF_INET or AF_INET6; 0: not IP */
    uint8_t addr[16];  /* IPv4 mapped */
    uint16_t port;     /* host order */
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
 * PEP must refuse it; without libpep the kernel answers it). */
static int goes_direct(const struct dest *d)
{
    uint8_t hdr[PEP_HDR_CAP];
    return !d->family || pep_resolving || pep_config_bypass(&pep_cfg, NULL, d->addr, d->port) ||
           !pep_encode_connect(hdr, sizeof hdr, d->addr, d->port, NULL, 0);
}

/* Only IPv4/IPv6 TCP stream sockets of the destination's family, not yet
 * connected. SO_TYPE is not asked: protocol IPPROTO_TCP in an inet family
 * is SOCK_STREAM, or SOCK_RAW, whose TCP_INFO fails (EOPNOTSUPP/ENOPROTOOPT);
 * MPTCP (262) and SMC (256) answer TCP_INFO but not SO_PROTOCOL 6. */
static int socket_eligible(int fd, int family)
{
    int v;
    struct tcp_info ti;
    return pep_sockopt_int(fd, SOL_SOCKET, SO_DOMAIN, &v) == 0 && v == family &&
           pep_sockopt_int(fd, SOL_SOCKET, SO_PROTOCOL, &v) == 0 && v == IPPROTO_TCP &&
           pep_tcp_state(fd, &ti) == TCP_CLOSE;
}

static int is_v6only(int fd, int family)
{
    int v = 0;
    return family == AF_INET6 && pep_sockopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v) == 0 && v;
}

/* The first PEP of PEP_PROXY, from `from` on, not tried yet for c, not held
 * down, with an address for c's socket: its index, or -1. *why: the last
 * reason one was left out. */
static int next_peer(struct pep_conn *c, unsigned from, struct sockaddr_in6 *addr,
                     socklen_t *len, const char **why)
{
    unsigned i;
    for (i = from; i < pep_cfg.npeers; i++) {
        if (c->tried & (1u << i))
            continue;
        if (pep_peer_addr(i, c->family, c->v6only, addr, len, why) < 0)
            continue;
        if (pep_peer_held_down(i, addr)) {
            *why = "held down";
            continue;
        }
        return (int)i;
    }
    return -1;
}

/* ---- registration ------------------------------------------------------- */

/*
 * A blocking connect() holds a reference of its own on the connection while
 * it waits for the handshake with the lock dropped, so that a close() of fd
 * on another thread cannot free it and hand it to another connection. Back
 * under pep_lock: is fd still this connection's? If not, the setup is
 * abandoned: its reference goes, and any dup left fails with ECONNABORTED
 * (as in a forked child).
 */
static struct pep_conn *register_conn(int fd, const struct stat *st, const struct sockaddr *dest,
                                      socklen_t destlen, const struct dest *d, int v6only)
{
    struct pep_conn *c = pep_conn_new(fd);
    if (!c)
        return NULL;
    c->dev = st->st_dev;
    c->ino = st->st_ino;
    memcpy(&c->dest, dest, destlen < sizeof c->dest ? destlen : sizeof c->dest);
    c->destlen = d->family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    c->family = d->family;
    c->v6only = v6only;
    c->confirm = pep_config_confirm(d->addr, d->port);
    c->ep_fd = -1;
    c->nocookie_set = pep_fresh_socket_nocookie();
    pep_conn_set_state(c, PEP_ST_CONNECTING);
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

/* ---- the program's bytes before the reply ------------------------------- */

void pep_replay_keep(struct pep_conn *c, const struct iovec *iov, size_t n, size_t r)
{
    size_t i;
    if (c->replay_lost || !r)
        return;
    size_t need = c->replay_len + r;
    if (need > PEP_REPLAY_MAX) {
        c->replay_lost = 1; /* too much to replay: no more attempts for this one */
        return;
    }
    /* Grown as needed: a request of a few hundred bytes takes a small block
     * from malloc's caches, where 64 KiB a connection grew and trimmed the
     * heap (page faults, madvise) on every connection whose program wrote
     * before the reply (wrk through a loaded PEP: ~2.5% of its CPU). */
    if (need > c->replay_cap) {
        size_t cap = c->replay_cap ? c->replay_cap : PEP_REPLAY_MIN;
        while (cap < need)
            cap *= 2;
        if (cap > PEP_REPLAY_MAX)
            cap = PEP_REPLAY_MAX;
        uint8_t *grown = realloc(c->replay, cap);
        if (!grown) {
            c->replay_lost = 1;
            return;
        }
        c->replay = grown;
        c->replay_cap = cap;
    }
    for (i = 0; i < n && r; i++) {
        size_t k = iov[i].iov_len < r ? iov[i].iov_len : r;
        memcpy(c->replay + c->replay_len, iov[i].iov_base, k);
        c->replay_len += k;
        r -= k;
    }
}

/* ---- one attempt -------------------------------------------------------- */

/* Dissolve whatever association the socket has (keeps the open file, its
 * options and epoll registrations). rst: abort an established connection
 * with a RST (the PEP sees the attempt is over). */
static void dissolve(int fd, struct pep_conn *c, int rst)
{
    struct sockaddr unspec;
    struct linger old, lg = {1, 0};
    socklen_t l = sizeof old;
    int had = rst && pep_real.getsockopt(fd, SOL_SOCKET, SO_LINGER, &old, &l) == 0;
    if (rst)
        pep_real.setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    memset(&unspec, 0, sizeof unspec);
    unspec.sa_family = AF_UNSPEC;
    pep_real.connect(fd, &unspec, sizeof unspec);
    if (had)
        pep_real.setsockopt(fd, SOL_SOCKET, SO_LINGER, &old, sizeof old);
    pep_fo_connect_off(fd, c); /* the next attempt's connect() must send its SYN */
}

/* The Convert message for c's destination, with the Cookie TLV PEP i wants. */
static int build_header(struct pep_conn *c, unsigned i, const struct sockaddr_in6 *addr)
{
    struct dest d = dest_of((const struct sockaddr *)&c->dest, c->destlen);
    size_t n = pep_encode_connect(c->hdr, sizeof c->hdr, d.addr, d.port, NULL, 0);
    uint8_t cookie[PEP_COOKIE_MAX];
    size_t clen = pep_peer_cookie(i, addr, cookie, sizeof cookie);
    if (n && clen) {
        size_t m = pep_add_cookie(c->hdr, n, sizeof c->hdr, cookie, clen);
        if (m)
            n = m;
    }
    c->hdr_len = (uint16_t)n;
    return n ? 0 : -1;
}

/* sendmsg(MSG_FASTOPEN | MSG_DONTWAIT) to `to` with what goes first on the
 * stream (header, then the replay). Never blocks. The sendmsg result. */
static ssize_t send_prefix_in_syn(int fd, struct pep_conn *c, const struct sockaddr_in6 *to,
                                  socklen_t tolen)
{
    struct iovec iov[2] = {{c->hdr, c->hdr_len}, {c->replay, c->replay_len}};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    struct sockaddr_in6 dst = *to;
    m.msg_name = &dst;
    m.msg_namelen = tolen;
    m.msg_iov = c->hdr_len ? iov : iov + 1;
    m.msg_iovlen = c->hdr_len ? (c->replay_len ? 2 : 1) : 1;
    c->pre_len = c->hdr_len + c->replay_len;
    c->pre_sent = 0;
    return pep_real.sendmsg(fd, &m, MSG_FASTOPEN | MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* TFO off on this host (net.ipv4.tcp_fastopen & 1 == 0): a plain
 * non-blocking connect; everything follows the handshake. */
static int connect_without_tfo(int fd, const struct sockaddr_in6 *to, socklen_t tolen)
{
    int fl = pep_real.fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK))
        pep_real.fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    int rc = pep_real.connect(fd, (const struct sockaddr *)to, tolen);
    int e = errno;
    if (fl >= 0 && !(fl & O_NONBLOCK))
        pep_real.fcntl(fd, F_SETFL, fl);
    errno = e;
    return rc;
}

/* After the SYN left (n bytes of the prefix in it, or -1/EINPROGRESS). */
static void attempt_started(struct pep_conn *c, ssize_t n)
{
    c->pre_sent = n > 0 ? (size_t)n : 0;
    pep_reader_init(&c->rd);
    c->reply_deadline = 0;
    pep_conn_set_state(c, c->pre_sent == c->pre_len && !c->direct ? PEP_ST_AWAIT
                          : c->pre_sent == c->pre_len ? PEP_ST_OPEN : PEP_ST_SENDING);
}

/*
 * PEP_SYN_WRITE: the kernel's TCP_FASTOPEN_CONNECT holds the SYN back
 * until the first write (connect() returns 0, the socket polls writable),
 * so the program's first bytes ride the SYN after the header
 * (conn.c, pep_syn_write). 0: deferred (DEFERRED), or the kernel sent a
 * SYN without data at once (no TFO cookie for this PEP: the header follows
 * the handshake, as today's path would); -1: the connect failed (errno);
 * -2: not deferred (the option is refused: old kernel, TFO client off),
 * today's path. The program's connect() says EINPROGRESS either way.
 */
static int attempt_deferred(int fd, struct pep_conn *c, unsigned i,
                            const struct sockaddr_in6 *addr, socklen_t len)
{
    int one = 1;
    if (pep_real.setsockopt(fd, IPPROTO_TCP, PEP_TCP_FASTOPEN_CONNECT, &one, sizeof one) < 0)
        return -2;
    c->fo_connect = 1;
    /* A socket disconnected (AF_UNSPEC) keeps the old connection's error
     * (ECONNRESET) until a SYN goes (tcp_connect_init clears it): taken
     * now, or the program's SO_ERROR would report it for this connect. */
    int stale = 0;
    pep_sockopt_int(fd, SOL_SOCKET, SO_ERROR, &stale);
    struct sockaddr_in6 dst = *addr;
    int rc = pep_real.connect(fd, (struct sockaddr *)&dst, len);
    int e = errno;
    c->pre_len = c->hdr_len;
    if (rc == 0) {
        c->pre_sent = 0;
        pep_reader_init(&c->rd);
        c->reply_deadline = 0;
        c->defer_waits = 0;
        c->defer_thread = (unsigned long)pthread_self();
        c->defer_since = pep_now_ns();
        pep_conn_set_state(c, PEP_ST_DEFERRED);
        pep_log(PEP_LOG_DEBUG, "fd %d: SYN deferred to the first write (TCP_FASTOPEN_CONNECT)",
                fd);
        return 0;
    }
    if (e == EINPROGRESS || e == EINTR) {
        if (c->nocookie)
            pep_warn_0rtt_lost("the kernel sent the SYN without data");
        attempt_started(c, -1);
        pep_conn_set_hs_deadline(c, pep_now_ns() + pep_peer_connect_timeout_ns(i, addr));
        return 0;
    }
    pep_fo_connect_off(fd, c);
    pep_lowat_release(fd, c);
    errno = e;
    return -1;
}

/* Start an attempt to PEP i. 0: the SYN is out (or deferred to the first
 * write); -1: it failed at once (errno). Under the lock; never blocks. */
static int attempt_pep(int fd, struct pep_conn *c, unsigned i, const struct sockaddr_in6 *addr,
                       socklen_t len)
{
    c->peer = i;
    c->tried |= 1u << i;
    c->direct = 0;
    memcpy(&c->pep, addr, sizeof c->pep);
    c->peplen = len;
    if (build_header(c, i, addr) < 0) {
        errno = EINVAL;
        return -1;
    }
    c->nocookie = pep_peer_use_nocookie(i, addr);
    pep_nocookie_set(fd, c, c->nocookie);
    if (!c->confirm) /* PEP_CONFIRM: the reply is awaited as POLLIN, whatever its size */
        pep_lowat_hold(fd, c);
    if (c->defer) {
        c->defer = 0;
        int d = attempt_deferred(fd, c, i, addr, len);
        if (d >= 0)
            return d;
    }
    ssize_t n = send_prefix_in_syn(fd, c, addr, len);
    int e = errno;
    if (n < 0 && e == EOPNOTSUPP) {
        pep_warn_0rtt_lost("TCP Fast Open is off on this host (net.ipv4.tcp_fastopen)");
        if (connect_without_tfo(fd, addr, len) < 0 && errno != EINPROGRESS) {
            e = errno;
        } else {
            e = EINPROGRESS;
        }
    } else if (n < 0 && e == EINPROGRESS && c->nocookie) {
        pep_warn_0rtt_lost("the kernel sent the SYN without data");
    }
    if (n < 0 && e != EINPROGRESS && e != EINTR) {
        pep_lowat_release(fd, c);
        errno = e;
        return -1;
    }
    attempt_started(c, n);
    pep_conn_set_hs_deadline(c, pep_now_ns() + pep_peer_connect_timeout_ns(i, addr));
    pep_log(PEP_LOG_DEBUG, "fd %d: Convert header (%zd of %zu bytes with the replay) sent "
            "with MSG_FASTOPEN", fd, n < 0 ? (ssize_t)0 : n, c->pre_len);
    return 0;
}

/* Straight to the destination, the replay first (PEP_FALLBACK=direct). */
static int attempt_direct(int fd, struct pep_conn *c)
{
    c->direct = 1;
    c->hdr_len = 0;
    pep_lowat_release(fd, c);
    pep_nocookie_set(fd, c, 0);
    memcpy(&c->pep, &c->dest, sizeof c->pep);
    c->peplen = c->destlen;
    ssize_t n;
    if (c->replay_len) {
        n = send_prefix_in_syn(fd, c, &c->dest, c->destlen);
    } else {
        c->pre_len = 0;
        n = connect_without_tfo(fd, &c->dest, c->destlen);
    }
    if (n < 0 && errno == EOPNOTSUPP)
        n = connect_without_tfo(fd, &c->dest, c->destlen);
    if (n < 0 && errno != EINPROGRESS && errno != EINTR)
        return -1;
    attempt_started(c, n);
    pep_conn_set_hs_deadline(c, 0); /* the destination's handshake: the kernel's story */
    return 0;
}

/* ---- moving on ---------------------------------------------------------- */

static const char *down_words[] = {
    "refused",
    "did not answer in time",
    "said Error 64 (resource exceeded)",
    "said Error 65 (network failure)",
};

/* "once per hold-down": the fallback line is said again only after this. */
static long long fallback_said_until;

/* Under the lock. Try the PEPs left, then the fallback. 0: an attempt is on
 * its way; -1: c failed (c->err). `failed`: the PEP that just failed, and
 * why, for the one line the user sees (NULL at connect time). */
static int move_on(int fd, struct pep_conn *c, const char *failed, const char *what, int err)
{
    struct sockaddr_in6 addr;
    socklen_t len;
    const char *why = "no PEP";
    int i;
    char peer[80];
    while ((i = next_peer(c, 0, &addr, &len, &why)) >= 0) {
        if (c->state != PEP_ST_CONNECTING)
            dissolve(fd, c, 0);
        if (attempt_pep(fd, c, (unsigned)i, &addr, len) == 0) {
            if (failed) {
                pep_peer_text(&addr, peer, sizeof peer);
                pep_log(PEP_LOG_ERROR, "PEP %s %s; using %s", failed, what, peer);
            }
            return 0;
        }
        int e = errno;
        pep_peer_text(&addr, peer, sizeof peer);
        pep_peer_hold_down((unsigned)i, &addr, PEP_DOWN_REFUSED, 0);
        pep_log(PEP_LOG_ERROR, "PEP %s: %s; trying the next one", peer, strerror(e));
        err = e;
    }
    long long now = pep_now_ns();
    if (!pep_cfg.fallback_fail) {
        dissolve(fd, c, 0);
        if (now >= fallback_said_until) {
            fallback_said_until = now + PEP_HOLD_DOWN_S * 1000000000LL;
            pep_log(PEP_LOG_ERROR, "no PEP usable (%s%s%s); connecting directly "
                    "(PEP_FALLBACK=direct; said once per hold-down)",
                    failed ? failed : why, failed ? " " : "", failed ? what : "");
        }
        if (attempt_direct(fd, c) == 0)
            return 0;
        err = errno;
    } else if (now >= fallback_said_until) {
        fallback_said_until = now + PEP_HOLD_DOWN_S * 1000000000LL;
        pep_log(PEP_LOG_ERROR, "no PEP usable (%s%s%s); refusing the connection "
                "(PEP_FALLBACK=fail)", failed ? failed : why, failed ? " " : "",
                failed ? what : "");
        err = ECONNREFUSED;
    } else {
        err = ECONNREFUSED;
    }
    pep_lowat_release(fd, c);
    pep_conn_set_hs_deadline(c, 0);
    c->err = err ? err : ECONNREFUSED;
    c->failed_connecting = 1;
    pep_conn_set_state(c, PEP_ST_FAILED);
    dissolve(fd, c, 1);
    return -1;
}

void pep_failover(int fd, struct pep_conn *c, enum pep_down_reason why, unsigned hold_s, int err)
{
    char peer[80];
    pep_peer_text(&c->pep, peer, sizeof peer);
    if (!c->direct)
        pep_peer_hold_down(c->peer, &c->pep, why, hold_s);
    if (c->direct || c->replay_lost) {
        /* nothing to move: the program sees the error */
        c->failed_connecting = c->hs_deadline != 0;
        pep_lowat_release(fd, c);
        pep_conn_set_hs_deadline(c, 0);
        c->err = err;
        pep_conn_set_state(c, PEP_ST_FAILED);
        dissolve(fd, c, 1);
        pep_log(PEP_LOG_ERROR, "PEP %s %s; %s", peer, down_words[why],
                c->direct ? "" : "too much written before its reply to move the connection");
        return;
    }
    dissolve(fd, c, why == PEP_DOWN_ERROR64 || why == PEP_DOWN_ERROR65);
    move_on(fd, c, peer, down_words[why], err);
}

void pep_retry_same(int fd, struct pep_conn *c)
{
    struct sockaddr_in6 addr = c->pep;
    socklen_t len = c->peplen;
    char peer[80];
    dissolve(fd, c, 1);
    if (attempt_pep(fd, c, c->peer, &addr, len) == 0)
        return;
    pep_peer_text(&addr, peer, sizeof peer);
    move_on(fd, c, peer, "refused", errno);
}

int pep_handshake_check(int fd, struct pep_conn *c, long long now)
{
    struct tcp_info ti;
    if (!c->hs_deadline)
        return 1;
    int st = pep_tcp_state(fd, &ti);
    int going = st == TCP_SYN_SENT || st == TCP_SYN_RECV;
    if (going && now < c->hs_deadline)
        return 0;
    /* never got as far as a handshake: refused (RST, ICMP) */
    int avail = 0;
    int refused = (st == TCP_CLOSE || st < 0) && !ti.tcpi_rtt &&
                  !(ioctl(fd, FIONREAD, &avail) == 0 && avail > 0);
    /* libpep acts on fd from here (fails over, holds the PEP down, notes
     * its RTT). A number that is not c's socket any more (closed behind
     * libpep's back, reused by a pipe, a file...) is left alone. c's socket
     * answers TCP_INFO in every state: a failure says so at once; a
     * failover (rare) is worth an fstat; a handshake seen done (every
     * connection) is not. */
    if ((st < 0 || going || refused) && !pep_fd_still_ours(fd, c))
        return 1;
    if (going) {
        pep_failover(fd, c, PEP_DOWN_TIMEOUT, 0, ETIMEDOUT);
        return c->state == PEP_ST_FAILED || !c->hs_deadline;
    }
    if (refused) {
        int err = 0;
        pep_log(PEP_LOG_DEBUG, "fd %d: handshake with the PEP failed", fd);
        pep_sockopt_int(fd, SOL_SOCKET, SO_ERROR, &err); /* takes it: it is ours to act on */
        pep_failover(fd, c, PEP_DOWN_REFUSED, 0, err ? err : ECONNREFUSED);
        return c->state == PEP_ST_FAILED || !c->hs_deadline;
    }
    /* done (and maybe over already: a PEP that sent its reply and reset is
     * the reply's story): what it tells about the PEP; and the reply's
     * clock starts (conn.c, reply_deadline: one TCP_INFO less) */
    pep_conn_set_hs_deadline(c, 0);
    if (!c->reply_deadline && (st == TCP_ESTABLISHED || st == TCP_CLOSE_WAIT))
        c->reply_deadline = now + pep_cfg.reply_timeout_ns;
    pep_peer_note_rtt(c->peer, &c->pep, (long)ti.tcpi_rtt);
    pep_peer_note_tfo(c->peer, &c->pep, c->nocookie, !!(ti.tcpi_options & TCPI_OPT_SYN_DATA));
    return 1;
}

/* ---- what the result means for the program ------------------------------ */

/* A blocking connect: wait for the handshake (failing over as needed),
 * then send what is left of the prefix. Called without the lock, c holding
 * the setup's reference. The connect's result. */
static int wait_handshake(int fd, struct pep_conn *c, int saved)
{
    for (;;) {
        pep_lock();
        if (!setup_kept(fd, c)) {
            pep_unlock();
            pep_log(PEP_LOG_INFO, "fd %d: closed on another thread during its connect", fd);
            errno = ECONNABORTED;
            return -1;
        }
        int done = pep_handshake_check(fd, c, pep_now_ns());
        long long until = c->hs_deadline;
        int state = c->state, direct = c->direct;
        pep_unlock();
        if (state == PEP_ST_FAILED)
            break;
        struct tcp_info ti;
        int st = pep_tcp_state(fd, &ti);
        if (direct && st == TCP_CLOSE)
            break; /* the kernel's answer for the destination, in SO_ERROR */
        if (done && st != TCP_SYN_SENT && st != TCP_SYN_RECV)
            break;
        int w = pep_wait_fd(fd, POLLOUT, until);
        if (w < 0) {
            int e = errno;
            pep_lock();
            if (setup_kept(fd, c))
                pep_conn_put(c);
            pep_unlock();
            /* SO_SNDTIMEO ran out (EAGAIN): in progress, as the kernel says */
            errno = e == EAGAIN ? EINPROGRESS : e;
            return -1;
        }
    }
    pep_lock();
    int kept = setup_kept(fd, c);
    if (kept)
        pep_conn_put(c);
    int failed = kept && c->state == PEP_ST_FAILED, e = c->err;
    int direct = kept && c->direct;
    pep_unlock();
    if (!kept) {
        errno = ECONNABORTED;
        return -1;
    }
    if (failed) {
        errno = e;
        return -1;
    }
    if (direct) {
        int err = 0;
        pep_sockopt_int(fd, SOL_SOCKET, SO_ERROR, &err);
        if (err) {
            pep_forget_open(fd);
            errno = err;
            return -1;
        }
    }
    if (pep_settle(fd, PEP_FOR_WRITE, 0) < 0)
        return -1;
    if (c->confirm && !direct && pep_settle(fd, PEP_FOR_READ, 0) < 0) {
        /* PEP_CONFIRM: the PEP's no is connect()'s; the socket is plain
         * again (a program may connect it anew) */
        int e = errno;
        if (e != EAGAIN && e != EINTR)
            pep_forget_open(fd);
        errno = e == EAGAIN ? EINPROGRESS : e;
        return -1;
    }
    errno = saved;
    return 0;
}

enum pep_taken pep_connect_via_pep(int fd, const struct sockaddr *sa, socklen_t salen,
                                   const struct msghdr *app, int appflags, ssize_t *ret)
{
    int saved = errno;
    struct dest d = dest_of(sa, salen);
    struct stat st;

    if (goes_direct(&d))
        return PEP_PASS;
    if (!socket_eligible(fd, d.family) || pep_config_is_any_pep(d.addr, d.port) ||
        fstat(fd, &st) < 0) {
        errno = saved;
        return PEP_PASS;
    }
    int v6only = is_v6only(fd, d.family);

    pep_lock();
    struct pep_conn *c = register_conn(fd, &st, sa, salen, &d, v6only);
    if (!c) {
        pep_unlock();
        pep_log(PEP_LOG_ERROR, "fd %d: out of memory for libpep's connection state", fd);
        *ret = -1;
        errno = ENOBUFS;
        return PEP_TAKEN;
    }
    size_t taken = 0;
    if (app) { /* the program's own TFO: its bytes go in the SYN, after the header */
        size_t total = 0, i;
        for (i = 0; i < app->msg_iovlen; i++)
            total += app->msg_iov[i].iov_len;
        taken = total < PEP_REPLAY_MAX ? total : PEP_REPLAY_MAX; /* a short write past it */
        pep_replay_keep(c, app->msg_iov, app->msg_iovlen, taken);
    }
    /* No PEP usable at all, and the fallback is direct: the real call, as
     * without libpep (nothing to replay). */
    struct sockaddr_in6 addr;
    socklen_t len;
    const char *why = "no PEP";
    if (next_peer(c, 0, &addr, &len, &why) < 0 && !pep_cfg.fallback_fail) {
        long long now = pep_now_ns();
        int say = now >= fallback_said_until;
        if (say)
            fallback_said_until = now + PEP_HOLD_DOWN_S * 1000000000LL;
        pep_fd_forget(fd);
        pep_unlock();
        if (say)
            pep_log(PEP_LOG_ERROR, "no PEP usable (%s); connecting directly (PEP_FALLBACK=direct; "
                    "said once per hold-down)", why);
        errno = saved;
        return PEP_PASS;
    }
    int nonblock = (appflags & MSG_DONTWAIT) || pep_is_nonblocking(fd);
    /* PEP_SYN_WRITE: a non-blocking connect() to a PEP may hold its SYN for
     * the program's first write (attempt_deferred) */
    c->defer = pep_cfg.syn_write && nonblock && !app && !c->confirm;
    if (move_on(fd, c, NULL, NULL, 0) < 0) {
        int e = c->err;
        pep_unlock();
        *ret = -1;
        errno = e;
        return PEP_TAKEN;
    }
    pep_confirm_adopt_epoll(fd, c);
    if (nonblock) {
        pep_unlock();
        if (app) {
            *ret = (ssize_t)taken;
            errno = saved;
        } else {
            *ret = -1;
            errno = EINPROGRESS;
        }
        return PEP_TAKEN;
    }
    c->refs++; /* the setup's own, while it waits */
    pep_unlock();
    int r = wait_handshake(fd, c, saved);
    *ret = r < 0 ? -1 : app ? (ssize_t)taken : 0;
    return PEP_TAKEN;
}

enum pep_taken pep_connect_again(int fd, const struct sockaddr *sa, socklen_t len, int *ret)
{
    struct tcp_info ti;
    int saved = errno;

    if (sa && len >= sizeof(sa_family_t) && sa->sa_family == AF_UNSPEC) {
        /* the program disconnects the socket to reuse it (disconnected
         * first: TCP_FASTOPEN_NO_COOKIE can only change on a closed socket) */
        *ret = pep_real.connect(fd, sa, len);
        int e = errno;
        pep_forget_open(fd);
        errno = e;
        return PEP_TAKEN;
    }
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (!c) {
        pep_unlock();
        return PEP_PASS;
    }
    if (!pep_same_socket(fd, c)) {
        pep_fd_forget(fd); /* a fresh start on this socket */
        pep_unlock();
        errno = saved;
        return PEP_PASS;
    }
    if (c->state != PEP_ST_CONNECTING)
        pep_handshake_check(fd, c, pep_now_ns());
    if (pep_conn_get(fd) != c) { /* fd turned out not to be c's socket */
        pep_unlock();
        errno = saved;
        return PEP_PASS;
    }
    if (c->confirm) {
        pep_unlock();
        int err = 0, v = pep_confirm_poll(fd, &err);
        if (v == PEP_VERDICT_PENDING) {
            *ret = -1;
            errno = EALREADY;
            return PEP_TAKEN;
        }
        pep_lock();
        c = pep_conn_get(fd);
        if (!c) {
            pep_unlock();
            return PEP_PASS;
        }
    }
    if (c->state == PEP_ST_FAILED) {
        int e = c->err;
        pep_unlock();
        *ret = -1;
        errno = e;
        return PEP_TAKEN;
    }
    if (pep_tcp_state(fd, &ti) == TCP_CLOSE && !c->hs_deadline) {
        pep_fd_forget_open(fd); /* a fresh start on this socket */
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
