"""The PROTOCOL.md test vectors (§13), checked four ways.

1. scripts/gen_vectors.py, re-run now, gives exactly tests/vectors.json, and PROTOCOL.md's
   vector section holds exactly the same hex (docs match code).
2. An independent derivation from the document's formulas, with hashlib/hmac and the raw
   `cryptography` AEADs only (no stcp.crypto), gives the same bytes (the document is
   complete enough to implement from).
3. Every record seals and opens to the vector through both record-protection paths: the C
   extension (stcp._aead.RecordCipher) and the pure-Python path, in the same run; and
   STCP_PURE_PYTHON=1 really selects the pure-Python path.
4. Real Connection objects with the vectors' fixed keys and CIDs send exactly the vector
   hellos and records, and accept the peer's vector records.
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

from stcp import crypto, handshake, wire
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
    assert types == {"PADDING", "PING", "ACK", "STREAM", "MAX_DATA", "CLOSE", "KEY_UPDATE"}
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


def _hello(kind, suite, flags, cid, pub, tail=bytes(32)) -> bytes:
    return bytes([kind, 1, suite, flags]) + bytes(4) + cid.to_bytes(8, "big") + pub + tail


def _header(length, cid, seq) -> bytes:
    return length.to_bytes(8, "big") + cid.to_bytes(8, "big") + seq.to_bytes(8, "big")


def test_independent_derivation_from_the_document(suite_name, sv):
    suite = SUITE_IDS[suite_name]
    inp = VECTORS["inputs"]
    ccid, scid = int(inp["client_cid"], 16), int(inp["server_cid"], 16)
    cpriv = X25519PrivateKey.from_private_bytes(h(inp["client_private_key"]))
    spriv = X25519PrivateKey.from_private_bytes(h(inp["server_private_key"]))
    cpub, spub = cpriv.public_key().public_bytes_raw(), spriv.public_key().public_bytes_raw()
    hs = sv["handshake"]
    # RFC 7748 §6.1
    assert spub.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    ss = cpriv.exchange(X25519PublicKey.from_public_bytes(spub))
    assert ss.hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742" == hs["shared_secret"]

    ch = _header(80, 0, 0) + _hello(0x01, suite, 0, ccid, cpub)
    assert ch.hex() == hs["client_hello_record"]
    sh_head = _header(80, ccid, 0) + _hello(0x02, suite, 0, scid, spub)[:48]
    assert len(ch + sh_head) == 176 and (ch + sh_head).hex() == hs["transcript_input"]
    th = hashlib.sha256(ch + sh_head).digest()
    assert th.hex() == hs["transcript_hash"]
    prk = hmac.new(b"stcp v1", ss, hashlib.sha256).digest()
    assert prk.hex() == hs["prk"]
    c_secret, s_secret = _expand(prk, "c2s", th, 32), _expand(prk, "s2c", th, 32)
    assert c_secret.hex() == hs["client_secret"] and s_secret.hex() == hs["server_secret"]
    confirm_key = _expand(prk, "confirm", th, 32)
    tag = hmac.new(confirm_key, th, hashlib.sha256).digest()
    assert confirm_key.hex() == hs["confirm_key"] and tag.hex() == hs["confirm_tag"]
    assert (sh_head + tag).hex() == hs["server_hello_record"]
    assert (_header(80, ccid, 0) + _hello(0x03, suite, inp["reject_code"], 0, bytes(32))).hex() == hs["reject_record"]

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
        nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, "big")))
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
        for (plo, _), (lo, hi) in zip(rs, rs[1:]):
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
    for d, chain in sv["keys"].items():
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

    client = Connection.client(_FixedCid(int(inp["client_cid"], 16), suite=suite), 0.0)
    [ch] = client.datagrams_to_send(0.0)
    assert ch.hex() == hs["client_hello_record"]
    endpoint = ServerEndpoint(_FixedCid(int(inp["server_cid"], 16)))
    server, new = endpoint.receive(ch, ("192.0.2.1", 1), 0.0)
    assert new and server.state == State.KEY_EXCHANGE
    [sh] = server.datagrams_to_send(0.0)
    assert sh.hex() == hs["server_hello_record"]
    assert (server._keys.send.fast is None) == (path == "python")

    client.receive_datagram(sh, 0.01)
    assert client.state == State.ENCRYPTED
    assert client._keys.send.secret.hex() == hs["client_secret"]
    assert client._keys.recv.secret.hex() == hs["server_secret"]
    # the client's first record (key confirmation + its receive window) and its first data
    assert client.datagrams_to_send(0.01) == [recs["c2s-1"]]
    client.send(b"GET /index.html\r\n")
    assert client.datagrams_to_send(0.01) == [recs["c2s-2"]]

    for name in ("c2s-1", "c2s-2"):
        endpoint.receive(recs[name], ("192.0.2.1", 1), 0.02)
    assert server.state == State.ENCRYPTED
    assert server.datagrams_to_send(0.02) == [recs["s2c-1"]]       # ACK 1..2 + MAX_DATA
    server.send(b"hello from the server")
    server.shutdown_write()
    assert server.datagrams_to_send(0.02) == [recs["s2c-2"]]

    for name in ("s2c-1", "s2c-2"):
        client.receive_datagram(recs[name], 0.03)
    events = list(client.events)
    assert DataReceived(b"hello from the server") in events and StreamFinished() in events

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

    # and the server's error CLOSE ends the client with the code and reason it carries
    client.receive_datagram(recs["s2c-3"], 0.06)
    assert client.state == State.CLOSED
    assert client.close_info == ConnectionClosed(CloseCode.PROTOCOL_VIOLATION, "unknown frame type 0x07",
                                                 by_peer=True, error=True)


def test_reject_vector_is_what_the_endpoint_sends(suite_name, sv, monkeypatch):
    """A server that does not accept the suite answers the vector client hello with the vector REJECT."""
    suite = SUITE_IDS[suite_name]
    other = [s for s in SUITE_IDS.values() if s != suite]
    endpoint = ServerEndpoint(Config(suite=other[0], accepted_suites=tuple(other)))
    conn, new = endpoint.receive(h(sv["handshake"]["client_hello_record"]), ("192.0.2.1", 1), 0.0)
    assert conn is None and not new
    assert [r for r, _ in endpoint.rejects] == [h(sv["handshake"]["reject_record"])]
    assert VECTORS["inputs"]["reject_code"] == wire.REJECT_SUITE
