/* Per-fd state of the connections libpep put on the PEP.
 *
 * No fixed cap: a two-level table fd -> connection grows with the process's
 * fds (chunks of 4096 fds, allocated on first use, never freed; any fd below
 * 2^30, far past RLIMIT_NOFILE's usual ceiling of fs.nr_open). Connections are
 * allocated as needed and recycled, never freed, so a lock-free reader never
 * touches freed memory. dup'ed fds share a connection (refs). The fast path
 * of every hook is two dependent relaxed loads. Slow paths hold pep_lock,
 * never across a blocking call. Fork: pthread_atfork keeps the lock
 * consistent; the child gets a copy of the table (its fds are copies of the
 * parent's).
 */
#ifndef PEP_FDSTATE_H
#define PEP_FDSTATE_H

#include <netinet/in.h>
#include <stdint.h>
#include <sys/types.h>

#include "tlv.h"

#define PEP_HDR_CAP 128             /* Connect TLV 24 bytes + a Cookie TLV of up to 64 */
#define PEP_REPLAY_MAX (64 * 1024)  /* bytes kept for a replay on the next PEP */
#define PEP_REPLAY_MIN 1024         /* the replay buffer's first size (it doubles) */
#define PEP_FD_CHUNK_BITS 12
#define PEP_FD_CHUNK (1u << PEP_FD_CHUNK_BITS)
#define PEP_FD_CHUNKS (1u << 18)
#define PEP_FD_LIMIT (PEP_FD_CHUNKS * PEP_FD_CHUNK) /* 2^30 */

enum pep_state {
    PEP_ST_FREE = 0,
    PEP_ST_CONNECTING, /* connect()/sendmsg(MSG_FASTOPEN) in flight: hands off */
    PEP_ST_SENDING,   /* connected or connecting, Convert header not all sent */
    PEP_ST_AWAIT,     /* header sent, the PEP's reply not all read */
    PEP_ST_OPEN,      /* reply stripped: plain pass-through */
    PEP_ST_FAILED,    /* Error TLV or bad reply: every read/write fails with err */
    PEP_ST_DEFERRED,  /* TCP_FASTOPEN_CONNECT: neither the SYN nor the header sent; the
                       * program's first write takes both (conn.c, pep_syn_write) */
};

struct pep_conn {
    int state;                  /* atomic loads outside pep_lock */
    int fd;                     /* one of its fds (-1 once all are closed) */
    int refs;
    int err;
    int lowat;                  /* the program's SO_RCVLOWAT, restored after the reply */
    dev_t dev;
    ino_t ino;
    struct sockaddr_in6 dest;   /* or a sockaddr_in */
    socklen_t destlen;
    struct sockaddr_in6 pep;    /* where the socket went (for a repeated connect) */
    socklen_t peplen;
    uint16_t hdr_len;
    uint8_t hdr[PEP_HDR_CAP];   /* the Convert message: Connect TLV (+ Cookie TLV) */
    /* What goes first on the stream of this attempt: hdr, then replay[0, pre_len - hdr_len) */
    size_t pre_len, pre_sent;
    struct pep_reader rd;
    long long reply_deadline;   /* CLOCK_MONOTONIC ns; 0: handshake not seen done yet */
    /* The attempt (connect.c) */
    int family, v6only;
    unsigned peer;              /* index in PEP_PROXY of the PEP in use */
    unsigned tried;             /* bitmask of the PEPs tried for this connection */
    int direct;                 /* fell back to the destination: no header, no reply */
    int nocookie;               /* TCP_FASTOPEN_NO_COOKIE on this attempt */
    int nocookie_set;           /* the value the socket has: 0, 1; -1 unknown (conn.c) */
    int cookie_retried;         /* reconnected once already for an Error 3 */
    int failed_connecting;      /* FAILED before connect() completed: SO_ERROR says err */
    int defer;                  /* connect(): this attempt may wait for the first write */
    int fo_connect;             /* TCP_FASTOPEN_CONNECT is set on the socket */
    int defer_waits;            /* DEFERRED: epoll waits of its thread seen (conn.c) */
    unsigned long defer_thread; /* DEFERRED: pthread_self() of the connect */
    long long defer_since;      /* DEFERRED: CLOCK_MONOTONIC ns of the connect */
    /* PEP_CONFIRM: connect() completes on the PEP's verdict */
    int confirm;
    int ep_fd;                  /* the program's epoll registration of this fd (-1: none) */
    uint32_t ep_events;
    uint64_t ep_data;
    int ep_swapped;             /* registered with EPOLLIN instead of EPOLLOUT for now */
    long long hs_deadline;      /* CLOCK_MONOTONIC ns; 0: handshake done (or not ours) */
    long long next_probe;       /* the waits ask the kernel (TCP_INFO) about this attempt
                                 * again no sooner than this (CLOCK_MONOTONIC ns; 0: at the
                                 * next wait), unless a deadline has come (conn.c, tick) */
    /* The program's bytes written before the reply, for the next attempt
     * (at most PEP_REPLAY_MAX; past it, replay_lost and no more attempts) */
    uint8_t *replay;
    size_t replay_len, replay_cap;
    int replay_lost;
    struct pep_conn *all_next;  /* every connection ever allocated (pep_conn_next) */
    struct pep_conn *free_next; /* free list */
};

extern struct pep_conn **pep_fd_chunks[PEP_FD_CHUNKS];
extern unsigned pep_nmapped;         /* fds in the table, for close_range */
extern unsigned pep_nsending;        /* conns in PEP_ST_SENDING */
extern unsigned pep_nawait;          /* conns in PEP_ST_AWAIT */
extern unsigned pep_nconfirm;        /* PEP_CONFIRM conns still waiting for the verdict */
extern unsigned pep_nepswapped;      /* conns with ep_swapped (wait.c) */
extern unsigned pep_ndeferred;       /* conns in PEP_ST_DEFERRED */

static inline int pep_confirm_pending_in(int confirm, int state)
{
    return confirm && (state == PEP_ST_CONNECTING || state == PEP_ST_SENDING ||
                       state == PEP_ST_AWAIT);
}

static inline int pep_confirm_pending(const struct pep_conn *c)
{
    return pep_confirm_pending_in(c->confirm, c->state);
}

/* fd's connection without the lock (it may change right after). */
static inline struct pep_conn *pep_fd_peek(int fd)
{
    if ((unsigned)fd >= PEP_FD_LIMIT)
        return 0;
    struct pep_conn **chunk =
        __atomic_load_n(&pep_fd_chunks[(unsigned)fd >> PEP_FD_CHUNK_BITS], __ATOMIC_ACQUIRE);
    return chunk ? __atomic_load_n(&chunk[(unsigned)fd & (PEP_FD_CHUNK - 1)], __ATOMIC_ACQUIRE)
                 : 0;
}

static inline int pep_fd_tracked(int fd)
{
    return pep_fd_peek(fd) != 0;
}

/* Is fd's SYN held for the program's first write? (no lock) */
static inline int pep_fd_deferred(int fd)
{
    struct pep_conn *c = pep_fd_peek(fd);
    return c && __atomic_load_n(&c->state, __ATOMIC_ACQUIRE) == PEP_ST_DEFERRED;
}

/* The fast path: does fd need the slow path (not plain pass-through)? */
static inline int pep_fd_busy(int fd)
{
    struct pep_conn *c = pep_fd_peek(fd);
    return c && __atomic_load_n(&c->state, __ATOMIC_ACQUIRE) != PEP_ST_OPEN;
}

void pep_lock(void);
void pep_unlock(void);
void pep_fdstate_atfork(void);

/* All of these need pep_lock held. */
struct pep_conn *pep_conn_get(int fd);             /* NULL if not ours */
struct pep_conn *pep_conn_new(int fd);             /* NULL: out of memory */
void pep_fd_forget(int fd);                        /* drop fd's reference */
void pep_conn_put(struct pep_conn *c);             /* drop a reference */
void pep_fd_dup(int oldfd, int newfd);             /* newfd shares oldfd's slot */
void pep_fd_forget_range(unsigned first, unsigned last);
void pep_conn_set_state(struct pep_conn *c, int state);
/* A new deadline (a new attempt) is probed at the next wait. */
void pep_conn_set_hs_deadline(struct pep_conn *c, long long deadline);

/* Every connection slot in use or once used, without the lock: start with
 * NULL; NULL at the end. A slot may change under the caller: read its state
 * and fd atomically, and act on it only through the fd (which rechecks). */
struct pep_conn *pep_conn_next(struct pep_conn *prev);

#endif
