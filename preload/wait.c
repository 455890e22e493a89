/* The wait hooks: poll, ppoll, select, pselect, epoll_wait, epoll_pwait,
 * epoll_pwait2, and glibc's fortified __poll_chk/__ppoll_chk.
 *
 * One rule for all of them (sliced_wait): libpep may have work to do
 * while the program sleeps (a Convert header that missed its SYN goes out
 * once the handshake is done; a reply past PEP_REPLY_TIMEOUT fails the
 * connection; see docs/preload.md). Before the wait, libpep does its work
 * (pep_wait_work). While it has more to come, the wait runs in slices no
 * longer than the time to it (10 ms while a header is pending; the nearest
 * reply deadline otherwise),
 * doing the work in between; the first slice that reports anything (events,
 * an error, EINTR) ends the wait; the program's timeout is kept on
 * CLOCK_MONOTONIC across slices. Once there is nothing more to come, the rest
 * of the wait is one real call. With nothing to do, the hook is the real
 * call with the program's own arguments (one relaxed load more).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "config.h"
#include "conn.h"
#include "fdstate.h"
#include "real.h"

#define ALL_HIDDEN (-2) /* every event was libpep's to hide: the wait goes on */

/* One real wait: at most ns nanoseconds (-1: no limit), or AS_ASKED: the
 * program's own timeout argument, untouched. */
#define AS_ASKED (-2LL)
typedef int (*wait_once_fn)(void *call, long long ns);

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* timeout_ns: the program's timeout (-1: none); AS_ASKED when it cannot be
 * read (an invalid value: the real call says so). */
static int sliced_wait(wait_once_fn once, void *call, long long timeout_ns)
{
    long long slice = pep_wait_work();
    if (PEP_LIKELY(slice < 0) || timeout_ns == 0 || timeout_ns == AS_ASKED)
        return once(call, AS_ASKED);
    long long deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
    long long left = timeout_ns;
    while (slice >= 0 && left != 0) {
        int r = once(call, left < 0 || left > slice ? slice : left);
        if (r != 0)
            return r;
        slice = pep_wait_work();
        if (deadline >= 0) {
            left = deadline - now_ns();
            if (left < 0)
                left = 0;
        }
    }
    return once(call, left);
}

static long long ms_to_ns(int ms)
{
    return ms < 0 ? -1 : ms * 1000000LL;
}

static int ns_to_ms(long long ns)
{
    if (ns < 0)
        return -1;
    long long ms = (ns + 999999) / 1000000; /* rounded up: never cut to 0 */
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static long long ts_to_ns(const struct timespec *ts)
{
    if (!ts)
        return -1;
    if (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000L ||
        ts->tv_sec > LLONG_MAX / 1000000000LL - 1)
        return AS_ASKED;
    return ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static struct timespec ns_to_ts(long long ns)
{
    struct timespec t = {ns / 1000000000LL, ns % 1000000000LL};
    return t;
}

/* ---- poll, ppoll ---------------------------------------------------------- */

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
    int hidden = 0;
    if (r <= 0 || !__atomic_load_n(&pep_nmapped, __ATOMIC_RELAXED))
        return r;
    int saved = errno;
    for (i = 0; i < n; i++) {
        if (!(fds[i].revents & (POLLERR | POLLHUP)) || !pep_fd_busy(fds[i].fd))
            continue;
        /* An attempt whose PEP refused: the next PEP is on its way, the
         * program keeps waiting (unless nothing is left: it sees the error). */
        int err = 0, a = pep_attempt_poll(fds[i].fd, &err);
        if (a == 1) {
            fds[i].revents = 0;
            hidden++;
            continue;
        }
        if (a)
            continue;
        /* Nothing received (a PEP that refused or never answered the SYN):
         * no Error TLV to find, and settle()'s recv would consume the
         * socket's pending ECONNREFUSED/ETIMEDOUT, so SO_ERROR would then say
         * 0 and the program would write into a dead socket (curl: "Send
         * failure: Protocol error" instead of "Couldn't connect").
         * tests/test_reliability_client_faults.py */
        int avail = 0;
        if (!pep_failed_by_reply(fds[i].fd) &&
            (ioctl(fds[i].fd, FIONREAD, &avail) < 0 || avail <= 0))
            continue;
        if (pep_failed_by_pep(fds[i].fd))
            fds[i].revents = (short)(fds[i].events & (POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM));
    }
    errno = saved;
    return r - hidden > 0 ? r - hidden : ALL_HIDDEN;
}

struct poll_call {
    struct pollfd *fds;
    nfds_t n;
    int timeout;                /* poll */
    const struct timespec *ts;  /* ppoll */
    const sigset_t *mask;
};

static int poll_once(void *call, long long ns)
{
    struct poll_call *p = call;
    return pep_real.poll(p->fds, p->n, ns == AS_ASKED ? p->timeout : ns_to_ms(ns));
}

static int ppoll_once(void *call, long long ns)
{
    struct poll_call *p = call;
    if (ns == AS_ASKED)
        return pep_real.ppoll(p->fds, p->n, p->ts, p->mask);
    struct timespec t = ns_to_ts(ns);
    return pep_real.ppoll(p->fds, p->n, ns < 0 ? NULL : &t, p->mask);
}

/*
 * PEP_CONFIRM: a connect waiting for the PEP's verdict is not done, so poll
 * must not say POLLOUT for it. For the wait, such an fd asks for POLLIN
 * instead (the reply's arrival); after it, its verdict decides what the
 * program sees: still pending, nothing; yes, POLLOUT (as asked); no,
 * POLLERR (SO_ERROR then says why). swapped[] holds the indices.
 */
struct confirm_swap {
    nfds_t *idx;
    short *events;
    nfds_t n;
    nfds_t local_idx[16];
    short local_events[16];
};

static void confirm_before(struct pollfd *fds, nfds_t n, struct confirm_swap *sw)
{
    nfds_t i, cap = 16;
    sw->n = 0;
    sw->idx = sw->local_idx;
    sw->events = sw->local_events;
    if (PEP_LIKELY(!__atomic_load_n(&pep_nconfirm, __ATOMIC_RELAXED)))
        return;
    for (i = 0; i < n; i++) {
        if (!(fds[i].events & (POLLOUT | POLLWRNORM)) || !pep_fd_busy(fds[i].fd))
            continue;
        int err;
        if (pep_confirm_poll(fds[i].fd, &err) != PEP_VERDICT_PENDING)
            continue;
        if (sw->n == cap) { /* more than 16: grow (never a cap) */
            nfds_t *ni = malloc(2 * cap * sizeof *ni);
            short *ne = malloc(2 * cap * sizeof *ne);
            if (!ni || !ne) {
                free(ni);
                free(ne);
                break;
            }
            memcpy(ni, sw->idx, cap * sizeof *ni);
            memcpy(ne, sw->events, cap * sizeof *ne);
            if (sw->idx != sw->local_idx) {
                free(sw->idx);
                free(sw->events);
            }
            sw->idx = ni;
            sw->events = ne;
            cap *= 2;
        }
        sw->idx[sw->n] = i;
        sw->events[sw->n++] = fds[i].events;
        fds[i].events = (short)((fds[i].events & ~(POLLOUT | POLLWRNORM)) | POLLIN);
    }
}

/* r: what the wait returned. The new count, or ALL_HIDDEN. */
static int confirm_after(struct pollfd *fds, struct confirm_swap *sw, int r)
{
    nfds_t k;
    int changed = 0;
    for (k = 0; k < sw->n; k++) {
        struct pollfd *p = &fds[sw->idx[k]];
        short asked = sw->events[k], was = p->revents;
        p->events = asked;
        if (r <= 0)
            continue;
        int err = 0, avail = 0;
        switch (pep_confirm_poll(p->fd, &err)) {
        case PEP_VERDICT_PENDING:
            p->revents = 0;
            break;
        case PEP_VERDICT_FAILED:
            p->revents = (short)(POLLERR | (asked & (POLLOUT | POLLWRNORM)));
            break;
        default: /* yes: writable; readable only if data follows the reply */
            p->revents = (short)(asked & (POLLOUT | POLLWRNORM));
            if ((asked & POLLIN) && ioctl(p->fd, FIONREAD, &avail) == 0 && avail > 0)
                p->revents |= POLLIN;
            break;
        }
        if (!!was != !!p->revents)
            changed += p->revents ? 1 : -1;
    }
    if (sw->idx != sw->local_idx) {
        free(sw->idx);
        free(sw->events);
    }
    if (r <= 0 || !changed)
        return r;
    return r + changed > 0 ? r + changed : ALL_HIDDEN;
}

/*
 * PEP_SYN_WRITE: a socket whose SYN waits for the program's first write
 * (PEP_ST_DEFERRED) polls writable at once. poll and select see what the
 * program waits for: waited on without write interest (a server that
 * speaks first: SSH, SMTP), its header goes now, the SYN with it; with
 * write interest it stays deferred (the wait returns at once, the program
 * writes).
 */
static void syn_before_poll(const struct pollfd *fds, nfds_t n)
{
    nfds_t i;
    for (i = 0; i < n && pep_syn_pending(); i++) {
        if (!(fds[i].events & (POLLOUT | POLLWRNORM)) && pep_fd_deferred(fds[i].fd))
            pep_syn_flush(fds[i].fd);
    }
}

static void syn_before_select(int n, fd_set *w)
{
    struct pep_conn *c;
    for (c = pep_conn_next(NULL); c && pep_syn_pending(); c = pep_conn_next(c)) {
        int fd = __atomic_load_n(&c->fd, __ATOMIC_RELAXED);
        if (fd < 0 || fd >= n || __atomic_load_n(&c->state, __ATOMIC_ACQUIRE) != PEP_ST_DEFERRED)
            continue;
        if (!w || fd >= FD_SETSIZE || !FD_ISSET(fd, w))
            pep_syn_flush(fd);
    }
}

/* A poll whose events after_poll hid (an attempt moved to the next PEP, a
 * verdict still pending) waits again for the time left. */
static int hooked_poll(struct pollfd *fds, nfds_t n, int timeout)
{
    if (PEP_UNLIKELY(pep_syn_pending()))
        syn_before_poll(fds, n);
    int ours = __atomic_load_n(&pep_nmapped, __ATOMIC_RELAXED) != 0;
    long long start = timeout > 0 && ours ? now_ns() : 0;
    for (;;) {
        struct poll_call p = {fds, n, timeout, NULL, NULL};
        struct confirm_swap sw;
        confirm_before(fds, n, &sw);
        int r = sliced_wait(poll_once, &p, ms_to_ns(timeout));
        r = after_poll(fds, n, confirm_after(fds, &sw, r));
        if (r != ALL_HIDDEN)
            return r;
        if (timeout > 0 && start) {
            long long left = timeout - (now_ns() - start) / 1000000;
            if (left <= 0)
                return 0;
            timeout = (int)left;
            start = now_ns();
        } else if (timeout == 0) {
            return 0;
        }
    }
}

static int hooked_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts,
                        const sigset_t *mask)
{
    if (PEP_UNLIKELY(pep_syn_pending()))
        syn_before_poll(fds, n);
    long long timeout = ts_to_ns(ts);
    int ours = __atomic_load_n(&pep_nmapped, __ATOMIC_RELAXED) != 0;
    long long deadline = timeout > 0 && ours ? now_ns() + timeout : 0;
    for (;;) {
        struct timespec t;
        const struct timespec *tp = ts;
        if (deadline) {
            long long left = deadline - now_ns();
            if (left <= 0)
                left = 0;
            t = ns_to_ts(left);
            tp = &t;
        }
        struct poll_call p = {fds, n, 0, tp, mask};
        struct confirm_swap sw;
        confirm_before(fds, n, &sw);
        int r = sliced_wait(ppoll_once, &p, ts_to_ns(tp));
        r = after_poll(fds, n, confirm_after(fds, &sw, r));
        if (r != ALL_HIDDEN)
            return r;
        if (timeout == 0 || (deadline && now_ns() >= deadline))
            return 0;
    }
}

PEP_EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    PEP_INIT();
    return hooked_poll(fds, n, timeout);
}

PEP_EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts,
                     const sigset_t *mask)
{
    PEP_INIT();
    return hooked_ppoll(fds, n, ts, mask);
}

/* _FORTIFY_SOURCE's poll/ppoll: glibc's check, then the same wait as
 * poll/ppoll. A failed check goes to glibc's own symbol, which aborts. */
PEP_EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
    PEP_INIT();
    if (fdslen / sizeof *fds < n)
        return pep_real.poll_chk(fds, n, timeout, fdslen);
    return hooked_poll(fds, n, timeout);
}

PEP_EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts,
                           const sigset_t *mask, size_t fdslen)
{
    PEP_INIT();
    if (fdslen / sizeof *fds < n)
        return pep_real.ppoll_chk(fds, n, ts, mask, fdslen);
    return hooked_ppoll(fds, n, ts, mask);
}

/* ---- select, pselect ------------------------------------------------------ */

/* select() rewrites its sets: each slice starts from the program's. Sets
 * larger than FD_SETSIZE (a program's own allocation) are not sliced. */
struct select_call {
    int n;
    fd_set *sets[3], saved[3];
    struct timeval *tv;         /* select */
    const struct timespec *ts;  /* pselect */
    const sigset_t *mask;
    int sliced;                 /* the sets were saved */
    long long start;            /* CLOCK_MONOTONIC at the first slice */
};

static void select_restore(struct select_call *s)
{
    int i;
    for (i = 0; i < 3; i++) {
        if (s->sets[i])
            memcpy(s->sets[i], &s->saved[i], sizeof(fd_set));
    }
}

static void select_save(struct select_call *s)
{
    int i;
    for (i = 0; i < 3; i++) {
        if (s->sets[i])
            memcpy(&s->saved[i], s->sets[i], sizeof(fd_set));
    }
}

static int select_once(void *call, long long ns)
{
    struct select_call *s = call;
    if (ns == AS_ASKED) {
        if (s->sliced)
            select_restore(s);
        return s->ts || s->mask ? pep_real.pselect(s->n, s->sets[0], s->sets[1], s->sets[2],
                                                   s->ts, s->mask)
                                : pep_real.select(s->n, s->sets[0], s->sets[1], s->sets[2], s->tv);
    }
    if (s->sliced) {
        select_restore(s);
    } else {
        select_save(s);
        s->start = now_ns();
        s->sliced = 1;
    }
    struct timespec t = ns_to_ts(ns < 0 ? 0 : ns);
    return pep_real.pselect(s->n, s->sets[0], s->sets[1], s->sets[2], ns < 0 ? NULL : &t,
                            s->mask);
}

static long long tv_to_ns(const struct timeval *tv)
{
    if (!tv)
        return -1;
    if (tv->tv_sec < 0 || tv->tv_usec < 0 || tv->tv_usec >= 1000000 ||
        tv->tv_sec > LLONG_MAX / 1000000000LL - 1)
        return AS_ASKED;
    return tv->tv_sec * 1000000000LL + tv->tv_usec * 1000LL;
}

/* PEP_CONFIRM under select: as under poll, a connect waiting for its
 * verdict waits in the read set instead of the write set; after the wait,
 * the verdict decides (pending: in no set; yes: writable; no: writable, and
 * SO_ERROR says why, as for any failed connect). */
struct select_swap {
    fd_set swapped, asked_read, local_read;
    int any;
};

static fd_set *select_confirm_before(int n, fd_set *r, fd_set *w, struct select_swap *sw)
{
    int fd;
    sw->any = 0;
    if (PEP_LIKELY(!__atomic_load_n(&pep_nconfirm, __ATOMIC_RELAXED)) || !w || n > FD_SETSIZE)
        return r;
    FD_ZERO(&sw->swapped);
    FD_ZERO(&sw->asked_read);
    for (fd = 0; fd < n; fd++) {
        int err;
        if (!FD_ISSET(fd, w) || !pep_fd_busy(fd) ||
            pep_confirm_poll(fd, &err) != PEP_VERDICT_PENDING)
            continue;
        if (!r) {
            FD_ZERO(&sw->local_read);
            r = &sw->local_read;
        }
        if (FD_ISSET(fd, r))
            FD_SET(fd, &sw->asked_read);
        FD_SET(fd, &sw->swapped);
        FD_CLR(fd, w);
        FD_SET(fd, r);
        sw->any = 1;
    }
    return r;
}

static int select_confirm_after(int n, fd_set *r, fd_set *w, fd_set *e, struct select_swap *sw,
                                int rc)
{
    int fd, count = 0;
    if (!sw->any)
        return rc;
    for (fd = 0; fd < n; fd++) {
        if (!FD_ISSET(fd, &sw->swapped))
            continue;
        int err = 0, avail = 0, asked = FD_ISSET(fd, &sw->asked_read);
        int v = rc > 0 ? pep_confirm_poll(fd, &err) : PEP_VERDICT_PENDING;
        if (v == PEP_VERDICT_PENDING) {
            if (!asked)
                FD_CLR(fd, r);
            FD_CLR(fd, w);
            continue;
        }
        FD_SET(fd, w);
        if (!(asked && ioctl(fd, FIONREAD, &avail) == 0 && avail > 0))
            FD_CLR(fd, r);
    }
    if (rc <= 0)
        return rc;
    for (fd = 0; fd < n; fd++)
        count += (r && FD_ISSET(fd, r)) + FD_ISSET(fd, w) + (e && FD_ISSET(fd, e));
    return count ? count : ALL_HIDDEN;
}

PEP_EXPORT int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
    PEP_INIT();
    if (PEP_UNLIKELY(pep_syn_pending()))
        syn_before_select(n, w);
    for (;;) {
        struct select_swap sw;
        fd_set *rr = select_confirm_before(n, r, w, &sw);
        struct select_call s = {n, {rr, w, e}, {{{0}}}, tv, NULL, NULL, 0, 0};
        long long timeout = n > FD_SETSIZE ? AS_ASKED : tv_to_ns(tv);
        int rc = sliced_wait(select_once, &s, timeout);
        if (s.sliced && tv) { /* Linux's select says how much time was left */
            long long left = timeout - (now_ns() - s.start);
            if (left < 0)
                left = 0;
            tv->tv_sec = left / 1000000000LL;
            tv->tv_usec = (left % 1000000000LL) / 1000;
        }
        rc = select_confirm_after(n, rr, w, e, &sw, rc);
        if (rc != ALL_HIDDEN)
            return rc;
        if (tv && !tv->tv_sec && !tv->tv_usec)
            return 0; /* (a select that was not sliced waits its full time again) */
    }
}

PEP_EXPORT int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts,
                       const sigset_t *mask)
{
    PEP_INIT();
    if (PEP_UNLIKELY(pep_syn_pending()))
        syn_before_select(n, w);
    long long timeout = n > FD_SETSIZE ? AS_ASKED : ts_to_ns(ts);
    long long deadline = timeout > 0 && __atomic_load_n(&pep_nconfirm, __ATOMIC_RELAXED)
                             ? now_ns() + timeout : 0;
    struct timespec left_ts;
    for (;;) {
        struct select_swap sw;
        fd_set *rr = select_confirm_before(n, r, w, &sw);
        struct select_call s = {n, {rr, w, e}, {{{0}}}, NULL, ts, mask, 0, 0};
        /* pselect with no timeout and no mask is select with no timeout: the
         * same call either way. */
        int rc = sliced_wait(select_once, &s, timeout);
        rc = select_confirm_after(n, rr, w, e, &sw, rc);
        if (rc != ALL_HIDDEN)
            return rc;
        if (timeout == 0 || (timeout > 0 && !deadline))
            return 0;
        if (deadline) { /* the time left, not the whole timeout again */
            timeout = deadline - now_ns();
            if (timeout <= 0)
                return 0;
            left_ts = ns_to_ts(timeout);
            ts = &left_ts;
        }
    }
}

/* ---- epoll ---------------------------------------------------------------- */

struct epoll_call {
    int epfd;
    struct epoll_event *ev;
    int max;
    int timeout;                /* epoll_wait, epoll_pwait */
    const struct timespec *ts;  /* epoll_pwait2 */
    const sigset_t *mask;
    int kind;                   /* 0 epoll_wait, 1 epoll_pwait, 2 epoll_pwait2 */
    struct timespec ts_left;    /* epoll_pwait2 waiting again: the time left */
};

static int epoll_once(void *call, long long ns)
{
    struct epoll_call *c = call;
    if (c->kind == 2) {
        struct timespec t = ns_to_ts(ns < 0 ? 0 : ns);
        const struct timespec *tp = ns == AS_ASKED ? c->ts : ns < 0 ? NULL : &t;
        return pep_real.epoll_pwait2(c->epfd, c->ev, c->max, tp, c->mask);
    }
    int ms = ns == AS_ASKED ? c->timeout : ns_to_ms(ns);
    if (c->kind == 1)
        return pep_real.epoll_pwait(c->epfd, c->ev, c->max, ms, c->mask);
    return pep_real.epoll_wait(c->epfd, c->ev, c->max, ms);
}

/*
 * PEP_CONFIRM under epoll. epoll's events carry the program's data, not the
 * fd, so libpep follows the program's epoll_ctl() on its connections: while
 * a verdict is pending, a registration that asks for EPOLLOUT is made with
 * EPOLLIN instead (the reply's arrival); when the verdict is in, the
 * program's own registration comes back and the event says what poll would
 * (yes: EPOLLOUT; no: EPOLLERR, SO_ERROR says why). A registration made
 * before connect() is not followed.
 */
static void ep_set_swapped(struct pep_conn *c, int on)
{
    if (c->ep_swapped == on)
        return;
    c->ep_swapped = on;
    if (on)
        __atomic_add_fetch(&pep_nepswapped, 1, __ATOMIC_RELAXED);
    else
        __atomic_sub_fetch(&pep_nepswapped, 1, __ATOMIC_RELAXED);
}

/*
 * Registrations made before connect() (nginx adds its upstream sockets to
 * epoll first): with PEP_CONFIRM configured, libpep remembers every
 * program's registration of an fd it does not track yet, in a table like
 * the fd table (chunks of 4096 fds, allocated on first use, never freed,
 * no lock: a race between two threads registering one fd is the program's).
 */
struct epreg {
    int epfd;                   /* -1 or 0 (never set): none */
    int set;
    uint32_t events;
    uint64_t data;
};
static struct epreg *epreg_chunks[PEP_FD_CHUNKS];

static struct epreg *epreg_slot(int fd, int create)
{
    if ((unsigned)fd >= PEP_FD_LIMIT)
        return NULL;
    unsigned ci = (unsigned)fd >> PEP_FD_CHUNK_BITS;
    struct epreg *chunk = __atomic_load_n(&epreg_chunks[ci], __ATOMIC_ACQUIRE);
    if (!chunk && create) {
        struct epreg *fresh = calloc(PEP_FD_CHUNK, sizeof *fresh);
        if (!fresh)
            return NULL;
        if (__atomic_compare_exchange_n(&epreg_chunks[ci], &chunk, fresh, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            chunk = fresh;
        else
            free(fresh); /* another thread's won; chunk holds it */
    }
    return chunk ? &chunk[(unsigned)fd & (PEP_FD_CHUNK - 1)] : NULL;
}

static void epreg_note(int epfd, int op, int fd, const struct epoll_event *ev)
{
    struct epreg *r = epreg_slot(fd, op != EPOLL_CTL_DEL);
    if (!r)
        return;
    if (op == EPOLL_CTL_DEL || !ev) {
        r->set = 0;
        return;
    }
    r->epfd = epfd;
    r->events = ev->events;
    r->data = ev->data.u64;
    r->set = 1;
}

void pep_epreg_forget(int fd)
{
    if (!pep_cfg.confirm_configured)
        return;
    struct epreg *r = epreg_slot(fd, 0);
    if (r)
        r->set = 0;
}

void pep_confirm_adopt_epoll(int fd, struct pep_conn *c)
{
    struct epreg *r = pep_cfg.confirm_configured ? epreg_slot(fd, 0) : NULL;
    if (!r || !r->set || !c->confirm)
        return;
    r->set = 0;
    c->ep_fd = r->epfd;
    c->ep_events = r->events;
    c->ep_data = r->data;
    if (pep_confirm_pending(c) && (r->events & EPOLLOUT)) {
        struct epoll_event mine = {(r->events & ~(uint32_t)EPOLLOUT) | EPOLLIN, {.u64 = r->data}};
        if (pep_real.epoll_ctl(r->epfd, EPOLL_CTL_MOD, fd, &mine) == 0)
            ep_set_swapped(c, 1);
    }
}

PEP_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    PEP_INIT();
    /* Registrations are followed for PEP_CONFIRM only (no connection has
     * c->confirm without it): otherwise the real call, no lock. */
    if (PEP_LIKELY(!pep_cfg.confirm_configured))
        return pep_real.epoll_ctl(epfd, op, fd, ev);
    if (PEP_LIKELY(!pep_fd_tracked(fd))) {
        int r = pep_real.epoll_ctl(epfd, op, fd, ev);
        if (PEP_UNLIKELY(pep_cfg.confirm_configured) && r == 0)
            epreg_note(epfd, op, fd, ev);
        return r;
    }
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    struct epoll_event mine;
    struct epoll_event *use = ev;
    if (c && op == EPOLL_CTL_DEL && c->ep_fd == epfd) {
        c->ep_fd = -1;
        ep_set_swapped(c, 0);
    } else if (c && (op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && ev) {
        c->ep_fd = epfd;
        c->ep_events = ev->events;
        c->ep_data = ev->data.u64;
        int swap = pep_confirm_pending(c) && (ev->events & EPOLLOUT);
        ep_set_swapped(c, swap);
        if (swap) {
            mine = *ev;
            mine.events = (ev->events & ~(uint32_t)EPOLLOUT) | EPOLLIN;
            use = &mine;
        }
    }
    int r = pep_real.epoll_ctl(epfd, op, fd, use); /* never blocks: under the lock */
    pep_unlock();
    return r;
}

/* The connection an event of epfd is for, if it is swapped; its fd or -1. */
static int swapped_fd(int epfd, uint64_t data)
{
    struct pep_conn *c;
    for (c = pep_conn_next(NULL); c; c = pep_conn_next(c)) {
        if (__atomic_load_n(&c->ep_swapped, __ATOMIC_RELAXED) && c->ep_fd == epfd &&
            c->ep_data == data)
            return __atomic_load_n(&c->fd, __ATOMIC_RELAXED);
    }
    return -1;
}

/* r events in ev from epfd: PEP_CONFIRM's view of them. The new count, or
 * ALL_HIDDEN. */
static int epoll_confirm_after(int epfd, struct epoll_event *ev, int r)
{
    int i, out = 0;
    if (r <= 0 || PEP_LIKELY(!__atomic_load_n(&pep_nepswapped, __ATOMIC_RELAXED)))
        return r;
    int saved = errno;
    for (i = 0; i < r; i++) {
        int fd = swapped_fd(epfd, ev[i].data.u64), err = 0, avail = 0;
        if (fd < 0) {
            ev[out++] = ev[i];
            continue;
        }
        int v = pep_confirm_poll(fd, &err);
        if (v == PEP_VERDICT_PENDING)
            continue; /* the connect is not done: nothing to say */
        pep_lock();
        struct pep_conn *c = pep_conn_get(fd);
        uint32_t asked = c ? c->ep_events : EPOLLOUT;
        if (c && c->ep_swapped && c->ep_fd == epfd) {
            struct epoll_event back = {c->ep_events, {.u64 = c->ep_data}};
            pep_real.epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &back);
            ep_set_swapped(c, 0);
        }
        pep_unlock();
        if (v == PEP_VERDICT_FAILED) {
            ev[i].events = EPOLLERR | EPOLLHUP | (asked & EPOLLOUT);
        } else {
            ev[i].events = asked & EPOLLOUT;
            if ((asked & EPOLLIN) && ioctl(fd, FIONREAD, &avail) == 0 && avail > 0)
                ev[i].events |= EPOLLIN;
        }
        if (ev[i].events)
            ev[out++] = ev[i];
    }
    errno = saved;
    return out ? out : ALL_HIDDEN;
}

static void epoll_time_left(struct epoll_call *c, long long timeout)
{
    c->timeout = ns_to_ms(timeout);
    c->ts_left = ns_to_ts(timeout < 0 ? 0 : timeout);
    c->ts = timeout < 0 ? NULL : &c->ts_left;
}

/*
 * PEP_SYN_WRITE under epoll, which does not say what the program waits
 * for (libpep follows registrations only for PEP_CONFIRM): a deferred
 * socket stays deferred through PEP_SYN_WAITS waits of the thread that
 * connected it that may block (wrk: told writable at one, writes at the
 * next; a timeout of 0 does not count); at the next one its header goes.
 * While one is deferred, a wait that would block runs in slices of
 * PEP_SYN_WAIT_CAP_NS; a slice that ends with nothing sends the calling
 * thread's headers (a server-speaks-first program waits that long more).
 * Any deferred socket goes after PEP_SYN_STALE_NS.
 * Returns the wait's result, or ALL_HIDDEN: go on with the time left in c.
 */
static int syn_epoll(struct epoll_call *c, long long *timeout)
{
    if (!pep_syn_flush_waited(0, *timeout != 0) || *timeout == 0 ||
        (*timeout > 0 && *timeout <= PEP_SYN_WAIT_CAP_NS))
        return ALL_HIDDEN;
    long long deadline = *timeout < 0 ? -1 : now_ns() + *timeout;
    for (;;) {
        long long slice = PEP_SYN_WAIT_CAP_NS;
        if (deadline >= 0 && deadline - now_ns() < slice)
            slice = deadline - now_ns();
        if (slice <= 0)
            return 0;
        int r = epoll_confirm_after(c->epfd, c->ev, epoll_once(c, slice));
        if (r != 0 && r != ALL_HIDDEN)
            return r;
        int left = pep_syn_flush_waited(1, 1);
        if (deadline >= 0) {
            *timeout = deadline - now_ns();
            if (*timeout <= 0)
                return 0;
            epoll_time_left(c, *timeout);
        }
        if (!left)
            return ALL_HIDDEN;
    }
}

/* epoll_wait/epoll_pwait/epoll_pwait2 through the sliced wait; events
 * PEP_CONFIRM hides make it wait again for the time left. */
static int hooked_epoll(struct epoll_call *c, long long timeout)
{
    if (PEP_UNLIKELY(pep_syn_pending()) && timeout != AS_ASKED) {
        int r = syn_epoll(c, &timeout);
        if (r != ALL_HIDDEN)
            return r;
    }
    long long deadline = timeout > 0 && __atomic_load_n(&pep_nepswapped, __ATOMIC_RELAXED)
                             ? now_ns() + timeout : 0;
    for (;;) {
        int r = epoll_confirm_after(c->epfd, c->ev, sliced_wait(epoll_once, c, timeout));
        if (r != ALL_HIDDEN)
            return r;
        if (timeout == 0)
            return 0;
        if (timeout > 0) {
            if (!deadline)
                return 0;
            timeout = deadline - now_ns();
            if (timeout <= 0)
                return 0;
            epoll_time_left(c, timeout);
        }
    }
}

PEP_EXPORT int epoll_wait(int epfd, struct epoll_event *ev, int max, int timeout)
{
    PEP_INIT();
    struct epoll_call c = {epfd, ev, max, timeout, NULL, NULL, 0, {0, 0}};
    return hooked_epoll(&c, ms_to_ns(timeout));
}

PEP_EXPORT int epoll_pwait(int epfd, struct epoll_event *ev, int max, int timeout,
                           const sigset_t *mask)
{
    PEP_INIT();
    struct epoll_call c = {epfd, ev, max, timeout, NULL, mask, 1, {0, 0}};
    return hooked_epoll(&c, ms_to_ns(timeout));
}

PEP_EXPORT int epoll_pwait2(int epfd, struct epoll_event *ev, int max,
                            const struct timespec *ts, const sigset_t *mask)
{
    PEP_INIT();
    if (!pep_real.epoll_pwait2) {
        errno = ENOSYS;
        return -1;
    }
    struct epoll_call c = {epfd, ev, max, 0, ts, mask, 2, {0, 0}};
    return hooked_epoll(&c, ts_to_ns(ts));
}
