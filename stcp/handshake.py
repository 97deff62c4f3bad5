"""The version 2 handshake (docs/PROTOCOL.md §5): the server always proves its static
key, in the one round trip; the client may prove its own in its first protected record.

1. client -> server: CLIENT_HELLO (ephemeral E, the client's CID, a cookie field)
2. server: ee = DH(f, E), es = DH(s, E), transcript hash TH over CH' and the server hello,
   keys; -> SERVER_HELLO (ephemeral F, static S, the server's CID, confirmation tag)
3. client: the same DHs, verifies the tag (only the holder of s can produce it), applies
   its policy to S (pinned, recorded or any), ENCRYPTED; its first records start with
   CLIENT_AUTH when it has a static key (se = DH(c, F), a proof bound to TH)
4. server: ENCRYPTED on the client's first record that authenticates (and, with an allow
   list, proves a listed key)

Until step 3 succeeds nothing the client receives is authenticated, so it is a hint: a
REJECT, a COOKIE or a server hello that fails verification is noted and ignored
(ClientHandshake.on_record), and only the handshake timeout ends the attempt.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple, Union

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import wire
from .crypto import HandshakeSecrets, RecordKey, client_auth_proof, generate_keypair, shared_secret, transcript_hash
from .errors import HandshakeFailure, MalformedRecord
from .identity import StaticKey, fingerprint

# The client's server-key policy: a pinned public key, a callable deciding on a presented
# key (a known-hosts lookup that records a new host), or None to accept any key.
ServerKeyPolicy = Union[bytes, Callable[[bytes], bool], None]
# Where a server hello's ephemeral key pair comes from: a pair made ahead of need, or None
# when none is ready (stcp.keypool.EphemeralKeys.take).
KeySource = Callable[[], Optional[Tuple[X25519PrivateKey, bytes]]]


class Rejected(HandshakeFailure):
    """The server refuses a client hello; `reject_code` is the wire reject code."""

    def __init__(self, reject_code: int, message: str):
        self.reject_code = reject_code
        super().__init__(message)


class ServerKeyRefused(HandshakeFailure):
    """A server hello verified, but the client's policy does not accept its static key."""


REJECT_REASONS = {
    wire.REJECT_VERSION: "unsupported protocol version",
    wire.REJECT_SUITE: "unsupported cipher suite",
    wire.REJECT_KEY: "public key rejected",
    wire.REJECT_BUSY: "server busy: try again later",
}


@dataclass
class Keys:
    send: RecordKey
    recv: RecordKey


@dataclass
class Established:
    """What a client gets from a verified, accepted server hello."""
    keys: Keys
    server_cid: int
    server_key: bytes                 # S, proven by the confirmation tag
    client_auth: Optional[bytes]      # the encoded CLIENT_AUTH frame, if the client has a static key


def _record(cid: int, payload: bytes) -> bytes:
    return wire.pack_header(len(payload), cid, wire.HANDSHAKE_SEQ) + payload


# How informative a hint is, for the error reported at the handshake timeout.
_UNVERIFIED, _REJECTED, _WRONG_KEY = 1, 2, 3


class ClientHandshake:
    def __init__(self, suite: int, client_cid: int, server_key: ServerKeyPolicy = None,
                 static: Optional[StaticKey] = None):
        self.suite = suite
        self.client_cid = client_cid
        self._policy = server_key
        self._static = static
        private, public = generate_keypair()
        self._private: Optional[X25519PrivateKey] = private
        self._base = _record(0, wire.encode_hello(
            wire.Hello(wire.HS_CLIENT_HELLO, wire.PROTOCOL_VERSION, suite, client_cid, public)))
        self.hello_record = self._base       # the hello as sent: with the latest cookie, if any
        self.new_cookie = False              # a COOKIE changed hello_record since it was last sent
        self.hints = 0                       # replies noted and ignored
        self._reason: Optional[str] = None
        self._rank = 0

    def failure_reason(self) -> Optional[str]:
        """The most informative thing seen, for the error at the handshake timeout."""
        return self._reason

    def _note(self, rank: int, reason: str) -> None:
        self.hints += 1
        if rank > self._rank:
            self._rank, self._reason = rank, reason

    def on_record(self, record: bytes) -> Optional[Established]:
        """A handshake-class record during KEY_EXCHANGE: Established for a verified server
        hello whose static key the policy accepts; anything else is noted and ignored."""
        try:
            _, cid, _ = wire.parse_header(record)
            hello = wire.decode_hello(record[wire.HEADER_LEN:])
        except MalformedRecord:          # nothing to learn from it
            self.hints += 1
            return None
        if cid != self.client_cid or hello.kind == wire.HS_CLIENT_HELLO:
            self.hints += 1
            return None
        if hello.kind == wire.HS_REJECT:
            reason = REJECT_REASONS.get(hello.reject_code, f"reject code {hello.reject_code}")
            if hello.reject_code == wire.REJECT_SUITE:
                names = {number: name for name, number in wire.SUITES.items()}
                reason += f" ({names.get(self.suite, self.suite)}; the server accepts another)"
            self._note(_REJECTED, f"server rejected the handshake: {reason}")
            return None
        if hello.kind == wire.HS_COOKIE:
            self.hints += 1
            start = wire.HEADER_LEN + wire.CLIENT_HELLO_COOKIE_OFFSET
            hello_record = self._base[:start] + hello.cookie + self._base[start + wire.COOKIE_LEN:]
            if hello_record != self.hello_record:
                self.hello_record, self.new_cookie = hello_record, True
            return None
        try:
            return self._verify(record, hello)
        except ServerKeyRefused as exc:
            self._note(_WRONG_KEY, str(exc))
        except HandshakeFailure as exc:
            self._note(_UNVERIFIED, f"a server hello failed verification: {exc}")
        return None

    def _verify(self, record: bytes, hello: wire.Hello) -> Established:
        if hello.version != wire.PROTOCOL_VERSION or hello.suite != self.suite:
            raise HandshakeFailure("it changed the version or cipher suite")
        if self._private is None:
            raise HandshakeFailure("the handshake is over: its ephemeral key is gone")
        ee = shared_secret(self._private, hello.public_key)
        es = shared_secret(self._private, hello.static_key)
        secrets = HandshakeSecrets(ee, es, transcript_hash(self._base, record))
        secrets.check_confirmation(hello.confirm_tag)
        self._check_policy(hello.static_key)
        auth = None
        if self._static is not None:
            se = shared_secret(self._static.private, hello.public_key)
            proof = client_auth_proof(secrets.client_secret, se, secrets.transcript, self._static.public)
            auth = wire.encode_frame(wire.ClientAuthFrame(self._static.public, proof))
        self._private = None    # forward secrecy: the ephemeral key is no longer needed
        keys = Keys(RecordKey(self.suite, secrets.client_secret), RecordKey(self.suite, secrets.server_secret))
        return Established(keys, hello.sender_cid, hello.static_key, auth)

    def _check_policy(self, presented: bytes) -> None:
        policy = self._policy
        if policy is None:
            return
        if isinstance(policy, (bytes, bytearray)):
            if not hmac.compare_digest(bytes(policy), presented):
                raise ServerKeyRefused(f"expected server key {fingerprint(bytes(policy))}, "
                                       f"presented {fingerprint(presented)}")
        elif not policy(presented):
            raise ServerKeyRefused(f"server key {fingerprint(presented)} refused by the client's key policy")


class ServerHandshake:
    """The server's side, from an acceptable client hello until the client's first
    authenticated record (which may carry CLIENT_AUTH, checked with f and TH kept until then)."""

    def __init__(self, static: StaticKey, client_record: bytes, hello: wire.Hello, server_cid: int,
                 suites: Iterable[int], take_key: Optional[KeySource] = None):
        """Raises Rejected (the endpoint answers with a REJECT record) if the hello cannot be served.
        take_key: a fresh ephemeral key pair made ahead of need (a server's stcp.keypool), or None
        when it has none ready (then one is made here); asked only once the version and suite
        are acceptable."""
        if hello.version != wire.PROTOCOL_VERSION:
            raise Rejected(wire.REJECT_VERSION, f"client speaks version {hello.version}")
        if hello.suite not in suites:
            raise Rejected(wire.REJECT_SUITE, f"client asked for cipher suite 0x{hello.suite:02x}")
        private, public = (take_key() if take_key is not None else None) or generate_keypair()
        try:
            client_key = X25519PublicKey.from_public_bytes(hello.public_key)    # once for ee and es
            ee = shared_secret(private, client_key)
            es = shared_secret(static.private, client_key)
        except ValueError as exc:
            raise Rejected(wire.REJECT_KEY, f"peer public key rejected: {exc}") from None
        except HandshakeFailure as exc:
            raise Rejected(wire.REJECT_KEY, str(exc)) from None
        unsigned = _record(hello.sender_cid, wire.encode_hello(wire.Hello(
            wire.HS_SERVER_HELLO, wire.PROTOCOL_VERSION, hello.suite, server_cid, public, static_key=static.public)))
        secrets = HandshakeSecrets(ee, es, transcript_hash(client_record, unsigned))
        self.record = unsigned[:-wire.CONFIRM_TAG_LEN] + secrets.confirm_tag
        self.keys = Keys(RecordKey(hello.suite, secrets.server_secret), RecordKey(hello.suite, secrets.client_secret))
        self._private: Optional[X25519PrivateKey] = private
        self._transcript = secrets.transcript
        self._client_secret = secrets.client_secret

    def verify_client_auth(self, frame: wire.ClientAuthFrame) -> None:
        """Raise HandshakeFailure unless the proof shows possession of the presented key."""
        if self._private is None:
            raise HandshakeFailure("the handshake is over: its ephemeral key is gone")
        se = shared_secret(self._private, frame.static_key)
        expected = client_auth_proof(self._client_secret, se, self._transcript, frame.static_key)
        if not hmac.compare_digest(expected, frame.proof):
            raise HandshakeFailure("client authentication proof does not verify")

    def finish(self) -> None:
        """The handshake is over: forget the ephemeral key (forward secrecy)."""
        self._private = None
        self._client_secret = b""


def reject_record(client_cid: int, suite: int, reject_code: int) -> bytes:
    return _record(client_cid, wire.encode_hello(
        wire.Hello(wire.HS_REJECT, wire.PROTOCOL_VERSION, suite, reject_code=reject_code)))


def cookie_record(client_cid: int, suite: int, cookie: bytes) -> bytes:
    return _record(client_cid, wire.encode_hello(
        wire.Hello(wire.HS_COOKIE, wire.PROTOCOL_VERSION, suite, cookie=cookie)))
