/* A proxied connection after its connect(): see conn.h. */
#define _GNU_SOURCE
#include "conn.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <time.h>

#include "config.h"
#include "connect.h"
#include "state.h"
#include "real.h"
#include "tlv.h"

#ifndef TCPI_OPT_SYN_DATA
#define TCPI_OPT_SYN_DATA 32
#endif

/* ---- small socket helpers ----------------------------------------------- */

int pep_sockopt_int(int fd, int level, int name, int *v)
{
    socklen_t l = sizeof *v;
    return pep_real.getsockopt(fd, level, name, v, &l);
}

int pep_tcp_state(int fd, struct tcp_info *ti)
{
    socklen_t l = sizeof *ti;
    memset(ti, 0, sizeof *ti);
    if (pep_real.getsockopt(fd, IPPROTO_TCP, TCP_INFO, ti, &l) < 0)
        return -1;
    return ti->tcpi_state;
}

int pep_is_nonblocking(int fd)
{
    int fl = pep_real.fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & O_NONBLOCK);
}

int pep_same_socket(int fd, const struct pep_conn *c)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == c->dev && st.st_ino == c->ino;
}

/* A socket closed behind libpep's back (glibc's own close in fclose() of an
 * fdopen()ed socket, syscall(SYS_close)) whose number went to something
 * libpep does not hook (pipe(), open(), eventfd()...): a wait must not take
 * it for a PEP that refused, nor dissolve it. */
int pep_fd_still_ours(int fd, struct pep_conn *c)
{
    if (pep_same_socket(fd, c))
        return 1;
    if (pep_conn_get(fd) == c) {
        pep_log(PEP_LOG_DEBUG, "fd %d: not the socket libpep connected any more "
                "(closed behind its back); forgotten", fd);
        pep_fd_forget(fd);
    }
    return 0;
}

void pep_forget(int fd)
{
    if (PEP_UNLIKELY(pep_fd_tracked(fd))) {
        pep_lock();
        pep_fd_forget(fd);
        pep_unlock();
    }
}

long long pep_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

void pep_peer_text(const struct sockaddr_in6 *sa, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (sa->sin6_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        snprintf(out, cap, "%s:%u", ip, ntohs(s4->sin_port));
    } else if (IN6_IS_ADDR_V4MAPPED(&sa->sin6_addr)) {
        inet_ntop(AF_INET, sa->sin6_addr.s6_addr + 12, ip, sizeof ip);
        snprintf(out, cap, "%s:%u", ip, ntohs(sa->sin6_port));
    } else {
        inet_ntop(AF_INET6, &sa->sin6_addr, ip, sizeof ip);
        snprintf(out, cap, "[%s]:%u", ip, ntohs(sa->sin6_port));
    }
}

int pep_wait_fd(int fd, short events, long long until)
{
    struct timeval tv = {0, 0};
    socklen_t l = sizeof tv;
    long long ms = -1;
    if (pep_real.getsockopt(fd, SOL_SOCKET, events == POLLIN ? SO_RCVTIMEO : SO_SNDTIMEO, &tv,
                            &l) == 0 &&
        (tv.tv_sec || tv.tv_usec))
        ms = tv.tv_sec > 86400 * 20 ? -1 : tv.tv_sec * 1000LL + (tv.tv_usec + 999) / 1000;
    int ours = 0;
    if (until) {
        long long left = (until - pep_now_ns() + 999999) / 1000000;
        if (left < 0)
            left = 0;
        if (ms < 0 || left < ms) {
            ms = left;
            ours = 1;
        }
    }
    struct pollfd p = {fd, events, 0};
    int n = pep_real.poll(&p, 1, (int)ms);
    if (n < 0)
        return -1;
    if (n == 0) {
        if (ours)
            return 1;
        errno = EAGAIN;
        return -1;
    }
    return 0;
}

static int warned_0rtt;

void pep_warn_0rtt_lost(const char *why)
{
    if (__atomic_exchange_n(&warned_0rtt, 1, __ATOMIC_RELAXED))
        return;
    pep_log(PEP_LOG_WARN, "0-RTT lost: %s; the Convert header went after the handshake "
            "(said once)", why);
}

/*
 * What a socket libpep registers carries, without asking the kernel.
 * SO_RCVLOWAT and TCP_FASTOPEN_NO_COOKIE are the kernel's defaults (1, 0) on
 * a socket libpep sees for the first time, unless the program set either
 * itself: the setsockopt hook (hooks.c) notes that it did, on any socket,
 * and from then on libpep asks (SO_RCVLOWAT) or sets regardless
 * (TCP_FASTOPEN_NO_COOKIE), as it always did. What libpep set on a socket
 * it lets go of while the program keeps it (pep_forget_open) goes back to
 * the defaults, so a later connect() on it finds them. (A socket that came
 * through exec or SCM_RIGHTS unconnected, with either option set through a
 * raw syscall, is the case left: the worst it gets is one attempt in the
 * other TFO mode, or SO_RCVLOWAT 1 after its reply.)
 */
static int app_set_lowat, app_set_nocookie;

void pep_note_app_sockopt(int level, int name)
{
    if (level == SOL_SOCKET && name == SO_RCVLOWAT)
        __atomic_store_n(&app_set_lowat, 1, __ATOMIC_RELAXED);
    else if (level == IPPROTO_TCP && name == TCP_FASTOPEN_NO_COOKIE)
        __atomic_store_n(&app_set_nocookie, 1, __ATOMIC_RELAXED);
}

int pep_fresh_socket_nocookie(void)
{
    return __atomic_load_n(&app_set_nocookie, __ATOMIC_RELAXED) ? -1 : 0;
}

void pep_nocookie_set(int fd, struct pep_conn *c, int on)
{
    if (c->nocookie_set == on)
        return;
    c->nocookie_set = pep_real.setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, &on,
                                          sizeof on) == 0 ? on : -1;
}

/*
 * While the reply is outstanding the socket carries SO_RCVLOWAT = 5: a
 * success reply alone (4 bytes) does not make it readable, so poll/epoll do
 * not wake the program for bytes it will never see (wrk counts a read that
 * finds nothing after EPOLLIN as an error). An Error reply (8 bytes), data,
 * FIN or RST still wake it. The program's own value comes back after.
 * c->lowat is that value while 5 is held (0: not held).
 */
void pep_lowat_hold(int fd, struct pep_conn *c)
{
    int v = 1, five = PEP_HDR_LEN + 1;
    if (c->lowat)
        return; /* held already (an attempt after a failover) */
    if (__atomic_load_n(&app_set_lowat, __ATOMIC_RELAXED) &&
        pep_sockopt_int(fd, SOL_SOCKET, SO_RCVLOWAT, &v) < 0)
        return;
    if (v < five && pep_real.setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &five, sizeof five) == 0)
        c->lowat = v;
}

void pep_lowat_release(int fd, struct pep_conn *c)
{
    if (c->lowat) {
        pep_real.setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &c->lowat, sizeof c->lowat);
        c->lowat = 0;
    }
}

void pep_fd_forget_open(int fd)
{
    struct pep_conn *c = pep_conn_get(fd);
    /* no dup of fd keeps the connection going, and fd is still its socket */
    if (c && c->refs == 1 && (c->lowat || c->nocookie_set == 1 || c->fo_connect) &&
        pep_same_socket(fd, c)) {
        pep_lowat_release(fd, c);
        pep_nocookie_set(fd, c, 0);
        pep_fo_connect_off(fd, c);
    }
    pep_fd_forget(fd);
}

void pep_forget_open(int fd)
{
    if (PEP_UNLIKELY(pep_fd_tracked(fd))) {
        pep_lock();
        pep_fd_forget_open(fd);
        pep_unlock();
    }
}

/* The connection failed (Error TLV, bad reply): remember the errno and reset. */
static void conn_fail(int fd, struct pep_conn *c, int err, const char *why)
{
    if (c->confirm)
        c->failed_connecting = 1; /* PEP_CONFIRM: the verdict is connect()'s */
    pep_lowat_release(fd, c);
    pep_conn_set_state(c, PEP_ST_FAILED);
    c->err = err;
    pep_log(PEP_LOG_INFO, "fd %d: %s: %s", fd, why, strerror(err));
    struct linger lg = {1, 0};
    pep_real.setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct sockaddr unspec;
    memset(&unspec, 0, sizeof unspec);
    unspec.sa_family = AF_UNSPEC;
    pep_real.connect(fd, &unspec, sizeof unspec); /* TCP: disconnect with a RST */
}

/* Reply fully read and fine: pass-through from now on. */
static void conn_open(int fd, struct pep_conn *c)
{
    pep_lowat_release(fd, c);
    pep_conn_set_state(c, PEP_ST_OPEN);
    free(c->replay); /* nothing to replay any more */
    c->replay = NULL;
    c->replay_len = c->replay_cap = 0;
    /* Under PEP_TFO_MODE=auto, a PEP that wants TFO cookies costs the first
     * connections their 0-RTT by design (learning, then the cookie request):
     * peers.c records it; only a forced mode deserves the warning. */
    if (pep_cfg.tfo_mode != PEP_TFO_AUTO && pep_cfg.level >= PEP_LOG_WARN &&
        !__atomic_load_n(&warned_0rtt, __ATOMIC_RELAXED)) {
        struct tcp_info ti;
        if (pep_tcp_state(fd, &ti) >= 0 && !(ti.tcpi_options & TCPI_OPT_SYN_DATA))
            pep_warn_0rtt_lost("the PEP did not take data in the SYN (TFO off on its side?)");
    }
    pep_log(PEP_LOG_DEBUG, "fd %d: PEP reply stripped", fd);
}

/* An Error TLV from the PEP: what it means for the connection. Errors about
 * the PEP itself (64, 65: held down for the Error's delay; 3: its cookie)
 * move the connection on, with what the program wrote; errors about the
 * destination (32, 96, 97 and the rest) are the program's. Under the lock. */
static void pep_reply_error(int fd, struct pep_conn *c, const struct pep_msg *m, int e)
{
    const uint8_t *v = m->error_value;
    size_t vlen = m->error_len;
    if (m->error_code == PEP_E_RESOURCE_EXCEEDED || m->error_code == PEP_E_NETWORK_FAILURE) {
        unsigned delay = vlen ? v[0] : 0; /* one byte fits after the code; 0: 30 s */
        pep_lowat_release(fd, c);
        pep_failover(fd, c, m->error_code == PEP_E_RESOURCE_EXCEEDED ? PEP_DOWN_ERROR64
                                                                       : PEP_DOWN_ERROR65,
                     delay, e);
        return;
    }
    if (m->error_code == PEP_E_MISSING_COOKIE && !c->cookie_retried && !c->replay_lost) {
        /* the Value: a zero byte, then the cookie, kept as it came (any
         * padding too: a PEP ignores up to 3 trailing zero bytes) */
        size_t clen = vlen > 1 && v[0] == 0 ? vlen - 1 : 0;
        if (clen && clen <= PEP_COOKIE_MAX) {
            pep_peer_store_cookie(c->peer, &c->pep, v + 1, clen);
            c->cookie_retried = 1;
            pep_lowat_release(fd, c);
            char peer[80];
            pep_peer_text(&c->pep, peer, sizeof peer);
            pep_log(PEP_LOG_INFO, "PEP %s asked for a cookie (Error 3); reconnecting with it",
                    peer);
            pep_retry_same(fd, c);
            return;
        }
    }
    if (m->error_code == PEP_E_NOT_AUTHORIZED) {
        uint8_t stored[PEP_COOKIE_MAX];
        if (pep_peer_cookie(c->peer, &c->pep, stored, sizeof stored))
            pep_peer_store_cookie(c->peer, &c->pep, NULL, 0); /* the next Error 3 brings one */
    }
    conn_fail(fd, c, e, "PEP refused the connection");
}

/* ---- PEP_SYN_WRITE: the first write rides the SYN ----------------------- */

void pep_fo_connect_off(int fd, struct pep_conn *c)
{
    int zero = 0;
    if (c->fo_connect &&
        pep_real.setsockopt(fd, IPPROTO_TCP, PEP_TCP_FASTOPEN_CONNECT, &zero, sizeof zero) == 0)
        c->fo_connect = 0;
}

#define SYN_IOV_MAX 64

/*
 * Under the lock, c DEFERRED: one sendmsg of [header, the program's bytes]
 * on the deferred socket; the kernel sends the SYN with as much as fits
 * (the rest is the program's to write again after the handshake). The
 * attempt starts now: the handshake deadline, then the reply's, as after
 * attempt_pep's send. Returns how many of the program's bytes went (kept
 * for a replay); -1 if the attempt failed at once and no other could start
 * (c FAILED, c->err).
 */
static ssize_t syn_send(int fd, struct pep_conn *c, const struct iovec *app, size_t n,
                        size_t want)
{
    struct iovec iov[SYN_IOV_MAX];
    size_t k = 0, i, room = PEP_REPLAY_MAX - c->replay_len, total = 0;
    iov[k].iov_base = c->hdr;
    iov[k++].iov_len = c->hdr_len;
    for (i = 0; i < n && k < SYN_IOV_MAX && total < want && total < room; i++) {
        size_t l = app[i].iov_len;
        if (l > want - total)
            l = want - total;
        if (l > room - total)
            l = room - total;
        if (!l)
            continue;
        iov[k].iov_base = app[i].iov_base;
        iov[k++].iov_len = l;
        total += l;
    }
    /* A copy of c in another process (fork) may have sent the SYN (and the
     * header) already: the kernel's socket is not deferred any more. */
    struct tcp_info ti;
    if (pep_tcp_state(fd, &ti) != TCP_SYN_SENT || ti.tcpi_unacked) { /* the SYN is out */
        pep_reader_init(&c->rd);
        c->reply_deadline = 0;
        c->pre_len = c->pre_sent = c->hdr_len;
        pep_conn_set_state(c, PEP_ST_AWAIT);
        pep_conn_set_hs_deadline(c, pep_now_ns() + pep_peer_connect_timeout_ns(c->peer, &c->pep));
        return 0;
    }
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = iov;
    m.msg_iovlen = k;
    /* No MSG_FASTOPEN: the socket's deferred connect makes this send the
     * SYN. -1/EINPROGRESS: the SYN left without data. */
    ssize_t r = pep_real.sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    int e = errno;
    pep_reader_init(&c->rd);
    c->reply_deadline = 0;
    c->pre_len = c->hdr_len;
    if (r < 0 && e != EINPROGRESS && e != EAGAIN && e != EINTR) {
        /* the PEP is unreachable at once: the program's bytes go with the
         * next attempt (or the destination) */
        size_t keep = total;
        pep_replay_keep(c, iov + 1, k - 1, keep);
        pep_conn_set_state(c, PEP_ST_SENDING);
        c->pre_sent = 0;
        pep_log(PEP_LOG_DEBUG, "fd %d: deferred SYN failed: %s", fd, strerror(e));
        pep_failover(fd, c, PEP_DOWN_REFUSED, 0, e);
        return c->state == PEP_ST_FAILED ? -1 : (ssize_t)keep;
    }
    size_t sent = r > 0 ? (size_t)r : 0;
    size_t took = sent > c->hdr_len ? sent - c->hdr_len : 0;
    c->pre_sent = sent < c->hdr_len ? sent : c->hdr_len;
    pep_replay_keep(c, iov + 1, k - 1, took);
    pep_conn_set_state(c, c->pre_sent == c->pre_len ? PEP_ST_AWAIT : PEP_ST_SENDING);
    pep_conn_set_hs_deadline(c, pep_now_ns() + pep_peer_connect_timeout_ns(c->peer, &c->pep));
    pep_log(PEP_LOG_DEBUG, "fd %d: SYN sent with %zu header and %zu program bytes", fd,
            c->pre_sent, took);
    return (ssize_t)took;
}

enum pep_taken pep_syn_write(int fd, const struct iovec *iov, size_t n, ssize_t *ret)
{
    size_t want = 0, i;
    for (i = 0; i < n; i++)
        want += iov[i].iov_len;
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (!c || c->state != PEP_ST_DEFERRED || !pep_same_socket(fd, c)) {
        pep_unlock();
        return PEP_PASS;
    }
    int saved = errno;
    ssize_t took = syn_send(fd, c, iov, n, want);
    int e = c->err;
    pep_unlock();
    if (took < 0) {
        *ret = -1;
        errno = e;
        return PEP_TAKEN;
    }
    if (took == 0 && want)
        return PEP_PASS; /* the SYN left without the bytes: the usual write path */
    *ret = took;
    errno = saved;
    return PEP_TAKEN;
}

void pep_syn_flush(int fd)
{
    int saved = errno;
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (c && c->state == PEP_ST_DEFERRED && pep_same_socket(fd, c))
        syn_send(fd, c, NULL, 0, 0);
    pep_unlock();
    errno = saved;
}

void pep_syn_flush_connected(int fd)
{
    int saved = errno;
    pep_syn_flush(fd);
    for (;;) {
        struct tcp_info ti;
        pep_lock();
        struct pep_conn *c = pep_conn_get(fd);
        long long until = 0;
        if (c && c->hs_deadline && pep_same_socket(fd, c) &&
            !pep_handshake_check(fd, c, pep_now_ns()))
            until = c->hs_deadline;
        pep_unlock();
        if (!until || pep_tcp_state(fd, &ti) != TCP_SYN_SENT ||
            pep_wait_fd(fd, POLLOUT, until) < 0)
            break;
    }
    errno = saved;
}

/* The held SYNs that go now (their headers alone): every one (`everyone`:
 * a blocking accept), else the calling thread's that went through
 * PEP_SYN_WAITS of its waits that could block (all: every one of the
 * thread's) and any held longer than PEP_SYN_STALE_NS; the calling thread's
 * others count this wait (blocking). 1 if some are still held. */
static int flush_held(int everyone, int all, int blocking)
{
    int saved = errno, left = 0;
    unsigned long me = (unsigned long)pthread_self();
    long long now = pep_now_ns();
    struct pep_conn *c;
    for (c = pep_conn_next(NULL); c && pep_syn_pending(); c = pep_conn_next(c)) {
        if (__atomic_load_n(&c->state, __ATOMIC_ACQUIRE) != PEP_ST_DEFERRED)
            continue;
        pep_lock();
        int fd = c->fd;
        if (c->state == PEP_ST_DEFERRED && fd >= 0 && pep_conn_get(fd) == c) {
            int mine = c->defer_thread == me;
            if (everyone || now - c->defer_since >= PEP_SYN_STALE_NS ||
                (mine && (all || c->defer_waits >= PEP_SYN_WAITS))) {
                syn_send(fd, c, NULL, 0, 0);
            } else {
                c->defer_waits += mine && blocking;
                left = 1;
            }
        }
        pep_unlock();
    }
    errno = saved;
    return left;
}

void pep_syn_flush_every(void)
{
    flush_held(1, 1, 0);
}

int pep_syn_flush_waited(int all, int blocking)
{
    return flush_held(0, all, blocking);
}

/* ---- the bounded wait for the reply ------------------------------------- */

/* When c's reply must be complete (CLOCK_MONOTONIC ns): PEP_REPLY_TIMEOUT
 * after the handshake with the PEP was first seen done (pep_handshake_check
 * sets it as it sees that; looked up here only if it has not); 0 while it
 * is not (the handshake has its own bound).
 * Under the lock. */
static long long reply_deadline(int fd, struct pep_conn *c)
{
    if (!c->reply_deadline) {
        struct tcp_info ti;
        int st = pep_tcp_state(fd, &ti);
        if (st == TCP_ESTABLISHED || st == TCP_CLOSE_WAIT)
            c->reply_deadline = pep_now_ns() + pep_cfg.reply_timeout_ns;
    }
    return c->reply_deadline;
}

/* Past its deadline: the connection fails with ETIMEDOUT (said at the
 * default log level, naming the PEP). Under the lock. 1 if it expired (or
 * fd was not c's socket any more: forgotten). */
static int reply_expired(int fd, struct pep_conn *c, long long now)
{
    long long d = reply_deadline(fd, c);
    if (!d || now < d)
        return 0;
    if (!pep_fd_still_ours(fd, c))
        return 1;
    char peer[80];
    pep_peer_text(&c->pep, peer, sizeof peer);
    pep_log(PEP_LOG_ERROR, "PEP %s did not answer within %.1f s (PEP_REPLY_TIMEOUT); "
            "connection timed out", peer, pep_cfg.reply_timeout_ns / 1e9);
    conn_fail(fd, c, ETIMEDOUT, "no reply from the PEP");
    return 1;
}

/* ---- one step of the connection, under the lock ------------------------- */

/* What one step found: go on stepping, stop with a result, or wait. */
enum step {
    STEP_AGAIN,     /* state changed: step again */
    STEP_GO,        /* the caller makes its real call */
    STEP_FAIL,      /* the call fails with *err */
    STEP_WAIT,      /* nothing to do until fd is ready for *wait_for (*err: EAGAIN/EINTR) */
};

/* Send what is left of the prefix: the header, then the bytes replayed
 * from an earlier attempt. */
static enum step step_send_header(int fd, struct pep_conn *c, enum pep_settle_for why,
                                  int *err, short *wait_for, long long *until)
{
    if (c->hs_deadline) { /* our attempt: refused or late means the next PEP */
        if (!pep_handshake_check(fd, c, pep_now_ns()))
            goto wait;
        if (pep_conn_get(fd) != c || c->state != PEP_ST_SENDING)
            return STEP_AGAIN;
    }
    if (why == PEP_FOR_HEADER_ONLY) {
        /* Not on the program's behalf: never take a pending socket error
         * (send() would) that its SO_ERROR or read must see. */
        struct tcp_info ti;
        int st = pep_tcp_state(fd, &ti);
        if (st != TCP_ESTABLISHED && st != TCP_CLOSE_WAIT) {
            if (st != TCP_SYN_SENT) { /* failed: the kernel's story now */
                pep_lowat_release(fd, c);
                pep_conn_set_state(c, PEP_ST_OPEN);
            }
            return STEP_GO;
        }
    }
    size_t off = c->pre_sent;
    const uint8_t *p = off < c->hdr_len ? c->hdr + off : c->replay + (off - c->hdr_len);
    size_t len = off < c->hdr_len ? c->hdr_len - off : c->pre_len - off;
    ssize_t n = pep_real.send(fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
        c->pre_sent += (size_t)n;
        if (c->pre_sent == c->pre_len) {
            pep_conn_set_state(c, c->direct ? PEP_ST_OPEN : PEP_ST_AWAIT);
            pep_log(PEP_LOG_DEBUG, "fd %d: header sent after the handshake", fd);
        }
        return STEP_AGAIN;
    }
    *err = errno;
    if (*err != EAGAIN && *err != EWOULDBLOCK && *err != EINTR) {
        /* the connection to the PEP failed: this call reports it, then plain
         * pass-through */
        pep_lowat_release(fd, c);
        pep_conn_set_state(c, PEP_ST_OPEN);
    }
    *wait_for = POLLOUT;
    return STEP_WAIT;
wait:
    *err = EAGAIN;
    *wait_for = POLLOUT;
    *until = c->hs_deadline;
    return STEP_WAIT;
}

/* Read what is there of the PEP's reply, never a byte past it. */
static enum step step_read_reply(int fd, struct pep_conn *c, enum pep_settle_for why,
                                 int *err, short *wait_for, long long *until)
{
    if (c->hs_deadline) { /* our attempt: refused or late means the next PEP */
        if (!pep_handshake_check(fd, c, pep_now_ns())) {
            /* a read waits for the reply, a write for the handshake: both no
             * longer than the handshake deadline (then the next PEP) */
            *err = EAGAIN;
            *wait_for = why == PEP_FOR_READ ? POLLIN : POLLOUT;
            *until = c->hs_deadline;
            return STEP_WAIT;
        }
        if (pep_conn_get(fd) != c || c->state != PEP_ST_AWAIT)
            return STEP_AGAIN;
    }
    uint8_t tmp[PEP_MSG_MAX];
    size_t want = pep_reader_want(&c->rd), used;
    ssize_t n = pep_real.recv(fd, tmp, want, MSG_DONTWAIT);
    if (n > 0) {
        struct pep_msg m;
        int code;
        int rc = pep_reader_feed(&c->rd, tmp, (size_t)n, &used, &m, &code);
        if (rc == PEP_OK && m.has_error) {
            int e = pep_errno_for(m.error_code, m.error_value, m.error_len);
            pep_log(PEP_LOG_INFO, "fd %d: PEP Error TLV code %u", fd, m.error_code);
            pep_reply_error(fd, c, &m, e);
        } else if (rc == PEP_OK) {
            conn_open(fd, c);
        } else if (rc == PEP_REJECT) {
            pep_log(PEP_LOG_ERROR, "fd %d: bad reply from the PEP (error code %d)", fd, code);
            conn_fail(fd, c, EPROTO, "bad PEP reply");
        }
        return STEP_AGAIN;
    }
    if (n == 0) {
        pep_log(PEP_LOG_ERROR, "fd %d: the PEP closed before its reply was complete", fd);
        conn_fail(fd, c, ECONNRESET, "PEP closed before its reply");
        return STEP_AGAIN;
    }
    *err = errno;
    if ((*err == EAGAIN || *err == EWOULDBLOCK) && reply_expired(fd, c, pep_now_ns()))
        return STEP_AGAIN;
    if (why != PEP_FOR_READ && (*err == EAGAIN || *err == EWOULDBLOCK))
        return STEP_GO; /* a write may go before the reply is in */
    *wait_for = POLLIN;
    *until = c->reply_deadline;
    return STEP_WAIT;
}

enum pep_settled pep_settle(int fd, enum pep_settle_for why, int dontwait)
{
    int saved = errno, checked = 0;

    for (;;) {
        int e = 0;
        short wait_for = POLLIN;
        long long until = 0;
        enum step s;

        pep_lock();
        struct pep_conn *c = pep_conn_get(fd);
        if (c && !checked) {
            checked = 1;
            if (!pep_same_socket(fd, c)) { /* closed behind our back, fd reused */
                pep_fd_forget(fd);
                c = NULL;
            }
        }
        if (c && c->state == PEP_ST_DEFERRED && why != PEP_FOR_HEADER_ONLY) {
            /* a read (or a write the hook did not put in the SYN): the
             * header goes alone, the SYN with it */
            syn_send(fd, c, NULL, 0, 0);
            s = STEP_AGAIN;
        } else if (!c || c->state == PEP_ST_OPEN ||
            (why == PEP_FOR_HEADER_ONLY && c->state != PEP_ST_SENDING)) {
            s = STEP_GO;
        } else if (c->state == PEP_ST_FAILED) {
            e = c->err;
            s = STEP_FAIL;
        } else if (c->state == PEP_ST_CONNECTING) {
            /* Another thread is inside connect() on this socket (a header-only
             * flush never gets here: it returned above). */
            e = EAGAIN;
            wait_for = POLLOUT;
            s = STEP_WAIT;
        } else if (c->state == PEP_ST_SENDING) {
            s = step_send_header(fd, c, why, &e, &wait_for, &until);
        } else { /* PEP_ST_AWAIT */
            s = step_read_reply(fd, c, why, &e, &wait_for, &until);
        }
        pep_unlock();

        switch (s) {
        case STEP_AGAIN:
            continue;
        case STEP_GO:
            errno = saved;
            return PEP_SETTLED_GO;
        case STEP_FAIL:
            errno = e;
            return PEP_SETTLED_FAIL;
        case STEP_WAIT:
            break;
        }
        if (e == EINTR)
            continue;
        if (e != EAGAIN && e != EWOULDBLOCK) {
            errno = e;
            return PEP_SETTLED_FAIL;
        }
        if (dontwait || pep_is_nonblocking(fd)) {
            pep_log(PEP_LOG_DEBUG, "fd %d: %s: nothing for the program yet (EAGAIN)", fd,
                    wait_for == POLLIN ? "reply outstanding" : "header not sent");
            errno = EAGAIN;
            return PEP_SETTLED_FAIL;
        }
        int w = pep_wait_fd(fd, wait_for, until);
        if (w < 0)
            return PEP_SETTLED_FAIL;
    }
}

int pep_failed_write_errno(int fd, int e)
{
    if ((e == EPIPE || e == ECONNRESET) && pep_settle(fd, PEP_FOR_READ, 1) < 0 &&
        errno != EAGAIN)
        return errno;
    return e;
}

int pep_failed_by_reply(int fd)
{
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    int failed = c && c->state == PEP_ST_FAILED && !c->failed_connecting;
    pep_unlock();
    return failed;
}

int pep_failed_by_pep(int fd)
{
    pep_settle(fd, PEP_FOR_WRITE, 1);
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    int failed = c && c->state == PEP_ST_FAILED;
    pep_unlock();
    return failed;
}

/*
 * tick() for one connection, under the lock, fd being c's: its deadline
 * left (0: none). The kernel is asked (TCP_INFO) about c at most once per
 * PEP_SLICE_NS, and at its deadline: a wait costs one getsockopt per
 * connection due, not per connection in flight, while a refusal is still
 * seen within a slice of waits and a deadline at it.
 */
static long long tick_conn(int fd, struct pep_conn *c, long long now)
{
    if (c->hs_deadline) {
        if (now < c->next_probe && now < c->hs_deadline)
            return c->hs_deadline; /* asked less than a slice ago */
        c->next_probe = now + PEP_SLICE_NS;
        pep_handshake_check(fd, c, now);
        if (pep_conn_get(fd) != c)
            return 0;
        if (c->hs_deadline)
            return c->hs_deadline;
    }
    if (c->state != PEP_ST_AWAIT)
        return 0;
    if (!c->reply_deadline) { /* handshake done, not seen established yet */
        if (now < c->next_probe)
            return c->next_probe;
        c->next_probe = now + PEP_SLICE_NS;
    }
    if (reply_expired(fd, c, now))
        return 0;
    return c->reply_deadline ? c->reply_deadline : c->next_probe;
}

/* Every connection with a deadline: a handshake late or refused moves to
 * the next PEP; a reply past PEP_REPLY_TIMEOUT fails. The nearest deadline
 * left (0: none); a handshake done but its reply deadline not set yet counts
 * as its next probe (at most PEP_SLICE_NS away). */
static long long tick(void)
{
    long long now = pep_now_ns(), next = 0;
    struct pep_conn *c;
    for (c = pep_conn_next(NULL); c; c = pep_conn_next(c)) {
        int fd = __atomic_load_n(&c->fd, __ATOMIC_RELAXED);
        int st = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
        if ((st != PEP_ST_AWAIT && st != PEP_ST_SENDING) || fd < 0)
            continue;
        pep_lock();
        long long d = pep_conn_get(fd) == c ? tick_conn(fd, c, now) : 0;
        pep_unlock();
        if (d && (!next || d < next))
            next = d;
    }
    return next;
}

long long pep_wait_work(void)
{
    if (PEP_LIKELY(!__atomic_load_n(&pep_nsending, __ATOMIC_RELAXED) &&
                   !__atomic_load_n(&pep_nawait, __ATOMIC_RELAXED)))
        return -1;
    int saved = errno;
    long long next = tick();
    pep_flush_sending();
    long long slice = pep_headers_pending() ? PEP_SLICE_NS : -1;
    if (next) {
        long long left = next - pep_now_ns();
        if (left < 0)
            left = 0;
        if (slice < 0 || left < slice)
            slice = left;
    }
    errno = saved;
    return slice;
}

int pep_attempt_poll(int fd, int *err)
{
    int ours = 0;
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (c && (c->state == PEP_ST_SENDING || c->state == PEP_ST_AWAIT) && c->hs_deadline &&
        pep_same_socket(fd, c)) {
        unsigned tried = c->tried;
        int direct = c->direct;
        pep_handshake_check(fd, c, pep_now_ns());
        if (pep_conn_get(fd) != c)
            c = NULL; /* not c's socket after all: forgotten */
        else if ((c->tried != tried || c->direct != direct) && c->state != PEP_ST_FAILED)
            ours = 1; /* moved to the next PEP (or the destination) */
    }
    if (c && c->state == PEP_ST_FAILED && c->failed_connecting) {
        ours = 2;
        *err = c->err;
    }
    pep_unlock();
    return ours;
}

/* After tick(): a connection whose handshake is not seen done yet
 * (hs_deadline) is tick's to watch, and waits for its next probe. */
void pep_flush_sending(void)
{
    if (!pep_headers_pending())
        return;
    int saved = errno;
    struct pep_conn *c;
    for (c = pep_conn_next(NULL); c; c = pep_conn_next(c)) {
        int fd = __atomic_load_n(&c->fd, __ATOMIC_RELAXED);
        if (__atomic_load_n(&c->state, __ATOMIC_ACQUIRE) == PEP_ST_SENDING && fd >= 0 &&
            !__atomic_load_n(&c->hs_deadline, __ATOMIC_RELAXED))
            pep_settle(fd, PEP_FOR_HEADER_ONLY, 1);
    }
    errno = saved;
}

int pep_confirm_poll(int fd, int *err)
{
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    int confirm = c && c->confirm, pending = c && pep_confirm_pending(c);
    pep_unlock();
    if (!confirm)
        return PEP_VERDICT_NONE;
    if (pending)
        pep_settle(fd, PEP_FOR_WRITE, 1); /* the reply, if it is there; never blocks */
    pep_lock();
    c = pep_conn_get(fd);
    int v = PEP_VERDICT_NONE;
    if (c && c->state == PEP_ST_FAILED && c->failed_connecting) {
        v = PEP_VERDICT_FAILED;
        *err = c->err;
    } else if (c && pep_confirm_pending(c)) {
        v = PEP_VERDICT_PENDING;
    }
    pep_unlock();
    return v;
}
