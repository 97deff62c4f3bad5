"""Key schedule and record protection (docs/PROTOCOL.md §5.4 Key schedule, §6 Record protection).

Only library primitives: X25519, HKDF-Expand (SHA-256) and the AEADs come from
`cryptography` (OpenSSL); HKDF-Extract and the key-confirmation tag are one
HMAC-SHA256 each, from the standard library's hmac (OpenSSL's HMAC through hashlib),
as docs/PROTOCOL.md §5.4 writes them. The nonce is the per-direction static IV XOR the
record's 64-bit sequence number; a sender never reuses a sequence number under
one key (Connection allocates them from a strictly increasing counter), so a
nonce never repeats under a key.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from types import ModuleType
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Type, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from . import wire
from .errors import AuthenticationFailure, HandshakeFailure, KeyUpdateError

if TYPE_CHECKING:
    from ._aead import RecordCipher

# C record protection (stcp/_ext/aead.c, OpenSSL EVP); STCP_PURE_PYTHON=1 keeps the
# pure-Python path below, which stays the reference and the fallback.
_aead: Optional[ModuleType] = None
if os.environ.get("STCP_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _aead
    except ImportError:
        _aead = None
ACCELERATED = _aead is not None

HKDF_SALT = b"stcp v2"
KEY_LEN = 32
IV_LEN = 12
# RFC 9001 §6.6 confidentiality limits, in records per key.
CONFIDENTIALITY_LIMIT = {
    wire.SUITE_AES_256_GCM: 1 << 23,
    wire.SUITE_CHACHA20_POLY1305: 1 << 62,
}
_Aead = Union[AESGCM, ChaCha20Poly1305]
_AEADS: Dict[int, Type[_Aead]] = {wire.SUITE_AES_256_GCM: AESGCM, wire.SUITE_CHACHA20_POLY1305: ChaCha20Poly1305}
_SEQ = struct.Struct("!Q")
_SHA256 = SHA256()


def generate_keypair() -> Tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def shared_secret(private: X25519PrivateKey, peer_public: Union[bytes, X25519PublicKey]) -> bytes:
    """X25519 with the all-zero result (a small-order peer key) rejected. `peer_public` is the
    32 raw bytes, or an X25519PublicKey made from them once for several DHs with one key."""
    try:
        if not isinstance(peer_public, X25519PublicKey):
            peer_public = X25519PublicKey.from_public_bytes(peer_public)
        secret = private.exchange(peer_public)
    except ValueError as exc:  # OpenSSL refuses small-order points itself
        raise HandshakeFailure(f"peer public key rejected: {exc}") from None
    if not any(secret):
        raise HandshakeFailure("peer public key gives an all-zero shared secret")
    return secret


def transcript_hash(client_hello_record: bytes, server_hello_record: bytes) -> bytes:
    """SHA-256 over CH' (the client hello record with its cookie field zeroed) and the server
    hello record up to its confirmation tag."""
    return hashlib.sha256(wire.client_hello_transcript_form(client_hello_record)
                          + wire.server_hello_transcript_part(server_hello_record)).digest()


def hkdf_expand(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869) with info = "stcp " || label || context: cryptography's.

    tests/test_crypto.py and tests/test_vectors.py check it against RFC 5869 written out
    over hmac; with cryptography 50 it costs what that loop did (a handshake's key
    schedule, seven expands, ~80-100 us either way)."""
    return HKDFExpand(_SHA256, length, b"stcp " + label + context).derive(secret)


class HandshakeSecrets:
    """Secrets derived once from the two DH results (ee, es) and the transcript hash."""

    def __init__(self, ee: bytes, es: bytes, transcript: bytes):
        prk = hkdf_extract(ee + es)
        self.transcript = transcript
        self.client_secret = hkdf_expand(prk, b"c2s", transcript, 32)
        self.server_secret = hkdf_expand(prk, b"s2c", transcript, 32)
        confirm_key = hkdf_expand(prk, b"confirm", transcript, 32)
        self.confirm_tag = hmac.digest(confirm_key, transcript, "sha256")     # one-shot: no HMAC object

    def check_confirmation(self, tag: bytes) -> None:
        if not hmac.compare_digest(self.confirm_tag, tag):
            raise HandshakeFailure("server key confirmation tag does not verify")


def client_auth_proof(client_secret: bytes, se: bytes, transcript: bytes, client_static: bytes) -> bytes:
    """The CLIENT_AUTH proof: HMAC(auth_key, TH || C), auth_key = HKDF-Expand(HKDF-Extract(
    salt = client_secret, IKM = se), "stcp cauth" || TH, 32). Only the holder of c (or of f)
    computes se, and TH ties the proof to this handshake."""
    auth_key = hkdf_expand(hmac.digest(client_secret, se, "sha256"), b"cauth", transcript, 32)
    return hmac.digest(auth_key, transcript + client_static, "sha256")


def reset_key(static_private: bytes) -> bytes:
    """The stateless-reset key, HKDF-Expand(static private key, "stcp reset"): every worker
    and every restart of a server with one identity key derive the same tokens."""
    return hkdf_expand(static_private, b"reset", b"", 32)


def reset_token(key: bytes, server_cid: int) -> bytes:
    return hmac.digest(key, _SEQ.pack(server_cid), "sha256")[:wire.RESET_TOKEN_LEN]


def hkdf_extract(ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869): HMAC-SHA256 keyed with the salt."""
    return hmac.digest(HKDF_SALT, ikm, "sha256")


def next_secret(secret: bytes) -> bytes:
    return hkdf_expand(secret, b"ku", b"", 32)


class RecordKey:
    """One direction's key for one key epoch."""

    __slots__ = ("suite", "epoch", "secret", "aead", "iv_int", "key", "iv", "fast")

    def __init__(self, suite: int, secret: bytes, epoch: int = 0):
        if suite not in _AEADS:
            raise HandshakeFailure(f"unsupported cipher suite 0x{suite:02x}")
        self.suite = suite
        self.epoch = epoch
        self.secret = secret
        self.key = hkdf_expand(secret, b"key", b"", KEY_LEN)
        self.iv = hkdf_expand(secret, b"iv", b"", IV_LEN)
        self.iv_int = int.from_bytes(self.iv, "big")
        # stcp._aead.RecordCipher (seal/open and the batch calls) or None; the pure-Python
        # AEAD object is made only when it is used
        self.fast: Optional[RecordCipher] = _aead.RecordCipher(suite, self.key, self.iv) if _aead is not None else None
        self.aead: Optional[_Aead] = None if self.fast is not None else _AEADS[suite](self.key)

    def next(self) -> "RecordKey":
        if self.epoch >= wire.MAX_EPOCH:      # the epoch is 16 bits of the seq: no key after the last
            raise KeyUpdateError("key epochs exhausted")
        return RecordKey(self.suite, next_secret(self.secret), self.epoch + 1)

    def _pure_aead(self) -> _Aead:
        if self.aead is None:
            self.aead = _AEADS[self.suite](self.key)
        return self.aead

    def nonce(self, seq: int) -> bytes:
        return (self.iv_int ^ seq).to_bytes(IV_LEN, "big")

    def seal(self, cid: int, seq: int, plaintext: bytes) -> bytes:
        """Return the whole record: header (authenticated as AAD) and ciphertext."""
        if self.fast is not None:
            return self.fast.seal(cid, seq, plaintext)
        header = wire.pack_header(len(plaintext) + wire.AEAD_TAG_LEN, cid, seq)
        return header + self._pure_aead().encrypt(self.nonce(seq), plaintext, header)

    def seal_stream(self, cid: int, first_seq: int, data: Union[bytes, bytearray, memoryview], stream_offset: int,
                    chunk: int, fin: bool) -> bytes:
        """`data` cut into records of one STREAM frame of `chunk` bytes each (the last may be
        shorter and carries FIN if `fin`), sealed back to back with seqs first_seq, first_seq + 1, ...

        All records but the last have one size, so the result can go to the kernel as one UDP
        GSO buffer. The C path does the whole run in one call; this loop is its reference."""
        if self.fast is not None:
            return self.fast.seal_stream(cid, first_seq, data, stream_offset, chunk, fin)
        if not 1 <= chunk <= 0xFFFF or not len(data):
            raise ValueError("chunk must be between 1 and 65535 bytes and data must not be empty")
        out = []
        mv = memoryview(data)
        for i, start in enumerate(range(0, len(mv), chunk)):
            piece = mv[start:start + chunk]
            last = start + chunk >= len(mv)
            frame = wire.encode_stream(stream_offset + start, bytes(piece), fin and last)
            out.append(self.seal(cid, first_seq + i, frame))
        return b"".join(out)

    def open_records(self, datagrams: List[wire.DatagramEntry], cid: int, epoch: int, largest_pn: int, limit: int,
                     max_len: int = wire.MAX_UDP_PAYLOAD) -> list:
        """One connection's datagrams of a receive batch, in order (an entry may be a (buffer,
        segment_size) pair: wire.expand_datagrams). A record is new when its
        header is well formed for `cid` in this key's `epoch`, it is no longer than `max_len`,
        and its pn is above `largest_pn` and above every pn before it in `datagrams` (so it
        cannot be a replay). New records are
        opened; each stretch of new authentic records with consecutive pns whose plaintexts
        are plain in-order stream data (one STREAM frame without FIN, each starting where the
        previous ended, ending at or below `limit`, below 2^62) is joined. In datagram order:
        (offset, count, data, first_pn, record_bytes) for a stretch, (plaintext, pn,
        record_len) for any other new authentic record, the datagram itself for the rest."""
        if self.fast is not None:
            return self.fast.open_records(datagrams, cid, epoch, largest_pn, limit, max_len)
        high = max(largest_pn, 0)
        opened = []                  # (datagram, pn, plaintext or None)
        for d in wire.expand_datagrams(datagrams):
            pn, pt = 0, None
            if len(d) >= wire.HEADER_LEN:
                length, rcid, seq = wire.HEADER_STRUCT.unpack_from(d)
                if rcid == cid and seq:
                    pn = seq & wire.PN_MASK
                    new = pn > high
                    high = max(high, pn)
                    if new and seq >> wire.EPOCH_SHIFT == epoch and length == len(d) - wire.HEADER_LEN \
                            and wire.HEADER_LEN + wire.AEAD_TAG_LEN <= len(d) <= max_len:
                        try:
                            pt = self.open(d, seq)
                        except AuthenticationFailure:
                            pt = None
            opened.append((d, pn, pt))
        out: list = []
        overhead = wire.STREAM_FRAME_OVERHEAD
        stretch = None               # [offset, count, pieces, first_pn, record_bytes, next_offset, last_pn]
        for d, pn, pt in opened:
            simple = False
            if pt is not None and len(pt) >= overhead:
                ftype, flags, off, length = wire.STREAM_HEADER_STRUCT.unpack_from(pt)
                simple = ftype == wire.FRAME_STREAM and not flags and length == len(pt) - overhead \
                    and off + length <= limit and off + length < 1 << 62
            if simple and pt is not None and stretch is not None and stretch[5] == off and stretch[6] + 1 == pn:
                stretch[1] += 1
                stretch[2].append(pt[overhead:])
                stretch[4] += len(d)
                stretch[5], stretch[6] = off + length, pn
                continue
            if stretch is not None:
                out.append((stretch[0], stretch[1], b"".join(stretch[2]), stretch[3], stretch[4]))
                stretch = None
            if simple and pt is not None:
                stretch = [off, 1, [pt[overhead:]], pn, len(d), off + length, pn]
            elif pt is not None:
                out.append((pt, pn, len(d)))
            else:
                out.append(d)
        if stretch is not None:
            out.append((stretch[0], stretch[1], b"".join(stretch[2]), stretch[3], stretch[4]))
        return out

    def open(self, record: bytes, seq: int) -> bytes:
        """Decrypt a record whose header was already parsed; raise AuthenticationFailure."""
        if self.fast is not None:
            try:
                return self.fast.open(record, seq)
            except ValueError:  # _aead.AuthError, or a record too short or mis-framed
                raise AuthenticationFailure("record failed authentication") from None
        mv = memoryview(record)
        try:
            return self._pure_aead().decrypt(self.nonce(seq), mv[wire.HEADER_LEN:], mv[:wire.HEADER_LEN])
        except InvalidTag:
            raise AuthenticationFailure("record failed authentication") from None
