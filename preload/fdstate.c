/* The per-fd table: see fdstate.h. */
#define _GNU_SOURCE
#include "fdstate.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

uint16_t pep_fdmap[PEP_FD_MAX];
unsigned pep_nmapped;
struct pep_conn pep_conns[PEP_CONN_MAX]; /* slot i is fdmap value i + 1 */
#define conns pep_conns
unsigned pep_nsending;
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
    unsigned i;
    pthread_mutex_init(&lock, NULL);
    /* A connect() that was in flight on another thread of the parent never
     * finishes here: that socket is the parent's to set up, and the
     * reference that setup held (connect.c, register_conn) has no owner here. */
    for (i = 0; i < PEP_CONN_MAX; i++) {
        if (conns[i].refs && conns[i].state == PEP_ST_CONNECTING) {
            conns[i].err = ECONNABORTED;
            pep_conn_set_state(&conns[i], PEP_ST_FAILED);
            pep_conn_put(&conns[i]);
        }
    }
}

void pep_fdstate_atfork(void)
{
    pthread_atfork(pep_lock, pep_unlock, child_after_fork);
}

struct pep_conn *pep_conn_get(int fd)
{
    if ((unsigned)fd >= PEP_FD_MAX || !pep_fdmap[fd])
        return NULL;
    return &conns[pep_fdmap[fd] - 1];
}

static void set_map(int fd, uint16_t v)
{
    if (pep_fdmap[fd] && !v)
        pep_nmapped--;
    else if (!pep_fdmap[fd] && v)
        pep_nmapped++;
    __atomic_store_n(&pep_fdmap[fd], v, __ATOMIC_RELEASE);
}

struct pep_conn *pep_conn_new(int fd)
{
    unsigned i;

    if ((unsigned)fd >= PEP_FD_MAX)
        return NULL;
    pep_fd_forget(fd);
    for (i = 0; i < PEP_CONN_MAX; i++) {
        if (conns[i].refs == 0) {
            pep_conn_set_state(&conns[i], PEP_ST_FREE);
            memset(&conns[i], 0, sizeof conns[i]);
            conns[i].refs = 1;
            conns[i].fd = fd;
            set_map(fd, (uint16_t)(i + 1));
            return &conns[i];
        }
    }
    return NULL;
}

/* Another fd naming slot v, or -1: a scan of the table, only when the fd a
 * connection is known by goes while dups of it stay. */
static int other_fd(uint16_t v)
{
    unsigned fd;
    for (fd = 0; fd < PEP_FD_MAX; fd++) {
        if (pep_fdmap[fd] == v)
            return (int)fd;
    }
    return -1;
}

void pep_fd_forget(int fd)
{
    struct pep_conn *c = pep_conn_get(fd);
    if (!c)
        return;
    uint16_t v = pep_fdmap[fd];
    set_map(fd, 0);
    /* c->fd is how pep_flush_sending() (conn.c) finds the connection: after
     * dup2(s, 1); close(s) it must name the dup, or a header that missed
     * the SYN would never go out from a wait (and every wait stays sliced). */
    if (c->fd == fd)
        c->fd = c->refs > 1 ? other_fd(v) : -1;
    pep_conn_put(c);
}

void pep_conn_put(struct pep_conn *c)
{
    if (--c->refs == 0)
        pep_conn_set_state(c, PEP_ST_FREE);
}

void pep_conn_set_state(struct pep_conn *c, int state)
{
    if (c->state == PEP_ST_SENDING && state != PEP_ST_SENDING)
        __atomic_sub_fetch(&pep_nsending, 1, __ATOMIC_RELAXED);
    else if (c->state != PEP_ST_SENDING && state == PEP_ST_SENDING)
        __atomic_add_fetch(&pep_nsending, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&c->state, state, __ATOMIC_RELEASE);
}

void pep_fd_dup(int oldfd, int newfd)
{
    if (oldfd == newfd || (unsigned)newfd >= PEP_FD_MAX)
        return;
    pep_fd_forget(newfd);
    struct pep_conn *c = pep_conn_get(oldfd);
    if (!c)
        return;
    c->refs++;
    set_map(newfd, pep_fdmap[oldfd]);
}

void pep_fd_forget_range(unsigned first, unsigned last)
{
    unsigned fd;
    if (!pep_nmapped)
        return;
    if (last >= PEP_FD_MAX)
        last = PEP_FD_MAX - 1;
    for (fd = first; fd <= last && pep_nmapped; fd++)
        pep_fd_forget((int)fd);
}

struct pep_conn *pep_conn_next(struct pep_conn *prev)
{
    unsigned i = prev ? (unsigned)(prev - conns) + 1 : 0;
    return i < PEP_CONN_MAX ? &conns[i] : NULL;
}
