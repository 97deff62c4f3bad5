"""The PROTOCOL.md test vectors (§13), checked four ways.

1. scripts/gen_vectors.py, re-run now, gives exactly tests/vectors.json, and PROTOCOL.md's
   vector section holds exactly the same hex (docs match code).
2. An independent derivation from the document's formulas, with hashlib/hmac and the raw
   `cryptography` AEADs only (no stcp.crypto), gives the same bytes (the document is
   complete enough to implement from); the cookie's SipHash through both stcp.siphash paths.
3. Every record seals and opens to the vector through both record-protection paths: the C
   extension (stcp._aead.RecordCipher) and the pure-Python path, in the same run; and
   STCP_PURE_PYTHON=1 really selects the pure-Python path.
4. Real Connection objects with the vectors' fixed keys and CIDs send exactly the vector
   hellos and records (CLIENT_AUTH and RESET_TOKEN included), and accept the peer's vector
   records; a real endpoint sends the vector REJECT, v1 REJECT, COOKIE and RESET.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from stcp import crypto, handshake, siphash, wire
from stcp.connection import Config, Connection, ConnectionClosed, DataReceived, KeyUpdated, StreamFinished
from stcp.endpoint import ServerEndpoint
from stcp.errors import AuthenticationFailure, CloseCode
from stcp.state import State

ROOT = Path(__file__).resolve().parent.parent
JSON_PATH = ROOT / "tests" / "vectors.json"
DOC_PATH = ROOT / "docs" / "PROTOCOL.md"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_vectors", ROOT / "scripts" / "gen_vectors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()
VECTORS = json.loads(JSON_PATH.read_text())
SUITE_NAMES = list(VECTORS["suites"])
SUITE_IDS = {"aes-256-gcm": wire.SUITE_AES_256_GCM, "chacha20-poly1305": wire.SUITE_CHACHA20_POLY1305}
h = bytes.fromhex

try:
    from stcp import _aead
except ImportError:        # test_aead_ext.py fails loudly for a missing build; here the C rows skip
    _aead = None

PATHS = ["python", pytest.param("c", marks=pytest.mark.skipif(_aead is None, reason="stcp._aead not built"))]


@pytest.fixture(params=SUITE_NAMES)
def suite_name(request):
    return request.param


@pytest.fixture
def sv(suite_name):
    return VECTORS["suites"][suite_name]


def test_both_suites_and_every_frame_type_are_covered():
    assert set(SUITE_NAMES) == {"aes-256-gcm", "chacha20-poly1305"}
    types = {f["type"] for r in VECTORS["suites"]["aes-256-gcm"]["records"] for f in r["frames"]}
    assert types == {"PADDING", "PING", "ACK", "STREAM", "MAX_DATA", "CLOSE", "KEY_UPDATE", "CLIENT_AUTH",
                     "RESET_TOKEN"}
    assert any(r["epoch"] == 1 for r in VECTORS["suites"]["aes-256-gcm"]["records"])


# --- 1. generator == json == document ---------------------------------------------------
def test_generator_reproduces_json():
    assert gen.build() == VECTORS


def test_generator_check_mode_is_clean():
    assert gen.main(["--check"]) == 0, "run scripts/gen_vectors.py and commit both files"


def _flatten(vectors: dict) -> dict:
    return {name: {label: hexstr for label, hexstr, _ in items} for name, items in gen.doc_items(vectors).items()}


def test_document_hex_equals_json():
    in_doc = gen.parse_section(DOC_PATH.read_text())
    expected = _flatten(VECTORS)
    assert set(in_doc) == set(expected)
    for name in expected:
        assert in_doc[name] == expected[name], f"PROTOCOL.md vectors for {name} differ from tests/vectors.json"
    # and the flattening really covers the JSON: every record and every handshake value appears
    sv = VECTORS["suites"]["aes-256-gcm"]
    assert len(expected["aes-256-gcm"]) == len(sv["handshake"]) + 3 * sum(map(len, sv["keys"].values())) \
        + 3 * len(sv["records"])


def test_document_parser_sees_a_change():
    """The doc check can fail: altering one hex digit in the section is noticed."""
    text = DOC_PATH.read_text()
    label = "handshake.confirm_tag (32 bytes):\n  "
    i = text.index(label) + len(label)
    tampered = text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:]
    assert gen.parse_section(tampered) != _flatten(VECTORS)


# --- 2. independent derivation from the document ----------------------------------------
def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def _expand(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    return _hkdf_expand(secret, b"stcp " + label.encode() + context, length)


def _payload(kind, suite, flags, cid, body) -> bytes:
    """A 112-byte handshake payload from the section 4 tables."""
    head = bytes([kind, 2, suite, flags]) + bytes(4) + cid.to_bytes(8, "big") + body
    return head + bytes(112 - len(head))


def _header(length, cid, seq) -> bytes:
    return length.to_bytes(8, "big") + cid.to_bytes(8, "big") + seq.to_bytes(8, "big")


def _x25519(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def test_independent_derivation_from_the_document(suite_name, sv):
    suite = SUITE_IDS[suite_name]
    inp = VECTORS["inputs"]
    ccid, scid = int(inp["client_cid"], 16), int(inp["server_cid"], 16)
    e, f = h(inp["client_private_key"]), h(inp["server_private_key"])
    s_priv, c_priv = h(inp["server_static_private_key"]), h(inp["client_static_private_key"])
    E, F, S, C = _public(e), _public(f), _public(s_priv), _public(c_priv)
    hs = sv["handshake"]
    assert s_priv == hashlib.sha256(b"stcp v2 test vector: server static key").digest()
    assert c_priv == hashlib.sha256(b"stcp v2 test vector: client static key").digest()
    # RFC 7748 §6.1
    assert F.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    ee, es = _x25519(e, F), _x25519(e, S)
    assert ee.hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742" == hs["ee"]
    assert es == _x25519(s_priv, E) and es.hex() == hs["es"]

    ch = _header(112, 0, 0) + _payload(0x01, suite, 0, ccid, E + bytes(16))
    assert ch.hex() == hs["client_hello_record"]
    sh_head = _header(112, ccid, 0) + _payload(0x02, suite, 0, scid, F + S)[:80]
    assert len(ch + sh_head) == 240 and (ch + sh_head).hex() == hs["transcript_input"]
    th = hashlib.sha256(ch + sh_head).digest()
    assert th.hex() == hs["transcript_hash"]
    prk = hmac.new(b"stcp v2", ee + es, hashlib.sha256).digest()
    assert prk.hex() == hs["prk"]
    c_secret, s_secret = _expand(prk, "c2s", th, 32), _expand(prk, "s2c", th, 32)
    assert c_secret.hex() == hs["client_secret"] and s_secret.hex() == hs["server_secret"]
    confirm_key = _expand(prk, "confirm", th, 32)
    tag = hmac.new(confirm_key, th, hashlib.sha256).digest()
    assert confirm_key.hex() == hs["confirm_key"] and tag.hex() == hs["confirm_tag"]
    assert (sh_head + tag).hex() == hs["server_hello_record"]
    assert (_header(112, ccid, 0) + _payload(0x03, suite, inp["reject_code"], 0, b"")).hex() == hs["reject_record"]
    v1_reject = _header(80, ccid, 0) + bytes([0x03, 2, suite, 0x01]) + bytes(76)
    assert v1_reject.hex() == hs["v1_reject_record"]

    # client proof (section 5.4)
    se = _x25519(c_priv, F)
    assert se == _x25519(f, C) and se.hex() == hs["se"]
    auth_key = _hkdf_expand(hmac.new(c_secret, se, hashlib.sha256).digest(), b"stcp cauth" + th, 32)
    proof = hmac.new(auth_key, th + C, hashlib.sha256).digest()
    assert (auth_key.hex(), proof.hex()) == (hs["auth_key"], hs["client_auth_proof"])
    assert (b"\x07" + C + proof).hex() == hs["client_auth_frame"]

    # cookie (section 4.5): ::ffff:192.0.2.1, port, client CID, E
    host, port = inp["client_address"]
    cookie_in = bytes(10) + b"\xff\xff" + bytes(map(int, host.split("."))) + port.to_bytes(2, "big") \
        + ccid.to_bytes(8, "big") + E
    assert len(cookie_in) == 58 and cookie_in.hex() == hs["cookie_input"]
    for mac in (siphash.siphash128_ref, siphash.siphash128):
        assert mac(h(inp["cookie_secret"]), cookie_in).hex() == hs["cookie"]
    cookie = h(hs["cookie"])
    assert (_header(112, ccid, 0) + _payload(0x04, suite, 0, 0, cookie)).hex() == hs["cookie_record"]
    assert (_header(112, 0, 0) + _payload(0x01, suite, 0, ccid, E + cookie)).hex() == \
        hs["client_hello_with_cookie_record"]

    # stateless reset (section 5.6)
    reset_key = _hkdf_expand(s_priv, b"stcp reset", 32)
    token = hmac.new(reset_key, scid.to_bytes(8, "big"), hashlib.sha256).digest()[:16]
    assert (reset_key.hex(), token.hex()) == (hs["reset_key"], hs["reset_token"])
    assert (b"\x08" + token).hex() == hs["reset_token_frame"]
    assert (_header(32, 0, 0) + b"\x05\x02" + bytes(14) + token).hex() == hs["reset_record"]

    secrets = {"c2s": [c_secret], "s2c": [s_secret]}
    for d, chain in sv["keys"].items():
        for k in chain:
            while len(secrets[d]) <= k["epoch"]:
                secrets[d].append(_expand(secrets[d][-1], "ku", b"", 32))
            s = secrets[d][k["epoch"]]
            assert (s.hex(), _expand(s, "key", b"", 32).hex(), _expand(s, "iv", b"", 12).hex()) == \
                (k["secret"], k["key"], k["iv"])

    aead_cls = AESGCM if suite == wire.SUITE_AES_256_GCM else ChaCha20Poly1305
    for r in sv["records"]:
        s = secrets[r["direction"]][r["epoch"]]
        key, iv = _expand(s, "key", b"", 32), _expand(s, "iv", b"", 12)
        seq = (r["epoch"] << 48) | r["pn"]
        assert f"{seq:016x}" == r["seq"]
        nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, "big"), strict=True))
        assert nonce.hex() == r["nonce"]
        pt = h(r["plaintext"])
        header = _header(len(pt) + 16, int(r["cid"], 16), seq)
        assert (header + aead_cls(key).encrypt(nonce, pt, header)).hex() == r["record"], r["name"]


def _independent_frame(f: dict) -> bytes:
    """Frame bytes straight from the §7 tables."""
    t = f["type"]
    if t == "PADDING":
        return bytes(f["length"])
    if t == "PING":
        return b"\x01"
    if t == "ACK":
        rs = f["ranges"]
        out = struct.pack("!BQIHQ", 2, rs[0][1], f["delay_us"], len(rs) - 1, rs[0][1] - rs[0][0])
        for (plo, _), (lo, hi) in zip(rs, rs[1:], strict=False):
            out += struct.pack("!QQ", plo - hi - 2, hi - lo)
        return out
    if t == "STREAM":
        data = h(f["data"])
        return struct.pack("!BBQH", 3, 1 if f["fin"] else 0, f["offset"], len(data)) + data
    if t == "MAX_DATA":
        return struct.pack("!BQ", 4, f["limit"])
    if t == "CLOSE":
        reason = f["reason"].encode()
        return struct.pack("!BHH", 5, f["code"], len(reason)) + reason
    if t == "KEY_UPDATE":
        return struct.pack("!BH", 6, f["epoch"])
    if t == "CLIENT_AUTH":
        return b"\x07" + h(f["static_key"]) + h(f["proof"])
    if t == "RESET_TOKEN":
        return b"\x08" + h(f["token"])
    raise AssertionError(t)


def test_record_plaintexts_are_the_documented_frames(sv):
    for r in sv["records"]:
        assert b"".join(_independent_frame(f) for f in r["frames"]).hex() == r["plaintext"], r["name"]
        frames = [gen.frame_obj(f) for f in r["frames"]]
        assert b"".join(wire.encode_frame(f) for f in frames).hex() == r["plaintext"]
        assert wire.decode_frames(h(r["plaintext"])) == frames


# --- 3. both record-protection paths -------------------------------------------------------
def _record_key(suite: int, secret: bytes, epoch: int, path: str) -> crypto.RecordKey:
    key = crypto.RecordKey(suite, secret, epoch)
    if path == "python":
        key.fast = None
    else:
        key.fast = _aead.RecordCipher(suite, key.key, key.iv)
    return key


@pytest.mark.parametrize("path", PATHS)
def test_records_seal_and_open_on_both_paths(suite_name, sv, path):
    suite = SUITE_IDS[suite_name]
    for chain in sv["keys"].values():
        for k in chain:
            key = _record_key(suite, h(k["secret"]), k["epoch"], path)
            assert (key.key.hex(), key.iv.hex()) == (k["key"], k["iv"])
            if k["epoch"]:
                assert key.secret == crypto.next_secret(h(chain[k["epoch"] - 1]["secret"]))
    for r in sv["records"]:
        secret = h(sv["keys"][r["direction"]][r["epoch"]]["secret"])
        key = _record_key(suite, secret, r["epoch"], path)
        seq = int(r["seq"], 16)
        assert key.nonce(seq).hex() == r["nonce"]
        record = key.seal(int(r["cid"], 16), seq, h(r["plaintext"]))
        assert record.hex() == r["record"], f"{r['name']} on the {path} path"
        assert key.open(h(r["record"]), seq).hex() == r["plaintext"]
        # the header is authenticated: the same record under another seq or cid fails
        tampered = bytearray(h(r["record"]))
        tampered[15] ^= 1
        with pytest.raises(AuthenticationFailure):
            key.open(bytes(tampered), seq)
        with pytest.raises(AuthenticationFailure):
            key.open(h(r["record"]), seq + 1)


def test_stcp_pure_python_env_selects_the_python_path():
    sv = VECTORS["suites"]["aes-256-gcm"]
    r = sv["records"][1]
    code = (
        "import sys; from stcp import crypto, wire\n"
        f"k = crypto.RecordKey(wire.SUITE_AES_256_GCM, bytes.fromhex({sv['keys']['c2s'][0]['secret']!r}))\n"
        f"rec = k.seal(0x{r['cid']}, 0x{r['seq']}, bytes.fromhex({r['plaintext']!r}))\n"
        f"assert rec.hex() == {r['record']!r}\n"
        "print(crypto.ACCELERATED, k.fast is None)\n"
    )
    env = dict(os.environ, STCP_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    if _aead is not None:
        env.pop("STCP_PURE_PYTHON")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "False"]


# --- 4. real connections produce and accept the vectors ----------------------------------
class _FixedCid(Config):
    def __init__(self, cid: int, **kw):
        super().__init__(**kw)
        self._cid = cid

    def new_cid(self) -> int:
        return self._cid


@pytest.mark.parametrize("path", PATHS)
def test_connections_with_fixed_keys_send_the_vectors(suite_name, sv, path, monkeypatch):
    suite = SUITE_IDS[suite_name]
    inp = VECTORS["inputs"]
    if path == "python":
        monkeypatch.setattr(crypto, "_aead", None)
    else:
        monkeypatch.setattr(crypto, "_aead", _aead)
    keys = [X25519PrivateKey.from_private_bytes(h(inp["client_private_key"])),
            X25519PrivateKey.from_private_bytes(h(inp["server_private_key"]))]
    monkeypatch.setattr(handshake, "generate_keypair",
                        lambda: (lambda k: (k, k.public_key().public_bytes_raw()))(keys.pop(0)))
    recs = {r["name"]: h(r["record"]) for r in sv["records"]}
    hs = sv["handshake"]
    client_static, server_static = h(inp["client_static_private_key"]), h(inp["server_static_private_key"])

    client = Connection.client(_FixedCid(int(inp["client_cid"], 16), suite=suite, static_key=client_static,
                                         server_key=h(hs["server_static_public_key"])), 0.0)
    [ch] = client.datagrams_to_send(0.0)
    assert ch.hex() == hs["client_hello_record"]
    endpoint = ServerEndpoint(_FixedCid(int(inp["server_cid"], 16), static_key=server_static,
                                        allowed_clients=[h(hs["client_static_public_key"])]))
    server, new = endpoint.receive(ch, ("192.0.2.1", 1), 0.0)
    assert new and server.state == State.KEY_EXCHANGE
    [sh] = server.datagrams_to_send(0.0)
    assert sh.hex() == hs["server_hello_record"]
    assert (server._keys.send.fast is None) == (path == "python")

    client.receive_datagram(sh, 0.01)
    assert client.state == State.ENCRYPTED
    assert client.peer_static_key.hex() == hs["server_static_public_key"]
    assert client._keys.send.secret.hex() == hs["client_secret"]
    assert client._keys.recv.secret.hex() == hs["server_secret"]
    # the client's first record (CLIENT_AUTH, its receive window, key confirmation) and its
    # first data, which carries CLIENT_AUTH again: nothing has acknowledged it yet
    assert client.datagrams_to_send(0.01) == [recs["c2s-1"]]
    client.send(b"GET /index.html\r\n")
    assert client.datagrams_to_send(0.01) == [recs["c2s-2"]]

    for name in ("c2s-1", "c2s-2"):
        endpoint.receive(recs[name], ("192.0.2.1", 1), 0.02)
    assert server.state == State.ENCRYPTED
    assert server.peer_static_key.hex() == hs["client_static_public_key"]
    assert server.datagrams_to_send(0.02) == [recs["s2c-1"]]       # ACK 1..2 + MAX_DATA + RESET_TOKEN
    server.send(b"hello from the server")
    server.shutdown_write()
    assert server.datagrams_to_send(0.02) == [recs["s2c-2"]]

    for name in ("s2c-1", "s2c-2"):
        client.receive_datagram(recs[name], 0.03)
    events = list(client.events)
    assert DataReceived(b"hello from the server") in events and StreamFinished() in events
    assert client._reset_token.hex() == hs["reset_token"] and client._client_auth is None

    # epoch-1 records, padding and the graceful CLOSE are accepted by the real server
    for name in ("c2s-4", "c2s-5"):
        endpoint.receive(recs[name], ("192.0.2.1", 1), 0.04)
    events = list(server.events)
    assert KeyUpdated("recv", 1) in events
    assert DataReceived(b"GET /index.html\r\n") in events and DataReceived(b"end") in events
    assert StreamFinished() in events
    assert server.recv_epoch == 1 and server.state == State.ENCRYPTED
    endpoint.receive(recs["c2s-6"], ("192.0.2.1", 1), 0.05)
    assert server.state == State.CLOSED
    assert server.close_info == ConnectionClosed(CloseCode.NO_ERROR, "", by_peer=True, error=False)

    # the server's error CLOSE ends the client with the code and reason it carries
    client.receive_datagram(recs["s2c-3"], 0.06)
    assert client.state == State.CLOSED
    assert client.close_info == ConnectionClosed(CloseCode.PROTOCOL_VIOLATION, "unknown frame type 0x09",
                                                 by_peer=True, error=True)


def test_endpoint_replies_are_the_vectors(suite_name, sv, monkeypatch):
    """A server that does not accept the suite answers the vector client hello with the vector
    REJECT; a v1 hello gets the v1 REJECT; under load the hello gets the vector COOKIE and the
    hello carrying it is served; a record for the vector server CID after the server forgot it
    gets the vector RESET."""
    suite = SUITE_IDS[suite_name]
    inp, hs = VECTORS["inputs"], sv["handshake"]
    addr = tuple(inp["client_address"])
    other = [s for s in SUITE_IDS.values() if s != suite]
    endpoint = ServerEndpoint(Config(suite=other[0], accepted_suites=tuple(other)))
    conn, new = endpoint.receive(h(hs["client_hello_record"]), addr, 0.0)
    assert conn is None and not new
    assert [r for r, _ in endpoint.replies] == [h(hs["reject_record"])]
    assert VECTORS["inputs"]["reject_code"] == wire.REJECT_SUITE
    endpoint.replies.clear()
    v1_hello = _header(80, 0, 0) + bytes([1, 1, suite, 0, 0, 0, 0, 0]) + h(inp["client_cid"]) + bytes(64)
    assert endpoint.receive(v1_hello, addr, 0.0) == (None, False)
    assert endpoint.replies == [(h(hs["v1_reject_record"]), addr)]

    server_static = h(inp["server_static_private_key"])
    loaded = ServerEndpoint(_FixedCid(int(inp["server_cid"], 16), static_key=server_static, hello_burst=0))
    loaded.cookies.current = h(inp["cookie_secret"])
    assert loaded.receive(h(hs["client_hello_record"]), addr, 0.0) == (None, False)
    assert loaded.replies == [(h(hs["cookie_record"]), addr)]
    loaded.replies.clear()
    _server, new = loaded.receive(h(hs["client_hello_with_cookie_record"]), addr, 0.0)
    assert new and loaded.stats.cookie_admitted == 1
    # the cookie is not in the transcript: the same server hello as without it
    keys = [X25519PrivateKey.from_private_bytes(h(inp["server_private_key"]))]
    monkeypatch.setattr(handshake, "generate_keypair",
                        lambda: (lambda k: (k, k.public_key().public_bytes_raw()))(keys.pop(0)))
    again = ServerEndpoint(_FixedCid(int(inp["server_cid"], 16), static_key=server_static, hello_burst=0))
    again.cookies.current = h(inp["cookie_secret"])
    conn, _ = again.receive(h(hs["client_hello_with_cookie_record"]), addr, 0.0)
    assert conn.datagrams_to_send(0.0) == [h(hs["server_hello_record"])]
    again.remove(conn)
    record = h(sv["records"][1]["record"])              # c2s-2, to the forgotten server CID
    assert again.receive(record, addr, 1.0) == (None, False)
    assert again.replies == [(h(hs["reset_record"]), addr)]
