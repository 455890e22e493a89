/* One tunnel: the header, the onward connect, the data path, the endings.
 * The same life as pepsock/relay/tunnel.py (the Python engine):
 *
 *   HEADER -> DECIDE (Python) -> CONNECTING -> DECIDE on failure -> CLOSER
 *                 |                  |
 *                 +-> CLOSER         +-> OPEN -> (both directions shut: closed)
 *                                          +-> FLUSHING (destination reset:
 *                                              deliver what is held, then reset)
 *
 * Every socket has SO_LINGER {1, 0} while its tunnel lives (the listener's,
 * inherited; the onward socket's, set here), so a dying relay resets both
 * sides; a clean close and an Error reply disarm it first.
 *
 * The data path, per direction (struct dir): bytes are copied through a
 * COPY_BUF buffer while transfers are small (recv + send, no pipe); a read
 * that fills the buffer switches the direction to splice() through a pooled
 * pipe for good.  Readiness is remembered per socket (edge-triggered, one
 * registration) and cleared only by EAGAIN, so the steady state makes no
 * epoll_ctl.  A direction reads only when what it holds is delivered
 * (nothing in the buffer, room in the pipe), so a slow receiver never spins
 * the loop; an idle tunnel holds no pipe and no buffer.
 *
 * The Success reply rides with the destination's first bytes when the
 * client is not waiting for it: a client that sent early data behind its
 * header (`early`) gets the 4 bytes in front of those first bytes, one send
 * (down.reply, then down.lead: reply bytes in the buffer, not counted as
 * data), so the reply takes no segment (no slot of the initial window) of
 * its own.  The hold ends, and the reply goes alone at once, on the first
 * of: more bytes or a FIN from the client (it may stream until the reply),
 * the destination's FIN (the reply still goes before it), any error or
 * reset path, REPLY_HOLD_NS (Q_REPLY: OPEN uses no other link-0 timer).  A
 * client that sent only the header may be waiting for the reply (PEP_CONFIRM,
 * a server-speaks-first protocol): it gets it at open, as the Python engine
 * does for every client.
 *
 * The spill.  The reply shifts the stream by its 4 bytes: a destination that
 * sends whole segments (bulk data) fills the client's segments to the brim
 * plus a spill of 1 to 4 bytes, and with Nagle off that spill would leave as
 * a tiny segment of its own, taking a slot of the initial window after all
 * (a 100 kB response then needs a fourth round trip of a satellite hop).  So
 * after a coalesced reply the direction is `spilling`: each send leaves out
 * a spill (keeps it in the buffer, the next read goes behind it) until the
 * first of: the client socket's congestion window is full (the spill then
 * waits in its send queue anyway and merges with the bytes behind it), the
 * destination's EOF, the buffer filling (splice from then on), an error
 * path, SPILL_HOLD_NS (Q_SPILL).  A response that really ends on a spill
 * waits at most SPILL_HOLD_NS.  TCP_CORK would hold the spill in the kernel,
 * but the kernel's autocorking then defers the whole push, and while the
 * client socket is still in SYN_RECV (a TFO child before the client's ACK:
 * a satellite hop's whole first flight) nothing resumes it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core.h"

#define READ_EV (EPOLLIN | EPOLLRDHUP | EPOLLHUP)
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
#define TCPI_OPT_SYN_DATA_BIT 0x20

static void connected(struct rc_core *core, struct tunnel *t, uint32_t ev);
static int verify_now(struct rc_core *core, struct tunnel *t);
static void set_int(int fd, int level, int opt, int v);

static const struct linger LINGER_RESET = {1, 0};
static const struct linger LINGER_OFF = {0, 0};

/* -- small helpers ------------------------------------------------------------------ */

static void disarm(int fd)
{
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &LINGER_OFF, sizeof LINGER_OFF);
}

static void reset_close(int fd)
{
    if (fd < 0)
        return;
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &LINGER_RESET, sizeof LINGER_RESET);
    close(fd);
}

static int tcp_state(int fd)
{
    struct tcp_info ti;
    socklen_t l = sizeof ti;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) < 0)
        return TCP_CLOSE;
    return ti.tcpi_state;
}

static uint32_t unacked(int fd)
{
    int n = 0;
    if (ioctl(fd, SIOCOUTQ, &n) < 0)
        return 0;
    return (uint32_t)n;
}

/* Whether the spill (see the top) may still be held back: the direction is
 * spilling, its source not at EOF, and the client's window not full. */
static bool spill_held(struct dir *down, struct tcp_info *ti)
{
    socklen_t l = sizeof *ti;
    if (down->spilling && !down->eof
        && getsockopt(down->dst->fd, IPPROTO_TCP, TCP_INFO, ti, &l) == 0 && ti->tcpi_snd_mss
        && ti->tcpi_unacked < ti->tcpi_snd_cwnd)
        return true;
    down->spilling = false;
    return false;
}

/* How many of the buffered bytes a spilling send leaves out: those past the
 * last whole segment when they are no more than the reply's length. */
static uint32_t spill_of(const struct rc_core *core, struct dir *down, uint64_t moved)
{
    /* stream offset once buf[off..off+len) is sent: reply + data */
    uint64_t end = core->success_len + down->bytes + moved + (down->len - down->lead);
    /* By the MSS seen at accept most sends cannot end on a spill (a short
     * response never does): no TCP_INFO for them. */
    uint32_t past = down->mss ? (uint32_t)(end % down->mss) : 1;
    if (past == 0 || past > core->success_len)
        return 0;
    struct tcp_info ti;
    if (!spill_held(down, &ti))
        return 0;
    uint32_t spill = (uint32_t)(end % ti.tcpi_snd_mss);
    return spill <= core->success_len && spill <= down->len ? spill : 0;
}

/* The held Success reply, now and alone (see the top): 0, or -errno if the
 * client's socket failed.  Nothing was read for the client while it was
 * held, so nothing can overtake it. */
static int reply_alone(struct rc_core *core, struct dir *down)
{
    if (!down->reply)
        return 0;
    down->reply = 0;
    if (send(down->dst->fd, core->success, core->success_len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
        return -errno;
    return 0;
}

static void ended(struct rc_core *core, struct tunnel *t, bool reset, const char *fmt,
                  const char *arg)
{
    struct rc_record *r = record(core, RC_ENDED, t);
    r->up = t->up.bytes;
    r->down = t->down.bytes;
    r->elapsed_ns = now_ns() - t->t0;
    r->reset = reset;
    snprintf(r->why, sizeof r->why, fmt, arg);
}

/* -- endings -------------------------------------------------------------------------- */

/* Reset both sides: a reset on one side becomes a reset on the other, and a
 * tunnel cut short is never mistaken for a finished one. */
void tunnel_abort(struct rc_core *core, struct tunnel *t, const char *why)
{
    reply_alone(core, &t->down);    /* the reply, then the reset: as if never held */
    reset_close(t->c.fd);
    reset_close(t->s.fd);
    core->n.resets++;
    ended(core, t, true, "reset (%s)", why);
    tunnel_free(core, t);
}

static void finish_clean(struct rc_core *core, struct tunnel *t)
{
    disarm(t->c.fd);
    disarm(t->s.fd);
    close(t->c.fd);
    close(t->s.fd);
    ended(core, t, false, "%s", "ok");
    tunnel_free(core, t);
}

/* Send the reply and become a closer: disarm the reset, send, SHUT_WR,
 * discard what the client still sends until its FIN or the linger timeout.
 * Past max_closers at once, close right after sending. */
static void send_reply(struct rc_core *core, struct tunnel *t, const uint8_t *reply, size_t len)
{
    int fd = t->c.fd;
    disarm(fd);
    bool ok = send(fd, reply, len, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0
              && shutdown(fd, SHUT_WR) == 0;
    if (!ok || core->n.closers >= core->cfg.max_closers) {
        close(fd);
        t->c.fd = -1;
        tunnel_free(core, t);
        return;
    }
    /* Now counted as a closer, no longer as a tunnel. */
    core->n.tunnels--;
    core->n.closers++;
    t->state = T_CLOSER;
    free(t->reader);
    t->reader = NULL;
    t->c.readable = true;
    timer_set(core, t, Q_LINGER);
    /* Whatever is already queued (the rest of a refused header) is discarded now. */
    tunnel_event(core, t, false, EPOLLIN);
}

/* An Error (or Info) reply, then a clean close.  An unverified client gets
 * no byte before its handshake completes: the reply is held (returns 1),
 * and a client that never completes it is reset, having been sent nothing.
 * Accept-time refusals held that way are bounded by max_closers too. */
int tunnel_refuse(struct rc_core *core, struct tunnel *t, const uint8_t *reply, size_t len,
                  int code, bool tracked)
{
    if (t->s.fd >= 0) {
        reset_close(t->s.fd);
        t->s.fd = -1;
    }
    t->tracked = tracked;
    if (t->unverified) {
        if (!tracked && core->n.closers + core->n.held_replies >= core->cfg.max_closers) {
            reset_close(t->c.fd);
            t->c.fd = -1;
            tunnel_free(core, t);
            return 1;
        }
        free(t->reply);
        t->reply = malloc(len ? len : 1);
        if (!t->reply) {
            tunnel_abort(core, t, "out of memory");
            return 1;
        }
        memcpy(t->reply, reply, len);
        t->reply_len = (uint32_t)len;
        t->reply_code = code;
        if (!tracked)
            core->n.held_replies++;
        timer_clear(core, t);
        t->state = T_HELD;
        t->held = H_REPLY;
        return 1;
    }
    send_reply(core, t, reply, len);
    return 0;
}

static void closer_event(struct rc_core *core, struct tunnel *t)
{
    char sink[4096];
    for (;;) {
        ssize_t n = recv(t->c.fd, sink, sizeof sink, MSG_DONTWAIT);
        if (n > 0)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        break;  /* FIN or an error */
    }
    close(t->c.fd);
    t->c.fd = -1;
    tunnel_free(core, t);
}

/* -- header ---------------------------------------------------------------------------- */

/* Read what the client sent: the header (usually all in the SYN) and the
 * early data behind it, which goes to up.buf to be sent onward first.
 * Returns the header state for the record. */
static int read_header(struct rc_core *core, struct tunnel *t, struct rc_record *r)
{
    struct dir *up = &t->up;
    if (!t->reader) {
        t->reader = malloc(sizeof *t->reader);
        if (!t->reader)
            return RC_HDR_GONE;
        pep_reader_init(t->reader);
    }
    if (!up->buf && !(up->buf = buf_get(core)))
        return RC_HDR_GONE;
    for (;;) {
        ssize_t n = recv(t->c.fd, up->buf, COPY_BUF, 0);
        int code = 0, rc;
        size_t used = 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                t->c.readable = false;
                t->c.armed = true;
                return RC_HDR_NONE;
            }
            snprintf(t->why, sizeof t->why, "client error in header: %s", strerror(errno));
            return RC_HDR_GONE;
        }
        if (n == 0) {
            r->err = pep_reader_eof(t->reader);
            return RC_HDR_BAD;
        }
        t->got += (uint32_t)n;
        r->got = t->got;
        rc = pep_reader_feed(t->reader, up->buf, (size_t)n, &used, &t->msg, &code);
        if (rc == PEP_NEED_MORE)
            continue;
        if (rc == PEP_OK && pep_check_request(&t->msg, &code) == PEP_OK) {
            up->off = 0;
            up->len = (uint32_t)((size_t)n - used);
            memmove(up->buf, up->buf + used, up->len);
            r->early = t->early = up->len;
            if (t->msg.has_info && !t->msg.has_connect)
                return RC_HDR_INFO;
            r->dest_port = t->msg.port;
            memcpy(r->dest_addr, t->msg.addr, 16);
            r->nkinds = (uint32_t)pep_option_kinds(&t->msg, r->kinds, sizeof r->kinds);
            r->cookie = t->msg.cookie;
            r->cookie_len = (uint32_t)t->msg.cookie_len;
            /* A short read drained the socket.  The socket was registered
             * before this read, so a FIN already behind these bytes (or any
             * byte after them) is reported by the next epoll_wait (the
             * mask is taken when the event is collected): no EAGAIN read
             * needed.  A full read may have left bytes: keep reading. */
            t->c.readable = n == COPY_BUF;
            t->c.armed = true;
            return RC_HDR_CONNECT;
        }
        r->err = code;
        return RC_HDR_BAD;
    }
}

/* Read the header into record r (NEW or HEADER) and settle the tunnel:
 * DECIDE if Python has something to decide.  False if t is gone (freed). */
static bool header_progress(struct rc_core *core, struct tunnel *t, struct rc_record *r)
{
    int hdr = read_header(core, t, r);
    r->hdr = hdr;
    r->unverified = t->unverified;
    if (hdr == RC_HDR_GONE) {
        if (r->kind == RC_NEW) {   /* Python never saw it: it only logs it */
            core->n.resets++;
            reset_close(t->c.fd);
            t->c.fd = -1;
            tunnel_free(core, t);
            return false;
        }
        core->nrec--;
        tunnel_abort(core, t, t->why[0] ? t->why : "out of memory");
        return false;
    }
    if (hdr == RC_HDR_NONE && r->kind == RC_HEADER) {
        core->nrec--;   /* nothing to report yet */
        return true;
    }
    timer_clear(core, t);
    t->state = T_DECIDE;
    return true;
}

/* tcp_info as the kernel lays it out (glibc's struct is older): tcpi_state
 * (u8 at 0), tcpi_options (u8 at 5), tcpi_snd_mss (u32 at 16),
 * tcpi_bytes_received (u64 at 128),
 * tcpi_data_segs_in (u32 at 152); Linux >= 4.6. */
#define TI_LEN 160

void tunnel_accepted(struct rc_core *core, struct tunnel *t, const struct sockaddr_storage *ss)
{
    uint8_t ti[TI_LEN];
    socklen_t l = sizeof ti;
    t->state = T_HEADER;
    t->c.readable = t->c.writable = true;
    struct rc_record *r = record(core, RC_NEW, t);
    r->family = ss->ss_family;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        memcpy(r->client_addr, &a->sin_addr, 4);
        r->client_port = ntohs(a->sin_port);
    } else {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        memcpy(r->client_addr, &a->sin6_addr, 16);
        r->client_port = ntohs(a->sin6_port);
    }
    /* One TCP_INFO read at accept (routability.accept_facts), before the
     * header read. */
    memset(ti, 0, sizeof ti);
    if (getsockopt(t->c.fd, IPPROTO_TCP, TCP_INFO, ti, &l) == 0) {
        r->handshaking = ti[0] == TCP_SYN_RECV;
        r->syn_data = (ti[5] & TCPI_OPT_SYN_DATA_BIT) != 0;
        memcpy(&t->down.mss, ti + 16, sizeof t->down.mss);
        if (r->syn_data && l >= 156) {
            uint32_t segs;
            uint64_t bytes;
            memcpy(&segs, ti + 152, sizeof segs);
            memcpy(&bytes, ti + 128, sizeof bytes);
            if (segs == 1)
                r->syn_payload = (uint32_t)bytes;
        }
        if (core->cfg.clients_unverified && r->handshaking) {
            /* Unverified (routability.py): nothing goes to it, nor onward
             * from it, until its ACK; reset if that never comes. */
            t->unverified = true;
            timer_set(core, t, Q_VERIFY);
        }
    }
    header_progress(core, t, r);
}

void tunnel_wait_header(struct rc_core *core, struct tunnel *t)
{
    t->state = T_HEADER;
    timer_set(core, t, Q_HEADER);
}

/* -- onward connect ------------------------------------------------------------------ */

static void set_int(int fd, int level, int opt, int v)
{
    setsockopt(fd, level, opt, &v, sizeof v);
}

static void set_buffer(int fd, int opt, int force, int size)
{
    if (size <= 0)
        return;
    if (setsockopt(fd, SOL_SOCKET, force, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, opt, &size, sizeof size);
}

/* The server side's options (sockopts.apply_side), before the SYN. */
static void server_options(const struct rc_config *cfg, int fd, const struct rc_connect *c)
{
    set_buffer(fd, SO_RCVBUF, SO_RCVBUFFORCE, c->server_rcvbuf ? c->server_rcvbuf
                                                               : cfg->server_rcvbuf);
    set_buffer(fd, SO_SNDBUF, SO_SNDBUFFORCE, c->server_sndbuf ? c->server_sndbuf
                                                               : cfg->server_sndbuf);
    if (cfg->user_timeout_ms)
        set_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, cfg->user_timeout_ms);
    if (cfg->server_cc[0])
        setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cfg->server_cc, strlen(cfg->server_cc));
    if (cfg->nodelay)
        set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
    set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &LINGER_RESET, sizeof LINGER_RESET);
    if (cfg->keepalive) {
        set_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, cfg->keepalive);
        set_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, cfg->keepalive / 3 > 1 ? cfg->keepalive / 3 : 1);
        set_int(fd, IPPROTO_TCP, TCP_KEEPCNT, 3);
    }
    if (cfg->syn_retries >= 0)
        set_int(fd, IPPROTO_TCP, TCP_SYNCNT, cfg->syn_retries);
}

/* Returns 0 (connecting, or held), or the errno of a connect that failed at
 * once.  An unverified client's onward SYN: only if Python found it no
 * larger than the client's (else `hold`: connect once verified), no TFO, and
 * dropped before the kernel would retransmit it (Q_SYN_WINDOW). */
int tunnel_connect(struct rc_core *core, struct tunnel *t, const struct rc_connect *c)
{
    if (t->unverified) {
        if (c != &t->conn)
            t->conn = *c;
        if (c->hold) {
            timer_clear(core, t);
            t->state = T_HELD;
            t->held = H_CONNECT;
            return 0;
        }
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    if (c->family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(c->port);
        memcpy(&a->sin_addr, c->addr, 4);
        sl = sizeof *a;
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(c->port);
        memcpy(&a->sin6_addr, c->addr, 16);
        sl = sizeof *a;
    }
    int fd = socket(c->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errno;
    server_options(&core->cfg, fd, c);
    if (t->unverified)
        set_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, core->cfg.unverified_user_timeout_ms);
    struct dir *up = &t->up;
    int err = 0;
    bool syn_data = false;
    if (c->syn_room && up->len && !t->unverified) {
        /* Onward TCP Fast Open (the kernel's cookie cache): with a cookie
         * from this destination the SYN carries the early data; without, a
         * plain SYN and the bytes follow the handshake. */
        uint32_t n = up->len < c->syn_room ? up->len : c->syn_room;
        ssize_t sent = sendto(fd, up->buf + up->off, n, MSG_FASTOPEN | MSG_NOSIGNAL,
                              (struct sockaddr *)&ss, sl);
        if (sent > 0) {
            up->off += (uint32_t)sent;
            up->len -= (uint32_t)sent;
            syn_data = true;
        } else if (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOPROTOOPT) {
            if (connect(fd, (struct sockaddr *)&ss, sl) < 0 && errno != EINPROGRESS)
                err = errno;
        } else if (errno != EINPROGRESS && errno != EAGAIN) {
            err = errno;
        }
    } else if (connect(fd, (struct sockaddr *)&ss, sl) < 0 && errno != EINPROGRESS) {
        err = errno;
    }
    if (err) {
        close(fd);
        return err;
    }
    if (syn_data)
        core->n.onward_syn_data++;
    t->onward_syn_data = syn_data;      /* reported in the CONNECTED record */
    t->s.fd = fd;
    t->s.readable = false;
    t->s.writable = false;
    t->s.armed = true;      /* registered before any byte can arrive */
    t->state = T_CONNECTING;
    t->up.limit = t->down.limit = c->pipe_limit ? c->pipe_limit : UINT32_MAX;
    free(t->reader);    /* the cookie pointer Python read is gone with it */
    t->reader = NULL;
    t->held = H_NONE;
    timer_set(core, t, t->unverified ? Q_SYN_WINDOW : Q_CONNECT);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = ((uint64_t)t->id << 2) | 2};
    epoll_ctl(core->ep, EPOLL_CTL_ADD, fd, &ev);
    /* A destination on this host has answered already (loopback runs the
     * handshake inside connect()): open now, not one loop turn later.  The
     * records this makes follow the step's (rc_count). */
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, 0) == 1 && p.revents == POLLOUT)
        connected(core, t, EPOLLOUT);
    return 0;
}

static void run(struct rc_core *core, struct tunnel *t);

static void connect_failed(struct rc_core *core, struct tunnel *t, int err, bool timeout)
{
    timer_clear(core, t);
    reset_close(t->s.fd);
    t->s.fd = -1;
    if (t->unverified && (timeout || err == ETIMEDOUT)) {
        /* The onward SYN went unanswered and may not be retransmitted: try
         * again once the client is verified (closing a SYN_SENT socket sends
         * nothing).  Python's pending-connect slot stays taken meanwhile. */
        t->state = T_HELD;
        t->held = H_CONNECT;
        return;
    }
    struct rc_record *r = record(core, RC_CONNECT_FAILED, t);
    r->err = err;
    r->timeout = timeout;
    r->unverified = t->unverified;
    t->state = T_DECIDE;
}

/* Onward connection up, client verified: the Success reply (held for the
 * destination's first bytes if the client sent early data), then data. */
static void open_tunnel(struct rc_core *core, struct tunnel *t)
{
    if (!t->early
        && send(t->c.fd, core->success, core->success_len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        char why[80];
        snprintf(why, sizeof why, "client gone before reply: %s", strerror(errno));
        return tunnel_abort(core, t, why);
    }
    struct rc_record *r = record(core, RC_CONNECTED, t);
    r->elapsed_ns = now_ns() - t->t0;
    r->onward_syn_data = t->onward_syn_data;
    t->state = T_OPEN;
    t->held = H_NONE;
    t->s.writable = true;
    t->up.src = &t->c;
    t->up.dst = &t->s;
    t->up.counter = &core->n.bytes_up;
    t->down.src = &t->s;
    t->down.dst = &t->c;
    t->down.counter = &core->n.bytes_down;
    t->up.peer = &t->down;
    t->down.peer = &t->up;
    if (t->early) {
        t->down.reply = (uint32_t)core->success_len;
        timer_set(core, t, Q_REPLY);
    }
    run(core, t);
}

static void connected(struct rc_core *core, struct tunnel *t, uint32_t ev)
{
    /* A clean EPOLLOUT is a completed connect(); SO_ERROR only when flagged. */
    if ((ev & (EPOLLERR | EPOLLHUP)) || !(ev & EPOLLOUT)) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(t->s.fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err)
            return connect_failed(core, t, err, false);
        if (!(ev & EPOLLOUT))
            return;
    }
    timer_clear(core, t);
    /* Edge-triggered: bytes the server sends after this poll raise a new edge. */
    t->s.readable = (ev & READ_EV) != 0;
    t->s.fin_seen = (ev & (EPOLLRDHUP | EPOLLHUP)) != 0;
    if (t->unverified) {
        t->state = T_HELD;
        t->held = H_OPEN;
        return;
    }
    open_tunnel(core, t);
}

/* -- data path ----------------------------------------------------------------------- */

/* Move what can be moved src -> dst.  Contract: returns 0 when the direction
 * is idle (EAGAIN on the side it waits for, or EOF carried), -errno when a
 * socket failed (the caller decides between FLUSHING and a reset).  `*which`
 * says which socket failed: 0 the source, 1 the destination. */
static int pump(struct rc_core *core, struct dir *d, int *which)
{
    struct end *src = d->src, *dst = d->dst;
    uint64_t moved = 0;
    int rc = 0;
    for (;;) {
        bool progress = false;
        /* 1. deliver: the pipe, else the buffer */
        if ((d->held || d->len) && dst->writable) {
            bool from_pipe = d->held != 0;
            uint32_t want = from_pipe || !d->spilling ? d->len : d->len - spill_of(core, d, moved);
            ssize_t n = from_pipe
                ? splice(d->pipe_r, NULL, dst->fd, NULL, d->held, SPLICE_FLAGS)
                : !want ? 0
                : send(dst->fd, d->buf + d->off, want, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                uint32_t lead = 0;
                if (from_pipe) {
                    d->held -= (uint32_t)n;
                } else {
                    lead = d->lead < (uint32_t)n ? d->lead : (uint32_t)n;
                    d->lead -= lead;
                    d->off += (uint32_t)n;
                    d->len -= (uint32_t)n;
                }
                moved += (uint64_t)n - lead;
                progress = true;
            } else if (n < 0 && errno == EAGAIN) {
                dst->writable = false;
            } else if (n < 0) {
                rc = -errno;
                *which = 1;
                break;
            }
        }
        /* 2. read, once what is buffered is delivered (but a held spill) */
        if (!d->eof && src->readable
            && (d->len == 0 || (d->spilling && d->len <= core->success_len))) {
            if (d->splice_mode && d->pipe_r < 0 && d->held == 0 && !pipe_get(core, d))
                d->splice_mode = false;     /* out of fds: copy instead */
            if (d->splice_mode) {
                uint32_t cap = d->pipe_cap < d->limit ? d->pipe_cap : d->limit;
                if (d->held < cap) {
                    ssize_t n = splice(src->fd, NULL, d->pipe_w, NULL, cap - d->held,
                                       SPLICE_FLAGS);
                    if (n >= 0 && (rc = reply_alone(core, d->peer)) != 0) {
                        *which = 0;     /* the client streams: its reply goes now */
                        break;
                    }
                    if (n > 0) {
                        d->held += (uint32_t)n;
                        progress = true;
                    } else if (n == 0) {
                        d->eof = true;
                    } else if (errno == EAGAIN) {
                        /* Ambiguous while the pipe holds bytes (it may be out
                         * of slots): stay "readable", retry once it drains. */
                        if (d->held == 0) {
                            src->readable = false;
                            src->armed = true;
                        }
                    } else {
                        rc = -errno;
                        *which = 0;
                        break;
                    }
                }
            } else if (d->held == 0) {
                if (!d->buf && !(d->buf = buf_get(core))) {
                    rc = -ENOMEM;
                    *which = 0;
                    break;
                }
                /* A held reply goes in front of the first bytes, one send;
                 * a held spill, likewise (never both). */
                uint32_t lead = d->reply, keep = d->len;
                if (keep && d->off)
                    memmove(d->buf, d->buf + d->off, keep);
                d->off = 0;
                ssize_t n = recv(src->fd, d->buf + lead + keep, COPY_BUF - lead - keep,
                                 MSG_DONTWAIT);
                if (n >= 0 && (rc = reply_alone(core, d->peer)) != 0) {
                    *which = 0;     /* the client streams: its reply goes now */
                    break;
                }
                if (n > 0) {
                    if (lead) {
                        memcpy(d->buf, core->success, lead);
                        d->reply = 0;
                        d->lead = lead;
                        d->spilling = true;
                        core->n.replies_coalesced++;
                    }
                    d->len = (uint32_t)n + lead + keep;
                    progress = true;
                    if (d->len == COPY_BUF) {
                        d->splice_mode = true;  /* a bulk transfer: splice from now on */
                        d->spilling = false;
                    } else if (src->armed && !src->fin_seen)
                        src->readable = false;  /* drained: saves the EAGAIN recv */
                } else if (n == 0) {
                    if ((rc = reply_alone(core, d)) != 0) {
                        *which = 1;     /* the reply precedes the destination's FIN */
                        break;
                    }
                    d->eof = true;
                } else if (errno == EAGAIN) {
                    src->readable = false;
                    src->armed = true;
                } else {
                    rc = -errno;
                    *which = 0;
                    break;
                }
            }
        }
        if (!progress) {
            struct tcp_info ti;
            if (d->len && d->spilling && !spill_held(d, &ti))
                continue;       /* the spill goes now */
            break;
        }
    }
    if (moved) {
        d->bytes += moved;
        *d->counter += moved;
    }
    if (rc)
        return rc;
    if (d->held == 0 && d->pipe_r >= 0)
        pipe_put(core, d);
    if (d->len == 0 && d->buf) {
        buf_put(core, d->buf);
        d->buf = NULL;
        d->off = 0;
    }
    if (d->eof && !d->held && !d->len && !d->shut) {
        /* Half-close: the source's EOF becomes the destination's EOF.  If the
         * other direction is already shut, the close() that follows sends
         * the FIN. */
        d->shut = true;
        if (!d->peer->shut && shutdown(dst->fd, SHUT_WR) < 0) {
            *which = 1;
            return -errno;
        }
    }
    return 0;
}

/* -- a destination reset: deliver, then reset ----------------------------------------- */

/* Pump what the relay holds for the client; a read error from the dead
 * server ends its stream.  False if the tunnel ended (t is freed). */
static bool flush(struct rc_core *core, struct tunnel *t)
{
    for (int k = 0; k < 3; k++) {
        int which = 0;
        int rc = pump(core, &t->down, &which);
        if (rc == 0)
            return true;
        if (tcp_state(t->c.fd) == TCP_CLOSE) {
            char why[200];
            snprintf(why, sizeof why, "%s; then client %s", t->why, strerror(-rc));
            tunnel_abort(core, t, why);
            return false;
        }
        t->down.eof = true;     /* the dead server's queue is read to its end */
    }
    return true;
}

/* The client gets every byte the relay already holds for it (the dead
 * socket's queue, the pipe, the client socket's send queue) before the
 * reset: the destination sent them and they were acknowledged, so dropping
 * them would lose data a direct connection delivers. */
static void start_flush(struct rc_core *core, struct tunnel *t, const char *why)
{
    reply_alone(core, &t->down);    /* first: a client gone shows in flush() */
    t->down.spilling = false;
    t->state = T_FLUSHING;
    snprintf(t->why, sizeof t->why, "server %s", why);
    pipe_put(core, &t->up);     /* the client's bytes cannot reach the server any more */
    t->up.len = 0;
    t->down.shut = true;        /* no FIN: this direction ends with the reset */
    t->s.readable = true;
    t->marked = false;
    t->mark_at = now_ns();
    if (flush(core, t))
        timer_set(core, t, Q_FLUSH);
}

static void flush_poll(struct rc_core *core, struct tunnel *t)
{
    char why[200];
    if (!flush(core, t))
        return;
    struct dir *d = &t->down;
    uint32_t left = unacked(t->c.fd);
    if (d->eof && !d->held && !d->len && left == 0) {
        snprintf(why, sizeof why, "%s; %llu bytes delivered in all", t->why,
                 (unsigned long long)d->bytes);
        return tunnel_abort(core, t, why);
    }
    if (tcp_state(t->c.fd) == TCP_CLOSE) {
        snprintf(why, sizeof why, "%s; then the client's connection ended", t->why);
        return tunnel_abort(core, t, why);
    }
    int64_t now = now_ns();
    if (!t->marked || t->mark[0] != d->bytes || t->mark[1] != left) {
        t->marked = true;
        t->mark[0] = d->bytes;
        t->mark[1] = left;
        t->mark_at = now;
    } else if (core->cfg.stall_timeout > 0
               && now - t->mark_at > (int64_t)(core->cfg.stall_timeout * 1e9)) {
        snprintf(why, sizeof why, "%s; client stalled, %u bytes undelivered", t->why,
                 left + d->held + d->len);
        return tunnel_abort(core, t, why);
    }
    timer_set(core, t, Q_FLUSH);
}

/* One side failed (err: -errno).  A destination reset while the client is
 * fine: FLUSHING.  Anything else: reset both now. */
static void broken(struct rc_core *core, struct tunnel *t, int err)
{
    const char *why = err ? strerror(-err) : "error";
    if (t->state == T_OPEN && !t->down.shut && tcp_state(t->s.fd) == TCP_CLOSE
        && tcp_state(t->c.fd) != TCP_CLOSE)
        return start_flush(core, t, why);
    tunnel_abort(core, t, why);
}

static void run(struct rc_core *core, struct tunnel *t)
{
    int which = 0, rc;
    if ((rc = pump(core, &t->up, &which)) != 0)
        return broken(core, t, rc);
    if ((rc = pump(core, &t->down, &which)) != 0)
        return broken(core, t, rc);
    if (t->tl[0].q == Q_REPLY && !t->down.reply)
        timer_clear(core, t);   /* the held reply went */
    if (t->down.spilling && t->tl[0].q != Q_SPILL)
        timer_set(core, t, Q_SPILL);
    else if (!t->down.spilling && t->tl[0].q == Q_SPILL)
        timer_clear(core, t);
    if (t->up.shut && t->down.shut)
        finish_clean(core, t);
}

static void on_error(struct rc_core *core, struct tunnel *t, struct end *e, const char *who)
{
    int err = 0;
    socklen_t l = sizeof err;
    char why[120];
    getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    snprintf(why, sizeof why, "%s %s", who, err ? strerror(err) : "error");
    if (t->state == T_OPEN && !t->down.shut && tcp_state(t->s.fd) == TCP_CLOSE
        && tcp_state(t->c.fd) != TCP_CLOSE)
        return start_flush(core, t, err ? strerror(err) : "error");
    tunnel_abort(core, t, why);
}

/* -- unverified clients (routability.py) --------------------------------------------- */

/* The client's handshake completed (or Python says its address is proven):
 * the onward socket gets its normal user timeout and connect deadline back,
 * and what was held runs. */
void tunnel_verified(struct rc_core *core, struct tunnel *t)
{
    t->unverified = false;
    verify_clear(core, t);
    if (t->s.fd >= 0)
        set_int(t->s.fd, IPPROTO_TCP, TCP_USER_TIMEOUT, core->cfg.user_timeout_ms);
    if (t->state == T_CONNECTING)
        timer_set(core, t, Q_CONNECT);
    enum held held = t->held;
    t->held = H_NONE;
    switch (held) {
    case H_CONNECT: {
        int err = tunnel_connect(core, t, &t->conn);
        if (err) {
            struct rc_record *r = record(core, RC_CONNECT_FAILED, t);
            r->err = err;
            t->state = T_DECIDE;
        }
        break;
    }
    case H_OPEN:
        open_tunnel(core, t);
        break;
    case H_REPLY: {
        uint8_t *reply = t->reply;
        t->reply = NULL;
        if (!t->tracked)
            core->n.held_replies--;
        struct rc_record *r = record(core, RC_REPLIED, t);
        r->err = t->reply_code;
        send_reply(core, t, reply, t->reply_len);
        free(reply);
        break;
    }
    default:
        break;
    }
}

/* 1: verified now (t alive), 0: not yet, -1: verified and t is gone. */
static int verify_now(struct rc_core *core, struct tunnel *t)
{
    if (tcp_state(t->c.fd) == TCP_SYN_RECV)
        return 0;
    int id = t->id;
    tunnel_verified(core, t);
    return core->slots[id] == t ? 1 : -1;
}

/* header_timeout passed and the client never completed its handshake (a
 * forged source): reset, having sent it nothing. */
void tunnel_verify_expired(struct rc_core *core, struct tunnel *t)
{
    if (t->held == H_REPLY && !t->tracked) {    /* an accept-time refusal: no tunnel */
        reset_close(t->c.fd);
        t->c.fd = -1;
        tunnel_free(core, t);
        return;
    }
    tunnel_abort(core, t, "client never completed its handshake");
    core->rec[core->nrec - 1].expired = 1;
}

/* -- events and timers ---------------------------------------------------------------- */

void tunnel_event(struct rc_core *core, struct tunnel *t, bool server, uint32_t ev)
{
    if (t->state == T_CLOSER) {
        if (!server)
            closer_event(core, t);
        return;
    }
    struct end *e = server ? &t->s : &t->c;
    if (server && t->state == T_CONNECTING)
        return connected(core, t, ev);
    if (server && t->state == T_FLUSHING)
        return;     /* the server is gone; flush() reads its last bytes */
    if (ev & READ_EV)
        e->readable = true;
    if (ev & (EPOLLRDHUP | EPOLLHUP))
        e->fin_seen = true;
    if (ev & EPOLLOUT)
        e->writable = true;
    if (ev & EPOLLERR && t->state != T_DECIDE)
        return on_error(core, t, e, server ? "server" : "client");
    if (!server && t->unverified && t->state != T_DECIDE) {
        /* The client's ACK raises an edge (EPOLLOUT at least): the moment to look. */
        if (verify_now(core, t) <= 0 || t->state != T_HEADER)
            return;
    }
    switch (t->state) {
    case T_OPEN:
        run(core, t);
        break;
    case T_FLUSHING:
        if (flush(core, t) && t->state == T_FLUSHING && t->tl[0].q == Q_NONE)
            timer_set(core, t, Q_FLUSH);
        break;
    case T_HEADER:
        /* Not on a bare EPOLLOUT: recv() would only EAGAIN. */
        if (t->c.readable)
            header_progress(core, t, record(core, RC_HEADER, t));
        break;
    default:
        break;
    }
}

void tunnel_timer(struct rc_core *core, struct tunnel *t)
{
    switch (t->state) {
    case T_HEADER: {
        struct rc_record *r = record(core, RC_HEADER, t);
        r->hdr = RC_HDR_TIMEOUT;
        t->state = T_DECIDE;
        break;
    }
    case T_CONNECTING:
        connect_failed(core, t, ETIMEDOUT, true);
        break;
    case T_CLOSER:
        close(t->c.fd);
        t->c.fd = -1;
        tunnel_free(core, t);
        break;
    case T_FLUSHING:
        flush_poll(core, t);
        break;
    case T_OPEN: {
        if (t->down.spilling) {     /* Q_SPILL: the response may end on its spill */
            t->down.spilling = false;
            run(core, t);
            break;
        }
        /* Q_REPLY: the destination is slow to answer, the reply goes alone */
        int rc = reply_alone(core, &t->down);
        if (rc)
            broken(core, t, rc);
        break;
    }
    default:
        break;
    }
}

/* Called every stall_timeout/4: a tunnel that holds bytes it cannot deliver
 * (a pipe, a buffer, a socket's unacknowledged send queue) while nothing
 * moves and nothing is acknowledged for stall_timeout is reset, so a peer
 * that stops reading cannot pin its buffers forever.  Idle ones are fine. */
void tunnel_stall_check(struct rc_core *core, struct tunnel *t, int64_t now)
{
    uint64_t up = t->up.bytes, down = t->down.bytes;
    if (t->marked && t->mark[0] == up && t->mark[1] == down) {
        uint64_t held = (uint64_t)t->up.held + t->down.held + t->up.len + t->down.len;
        uint64_t q0 = unacked(t->c.fd), q1 = unacked(t->s.fd);
        if (!held && !q0 && !q1) {
            t->marked = false;  /* idle, nothing owed */
            return;
        }
        if (t->mark[2] != q0 || t->mark[3] != q1) {
            t->mark[2] = q0;
            t->mark[3] = q1;
            t->mark_at = now;
        } else if (now - t->mark_at >= (int64_t)(core->cfg.stall_timeout * 1e9)) {
            char why[160];
            snprintf(why, sizeof why,
                     "stalled %.0fs with %llu bytes in the relay and %llu unacknowledged",
                     (double)(now - t->mark_at) / 1e9, (unsigned long long)held,
                     (unsigned long long)(q0 + q1));
            tunnel_abort(core, t, why);
        }
        return;
    }
    t->marked = true;
    t->mark[0] = up;
    t->mark[1] = down;
    t->mark[2] = t->mark[3] = UINT64_MAX;
    t->mark_at = now;
}
