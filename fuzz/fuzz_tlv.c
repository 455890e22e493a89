/* libFuzzer harness for preload/tlv.c, the C RFC 8803 codec inside libpep.so.
 *
 * Build and run: see fuzz/README.md (make -C fuzz; ./fuzz/build/fuzz_tlv ...).
 * Built with -fsanitize=fuzzer,address,undefined: any out-of-bounds access,
 * use of uninitialised data or undefined behaviour aborts the run, and so do
 * the invariants below (__builtin_trap), which tie the parser's three entry
 * points together:
 *
 *  1. pep_decode() on the input: accept (msg->total <= len, a multiple of 4,
 *     pointers inside the buffer) or reject with a code from the table.
 *  2. pep_reader_feed() over the same bytes in chunks whose sizes come from
 *     the input itself (1 byte at a time up to everything at once) must reach
 *     the same verdict and code, never take a byte past the message, and
 *     never ask for 0 bytes before it is done.
 *  3. A message that decodes: pep_check_request() returns a code from the
 *     table; an Error TLV's errno is one of the mapped ones; a Connect TLV
 *     re-encoded with pep_encode_connect() decodes to the same port, address
 *     and options.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tlv.h"

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static int known_code(int c)
{
    return c == PEP_E_UNSUPPORTED_VERSION || c == PEP_E_MALFORMED ||
           c == PEP_E_UNSUPPORTED_MESSAGE;
}

static void check_msg(const uint8_t *base, size_t len, const struct pep_msg *m)
{
    CHECK(m->total >= PEP_HDR_LEN && m->total <= len && m->total % 4 == 0);
    CHECK(m->total <= PEP_MSG_MAX);
    if (m->has_connect) {
        CHECK(m->port != 0);
        CHECK(m->opts >= base && m->opts + m->optlen <= base + m->total);
    }
    if (m->has_error) {
        CHECK(m->error_value >= base && m->error_value + m->error_len <= base + m->total);
        int e = pep_errno_for(m->error_code, m->error_value, m->error_len);
        CHECK(e == EPROTO || e == EACCES || e == EOPNOTSUPP || e == ENOBUFS ||
              e == ENETUNREACH || e == ECONNREFUSED || e == EHOSTUNREACH);
    }
    if (m->has_supported) {
        CHECK(m->supported >= base && m->supported + m->nsupported <= base + m->total);
        for (size_t i = 0; i < m->nsupported; i++)
            CHECK(m->supported[i] != 0);
    }
}

/* Re-encode a decoded Connect and decode it again: same destination, same options. */
static void roundtrip_connect(const struct pep_msg *m)
{
    struct pep_opt opts[128];
    size_t n = 0, i = 0;

    while (i < m->optlen && m->opts[i] != 0) {
        CHECK(n < sizeof opts / sizeof opts[0]);
        CHECK(m->opts[i] != 1 && i + 1 < m->optlen && m->opts[i + 1] >= 2);
        opts[n].kind = m->opts[i];
        opts[n].len = (uint8_t)(m->opts[i + 1] - 2);
        opts[n].value = m->opts + i + 2;
        i += m->opts[i + 1];
        n++;
    }
    uint8_t out[PEP_MSG_MAX];
    size_t len = pep_encode_connect(out, sizeof out, m->addr, m->port, opts, n);
    CHECK(len != 0);
    struct pep_msg again;
    int code = -1;
    CHECK(pep_decode(out, len, &again, &code) == PEP_OK);
    CHECK(again.total == len && again.has_connect && again.port == m->port);
    CHECK(memcmp(again.addr, m->addr, 16) == 0);
    CHECK(again.optlen >= i && memcmp(again.opts, m->opts, i) == 0);
    for (size_t j = i; j < again.optlen; j++)
        CHECK(again.opts[j] == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* First byte: how the incremental reader is fed; the rest: the stream. */
    size_t chunk = 1;
    if (size > 0) {
        chunk = (size_t)data[0] % 9;
        chunk = chunk == 0 ? 1 : chunk == 8 ? (size_t)-1 : chunk;
        data++;
        size--;
    }

    /* Copy into an exact-size heap buffer so ASan sees any read past the end. */
    uint8_t *buf = (uint8_t *)__builtin_malloc(size ? size : 1);
    memcpy(buf, data, size);

    struct pep_msg m;
    int code = -1;
    int rc = pep_decode(buf, size, &m, &code);
    CHECK(rc == PEP_OK || rc == PEP_REJECT);
    if (rc == PEP_REJECT) {
        CHECK(known_code(code) && code != PEP_E_UNSUPPORTED_MESSAGE);
    } else {
        check_msg(buf, size, &m);
        int c2 = -1;
        int ok = pep_check_request(&m, &c2);
        CHECK(ok == PEP_OK || (ok == PEP_REJECT && known_code(c2)));
        if (ok == PEP_OK)
            CHECK(m.has_connect || m.has_info);
        if (m.has_connect)
            roundtrip_connect(&m);
    }

    /* The incremental reader over the same bytes. */
    struct pep_reader r;
    struct pep_msg rm;
    int rcode = -1, rrc = PEP_NEED_MORE;
    size_t off = 0;
    pep_reader_init(&r);
    while (off < size) {
        size_t want = pep_reader_want(&r);
        CHECK(want > 0 && want <= PEP_MSG_MAX);
        size_t n = size - off < chunk ? size - off : chunk;
        size_t used = 0;
        rrc = pep_reader_feed(&r, buf + off, n, &used, &rm, &rcode);
        CHECK(used <= n);
        off += used;
        if (rrc != PEP_NEED_MORE)
            break;
        CHECK(used == n);
    }
    if (rrc == PEP_NEED_MORE) {
        /* Stream ended inside the message: the one-shot decode rejected it too. */
        CHECK(rc == PEP_REJECT);
        int eof = pep_reader_eof(&r);
        CHECK(eof == code);
    } else if (rrc == PEP_OK) {
        CHECK(rc == PEP_OK && off == m.total && rm.total == m.total);
        CHECK(rm.has_connect == m.has_connect && rm.has_error == m.has_error &&
              rm.has_info == m.has_info && rm.has_unknown == m.has_unknown);
        CHECK(rm.port == m.port && memcmp(rm.addr, m.addr, 16) == 0);
    } else {
        CHECK(rrc == PEP_REJECT && rc == PEP_REJECT && rcode == code);
        CHECK(off <= size);
    }

    /* Encoders never write past cap, and what they write decodes. */
    if (size >= 3) {
        uint8_t out[PEP_MSG_MAX + 8];
        size_t cap = (size_t)buf[0] * 4 + 4;
        if (cap > sizeof out)
            cap = sizeof out;
        size_t vlen = size - 2 > 64 ? 64 : size - 2;
        size_t n = pep_encode_error(out, cap, buf[1], buf + 2, vlen);
        CHECK(n <= cap);
        if (n) {
            struct pep_msg e;
            int ec;
            CHECK(pep_decode(out, n, &e, &ec) == PEP_OK && e.has_error &&
                  e.error_code == buf[1]);
            CHECK(e.error_len >= vlen && memcmp(e.error_value, buf + 2, vlen) == 0);
        }
    }
    __builtin_free(buf);
    return 0;
}
