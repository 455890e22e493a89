/* What this user's processes learn about each PEP, shared through small
 * files (docs/protocol.md, "Shared state"): hold-downs, TFO mode, the
 * Cookie TLV from an Error 3, the handshake RTT.
 *
 * Directory: $PEP_STATE_DIR, else $XDG_RUNTIME_DIR/pepsock, else
 * /tmp/pepsock-<uid>; mode 0700, refused (said once) if another user owns
 * it or others may write it. One file per PEP, `pep-<ip>-<port>`, one line
 * of `key=value` words; unknown keys are kept when rewriting. Writes go to
 * `<file>.<pid>.tmp`, then rename(): readers never see half a file; a lost
 * update between two writers only loses a hint.
 */
#ifndef PEP_STATE_H
#define PEP_STATE_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>

#define PEP_STATE_FILE_MAX 4096
#define PEP_COOKIE_MAX 64

enum pep_tfo_learned { PEP_TFO_UNKNOWN, PEP_TFO_NOCOOKIE, PEP_TFO_COOKIE };

struct pep_peer_state {
    long long down_until;       /* unix seconds; 0: up */
    char reason[16];            /* refused, timeout, error64, error65 */
    int tfo;                    /* enum pep_tfo_learned */
    uint8_t cookie[PEP_COOKIE_MAX];
    size_t cookie_len;
    long rtt_us;                /* 0: unknown */
};

/* Read the PEP's state (all zero if none or unusable). */
void pep_state_read(const struct sockaddr_in6 *pep, struct pep_peer_state *st);

/* Set keys in the PEP's file (read, change, write, rename): "key", "value"
 * pairs, NULL-terminated; a NULL value removes the key. */
void pep_state_write(const struct sockaddr_in6 *pep, ...) __attribute__((sentinel));

/* The file's name for a PEP, for the tests and the logs. */
void pep_state_name(const struct sockaddr_in6 *pep, char *out, size_t cap);

#endif
