/* Shared per-PEP state: see state.h. Raw syscalls, so that none of libpep's
 * own hooks sees these fds. */
#define _GNU_SOURCE
#include "state.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "config.h"

static pthread_once_t dir_once = PTHREAD_ONCE_INIT;
static char dir[300]; /* "" : no shared state */

static int sys_open(const char *path, int flags, int mode)
{
    return (int)syscall(SYS_openat, AT_FDCWD, path, flags | O_CLOEXEC, mode);
}

static void sys_close(int fd)
{
    syscall(SYS_close, fd);
}

/* A directory we may trust: ours, not writable by others. */
static int trusted_dir(const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return 0;
    return S_ISDIR(st.st_mode) && st.st_uid == geteuid() && !(st.st_mode & 022);
}

static void pick_dir(void)
{
    const char *explicit_dir = getenv("PEP_STATE_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    char path[sizeof dir];
    int n;
    if (explicit_dir && *explicit_dir)
        n = snprintf(path, sizeof path, "%s", explicit_dir);
    else if (xdg && *xdg)
        n = snprintf(path, sizeof path, "%s/pepsock", xdg);
    else
        n = snprintf(path, sizeof path, "/tmp/pepsock-%u", (unsigned)geteuid());
    if (n <= 0 || (size_t)n >= sizeof path - 64)
        return;
    if (mkdir(path, 0700) < 0 && errno != EEXIST) {
        pep_log(PEP_LOG_WARN, "cannot create the state directory %s (%s); running without "
                "shared state", path, strerror(errno));
        return;
    }
    if (!trusted_dir(path)) {
        pep_log(PEP_LOG_ERROR, "state directory %s is not owned by this user or is "
                "group/world writable; running without shared state", path);
        return;
    }
    memcpy(dir, path, (size_t)n + 1);
}

void pep_state_name(const struct sockaddr_in6 *pep, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    unsigned port;
    if (pep->sin6_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)pep;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        port = ntohs(s4->sin_port);
    } else if (IN6_IS_ADDR_V4MAPPED(&pep->sin6_addr)) {
        inet_ntop(AF_INET, pep->sin6_addr.s6_addr + 12, ip, sizeof ip);
        port = ntohs(pep->sin6_port);
    } else {
        inet_ntop(AF_INET6, &pep->sin6_addr, ip, sizeof ip);
        port = ntohs(pep->sin6_port);
    }
    snprintf(out, cap, "pep-%s-%u", ip, port);
}

static int file_path(const struct sockaddr_in6 *pep, char *out, size_t cap)
{
    pthread_once(&dir_once, pick_dir);
    if (!dir[0])
        return -1;
    char name[96];
    pep_state_name(pep, name, sizeof name);
    int n = snprintf(out, cap, "%s/%s", dir, name);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

/* The file's line (NUL-terminated), or "" if absent or unusable. */
static void read_line(const char *path, char *buf, size_t cap)
{
    buf[0] = 0;
    int fd = sys_open(path, O_RDONLY | O_NOFOLLOW, 0);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid() ||
        st.st_size > PEP_STATE_FILE_MAX) {
        sys_close(fd);
        return;
    }
    size_t have = 0;
    for (;;) {
        long n = syscall(SYS_read, fd, buf + have, cap - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        if (have >= cap - 1)
            break;
    }
    sys_close(fd);
    buf[have] = 0;
    char *nl = strchr(buf, '\n');
    if (nl)
        *nl = 0;
}

/* 1 to 18 ASCII digits: the integers of the state file (no sign, no blanks). */
static int plain_integer(const char *v)
{
    size_t n = strspn(v, "0123456789");
    return n >= 1 && n <= 18 && !v[n];
}

void pep_state_read(const struct sockaddr_in6 *pep, struct pep_peer_state *st)
{
    char path[400], line[PEP_STATE_FILE_MAX + 1];
    int saved = errno;
    memset(st, 0, sizeof *st);
    if (file_path(pep, path, sizeof path) == 0)
        read_line(path, line, sizeof line);
    else
        line[0] = 0;
    /* A malformed word (no '=', no key, or a known key whose value breaks its
     * grammar) is skipped and the rest kept, as pepsock/pepstate.py does. */
    char *save = NULL, *w;
    for (w = strtok_r(line, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
        char *eq = strchr(w, '=');
        if (!eq || eq == w)
            continue;
        *eq = 0;
        const char *v = eq + 1;
        if (!strcmp(w, "down_until")) {
            if (plain_integer(v))
                st->down_until = strtoll(v, NULL, 10);
        } else if (!strcmp(w, "reason")) {
            snprintf(st->reason, sizeof st->reason, "%s", v);
        } else if (!strcmp(w, "tfo")) {
            if (!strcmp(v, "cookie"))
                st->tfo = PEP_TFO_COOKIE;
            else if (!strcmp(v, "nocookie"))
                st->tfo = PEP_TFO_NOCOOKIE;
        } else if (!strcmp(w, "cookie")) {
            uint8_t cookie[sizeof st->cookie];
            size_t n = pep_hex_decode(v, strlen(v), cookie, sizeof cookie);
            if (n) {
                memcpy(st->cookie, cookie, n);
                st->cookie_len = n;
            }
        } else if (!strcmp(w, "rtt_us")) {
            if (plain_integer(v))
                st->rtt_us = strtol(v, NULL, 10);
        }
    }
    errno = saved;
}

/* Replace or drop key in the line of words (in place, cap bytes). */
static void set_word(char *line, size_t cap, const char *key, const char *value)
{
    char out[PEP_STATE_FILE_MAX + 1];
    size_t o = 0, klen = strlen(key);
    const char *p = line;
    out[0] = 0;
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        const char *e = p;
        while (*e && *e != ' ' && *e != '\t')
            e++;
        if (e > p && !((size_t)(e - p) > klen && !strncmp(p, key, klen) && p[klen] == '=')) {
            int n = snprintf(out + o, sizeof out - o, "%s%.*s", o ? " " : "", (int)(e - p), p);
            if (n > 0 && (size_t)n < sizeof out - o)
                o += (size_t)n;
        }
        p = e;
    }
    if (value) {
        int n = snprintf(out + o, sizeof out - o, "%s%s=%s", o ? " " : "", key, value);
        if (n > 0 && (size_t)n < sizeof out - o)
            o += (size_t)n;
    }
    snprintf(line, cap, "%s", out);
}

void pep_state_write(const struct sockaddr_in6 *pep, ...)
{
    char path[400], tmp[440], line[PEP_STATE_FILE_MAX + 1];
    int saved = errno;
    if (file_path(pep, path, sizeof path) < 0)
        return;
    read_line(path, line, sizeof line);
    va_list ap;
    va_start(ap, pep);
    const char *k;
    while ((k = va_arg(ap, const char *))) {
        const char *v = va_arg(ap, const char *);
        set_word(line, sizeof line, k, v);
    }
    va_end(ap);
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    int fd = sys_open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        errno = saved;
        return;
    }
    size_t len = strlen(line);
    line[len++] = '\n';
    long n = syscall(SYS_write, fd, line, len);
    sys_close(fd);
    if (n == (long)len)
        syscall(SYS_renameat, AT_FDCWD, tmp, AT_FDCWD, path);
    else
        syscall(SYS_unlinkat, AT_FDCWD, tmp, 0);
    errno = saved;
}
