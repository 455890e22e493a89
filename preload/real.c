/* The real-symbol table and the library's initialisation: see real.h. */
#define _GNU_SOURCE
#include "real.h"

#include <dlfcn.h>
#include <errno.h>

#include "config.h"
#include "fdstate.h"
#include "peers.h"

struct pep_real pep_real;
int pep_ready;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

#define BIND(name) (*(void **)&pep_real.name = dlsym(RTLD_NEXT, #name))
#define BIND_AS(field, sym) (*(void **)&pep_real.field = dlsym(RTLD_NEXT, sym))

static void init_once_fn(void)
{
    int saved = errno;
    BIND(socket);
    BIND(connect);
    BIND(accept);
    BIND(accept4);
    BIND(send);
    BIND(sendto);
    BIND(sendmsg);
    BIND(write);
    BIND(writev);
    BIND(read);
    BIND(readv);
    BIND(recv);
    BIND(recvfrom);
    BIND(recvmsg);
    BIND_AS(read_chk, "__read_chk");
    BIND_AS(recv_chk, "__recv_chk");
    BIND_AS(recvfrom_chk, "__recvfrom_chk");
    BIND(getpeername);
    BIND(getsockopt);
    BIND(setsockopt);
    BIND(close);
    BIND(dup);
    BIND(dup2);
    BIND(dup3);
    BIND(fcntl);
    BIND(fcntl64);
    BIND(close_range);
    BIND(poll);
    BIND(ppoll);
    BIND(select);
    BIND(pselect);
    BIND(epoll_ctl);
    BIND(epoll_wait);
    BIND(epoll_pwait);
    BIND(epoll_pwait2);
    BIND_AS(poll_chk, "__poll_chk");
    BIND_AS(ppoll_chk, "__ppoll_chk");
    BIND(recvmmsg);
    BIND(sendmmsg);
    BIND(sendfile);
    BIND(sendfile64);
    BIND(splice);
    BIND(shutdown);
    if (!pep_real.fcntl64)
        pep_real.fcntl64 = pep_real.fcntl;
    pep_config_load();
    pep_fdstate_atfork();
    pep_peers_atfork();
    __atomic_store_n(&pep_ready, 1, __ATOMIC_RELEASE);
    errno = saved;
}

void pep_init(void)
{
    pthread_once(&init_once, init_once_fn);
}

__attribute__((constructor)) static void pep_ctor(void)
{
    PEP_INIT();
}
