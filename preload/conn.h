/* One proxied connection after its connect(): the Convert header still to
 * send, the PEP's reply to strip, an Error to deliver. Used by the I/O
 * hooks (hooks.c), the waits (wait.c) and connect (connect.c).
 */
#ifndef PEP_CONN_H
#define PEP_CONN_H

#include <netinet/tcp.h>

#include <sys/socket.h>
#include <sys/uio.h>

#include "connect.h"
#include "fdstate.h"

#ifndef TCP_FASTOPEN_NO_COOKIE
#define TCP_FASTOPEN_NO_COOKIE 34
#endif

#define PEP_TCP_FASTOPEN_CONNECT 30 /* TCP_FASTOPEN_CONNECT (Linux 4.11) */

/* What the caller of pep_settle() is about to do. */
enum pep_settle_for {
    PEP_FOR_READ,        /* an application read: the reply must be gone first */
    PEP_FOR_WRITE,       /* an application write: the header must be out; the
                          * reply may still be outstanding */
    PEP_FOR_HEADER_ONLY, /* not for the program (waits, SO_ERROR): send what is
                          * left of the header, never take a socket error */
};

/* What pep_settle() tells its caller. */
enum pep_settled {
    PEP_SETTLED_GO = 0,    /* make the real call */
    PEP_SETTLED_FAIL = -1, /* the call fails with errno */
};

/* Bring fd's connection as far as it can go before `why`. dontwait: the
 * call must not block (MSG_DONTWAIT); O_NONBLOCK is looked up only when it
 * matters. */
enum pep_settled pep_settle(int fd, enum pep_settle_for why, int dontwait);

/* An application write on one of ours failed with EPIPE/ECONNRESET while the
 * reply was outstanding: the PEP may have said why. The errno to use. */
int pep_failed_write_errno(int fd, int e);

/* Take what the PEP sent without blocking: did it refuse the connection
 * (Error TLV or a bad reply)? */
int pep_failed_by_pep(int fd);

/* Has the PEP's reply (an Error TLV, a bad reply) already failed fd's
 * connection? (no I/O) */
int pep_failed_by_reply(int fd);

/*
 * PEP_SYN_WRITE (PEP_ST_DEFERRED: connect() left the SYN to the first
 * write). pep_syn_write: the program writes iov (n entries) on fd: if fd
 * is deferred, one sendmsg puts the header and as much of the bytes as fit
 * in the SYN. PEP_TAKEN: *ret is the program's result (errno set on -1);
 * PEP_PASS: not deferred (any more), the hook goes on its usual way.
 * pep_syn_flush: fd's header goes alone (a read, a wait for reading,
 * shutdown, sendfile: anything but a write); no-op unless deferred.
 * pep_syn_flush_connected: the same, then wait for the handshake (shutdown:
 * a FIN in SYN_SENT would close the socket). pep_syn_flush_waited: the
 * epoll rule (wait.c, docs/preload.md): the calling thread's deferred
 * connections that went through PEP_SYN_WAITS of its waits that could
 * block (all: every one of them), and any deferred connection older than
 * PEP_SYN_STALE_NS, get their header sent; the calling thread's others
 * count one wait more if this one may block (`blocking`: its timeout is
 * not 0). 1 if any deferred connection is left. All keep errno.
 */
enum pep_taken pep_syn_write(int fd, const struct iovec *iov, size_t n, ssize_t *ret);
void pep_syn_flush(int fd);
void pep_syn_flush_connected(int fd);
int pep_syn_flush_waited(int all, int blocking);
/* Every deferred connection of every thread gets its header sent (before a
 * blocking accept: the program may wait for its own connection). */
void pep_syn_flush_every(void);
#define PEP_SYN_WAITS 2               /* wrk: connected at one wait, writes at the next */
#define PEP_SYN_STALE_NS 50000000LL   /* any deferred socket, at any wait: 50 ms */
static inline int pep_syn_pending(void)
{
    return __atomic_load_n(&pep_ndeferred, __ATOMIC_RELAXED) != 0;
}
#define PEP_SYN_WAIT_CAP_NS 2000000LL /* an epoll wait with a deferred socket: 2 ms */
/* Clear TCP_FASTOPEN_CONNECT if libpep set it (the socket is closed). */
void pep_fo_connect_off(int fd, struct pep_conn *c);

/* Send every header that missed its SYN, where the handshake is done. */
void pep_flush_sending(void);
/* Is any header waiting for its handshake? (one relaxed load) */
static inline int pep_headers_pending(void)
{
    return __atomic_load_n(&pep_nsending, __ATOMIC_RELAXED) != 0;
}

/* The waits (wait.c): libpep's work while the program sleeps (headers
 * that missed their SYN, replies past PEP_REPLY_TIMEOUT). Returns how long
 * the wait may run before there is more to do (ns; -1: nothing to come);
 * costs two relaxed loads when libpep has nothing in flight. */
#define PEP_SLICE_NS 10000000LL /* a header waiting for its handshake: 10 ms */
long long pep_wait_work(void);

/* Wait for fd to be ready, honouring SO_RCVTIMEO / SO_SNDTIMEO, but no
 * longer than until `until` (CLOCK_MONOTONIC ns; 0: no limit of ours).
 * 0: ready; 1: `until` came first; -1 + errno (EAGAIN: the program's own
 * timeout, EINTR). */
int pep_wait_fd(int fd, short events, long long until);

/* For SO_ERROR and poll: a connection whose attempt is in flight is checked
 * (and moved on if its PEP refused or is late). 1: it moved to the next
 * PEP (or the destination): what the program saw of the old attempt is to
 * be hidden; 2: it failed while connecting (no PEP left,
 * PEP_FALLBACK=fail), *err is what SO_ERROR says; 0: neither. */
int pep_attempt_poll(int fd, int *err);

/* PEP_CONFIRM, for the waits and connect(): fd's verdict, taking the
 * reply if it is there (never blocks). */
enum pep_verdict {
    PEP_VERDICT_NONE,    /* not a PEP_CONFIRM connection, or its verdict was yes */
    PEP_VERDICT_PENDING, /* still waiting for it: the connect is not done */
    PEP_VERDICT_FAILED,  /* no: *err is connect()'s errno (SO_ERROR) */
};
int pep_confirm_poll(int fd, int *err);

/* PEP_CONFIRM and epoll (wait.c): a registration of fd the program made
 * before its connect() becomes c's (swapped while the verdict is pending);
 * and fd is a new socket: forget any registration remembered for it. Under
 * the lock / anywhere. */
void pep_confirm_adopt_epoll(int fd, struct pep_conn *c);
void pep_epreg_forget(int fd);

/* CLOCK_MONOTONIC in ns. */
long long pep_now_ns(void);
/* "198.51.100.1:5124" or "[2001:db8::1]:5124" (v4-mapped written as IPv4). */
void pep_peer_text(const struct sockaddr_in6 *sa, char *out, size_t cap);

/* SO_RCVLOWAT 5 while the reply is outstanding (conn.c says why). */
void pep_lowat_hold(int fd, struct pep_conn *c);
void pep_lowat_release(int fd, struct pep_conn *c);

/* TCP_FASTOPEN_NO_COOKIE on fd, unless c says the socket has it already;
 * what a socket seen for the first time has (0, or -1: unknown); and the
 * setsockopt hook's note that the program set one of the two options
 * libpep assumes at their defaults on a new socket (conn.c says why). */
void pep_nocookie_set(int fd, struct pep_conn *c, int on);
int pep_fresh_socket_nocookie(void);
void pep_note_app_sockopt(int level, int name);

/* Said once per process, at PEP_LOG=warn. */
void pep_warn_0rtt_lost(const char *why);

/* Drop fd's state, if any (takes the lock). */
void pep_forget(int fd);
/* The same where the program keeps using fd's socket (a disconnect, a failed
 * connect), once it is closed (TCP_CLOSE): what libpep set on it goes back
 * first (takes the lock; the second under it). */
void pep_forget_open(int fd);
void pep_fd_forget_open(int fd);

/* Small socket helpers (the real getsockopt/fcntl). */
int pep_sockopt_int(int fd, int level, int name, int *v);
int pep_tcp_state(int fd, struct tcp_info *ti); /* TCP_* state or -1 */
int pep_is_nonblocking(int fd);
int pep_same_socket(int fd, const struct pep_conn *c); /* not closed and reused */
/* Under the lock, right before libpep acts on fd for c (a failover, a
 * disconnect, a hold-down): is fd still c's socket? If not, fd is
 * forgotten (pep_conn_get(fd) is not c any more) and the caller does
 * nothing. One fstat per act, none per look. */
int pep_fd_still_ours(int fd, struct pep_conn *c);

#endif
