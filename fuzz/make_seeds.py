"""Write the seed corpus fuzz/corpus/ from pepsock.protocol (run from the repo root).

Every corpus file is: one byte that says how the incremental parsers are fed
(value % 9: 0/1 one byte at a time, 2-7 that many, 8 all at once), then the
byte stream a PEP or a client would read.  Both harnesses (fuzz_tlv.c and
fuzz_protocol.py) read the same format, so the corpus serves both.
"""
import hashlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from pepsock import protocol as p  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "corpus"


def seeds():
    hdr = bytes.fromhex("01012263")
    yield "connect_v4", p.connect_request("192.0.2.10", 443)
    yield "connect_v6", p.connect_request("2001:db8::1", 80)
    yield "connect_v4_opts", p.connect_request(
        "198.51.100.7", 8080, [p.TCPOption(2, b"\x05\xb4"), p.TCPOption(30, b"\x01\x02\x03")])
    yield "connect_and_data", p.connect_request("203.0.113.5", 22) + b"SSH-2.0-x\r\n"
    yield "info", p.info_request()
    yield "success", p.success_reply()
    yield "success_and_data", p.success_reply() + b"HTTP/1.1 200 OK\r\n"
    yield "success_ext", p.success_reply([p.ExtendedTCPHeader(b"\x00" * 18),
                                          p.SupportedTCPExtensions((2, 4, 8, 30))])
    yield "cookie", p.Message((p.Info(), p.Cookie(b"abcdefgh"))).encode()
    for code, value in ((96, b""), (97, b"\x01"), (97, b"\x00"), (32, b""), (64, b""), (1, b"")):
        yield f"error_{code}_{value.hex()}", p.error_reply(code, value)
    yield "unknown_tlv", p.Message((p.UnknownTLV(0x77, b"\x00\x00xy"),)).encode()
    # Hostile shapes: each rule of docs/protocol.md broken once.
    yield "bad_version", b"\x02\x06\x22\x63" + p.connect_request("192.0.2.1", 1)[4:]
    yield "total_zero", b"\x01\x00\x22\x63"
    yield "bad_magic", b"\x01\x01\x63\x22"
    yield "truncated", p.connect_request("192.0.2.10", 443)[:13]
    yield "tlv_len_zero", b"\x01\x02\x22\x63\x0a\x00\x00\x00"
    yield "tlv_type_zero", b"\x01\x02\x22\x63\x00\x01\x00\x00"
    yield "tlv_past_end", b"\x01\x02\x22\x63\x0a\x05\x01\xbb"
    yield "tlv_twice", b"\x01\x03\x22\x63\x01\x01\x00\x00\x01\x01\x00\x00"
    yield "info_long", b"\x01\x03\x22\x63\x01\x02\x00\x00\x00\x00\x00\x00"
    c = bytearray(p.connect_request("192.0.2.10", 443))
    c[6:8] = b"\x00\x00"
    yield "connect_port0", bytes(c)
    for name, addr in (("unspec4", b"\x00" * 10 + b"\xff\xff" + bytes(4)), ("unspec6", bytes(16)),
                       ("mcast4", b"\x00" * 10 + b"\xff\xff\xe0\x00\x00\x01"),
                       ("mcast6", b"\xff\x02" + bytes(14)),
                       ("bcast", b"\x00" * 10 + b"\xff" * 6)):
        yield f"connect_{name}", bytes(c[:6]) + b"\x01\xbb" + addr
    yield "connect_nop", hdr[:1] + b"\x07" + hdr[2:] + bytes(c[4:5]) + b"\x06" + bytes(c[6:24]) + \
        b"\x01\x02\x04\x00"
    yield "connect_eol_mid", b"\x01\x07\x22\x63\x0a\x06" + bytes(c[6:24]) + b"\x00\x02\x04\x02"
    yield "connect_opt_overrun", b"\x01\x07\x22\x63\x0a\x06" + bytes(c[6:24]) + b"\x02\x09\x05\xb4"
    yield "supported_zero_mid", b"\x01\x03\x22\x63\x15\x02\x00\x00\x02\x00\x04\x00"
    yield "max_length", bytes((1, 255, 0x22, 0x63)) + bytes((0x14, 254)) + bytes(1014)
    yield "oversized_claim", bytes((1, 255, 0x22, 0x63)) + b"\x0a\x05" + bytes(20)
    yield "garbage_http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    yield "garbage_tls", bytes.fromhex("160301020001") + bytes(64)
    yield "request_with_error", p.Message((p.Connect("192.0.2.1", 80), p.Error(96))).encode()


def main():
    OUT.mkdir(exist_ok=True)
    n = 0
    for name, body in seeds():
        for mode in (1, 3, 8):
            data = bytes((mode,)) + body
            digest = hashlib.sha1(data).hexdigest()[:12]
            (OUT / f"{name}-m{mode}-{digest}").write_bytes(data)
            n += 1
    print(f"wrote {n} seeds to {OUT}")


if __name__ == "__main__":
    main()
