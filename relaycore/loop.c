/* The core's loop: its epoll set, the timer queues, tunnel slots, accept,
 * the pipe and buffer pools, and the API Python calls (relaycore.h).
 *
 * epoll data: (id << 2) | what, what = 0 listener (id: its index), 1 the
 * client socket, 2 the server socket of tunnel `id`, 3 the external fd
 * (Python's own epoll set, rc_set_external: one blocking wait per turn).  A freed id is reused
 * only after the step that freed it, so a stale event in the same
 * epoll_wait batch never reaches a new tunnel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

enum { EV_LISTENER = 0, EV_CLIENT = 1, EV_SERVER = 2, EV_EXTERNAL = 3 };

int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t secs_ns(double s)
{
    return (int64_t)(s * 1e9);
}

/* -- records -------------------------------------------------------------------- */

struct rc_record *record(struct rc_core *core, int kind, struct tunnel *t)
{
    /* Sized so a step cannot overflow (see MAX_RECORDS); if it ever did, the
     * last slot is overwritten rather than memory beyond it. */
    int i = core->nrec < MAX_RECORDS ? core->nrec++ : MAX_RECORDS - 1;
    struct rc_record *r = &core->rec[i];
    memset(r, 0, offsetof(struct rc_record, why) + 1);
    r->kind = kind;
    r->id = t ? t->id : -1;
    return r;
}

/* -- timers --------------------------------------------------------------------- */

static void link_clear(struct rc_core *core, struct tunnel *t, int which)
{
    struct tlink *l = &t->tl[which];
    if (l->q == Q_NONE)
        return;
    struct tqueue_head *q = &core->q[l->q];
    if (l->prev)
        l->prev->tl[which].next = l->next;
    else
        q->head = l->next;
    if (l->next)
        l->next->tl[which].prev = l->prev;
    else
        q->tail = l->prev;
    l->prev = l->next = NULL;
    l->q = Q_NONE;
}

void timer_clear(struct rc_core *core, struct tunnel *t)
{
    link_clear(core, t, 0);
}

void verify_clear(struct rc_core *core, struct tunnel *t)
{
    link_clear(core, t, 1);
}

static int link_of(int queue)
{
    return queue == Q_VERIFY;
}

void timer_set(struct rc_core *core, struct tunnel *t, int queue)
{
    int which = link_of(queue);
    link_clear(core, t, which);
    struct tqueue_head *q = &core->q[queue];
    struct tlink *l = &t->tl[which];
    l->q = queue;
    l->deadline = now_ns() + q->duration;
    l->prev = q->tail;
    l->next = NULL;
    if (q->tail)
        q->tail->tl[which].next = t;
    else
        q->head = t;
    q->tail = t;
}

/* -- pools ---------------------------------------------------------------------- */

/* A pipe for d, pooled or new (capacity read back: F_SETPIPE_SZ may be
 * refused).  False when none can be had (out of fds): the caller copies. */
bool pipe_get(struct rc_core *core, struct dir *d)
{
    int p[3];
    if (core->npipes) {
        memcpy(p, core->pipes[--core->npipes], sizeof p);
    } else {
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
            return false;
        int cap = fcntl(p[1], F_SETPIPE_SZ, (int)core->cfg.pipe_size);
        if (cap < 0) {
            cap = fcntl(p[1], F_GETPIPE_SZ);
            core->n.pipe_refused++;     /* Python warns once */
            core->n.pipe_cap = (uint64_t)cap;
        }
        p[2] = cap > 0 ? cap : 65536;
        core->n.pipes_open++;
    }
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    d->pipe_cap = (uint32_t)p[2];
    return true;
}

/* Give back d's pipe: pooled if empty and there is room, else closed (its
 * bytes, if any, die with the tunnel that owned them). */
void pipe_put(struct rc_core *core, struct dir *d)
{
    if (d->pipe_r < 0)
        return;
    if (d->held == 0 && core->npipes < core->cfg.pipe_pool) {
        int *p = core->pipes[core->npipes++];
        p[0] = d->pipe_r;
        p[1] = d->pipe_w;
        p[2] = (int)d->pipe_cap;
    } else {
        close(d->pipe_r);
        close(d->pipe_w);
        core->n.pipes_open--;
    }
    d->pipe_r = d->pipe_w = -1;
    d->held = 0;
}

uint8_t *buf_get(struct rc_core *core)
{
    if (core->nbufs)
        return core->bufs[--core->nbufs];
    return malloc(COPY_BUF);
}

void buf_put(struct rc_core *core, uint8_t *buf)
{
    if (!buf)
        return;
    if (core->nbufs < core->maxbufs)
        core->bufs[core->nbufs++] = buf;
    else
        free(buf);
}

/* -- slots ---------------------------------------------------------------------- */

static struct tunnel *tunnel_alloc(struct rc_core *core)
{
    int id;
    if (core->nfree) {
        id = core->free_ids[--core->nfree];
    } else {
        if (core->nslots % 1024 == 0) {
            int n = core->nslots + 1024;
            struct tunnel **s = realloc(core->slots, n * sizeof *s);
            int *f = realloc(core->free_ids, n * sizeof *f);
            if (s)
                core->slots = s;
            if (f)
                core->free_ids = f;
            if (!s || !f)
                return NULL;
        }
        id = core->nslots++;
    }
    struct tunnel *t = calloc(1, sizeof *t);
    if (!t) {
        core->free_ids[core->nfree++] = id;
        return NULL;
    }
    t->id = id;
    t->tl[0].q = t->tl[1].q = Q_NONE;
    t->c.fd = t->s.fd = -1;
    t->up.pipe_r = t->up.pipe_w = t->down.pipe_r = t->down.pipe_w = -1;
    core->slots[id] = t;
    core->n.tunnels++;
    return t;
}

/* Forget t (its fds are closed by the caller). */
void tunnel_free(struct rc_core *core, struct tunnel *t)
{
    timer_clear(core, t);
    verify_clear(core, t);
    pipe_put(core, &t->up);
    pipe_put(core, &t->down);
    buf_put(core, t->up.buf);
    buf_put(core, t->down.buf);
    free(t->reader);
    if (t->reply && !t->tracked)
        core->n.held_replies--;
    free(t->reply);
    core->slots[t->id] = NULL;
    if (t->state != T_CLOSER)
        core->n.tunnels--;
    else
        core->n.closers--;
    if (core->nfreed_now == core->capfreed_now) {
        int n = core->capfreed_now ? core->capfreed_now * 2 : 256;
        int *f = realloc(core->freed_now, n * sizeof *f);
        if (!f) {   /* cannot remember the id: leak it rather than reuse it early */
            free(t);
            return;
        }
        core->freed_now = f;
        core->capfreed_now = n;
    }
    core->freed_now[core->nfreed_now++] = t->id;
    free(t);
}

static void release_freed(struct rc_core *core)
{
    for (int i = 0; i < core->nfreed_now; i++)
        core->free_ids[core->nfree++] = core->freed_now[i];
    core->nfreed_now = 0;
}

static struct tunnel *lookup(struct rc_core *core, int id)
{
    if (id < 0 || id >= core->nslots)
        return NULL;
    return core->slots[id];
}

/* -- accept ---------------------------------------------------------------------- */

static void pause_listeners(struct rc_core *core, bool pause)
{
    for (int i = 0; i < core->nlisteners; i++) {
        if (core->listeners[i] < 0)
            continue;
        struct epoll_event ev = {.events = pause ? 0 : EPOLLIN,
                                 .data.u64 = ((uint64_t)i << 2) | EV_LISTENER};
        epoll_ctl(core->ep, EPOLL_CTL_MOD, core->listeners[i], &ev);
    }
    core->paused_until = pause ? now_ns() + ACCEPT_PAUSE_NS : 0;
}

static void on_accept(struct rc_core *core, int lfd)
{
    for (int k = 0; k < ACCEPT_BATCH; k++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                return;
            struct rc_record *r = record(core, RC_ACCEPT_ERROR, NULL);
            r->err = errno;
            pause_listeners(core, true);
            return;
        }
        struct tunnel *t = tunnel_alloc(core);
        if (!t) {
            close(fd);  /* out of memory: the client sees a reset */
            continue;
        }
        t->c.fd = fd;
        t->family = ss.ss_family;
        t->t0 = now_ns();
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                 .data.u64 = ((uint64_t)t->id << 2) | EV_CLIENT};
        epoll_ctl(core->ep, EPOLL_CTL_ADD, fd, &ev);
        tunnel_accepted(core, t, &ss);
    }
}

/* -- the API ---------------------------------------------------------------------- */

RC_API struct rc_core *rc_new(const struct rc_config *cfg, struct rc_record **records)
{
    struct rc_core *core = calloc(1, sizeof *core);
    if (!core)
        return NULL;
    core->cfg = *cfg;
    core->ep = epoll_create1(EPOLL_CLOEXEC);
    core->rec = calloc(MAX_RECORDS, sizeof *core->rec);
    core->pipes = calloc(cfg->pipe_pool ? cfg->pipe_pool : 1, sizeof *core->pipes);
    core->maxbufs = 64;     /* 1 MiB of idle copy buffers at most */
    core->bufs = calloc(core->maxbufs, sizeof *core->bufs);
    if (core->ep < 0 || !core->rec || !core->pipes || !core->bufs) {
        rc_free(core);
        return NULL;
    }
    core->q[Q_HEADER].duration = secs_ns(cfg->header_timeout);
    core->q[Q_CONNECT].duration = secs_ns(cfg->connect_limit);
    core->q[Q_LINGER].duration = secs_ns(cfg->linger_timeout);
    core->q[Q_FLUSH].duration = FLUSH_POLL_NS;
    core->q[Q_SYN_WINDOW].duration = secs_ns(cfg->unverified_syn_window);
    core->q[Q_REPLY].duration = REPLY_HOLD_NS;
    core->q[Q_SPILL].duration = SPILL_HOLD_NS;
    core->q[Q_VERIFY].duration = secs_ns(cfg->header_timeout);
    if (cfg->stall_timeout > 0) {
        double every = cfg->stall_timeout / 4;
        core->stall_every = secs_ns(every < 0.25 ? 0.25 : every);
        core->next_stall = now_ns() + core->stall_every;
    }
    core->success_len = pep_encode_success(core->success, sizeof core->success);
    *records = core->rec;
    return core;
}

RC_API void rc_free(struct rc_core *core)
{
    if (!core)
        return;
    for (int i = 0; i < core->nslots; i++) {
        struct tunnel *t = core->slots[i];
        if (t) {
            if (t->c.fd >= 0)
                close(t->c.fd);
            if (t->s.fd >= 0)
                close(t->s.fd);
            tunnel_free(core, t);
        }
    }
    for (uint32_t i = 0; i < core->npipes; i++) {
        close(core->pipes[i][0]);
        close(core->pipes[i][1]);
    }
    for (uint32_t i = 0; i < core->nbufs; i++)
        free(core->bufs[i]);
    if (core->ep >= 0)
        close(core->ep);
    free(core->bufs);
    free(core->pipes);
    free(core->rec);
    free(core->slots);
    free(core->free_ids);
    free(core->freed_now);
    free(core);
}

RC_API int rc_fd(const struct rc_core *core)
{
    return core->ep;
}

RC_API int rc_add_listener(struct rc_core *core, int fd)
{
    if (core->nlisteners == MAX_LISTENERS)
        return -ENOSPC;
    int i = core->nlisteners++;
    core->listeners[i] = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)i << 2) | EV_LISTENER};
    return epoll_ctl(core->ep, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

/* Stop polling the listeners (Python closes them): the drain. */
RC_API void rc_stop_accepting(struct rc_core *core)
{
    for (int i = 0; i < core->nlisteners; i++) {
        if (core->listeners[i] >= 0)
            epoll_ctl(core->ep, EPOLL_CTL_DEL, core->listeners[i], NULL);
        core->listeners[i] = -1;
    }
    core->paused_until = 0;
}

static void run_timers(struct rc_core *core)
{
    int64_t now = now_ns();
    for (int q = 0; q < NQUEUES; q++) {
        /* Leave room for a full round of events after the timers (and for
         * what rc_connect adds behind them): the rest wait for the next turn. */
        int which = link_of(q);
        while (core->q[q].head && core->q[q].head->tl[which].deadline <= now
               && core->nrec < MAX_RECORDS / 4) {
            struct tunnel *t = core->q[q].head;
            link_clear(core, t, which);
            if (q == Q_VERIFY)
                tunnel_verify_expired(core, t);
            else
                tunnel_timer(core, t);
        }
    }
    if (core->stall_every && now >= core->next_stall) {
        core->next_stall = now + core->stall_every;
        for (int i = 0; i < core->nslots; i++) {
            struct tunnel *t = core->slots[i];
            if (t && t->state == T_OPEN)
                tunnel_stall_check(core, t, now);
        }
    }
    if (core->paused_until && now >= core->paused_until)
        pause_listeners(core, false);
}

static int64_t next_deadline_ns(const struct rc_core *core)
{
    int64_t next = INT64_MAX;
    for (int q = 0; q < NQUEUES; q++)
        if (core->q[q].head && core->q[q].head->tl[link_of(q)].deadline < next)
            next = core->q[q].head->tl[link_of(q)].deadline;
    if (core->stall_every && core->next_stall < next)
        next = core->next_stall;
    if (core->paused_until && core->paused_until < next)
        next = core->paused_until;
    return next;
}

/* One turn: due timers, then what epoll reports within timeout_ms (shortened
 * to the core's next deadline), then the timers that came due meanwhile. */
static int step(struct rc_core *core, int timeout_ms, int *external)
{
    struct epoll_event evs[EVENTS_PER_STEP];
    core->nrec = 0;
    run_timers(core);
    if (core->nrec)
        timeout_ms = 0;
    int64_t next = next_deadline_ns(core);
    if (timeout_ms != 0 && next != INT64_MAX) {
        int64_t ms = (next - now_ns() + 999999) / 1000000;
        if (ms < 0)
            ms = 0;
        if (timeout_ms < 0 || ms < timeout_ms)
            timeout_ms = (int)ms;
    }
    int n = epoll_wait(core->ep, evs, EVENTS_PER_STEP, timeout_ms);
    for (int i = 0; i < n; i++) {
        uint64_t u = evs[i].data.u64;
        int what = (int)(u & 3), id = (int)(u >> 2);
        if (what == EV_LISTENER) {
            if (id < core->nlisteners && core->listeners[id] >= 0)
                on_accept(core, core->listeners[id]);
            continue;
        }
        if (what == EV_EXTERNAL) {
            if (external)
                *external = 1;
            continue;
        }
        struct tunnel *t = lookup(core, id);
        if (t)
            tunnel_event(core, t, what == EV_SERVER, evs[i].events);
    }
    if (timeout_ms != 0)
        run_timers(core);
    release_freed(core);
    return core->nrec;
}

/* Handle what is ready now (events and due timers); returns the records made. */
RC_API int rc_step(struct rc_core *core)
{
    return step(core, 0, NULL);
}

/* As rc_step, but wait up to timeout_ms (-1: no limit but the core's own
 * deadlines) for something to do; *external is set when the external fd
 * is readable (Python then polls its own set). */
RC_API int rc_wait(struct rc_core *core, int timeout_ms, int *external)
{
    *external = 0;
    return step(core, timeout_ms, external);
}

/* Watch fd (Python's epoll set) in the core's wait. */
RC_API int rc_set_external(struct rc_core *core, int fd)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV_EXTERNAL};
    return epoll_ctl(core->ep, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

/* CLOCK_MONOTONIC seconds (time.monotonic()) of the next timer; 0: none. */
RC_API double rc_next_deadline(const struct rc_core *core)
{
    int64_t next = next_deadline_ns(core);
    return next == INT64_MAX ? 0.0 : (double)next / 1e9;
}

/* Records made so far: rc_step()'s, and those rc_connect() added after them. */
RC_API int rc_count(const struct rc_core *core)
{
    return core->nrec;
}

RC_API const struct rc_counters *rc_counters(const struct rc_core *core)
{
    return &core->n;
}

RC_API uint64_t rc_pipe_bytes(const struct rc_core *core)
{
    uint64_t sum = 0;
    for (int i = 0; i < core->nslots; i++)
        if (core->slots[i])
            sum += core->slots[i]->up.held + core->slots[i]->down.held;
    return sum;
}

static struct tunnel *deciding(struct rc_core *core, int id)
{
    struct tunnel *t = lookup(core, id);
    return t && t->state == T_DECIDE ? t : NULL;
}

RC_API int rc_wait_header(struct rc_core *core, int id)
{
    struct tunnel *t = deciding(core, id);
    if (!t)
        return -EINVAL;
    tunnel_wait_header(core, t);
    return 0;
}

/* A tunnel granted less memory than the listener's buffers (budget.py). */
RC_API int rc_client_buffers(struct rc_core *core, int id, int rcvbuf, int sndbuf)
{
    struct tunnel *t = lookup(core, id);
    if (!t)
        return -EINVAL;
    if (rcvbuf > 0)
        setsockopt(t->c.fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (sndbuf > 0)
        setsockopt(t->c.fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    return 0;
}

/* 0, or the errno of a connect that failed at once (Python refuses it). */
RC_API int rc_connect(struct rc_core *core, int id, const struct rc_connect *c)
{
    struct tunnel *t = deciding(core, id);
    if (!t)
        return EINVAL;
    return tunnel_connect(core, t, c);
}

/* 0: sent; 1: held until the client's handshake completes (an RC_REPLIED
 * record, or an RC_ENDED one if it never does).  `code`: the Error code (-1
 * for an Info reply); `tracked`: Python keeps a tunnel for it. */
RC_API int rc_refuse(struct rc_core *core, int id, const uint8_t *reply, size_t len, int code,
                     int tracked)
{
    struct tunnel *t = deciding(core, id);
    if (!t)
        return -EINVAL;
    return tunnel_refuse(core, t, reply, len, code, tracked != 0);
}

/* The client proved its address another way (an address cookie, cookies.py). */
RC_API int rc_verified(struct rc_core *core, int id)
{
    struct tunnel *t = lookup(core, id);
    if (!t)
        return -EINVAL;
    if (t->unverified)
        tunnel_verified(core, t);
    return 0;
}

/* Reset every tunnel (not the lingering Error replies): the drain's end. */
RC_API int rc_abort_all(struct rc_core *core, const char *why)
{
    core->nrec = 0;
    for (int i = 0; i < core->nslots && core->nrec < MAX_RECORDS; i++) {
        struct tunnel *t = core->slots[i];
        if (t && t->state != T_CLOSER && (t->tracked || !t->reply))
            tunnel_abort(core, t, why);
    }
    release_freed(core);
    return core->nrec;
}
