/* The PEPs of PEP_PROXY: which one a connection should try, and what this
 * process and the user's others (state.c) learned about each: hold-downs,
 * handshake RTT, TFO mode, Cookie TLV. Thread-safe; never blocks on the
 * network. */
#ifndef PEP_PEERS_H
#define PEP_PEERS_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>

#define PEP_HOLD_DOWN_S 30      /* refused or timed out; Error 64/65 with Value 0 */

enum pep_down_reason { PEP_DOWN_REFUSED, PEP_DOWN_TIMEOUT, PEP_DOWN_ERROR64, PEP_DOWN_ERROR65 };

/* Called once at load: the lock stays usable in a forked child. */
void pep_peers_atfork(void);

/* PEP i's address for a socket of this family (AF_INET6 may reach an IPv4
 * PEP v4-mapped unless v6only). 0, or -1 with *why. */
int pep_peer_addr(unsigned i, int family, int v6only, struct sockaddr_in6 *out,
                  socklen_t *len, const char **why);

/* Is PEP i (at this address) held down now? */
int pep_peer_held_down(unsigned i, const struct sockaddr_in6 *addr);

/* Hold PEP i down for `seconds` (0: PEP_HOLD_DOWN_S), here and in the
 * shared state. */
void pep_peer_hold_down(unsigned i, const struct sockaddr_in6 *addr, enum pep_down_reason why,
                        unsigned seconds);

/* How long a handshake with PEP i may take (ns): PEP_CONNECT_TIMEOUT, else
 * clamp(4 x the last RTT seen, 1 s, 5 s), else 3 s. */
long long pep_peer_connect_timeout_ns(unsigned i, const struct sockaddr_in6 *addr);

/* A handshake with PEP i took rtt_us (TCP_INFO). */
void pep_peer_note_rtt(unsigned i, const struct sockaddr_in6 *addr, long rtt_us);

/* TFO mode to use with PEP i: 1 = TCP_FASTOPEN_NO_COOKIE, 0 = plain TFO
 * (the kernel's cookie). And what a handshake showed (syn_data_acked). */
int pep_peer_use_nocookie(unsigned i, const struct sockaddr_in6 *addr);
void pep_peer_note_tfo(unsigned i, const struct sockaddr_in6 *addr, int used_nocookie,
                       int syn_data_acked);

/* The Cookie TLV value for PEP i (PEP_COOKIE wins, else one from an
 * Error 3); its length, 0 if none. And storing one from an Error 3. */
size_t pep_peer_cookie(unsigned i, const struct sockaddr_in6 *addr, uint8_t *out, size_t cap);
void pep_peer_store_cookie(unsigned i, const struct sockaddr_in6 *addr, const uint8_t *cookie,
                           size_t len);

#endif
