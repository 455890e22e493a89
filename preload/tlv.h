/* RFC 8803 Convert messages: encoder, one-shot decoder, incremental reader.
 *
 * No I/O and no allocation: every function works on caller-owned buffers.
 * The validation order and the error codes are those of docs/protocol.md;
 * tests/test_codec_cross.py holds this file to pepsock/protocol.py.
 */
#ifndef PEP_TLV_H
#define PEP_TLV_H

#include <stddef.h>
#include <stdint.h>

#define PEP_VERSION 1
#define PEP_MAGIC 0x2263
#define PEP_HDR_LEN 4
#define PEP_MSG_MAX 1020 /* Total Length is 8 bits of 32-bit words */

enum pep_tlv_type {
    PEP_TLV_INFO = 0x01,
    PEP_TLV_CONNECT = 0x0A,
    PEP_TLV_EXTENDED_HEADER = 0x14,
    PEP_TLV_SUPPORTED_EXT = 0x15,
    PEP_TLV_COOKIE = 0x16,
    PEP_TLV_ERROR = 0x1E,
};

enum pep_error_code {
    PEP_E_UNSUPPORTED_VERSION = 0,
    PEP_E_MALFORMED = 1,
    PEP_E_UNSUPPORTED_MESSAGE = 2,
    PEP_E_MISSING_COOKIE = 3,
    PEP_E_NOT_AUTHORIZED = 32,
    PEP_E_UNSUPPORTED_TCP_OPTION = 33,
    PEP_E_RESOURCE_EXCEEDED = 64,
    PEP_E_NETWORK_FAILURE = 65,
    PEP_E_CONNECTION_RESET = 96,
    PEP_E_DESTINATION_UNREACHABLE = 97,
};

/* Return values of the decoder and the reader. */
#define PEP_OK 0
#define PEP_REJECT (-1) /* *code says why */
#define PEP_NEED_MORE 1 /* incremental reader only */

struct pep_opt {
    uint8_t kind;
    uint8_t len;          /* value length; the Len byte on the wire is len + 2 */
    const uint8_t *value;
};

/* What a decoded message says. Pointers point into the decoded buffer. */
struct pep_msg {
    size_t total;          /* bytes of the message (Total Length * 4) */
    uint32_t seen[8];      /* bitmap of the TLV types present */
    unsigned ntlv;
    int has_info, has_connect, has_error, has_supported, has_unknown;
    uint16_t port;         /* Connect */
    uint8_t addr[16];      /* Connect: IPv6 or ::ffff:a.b.c.d */
    const uint8_t *opts;   /* Connect: TCP options, padding included */
    size_t optlen;
    uint8_t error_code;    /* Error */
    const uint8_t *error_value; /* Error: bytes after the code, padding included */
    size_t error_len;
    const uint8_t *supported; /* Supported TCP Extensions: kinds, padding dropped */
    size_t nsupported;
    const uint8_t *cookie; /* Cookie: the value after the 16 zero bits, padding included */
    size_t cookie_len;
};

/* Encoders: return the message length, or 0 if it does not fit in cap or
 * cannot be encoded (port 0, an address a PEP must refuse, options of kind 0/1 or a value
 * over 253 bytes or a message over 1020 bytes are not). */
size_t pep_encode_connect(uint8_t *out, size_t cap, const uint8_t addr[16], uint16_t port,
                          const struct pep_opt *opts, size_t nopts);
/* Append a Cookie TLV (16 bits zero, then the cookie, zero padding) to the
 * message of len bytes in msg, updating its Total Length: the new length,
 * or 0 if it does not fit in cap or 1020 bytes, or clen is 0. */
size_t pep_add_cookie(uint8_t *msg, size_t len, size_t cap, const uint8_t *cookie, size_t clen);
size_t pep_encode_error(uint8_t *out, size_t cap, uint8_t code, const uint8_t *value,
                        size_t len);
size_t pep_encode_success(uint8_t *out, size_t cap);

/* One-shot decode of a message at the start of buf: rules 1-6. PEP_OK fills
 * msg (msg->total is how much of buf the message used); PEP_REJECT sets *code. */
int pep_decode(const uint8_t *buf, size_t len, struct pep_msg *msg, int *code);

/* Semantic checks on a well-formed message (docs/protocol.md). Return
 * PEP_OK or PEP_REJECT with *code. */
int pep_check_request(const struct pep_msg *msg, int *code);

/* Incremental reader: bytes go in a few at a time; it never takes a byte
 * past the end of the message, so application data after it stays put. */
struct pep_reader {
    uint16_t have;
    uint8_t buf[PEP_MSG_MAX];
};

void pep_reader_init(struct pep_reader *r);
/* How many bytes the reader wants next (never 0 before the message is
 * complete): read exactly this many from a stream to stay at its boundary. */
size_t pep_reader_want(const struct pep_reader *r);
/* Take up to len bytes (no more than the message needs; *used says how many).
 * PEP_NEED_MORE, PEP_OK (msg filled, pointing into r->buf) or PEP_REJECT. */
int pep_reader_feed(struct pep_reader *r, const uint8_t *data, size_t len, size_t *used,
                    struct pep_msg *msg, int *code);
/* End of stream before the message was complete: always PEP_E_MALFORMED,
 * except PEP_E_UNSUPPORTED_VERSION already decided by the first byte. */
int pep_reader_eof(const struct pep_reader *r);

/* The kinds of a decoded Connect's TCP options, in order (at most cap):
 * how many there are.  Only for a message pep_decode accepted. */
size_t pep_option_kinds(const struct pep_msg *msg, uint8_t *out, size_t cap);

/* errno an application sees for an Error TLV (docs/protocol.md table). */
int pep_errno_for(uint8_t code, const uint8_t *value, size_t len);

/* IPv4 address (network order bytes) as ::ffff:a.b.c.d */
void pep_v4_mapped(uint8_t out[16], const uint8_t v4[4]);

#endif
