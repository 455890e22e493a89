/* connect() and the program's own TFO send: put the socket on the PEP. */
#ifndef PEP_CONNECT_H
#define PEP_CONNECT_H

#include <sys/socket.h>
#include <sys/types.h>

/* Did libpep take the call? */
enum pep_taken {
    PEP_PASS,  /* not for us: the hook makes the real call */
    PEP_TAKEN, /* done: *ret (and errno) is the call's result */
};

/* fd is about to connect to dest (app == NULL), or, from sendto/sendmsg with
 * MSG_FASTOPEN, to send app's bytes there. connect: *ret 0/-1; send: the
 * number of the program's bytes sent, or -1. */
enum pep_taken pep_connect_via_pep(int fd, const struct sockaddr *dest, socklen_t destlen,
                                   const struct msghdr *app, int appflags, ssize_t *ret);

/* connect() again on one of ours (EALREADY/EISCONN polling, a retry, or
 * AF_UNSPEC). PEP_PASS: treat it as a fresh connect. */
enum pep_taken pep_connect_again(int fd, const struct sockaddr *sa, socklen_t len, int *ret);

#endif
