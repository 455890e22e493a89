/* libpep.so: the hooks on sockets made, closed and duplicated, on reads,
 * writes and what the program asks about a socket. connect() is in
 * connect.c, the waits in wait.c, the connection they act on in conn.c, the
 * real symbols in real.c. See docs/preload.md.
 *
 * Every hook that does not concern us costs one predictable branch (init)
 * plus one load of the fd table, then calls the real symbol.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "config.h"
#include "conn.h"
#include "connect.h"
#include "fdstate.h"
#include "real.h"

#define EXPORT PEP_EXPORT
#define UNLIKELY PEP_UNLIKELY
#define INIT PEP_INIT

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* ---- connect ------------------------------------------------------------ */

EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
    ssize_t ret;
    int r;

    INIT();
    if (!pep_cfg.enabled)
        return pep_real.connect(fd, sa, len);
    if (UNLIKELY(pep_fd_tracked(fd)) && pep_connect_again(fd, sa, len, &r) == PEP_TAKEN)
        return r;
    if (pep_connect_via_pep(fd, sa, len, NULL, 0, &ret) == PEP_PASS)
        return pep_real.connect(fd, sa, len);
    return (int)ret;
}

/* ---- sockets made or replaced: forget stale state ---------------------- */

EXPORT int socket(int domain, int type, int protocol)
{
    INIT();
    int fd = pep_real.socket(domain, type, protocol);
    if (fd >= 0) {
        pep_forget(fd);
        pep_epreg_forget(fd);
    }
    return fd;
}

/* A blocking accept while a connection of ours holds its SYN for a write:
 * the program may be waiting for that very connection (a listener of its
 * own): every held SYN goes first. */
static void before_accept(int fd)
{
    if (UNLIKELY(pep_syn_pending()) && !pep_is_nonblocking(fd))
        pep_syn_flush_every();
}

EXPORT int accept(int fd, struct sockaddr *sa, socklen_t *len)
{
    INIT();
    before_accept(fd);
    int r = pep_real.accept(fd, sa, len);
    if (r >= 0)
        pep_forget(r);
    return r;
}

EXPORT int accept4(int fd, struct sockaddr *sa, socklen_t *len, int flags)
{
    INIT();
    before_accept(fd);
    int r = pep_real.accept4(fd, sa, len, flags);
    if (r >= 0)
        pep_forget(r);
    return r;
}

EXPORT int close(int fd)
{
    INIT();
    pep_forget(fd);
    return pep_real.close(fd);
}

static void dup_state(int oldfd, int newfd)
{
    if (newfd < 0 || oldfd == newfd)
        return;
    if (pep_fd_tracked(oldfd) || pep_fd_tracked(newfd)) {
        pep_lock();
        pep_fd_dup(oldfd, newfd);
        pep_unlock();
    }
}

EXPORT int dup(int fd)
{
    INIT();
    int r = pep_real.dup(fd);
    dup_state(fd, r);
    return r;
}

EXPORT int dup2(int oldfd, int newfd)
{
    INIT();
    int r = pep_real.dup2(oldfd, newfd);
    dup_state(oldfd, r);
    return r;
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    INIT();
    int r = pep_real.dup3(oldfd, newfd, flags);
    dup_state(oldfd, r);
    return r;
}

static int do_fcntl(int (*fn)(int, int, ...), int fd, int cmd, void *arg)
{
    int r = fn(fd, cmd, arg);
    if ((cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && r >= 0)
        dup_state(fd, r);
    return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    INIT();
    return do_fcntl(pep_real.fcntl, fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    INIT();
    return do_fcntl(pep_real.fcntl64, fd, cmd, arg);
}

EXPORT int close_range(unsigned first, unsigned last, int flags)
{
    INIT();
    if (!(flags & CLOSE_RANGE_CLOEXEC) && __atomic_load_n(&pep_nmapped, __ATOMIC_RELAXED)) {
        pep_lock();
        pep_fd_forget_range(first, last);
        pep_unlock();
    }
    if (pep_real.close_range)
        return pep_real.close_range(first, last, flags);
    return (int)syscall(SYS_close_range, first, last, flags);
}

/* ---- reads: strip the PEP's reply -------------------------------------- */

#define BEFORE_READ(fd, dontwait)                                   \
    do {                                                            \
        INIT();                                                     \
        if (UNLIKELY(pep_fd_busy(fd)) && pep_settle(fd, PEP_FOR_READ, dontwait) < 0) \
            return -1;                                              \
    } while (0)

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    BEFORE_READ(fd, 0);
    return pep_real.read(fd, buf, n);
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    BEFORE_READ(fd, 0);
    return pep_real.read_chk(fd, buf, n, buflen);
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
    BEFORE_READ(fd, 0);
    return pep_real.readv(fd, iov, cnt);
}

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return pep_real.recv(fd, buf, n, flags);
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return pep_real.recv_chk(fd, buf, n, buflen, flags);
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *sa,
                        socklen_t *len)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return pep_real.recvfrom(fd, buf, n, flags, sa, len);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *sa, socklen_t *len)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return pep_real.recvfrom_chk(fd, buf, n, buflen, flags, sa, len);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    return pep_real.recvmsg(fd, msg, flags);
}

EXPORT int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *ts)
{
    BEFORE_READ(fd, flags & MSG_DONTWAIT);
    if (!pep_real.recvmmsg) {
        errno = ENOSYS;
        return -1;
    }
    return pep_real.recvmmsg(fd, v, n, flags, ts);
}

/* ---- writes: header first, errors delivered ---------------------------- */

#define BEFORE_WRITE(fd, dontwait)                                  \
    do {                                                            \
        INIT();                                                     \
        if (UNLIKELY(pep_fd_busy(fd)) && pep_settle(fd, PEP_FOR_WRITE, dontwait) < 0) \
            return -1;                                              \
    } while (0)

/* After a write on one of ours before the reply: an error the PEP may
 * explain, or bytes to keep for a replay on the next PEP. */
#define AFTER_WRITE(fd, r, iov, n)                                  \
    do {                                                            \
        if (UNLIKELY((r) < 0) && pep_fd_tracked(fd))                \
            errno = pep_failed_write_errno(fd, errno);              \
        else if (UNLIKELY((r) > 0) && pep_fd_busy(fd))              \
            keep_for_replay(fd, iov, n, (size_t)(r));               \
    } while (0)

/* PEP_SYN_WRITE: the first write on a socket whose SYN waits for it goes
 * in the SYN, after the header (conn.c, pep_syn_write). */
#define SYN_WRITE(fd, iov, n)                                       \
    do {                                                            \
        ssize_t synr_;                                              \
        INIT();                                                     \
        if (UNLIKELY(pep_fd_deferred(fd)) &&                        \
            pep_syn_write(fd, iov, n, &synr_) == PEP_TAKEN)         \
            return synr_;                                           \
    } while (0)

static void keep_for_replay(int fd, const struct iovec *iov, size_t n, size_t r)
{
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (c && !c->direct && (c->state == PEP_ST_AWAIT || c->state == PEP_ST_SENDING))
        pep_replay_keep(c, iov, n, r);
    pep_unlock();
}

/* sendmmsg's bytes are not kept: a connection that used it before the
 * reply is not moved to another PEP. */
static void no_replay(int fd)
{
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (c)
        c->replay_lost = 1;
    pep_unlock();
}

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    struct iovec one = {(void *)buf, n};
    SYN_WRITE(fd, &one, 1);
    BEFORE_WRITE(fd, 0);
    ssize_t r = pep_real.write(fd, buf, n);
    AFTER_WRITE(fd, r, &one, 1);
    return r;
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    if (cnt > 0)
        SYN_WRITE(fd, iov, (size_t)cnt);
    BEFORE_WRITE(fd, 0);
    ssize_t r = pep_real.writev(fd, iov, cnt);
    AFTER_WRITE(fd, r, iov, cnt < 0 ? 0 : (size_t)cnt);
    return r;
}

EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    struct iovec one = {(void *)buf, n};
    if (!(flags & MSG_OOB))
        SYN_WRITE(fd, &one, 1);
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    ssize_t r = pep_real.send(fd, buf, n, flags);
    AFTER_WRITE(fd, r, &one, 1);
    return r;
}

/* sendto/sendmsg with MSG_FASTOPEN and an address (the callers check both)
 * on a fresh socket: the program's own TFO connect; the header goes in
 * front of its bytes. */
static enum pep_taken fastopen_send(int fd, const struct sockaddr *sa, socklen_t len,
                                    const struct msghdr *app, int flags, ssize_t *ret)
{
    if (!pep_cfg.enabled || pep_fd_tracked(fd))
        return PEP_PASS;
    return pep_connect_via_pep(fd, sa, len, app, flags, ret);
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa,
                      socklen_t len)
{
    ssize_t ret;
    INIT();
    if (UNLIKELY(flags & MSG_FASTOPEN) && sa) {
        struct iovec iov = {(void *)buf, n};
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        if (fastopen_send(fd, sa, len, &m, flags, &ret) != PEP_PASS)
            return ret;
    }
    struct iovec one = {(void *)buf, n};
    if (!(flags & MSG_OOB))
        SYN_WRITE(fd, &one, 1);
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    ssize_t r = pep_real.sendto(fd, buf, n, flags, sa, len);
    AFTER_WRITE(fd, r, &one, 1);
    return r;
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    ssize_t ret;
    INIT();
    if (UNLIKELY(flags & MSG_FASTOPEN) && msg && msg->msg_name &&
        fastopen_send(fd, msg->msg_name, msg->msg_namelen, msg, flags, &ret) != PEP_PASS)
        return ret;
    /* (ancillary data, MSG_OOB: the header goes alone first) */
    if (msg && !msg->msg_controllen && !(flags & MSG_OOB))
        SYN_WRITE(fd, msg->msg_iov, msg->msg_iovlen);
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    ssize_t r = pep_real.sendmsg(fd, msg, flags);
    AFTER_WRITE(fd, r, msg ? msg->msg_iov : NULL, msg ? msg->msg_iovlen : 0);
    return r;
}

EXPORT int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
    BEFORE_WRITE(fd, flags & MSG_DONTWAIT);
    if (!pep_real.sendmmsg) {
        errno = ENOSYS;
        return -1;
    }
    if (UNLIKELY(pep_fd_busy(fd)))
        no_replay(fd);
    int r = pep_real.sendmmsg(fd, v, n, flags);
    AFTER_WRITE(fd, r, NULL, 0);
    return r;
}

/* Bytes from a file or a pipe (sendfile, splice): the header first (on a
 * deferred socket the kernel would put the file's bytes in the SYN without
 * it), as for any write; they are not kept for a replay (as sendmmsg). */
static int before_file_write(int fd)
{
    INIT();
    if (UNLIKELY(pep_fd_busy(fd))) {
        if (pep_settle(fd, PEP_FOR_WRITE, 0) < 0)
            return -1;
        if (pep_fd_busy(fd))
            no_replay(fd);
    }
    return 0;
}

EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t n)
{
    if (before_file_write(out) < 0)
        return -1;
    ssize_t r = pep_real.sendfile(out, in, off, n);
    AFTER_WRITE(out, r, NULL, 0);
    return r;
}

EXPORT ssize_t sendfile64(int out, int in, off64_t *off, size_t n)
{
    if (before_file_write(out) < 0)
        return -1;
    ssize_t r = pep_real.sendfile64(out, in, off, n);
    AFTER_WRITE(out, r, NULL, 0);
    return r;
}

EXPORT ssize_t splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t n,
                      unsigned int flags)
{
    INIT();
    if (UNLIKELY(pep_fd_busy(in)) && pep_settle(in, PEP_FOR_READ, flags & SPLICE_F_NONBLOCK) < 0)
        return -1;
    if (before_file_write(out) < 0)
        return -1;
    ssize_t r = pep_real.splice(in, off_in, out, off_out, n, flags);
    AFTER_WRITE(out, r, NULL, 0);
    return r;
}

/* shutdown before any write: the header first, and the handshake (a FIN
 * cannot follow a SYN that is still out: the kernel would close). */
EXPORT int shutdown(int fd, int how)
{
    INIT();
    if (UNLIKELY(pep_fd_deferred(fd)))
        pep_syn_flush_connected(fd);
    return pep_real.shutdown(fd, how);
}

/* ---- what the program asks about the socket ---------------------------- */

EXPORT int getpeername(int fd, struct sockaddr *sa, socklen_t *len)
{
    INIT();
    int r = pep_real.getpeername(fd, sa, len);
    if (!pep_fd_tracked(fd) || !len || !sa)
        return r;
    int saved = errno;
    /* The PEP refused and reset at once, before its reply was read (curl asks
     * right after connect): the socket is closed with an Error TLV waiting.
     * Take the reply now, without blocking, so the program hears its errno
     * from the next read or write rather than ENOTCONN here. */
    struct tcp_info ti;
    if (r < 0 && saved == ENOTCONN && pep_tcp_state(fd, &ti) == TCP_CLOSE)
        pep_settle(fd, PEP_FOR_READ, 1);
    /* Connected (or connected, then reset by us for an Error TLV, which the
     * program learns from its next read or write): the real destination. */
    pep_lock();
    struct pep_conn *c = pep_conn_get(fd);
    if (c && (r == 0 || c->state == PEP_ST_FAILED || c->state == PEP_ST_DEFERRED) &&
        pep_same_socket(fd, c)) {
        socklen_t n = *len < c->destlen ? *len : c->destlen;
        memcpy(sa, &c->dest, n);
        *len = c->destlen;
        r = 0;
        saved = errno;
    }
    pep_unlock();
    errno = saved;
    return r;
}

/* Two options libpep takes at their defaults on a socket it sees for the
 * first time, until the program sets either (conn.c, pep_note_app_sockopt). */
EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    INIT();
    if (UNLIKELY((level == SOL_SOCKET && name == SO_RCVLOWAT) ||
                 (level == IPPROTO_TCP && name == TCP_FASTOPEN_NO_COOKIE)))
        pep_note_app_sockopt(level, name);
    return pep_real.setsockopt(fd, level, name, val, len);
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    INIT();
    /* SO_ERROR is how a non-blocking connect learns it is done. While an
     * attempt is in flight, libpep looks first: a PEP that refused or is
     * late is replaced by the next (the program keeps waiting, SO_ERROR 0),
     * and with no PEP left under PEP_FALLBACK=fail, SO_ERROR says why; so
     * does a PEP's no under PEP_CONFIRM. */
    int failed_err = 0;
    if (UNLIKELY(level == SOL_SOCKET && name == SO_ERROR) && pep_fd_busy(fd) &&
        (pep_attempt_poll(fd, &failed_err) == 2 ||
         pep_confirm_poll(fd, &failed_err) == PEP_VERDICT_FAILED) &&
        val && len && *len >= sizeof(int)) {
        pep_real.getsockopt(fd, level, name, val, len); /* the kernel's own, taken */
        *(int *)val = failed_err;
        *len = sizeof(int);
        return 0;
    }
    int r = pep_real.getsockopt(fd, level, name, val, len);
    /* If the header could not go in the SYN, it goes now. A PEP that sends
     * its Error TLV and resets at once shows up here as ECONNRESET, but the
     * connection did complete and its Error TLV is in the receive queue: the
     * connect is reported done, and the Error, as for any PEP error, is the
     * next read's or write's errno (curl: "Recv failure: Connection
     * refused", not "Couldn't connect to server"). */
    if (UNLIKELY(level == SOL_SOCKET && name == SO_ERROR) && r == 0 && pep_fd_busy(fd) &&
        val && len && *len >= sizeof(int)) {
        int saved = errno, kerr = *(int *)val;
        if (kerr == 0) {
            pep_settle(fd, PEP_FOR_HEADER_ONLY, 1);
        } else if ((kerr == ECONNRESET || kerr == EPIPE) && pep_failed_by_pep(fd)) {
            *(int *)val = 0;
        }
        errno = saved;
    }
    return r;
}

