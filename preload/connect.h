/* connect() and the program's own TFO send: put the socket on a PEP, and
 * move it to the next one (or the destination) when a PEP fails. */
#ifndef PEP_CONNECT_H
#define PEP_CONNECT_H

#include <sys/socket.h>
#include <sys/types.h>

#include "fdstate.h"
#include "peers.h"

/* Did libpep take the call? */
enum pep_taken {
    PEP_PASS,  /* not for us: the hook makes the real call */
    PEP_TAKEN, /* done: *ret (and errno) is the call's result */
};

/* fd is about to connect to dest (app == NULL), or, from sendto/sendmsg with
 * MSG_FASTOPEN, to send app's bytes there. connect: *ret 0/-1; send: the
 * number of the program's bytes taken, or -1. */
enum pep_taken pep_connect_via_pep(int fd, const struct sockaddr *dest, socklen_t destlen,
                                   const struct msghdr *app, int appflags, ssize_t *ret);

/* connect() again on one of ours (EALREADY/EISCONN polling, a retry, or
 * AF_UNSPEC). PEP_PASS: treat it as a fresh connect. */
enum pep_taken pep_connect_again(int fd, const struct sockaddr *sa, socklen_t len, int *ret);

/* Under the lock. The PEP in use failed (why; hold its Error's delay, 0:
 * the default; err: what the program sees if nothing else can be tried):
 * hold it down and move the connection, with the bytes the program wrote,
 * to the next PEP, or the destination (PEP_FALLBACK=direct), or fail it. */
void pep_failover(int fd, struct pep_conn *c, enum pep_down_reason why, unsigned hold_s,
                  int err);

/* Under the lock. The same PEP again (after an Error 3, with the cookie
 * now stored), the program's bytes replayed; the next PEP if it fails. */
void pep_retry_same(int fd, struct pep_conn *c);

/* Under the lock. Is the handshake of c's attempt done, failed or late?
 * Acts on it (failover). Returns 1 once the handshake is done (or the
 * attempt is not ours to watch: fd is then forgotten if it is not c's
 * socket any more, see pep_fd_still_ours), 0 while it is still going.
 * One TCP_INFO while the handshake is going. */
int pep_handshake_check(int fd, struct pep_conn *c, long long now);

/* Under the lock: the program wrote these bytes (r of them) before the
 * reply; keep them for a replay on the next PEP. */
void pep_replay_keep(struct pep_conn *c, const struct iovec *iov, size_t n, size_t r);

#endif
