"""The RFC 8803 Lua dissector (pepsock/dissector/rfc8803.lua) on real traffic.

One capture, made here: client -- PEP -- server in three namespaces, dumpcap on
the client's veth, while `pep relay`, the Python client, libpep.so (curl) and
raw sockets make real connections, and the test converter answers the cases the
relay does not produce (a reply split over segments, Missing Cookie and the
other Error codes). tshark then reads it back with the dissector, and every
case is checked by its `convert.*` fields.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require_root
from converter import Converter
from pepsock import dissector, protocol

LUA = dissector.path()
ROOT = Path(__file__).resolve().parents[1]
PEP4, PEP6, PEP_PORT = "192.0.2.1", "2001:db8:1::1", 5124
SERVER4, SERVER6, SERVER_PORT = "198.51.100.2", "2001:db8:2::2", 8080
CONV_SPLIT, CONV_COOKIE, CONV_ERRORS = 5131, 5133, 5140   # errors: one port each from 5140
COOKIE = bytes.fromhex("c0ffee00deadbeef")   # 8 bytes: no padding in either TLV
EXT_HEADER = bytes.fromhex("020405b4" "0402" "080a0000000100000002" "01030307")
# (code, value) a converter answers with, one converter (port CONV_ERRORS + i) each
ERRORS = [(3, b"\x00" + COOKIE), (97, b"\x01"), (64, b"\x05"), (0, b"\x01"), (33, b"\x1e"),
          (65, b"\x00"), (32, b"")]

# Runs inside the client namespace; every connection is real. Prints what it saw.
CLIENT = r"""
import json, socket, sys, time
import pepsock
from pepsock import protocol
from pepsock.protocol import TCPOption, Cookie, Connect, Message, UnknownTLV

PEP4, PEP6, PEP_PORT, SERVER4, SERVER6, SERVER_PORT, CONV_SPLIT, CONV_ERRORS, CONV_COOKIE, NERR, COOKIE = \
    json.loads(sys.argv[1])
COOKIE = bytes.fromhex(COOKIE)
out = {}
GET = b"GET / HTTP/1.0\r\n\r\n"

def fetch(dest, pep):
    try:
        with pepsock.create_connection(dest, timeout=5, pep=pep) as s:
            s.sendall(GET)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data.decode(errors="replace")
                data += chunk
    except OSError as exc:
        return f"error {getattr(exc, 'code', exc)}"

def raw(port, pieces, host=PEP4, gap=0.2):
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i, p in enumerate(pieces):
            if i:
                time.sleep(gap)
            s.sendall(p)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data.hex()
            data += chunk
    except OSError as exc:
        return f"error {exc}"
    finally:
        s.close()

out["pepsock4"] = fetch((SERVER4, SERVER_PORT), (PEP4, PEP_PORT))
time.sleep(0.1)
out["pepsock6"] = fetch((SERVER6, SERVER_PORT), (PEP6, PEP_PORT))
time.sleep(0.1)
out["refused"] = fetch((SERVER4, 9), (PEP4, PEP_PORT))
time.sleep(0.1)
req = protocol.connect_request(SERVER4, SERVER_PORT)
out["split_request"] = raw(PEP_PORT, [req[:2], req[2:], GET])
out["info"] = raw(PEP_PORT, [protocol.info_request()])
opts = protocol.connect_request(SERVER4, SERVER_PORT, [TCPOption(30), TCPOption(34, bytes(range(8)))])
out["options"] = raw(PEP_PORT, [opts + GET])
out["malformed"] = raw(PEP_PORT, [bytes.fromhex("01022263" "00010000")])
out["unknown_tlv"] = raw(PEP_PORT, [Message((Connect(SERVER4, SERVER_PORT), UnknownTLV(0x7f, b"\x00\x00"))).encode()])
out["split_reply"] = fetch((SERVER4, SERVER_PORT), (PEP4, CONV_SPLIT))
out["cookie_tlv"] = raw(CONV_COOKIE, [Message((Connect(SERVER4, SERVER_PORT), Cookie(COOKIE))).encode() + GET])
out["errors"] = [raw(CONV_ERRORS + i, [protocol.connect_request(SERVER4, SERVER_PORT)]) for i in range(NERR)]
print(json.dumps(out))
"""


def http_server(host):
    """A dual-stack one-line HTTP server in `host`'s namespace (thread in this process)."""
    with host.enter():
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", SERVER_PORT))
    srv.listen(16)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                except OSError:
                    pass
    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    require_root()
    for tool in ("tshark", "dumpcap"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs `{tool}` (apt-get install tshark; .ci/run does)")
    from pepsock.testbed.netns import Topology
    tmp = tmp_path_factory.mktemp("cap")
    cap = str(tmp / "convert.pcapng")
    procs, closers = [], []
    topo = Topology(prefix="dz")
    try:
        client, pep, server = topo.host("client"), topo.host("pep", forwarding=True), topo.host("server")
        for h in (client, pep, server):
            h.sysctl("net.ipv6.conf.all.accept_dad", 0)
            h.sysctl("net.ipv6.conf.default.accept_dad", 0)
        pep.sysctl("net.ipv6.conf.all.forwarding", 1)
        c_if, _ = topo.link(client, ["192.0.2.2/24", "2001:db8:1::2/64"], pep, [f"{PEP4}/24", f"{PEP6}/64"])
        topo.link(pep, ["198.51.100.1/24", "2001:db8:2::1/64"], server, [f"{SERVER4}/24", f"{SERVER6}/64"])
        for h, v4, v6 in ((client, PEP4, PEP6), (server, "198.51.100.1", "2001:db8:2::1")):
            h.run("ip", "route", "add", "default", "via", v4)
            h.run("ip", "-6", "route", "add", "default", "via", v6)
        closers.append(http_server(server))
        with pep.enter():
            closers.append(Converter(host=PEP4, port=CONV_SPLIT, split=3, split_delay=0.05,
                                     reply_tlvs=(protocol.ExtendedTCPHeader(EXT_HEADER),)))
            for i, err in enumerate(ERRORS):
                closers.append(Converter(host=PEP4, port=CONV_ERRORS + i, error=err,
                                         reset_after_error=False))
            closers.append(Converter(host=PEP4, port=CONV_COOKIE))
        env = dict(os.environ, PYTHONPATH=str(ROOT), PEP_STATE_DIR=str(tmp / "state"))
        relay = pep.popen(sys.executable, "-m", "pepsock.cli", "relay", "--listen", f"{PEP4}:{PEP_PORT}",
                          "--listen", f"[{PEP6}]:{PEP_PORT}", stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, env=env)
        procs.append(relay)
        for _ in range(2):
            assert relay.stdout.readline().startswith("listening on")
        dump = client.popen("dumpcap", "-q", "-i", c_if, "-w", cap, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
        procs.append(dump)
        deadline = time.monotonic() + 10
        while not os.path.exists(cap) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)

        args = json.dumps([PEP4, PEP6, PEP_PORT, SERVER4, SERVER6, SERVER_PORT, CONV_SPLIT,
                           CONV_ERRORS, CONV_COOKIE, len(ERRORS), COOKIE.hex()])
        seen = client.run(sys.executable, "-c", CLIENT, args, env=env, timeout=120)
        results = json.loads(seen.stdout.splitlines()[-1])
        # libpep.so: an unmodified curl, header in the SYN
        try:
            from pepsock.preload import library_path
            library_path()
            curl = shutil.which("curl")
        except FileNotFoundError:
            curl = None
        if curl:
            out = client.run(sys.executable, "-m", "pepsock.cli", "run", "--pep", f"{PEP4}:{PEP_PORT}",
                             "--", curl, "-sS", "--max-time", "10", f"http://{SERVER4}:{SERVER_PORT}/",
                             env=env, check=False, timeout=60)
            results["libpep"] = out.stdout
        time.sleep(0.5)
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
        yield cap, results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for c in closers:
            c.close()
        topo.cleanup()


def tshark(cap, filt, *fields, extra=()):
    """Rows of the fields (each a list of values) for packets matching `filt`."""
    argv = ["tshark", "-n", "-r", cap, "-X", f"lua_script:{LUA}", *extra, "-Y", filt,
            "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Lua" not in out.stderr and "rror" not in out.stderr, out.stderr
    return [[v.split(";") if v else [] for v in line.split("|")] for line in out.stdout.splitlines()]


def one(rows):
    assert len(rows) == 1, rows
    return rows[0]


def test_the_client_side_saw_what_the_capture_should_show(capture):
    _, res = capture
    assert res["pepsock4"].endswith("hello") and res["pepsock6"].endswith("hello")
    assert res["refused"] == "error 96"
    assert res["split_request"].endswith(b"hello".hex())
    assert res["split_reply"].endswith("hello")
    assert len(res["errors"]) == len(ERRORS)


def test_header_fields_on_every_message(capture):
    cap, _ = capture
    rows = tshark(cap, "convert", "convert.version", "convert.length", "convert.magic",
                  "convert.message_bytes")
    assert len(rows) >= 2 * 12
    for version, length, magic, nbytes in rows:
        assert version == ["1"] and magic == ["0x2263"], (version, magic)
        assert int(nbytes[0]) == 4 * int(length[0])


def test_connect_in_the_syn_ipv4_and_ipv6(capture):
    cap, res = capture
    syn = "convert && tcp.flags.syn == 1 && tcp.flags.ack == 0"
    rows = tshark(cap, syn, "convert.connect.address", "convert.connect.port", "convert.connect.ipv4",
                  "ip.dst", "ipv6.dst", "convert.tlv.type")
    v4 = [r for r in rows if r[3] == [PEP4]]
    v6 = [r for r in rows if r[4] == [PEP6]]
    expected_v4 = 1 + (1 if "libpep" in res else 0)    # the Python client, then curl under libpep.so
    assert len([r for r in v4 if r[1] == [str(SERVER_PORT)]]) >= expected_v4, rows
    for r in v4:
        assert r[0] in ([f"::ffff:{SERVER4}"],) and r[5] == ["0x0a"]
    assert [r[2] for r in v4 if r[1] == [str(SERVER_PORT)]][0] == [SERVER4]
    assert v6 and v6[0][0] == [SERVER6] and v6[0][1] == [str(SERVER_PORT)], rows


def test_libpep_curl_through_the_relay(capture):
    cap, res = capture
    if "libpep" not in res:
        pytest.skip("libpep.so not built (make -C preload) or no curl")
    assert res["libpep"] == "hello"


def test_success_replies_and_the_application_bytes_after_them(capture):
    cap, _ = capture
    rows = tshark(cap, f"convert.kind == \"reply\" && tcp.srcport == {PEP_PORT}", "convert.tlv.type",
                  "data.len")
    assert len(rows) >= 3, rows


def test_error_96_from_the_relay(capture):
    cap, _ = capture
    rows = tshark(cap, "convert.error.code == 96", "convert.tlv.type", "_ws.expert.message",
                  "convert.kind")
    r = one(rows)
    assert r[0] == ["0x1e"] and "Error 96: Connection Reset" in r[1] and r[2] == ["error reply"]


def test_request_split_inside_the_header_is_reassembled(capture):
    cap, _ = capture
    rows = tshark(cap, f"convert.connect.port && tcp.dstport == {PEP_PORT} && tcp.segment.count",
                  "tcp.segment.count", "convert.connect.ipv4")
    r = one(rows)
    assert int(r[0][0]) >= 2 and r[1] == [SERVER4]


def test_reply_split_over_segments_with_extended_tcp_header(capture):
    cap, _ = capture
    rows = tshark(cap, f"convert && tcp.srcport == {CONV_SPLIT}", "tcp.segment.count",
                  "convert.tlv.type", "convert.option.kind", "convert.ext_header", "convert.unassigned")
    r = one(rows)
    assert int(r[0][0]) >= 2         # 3-byte pieces: reassembled from many segments
    assert r[1] == ["0x14"]
    assert r[2] == ["2", "4", "8", "1", "3"]       # MSS, SACK-permitted, timestamps, NOP, wscale
    assert r[3] == [EXT_HEADER.hex()] and r[4] == ["0x0000"]


def test_info_and_supported_tcp_extensions(capture):
    cap, _ = capture
    req = one(tshark(cap, f"convert.tlv.type == 0x01 && tcp.dstport == {PEP_PORT}", "convert.kind",
                     "convert.unassigned"))
    assert req == [["request"], ["0x0000"]]
    rep = one(tshark(cap, "convert.tlv.type == 0x15", "convert.supported.kind", "convert.kind"))
    assert rep[0] == ["2", "3", "4", "8"] and rep[1] == ["reply"]


def test_connect_with_tcp_options(capture):
    cap, _ = capture
    r = one(tshark(cap, "convert.connect.options > 0", "convert.connect.options", "convert.option.kind",
                   "convert.option.length", "convert.option.value"))
    assert r[0] == ["2"] and r[1] == ["30", "34"] and r[2] == ["2", "10"]
    assert r[3] == [bytes(range(8)).hex()]


def test_cookie_tlv_in_a_request(capture):
    cap, _ = capture
    r = one(tshark(cap, "convert.tlv.type == 0x16", "convert.cookie", "convert.connect.port"))
    assert r == [[COOKIE.hex()], [str(SERVER_PORT)]]


def test_every_error_code_with_its_value(capture):
    cap, _ = capture
    rows = tshark(cap, f"convert.error.code && tcp.srcport >= {CONV_ERRORS}", "convert.error.code",
                  "_ws.expert.message", "convert.cookie", "convert.error.icmp_code",
                  "convert.error.delay", "convert.error.version", "convert.error.option_kind")
    by_code = {int(r[0][0]): r for r in rows}
    assert sorted(by_code) == sorted(code for code, _ in ERRORS), rows
    assert "Error 3: Missing Cookie" in by_code[3][1] and by_code[3][2] == [COOKIE.hex()]
    assert by_code[97][3] == ["1"] and "Error 97: Destination Unreachable" in by_code[97][1]
    assert by_code[64][4] == ["5"] and by_code[65][4] == ["0"]
    assert by_code[0][5] == ["1"] and by_code[33][6] == ["30"]
    assert "Error 32: Not Authorized" in by_code[32][1]


def test_malformed_messages_get_expert_info(capture):
    cap, _ = capture
    rows = tshark(cap, "_ws.expert.group == 0x07000000 && convert", "_ws.expert.message")
    messages = [m for r in rows for m in r[0]]
    assert "TLV type 0 is reserved" in messages, messages
    # the relay answers both bad requests with an Error the dissector names
    codes = [r[0] for r in tshark(cap, f"convert.error.code && tcp.srcport == {PEP_PORT}",
                                  "convert.error.code")]
    assert ["1"] in codes and ["2"] in codes and ["96"] in codes, codes
    unknown = tshark(cap, "convert.tlv.type == 0x7f", "_ws.expert.message", "convert.tlv.value")
    assert "Unknown TLV type 127" in one(unknown)[0] and one(unknown)[1] == ["0000"]


def test_any_port_and_no_false_positives(capture):
    """The heuristic finds messages on every port used; per connection there is one
    message each way, never one made of the application's bytes."""
    cap, res = capture
    rows = tshark(cap, "convert", "tcp.port", "tcp.stream", "tcp.srcport")
    ports = {p for r in rows for p in r[0]}
    want = {PEP_PORT, CONV_SPLIT, CONV_COOKIE, *(CONV_ERRORS + i for i in range(len(ERRORS)))}
    assert {str(p) for p in want} <= ports
    assert all(int(p) >= 32768 for p in ports - {str(p) for p in want})   # clients' ports
    per_direction = [(r[1][0], r[2][0]) for r in rows]
    assert len(per_direction) == len(set(per_direction)), per_direction
    connections = 10 + len(ERRORS) + (1 if "libpep" in res else 0)
    assert len(per_direction) == 2 * connections


def test_application_bytes_go_to_the_destination_ports_dissector(capture):
    """After the messages, HTTP (the Connect's port 8080) is decoded as HTTP, also in
    the segment that carries the Connect message."""
    cap, _ = capture
    r = one(tshark(cap, "convert.connect.options > 0", "http.request.method"))
    assert r == [["GET"]]
    answers = tshark(cap, "http.response.code == 200", "tcp.stream")
    assert len(answers) >= 5


# ---------------------------------------------------------------------------
# Property: every message the codec can encode is decoded to the same fields

def pcap_of(payloads) -> bytes:
    """A pcap with one IPv4/TCP segment per payload, each in its own connection
    (source port 40000 + i to 192.0.2.1:5124)."""
    import struct

    def csum(b):
        s = sum(struct.unpack(f"!{len(b) // 2}H", b))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, data in enumerate(payloads):
        tcp = struct.pack("!HHIIBBHHH", 40000 + i, PEP_PORT, 1000, 1, 5 << 4, 0x18, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(data), i, 0x4000, 64, 6, 0,
                         socket.inet_aton("192.0.2.2"), socket.inet_aton(PEP4))
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frame = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + ip + tcp + data
        out.append(struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame)
    return b"".join(out)


def expected_fields(msg: protocol.Message) -> dict:
    tlvs = msg.tlvs
    want = {"types": [f"0x{int(t.type):02x}" for t in tlvs], "port": [], "address": [],
            "cookies": [], "codes": [], "kinds": [], "noptions": []}
    for t in tlvs:
        if isinstance(t, protocol.Connect):
            want["port"] = [str(t.port)]
            addr = t.address
            want["address"] = [f"::ffff:{addr}" if addr.version == 4 else addr.compressed]
            want["noptions"] = [str(len(t.options))]
        elif isinstance(t, protocol.Cookie) and t.data:
            pad = -(4 + len(t.data)) % 4
            want["cookies"].append((t.data + bytes(pad)).hex())
        elif isinstance(t, protocol.Error):
            want["codes"] = [str(t.code)]
            if t.code == 3 and len(t.value) > 1:
                pad = -(3 + len(t.value)) % 4
                want["cookies"].append((t.value[1:] + bytes(pad)).hex())
        elif isinstance(t, protocol.SupportedTCPExtensions):
            want["kinds"] = [str(k) for k in t.kinds]
    return want


def test_property_codec_messages_decode_to_the_same_fields(tmp_path):
    if shutil.which("tshark") is None:
        pytest.skip("needs `tshark` (apt-get install tshark; .ci/run does)")
    from hypothesis import HealthCheck, given, settings, strategies as st
    from test_protocol import messages

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
    @given(st.lists(messages.filter(lambda m: m.tlvs), min_size=1, max_size=30), st.binary(max_size=40))
    def check(msgs, app_bytes):
        cap = tmp_path / "prop.pcap"
        cap.write_bytes(pcap_of([m.encode() + app_bytes for m in msgs]))
        rows = tshark(str(cap), "tcp", "convert.tlv.type", "convert.connect.port",
                      "convert.connect.address", "convert.cookie", "convert.error.code",
                      "convert.supported.kind", "convert.connect.options", "_ws.expert.group",
                      "convert.message_bytes", "_ws.lua.text")
        assert len(rows) == len(msgs)
        for msg, row in zip(msgs, rows):
            want = expected_fields(msg)
            types, port, addr, cookies, codes, kinds, nopts, groups, nbytes, lua = row
            assert types == want["types"]
            assert port == want["port"] and addr == want["address"]
            assert cookies == want["cookies"] and codes == want["codes"]
            assert kinds == want["kinds"] and nopts == want["noptions"]
            assert nbytes == [str(len(msg.encode()))]
            assert "0x07000000" not in groups, (msg, groups)     # nothing called malformed
            assert lua == []
    check()


def test_property_garbage_after_a_header_never_breaks_the_dissector(tmp_path):
    if shutil.which("tshark") is None:
        pytest.skip("needs `tshark` (apt-get install tshark; .ci/run does)")
    from hypothesis import HealthCheck, given, settings, strategies as st

    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=80)), min_size=1, max_size=40))
    def check(cases):
        payloads = [bytes((1, words)) + b"\x22\x63" + body for words, body in cases]
        cap = tmp_path / "garbage.pcap"
        cap.write_bytes(pcap_of(payloads))
        # without reassembly, so a message longer than its segment is shown (cut short)
        out = subprocess.run(["tshark", "-n", "-r", str(cap), "-X", f"lua_script:{LUA}", "-V",
                              "-o", "tcp.desegment_tcp_streams:FALSE"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "Lua Error" not in out.stdout and "Lua Error" not in out.stderr
        assert out.stdout.count("0-RTT TCP Convert Protocol (RFC 8803)") == len(payloads)
        cut = sum(1 for p in payloads if p[1] * 4 > len(p))
        assert out.stdout.count("Convert message cut short") + out.stdout.count(
            "Total Length says") >= cut
    check()
