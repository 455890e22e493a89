/* The per-fd table: see fdstate.h. */
#define _GNU_SOURCE
#include "fdstate.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct pep_conn **pep_fd_chunks[PEP_FD_CHUNKS];
unsigned pep_nmapped;
unsigned pep_nsending;
unsigned pep_nawait;
unsigned pep_ndeferred;
unsigned pep_nconfirm;
unsigned pep_nepswapped;
static struct pep_conn *all;   /* every connection ever allocated, newest first */
static struct pep_conn *unused; /* refs == 0, ready for reuse */
static unsigned chunks_used;    /* highest fd chunk index allocated + 1 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

void pep_lock(void)
{
    pthread_mutex_lock(&lock);
}

void pep_unlock(void)
{
    pthread_mutex_unlock(&lock);
}

static void child_after_fork(void)
{
    struct pep_conn *c;
    pthread_mutex_init(&lock, NULL);
    /* A connect() that was in flight on another thread of the parent never
     * finishes here: that socket is the parent's to set up, and the
     * reference that setup held (connect.c, register_conn) has no owner here. */
    for (c = all; c; c = c->all_next) {
        if (c->refs && c->state == PEP_ST_CONNECTING) {
            c->err = ECONNABORTED;
            pep_conn_set_state(c, PEP_ST_FAILED);
            pep_conn_put(c);
        }
    }
}

void pep_fdstate_atfork(void)
{
    pthread_atfork(pep_lock, pep_unlock, child_after_fork);
}

struct pep_conn *pep_conn_get(int fd)
{
    return pep_fd_peek(fd);
}

/* fd's entry in the table, its chunk allocated if need be; NULL if out of
 * memory or beyond PEP_FD_LIMIT. */
static struct pep_conn **slot(int fd, int create)
{
    if ((unsigned)fd >= PEP_FD_LIMIT)
        return NULL;
    unsigned ci = (unsigned)fd >> PEP_FD_CHUNK_BITS;
    struct pep_conn **chunk = pep_fd_chunks[ci];
    if (!chunk) {
        if (!create)
            return NULL;
        chunk = calloc(PEP_FD_CHUNK, sizeof *chunk);
        if (!chunk)
            return NULL;
        __atomic_store_n(&pep_fd_chunks[ci], chunk, __ATOMIC_RELEASE);
        if (ci + 1 > chunks_used)
            chunks_used = ci + 1;
    }
    return &chunk[(unsigned)fd & (PEP_FD_CHUNK - 1)];
}

static void set_map(struct pep_conn **e, struct pep_conn *c)
{
    if (*e && !c)
        pep_nmapped--;
    else if (!*e && c)
        pep_nmapped++;
    __atomic_store_n(e, c, __ATOMIC_RELEASE);
}

struct pep_conn *pep_conn_new(int fd)
{
    pep_fd_forget(fd);
    struct pep_conn **e = slot(fd, 1);
    if (!e)
        return NULL;
    struct pep_conn *c = unused;
    if (c) {
        unused = c->free_next;
    } else {
        c = calloc(1, sizeof *c);
        if (!c)
            return NULL;
        c->all_next = all;
        __atomic_store_n(&all, c, __ATOMIC_RELEASE);
    }
    /* Lock-free readers may still look at a recycled connection: its state
     * goes FREE first, and every field but the list links is cleared. */
    pep_conn_set_state(c, PEP_ST_FREE);
    struct pep_conn *keep = c->all_next;
    memset(c, 0, sizeof *c);
    c->all_next = keep;
    c->refs = 1;
    c->fd = fd;
    set_map(e, c);
    return c;
}

/* Another fd naming c, or -1: a scan of the table, only when the fd a
 * connection is known by goes while dups of it stay. */
static int other_fd(const struct pep_conn *c)
{
    unsigned ci, i;
    for (ci = 0; ci < chunks_used; ci++) {
        struct pep_conn **chunk = pep_fd_chunks[ci];
        if (!chunk)
            continue;
        for (i = 0; i < PEP_FD_CHUNK; i++) {
            if (chunk[i] == c)
                return (int)(ci * PEP_FD_CHUNK + i);
        }
    }
    return -1;
}

void pep_fd_forget(int fd)
{
    struct pep_conn **e = slot(fd, 0);
    struct pep_conn *c = e ? *e : NULL;
    if (!c)
        return;
    set_map(e, NULL);
    /* c->fd is how pep_flush_sending() (conn.c) finds the connection: after
     * dup2(s, 1); close(s) it must name the dup, or a header that missed
     * the SYN would never go out from a wait (and every wait stays sliced). */
    if (c->fd == fd)
        __atomic_store_n(&c->fd, c->refs > 1 ? other_fd(c) : -1, __ATOMIC_RELAXED);
    pep_conn_put(c);
}

void pep_conn_set_hs_deadline(struct pep_conn *c, long long deadline)
{
    if (deadline)
        c->next_probe = 0;
    __atomic_store_n(&c->hs_deadline, deadline, __ATOMIC_RELAXED); /* pep_flush_sending */
}

void pep_conn_put(struct pep_conn *c)
{
    if (--c->refs == 0) {
        pep_conn_set_state(c, PEP_ST_FREE);
        pep_conn_set_hs_deadline(c, 0);
        if (c->ep_swapped) {
            c->ep_swapped = 0;
            __atomic_sub_fetch(&pep_nepswapped, 1, __ATOMIC_RELAXED);
        }
        free(c->replay);
        c->replay = NULL;
        c->replay_cap = 0;
        c->free_next = unused;
        unused = c;
    }
}

void pep_conn_set_state(struct pep_conn *c, int state)
{
    if (c->state == state)
        return;
    if (c->confirm) {
        int was = pep_confirm_pending(c), now = pep_confirm_pending_in(1, state);
        if (was && !now)
            __atomic_sub_fetch(&pep_nconfirm, 1, __ATOMIC_RELAXED);
        else if (!was && now)
            __atomic_add_fetch(&pep_nconfirm, 1, __ATOMIC_RELAXED);
    }
    if (c->state == PEP_ST_SENDING)
        __atomic_sub_fetch(&pep_nsending, 1, __ATOMIC_RELAXED);
    else if (c->state == PEP_ST_AWAIT)
        __atomic_sub_fetch(&pep_nawait, 1, __ATOMIC_RELAXED);
    else if (c->state == PEP_ST_DEFERRED)
        __atomic_sub_fetch(&pep_ndeferred, 1, __ATOMIC_RELAXED);
    if (state == PEP_ST_SENDING)
        __atomic_add_fetch(&pep_nsending, 1, __ATOMIC_RELAXED);
    else if (state == PEP_ST_AWAIT)
        __atomic_add_fetch(&pep_nawait, 1, __ATOMIC_RELAXED);
    else if (state == PEP_ST_DEFERRED)
        __atomic_add_fetch(&pep_ndeferred, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&c->state, state, __ATOMIC_RELEASE);
}

void pep_fd_dup(int oldfd, int newfd)
{
    if (oldfd == newfd)
        return;
    pep_fd_forget(newfd);
    struct pep_conn *c = pep_conn_get(oldfd);
    if (!c)
        return;
    struct pep_conn **e = slot(newfd, 1);
    if (!e)
        return; /* out of memory: newfd is plain (its reads would show the reply) */
    c->refs++;
    set_map(e, c);
}

void pep_fd_forget_range(unsigned first, unsigned last)
{
    unsigned fd;
    if (!pep_nmapped)
        return;
    if (last >= PEP_FD_LIMIT)
        last = PEP_FD_LIMIT - 1;
    for (fd = first; fd <= last && pep_nmapped; fd++) {
        if ((fd & (PEP_FD_CHUNK - 1)) == 0 && !pep_fd_chunks[fd >> PEP_FD_CHUNK_BITS]) {
            if (fd > PEP_FD_LIMIT - PEP_FD_CHUNK)
                break;
            fd += PEP_FD_CHUNK - 1; /* a whole chunk never used */
            continue;
        }
        pep_fd_forget((int)fd);
    }
}

struct pep_conn *pep_conn_next(struct pep_conn *prev)
{
    return prev ? prev->all_next : __atomic_load_n(&all, __ATOMIC_ACQUIRE);
}
