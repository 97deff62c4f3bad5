"""The X25519 handshake with key confirmation (docs/PROTOCOL.md §5 Handshake and key schedule).

1. client -> server: CLIENT_HELLO (client's public key and the CID it wants to receive on)
2. server: shared secret, transcript hash, keys; -> SERVER_HELLO (server's public key,
   server's CID, HMAC key-confirmation tag over the transcript)
3. client: shared secret, verifies the tag, switches to ENCRYPTED
4. server: switches to ENCRYPTED on the first record that authenticates under the new keys
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

from . import wire
from .crypto import HandshakeSecrets, RecordKey, generate_keypair, shared_secret, transcript_hash
from .errors import HandshakeFailure


class Rejected(HandshakeFailure):
    """The server refused a client hello; `reject_code` is the wire reject code."""

    def __init__(self, reject_code: int, message: str):
        self.reject_code = reject_code
        super().__init__(message)


REJECT_REASONS = {
    wire.REJECT_VERSION: "unsupported protocol version",
    wire.REJECT_SUITE: "unsupported cipher suite",
    wire.REJECT_KEY: "public key rejected",
}


@dataclass
class Keys:
    send: RecordKey
    recv: RecordKey


def _record(cid: int, payload: bytes) -> bytes:
    return wire.pack_header(len(payload), cid, wire.HANDSHAKE_SEQ) + payload


class ClientHandshake:
    def __init__(self, suite: int, client_cid: int):
        self.suite = suite
        self.client_cid = client_cid
        self._private, public = generate_keypair()
        self.hello_record = _record(0, wire.encode_hello(
            wire.Hello(wire.HS_CLIENT_HELLO, wire.PROTOCOL_VERSION, suite, client_cid, public)))

    def on_server_hello(self, record: bytes, hello: wire.Hello) -> Tuple[Keys, int]:
        """Verify the server hello; return the keys and the server's CID."""
        if hello.kind == wire.HS_REJECT:
            reason = REJECT_REASONS.get(hello.reject_code, f"reject code {hello.reject_code}")
            raise Rejected(hello.reject_code, f"server rejected the handshake: {reason}")
        if hello.kind != wire.HS_SERVER_HELLO:
            raise HandshakeFailure("expected a server hello")
        if hello.version != wire.PROTOCOL_VERSION or hello.suite != self.suite:
            raise HandshakeFailure("server hello changed the version or cipher suite")
        shared = shared_secret(self._private, hello.public_key)
        secrets = HandshakeSecrets(shared, transcript_hash(self.hello_record, record))
        secrets.check_confirmation(hello.confirm_tag)
        self._private = None    # forward secrecy: the ephemeral key is no longer needed
        return Keys(RecordKey(self.suite, secrets.client_secret), RecordKey(self.suite, secrets.server_secret)), \
            hello.sender_cid


def server_respond(client_record: bytes, hello: wire.Hello, server_cid: int,
                   suites: Iterable[int]) -> Tuple[bytes, Keys]:
    """Answer a client hello: return the server hello record and the server's keys.

    Raises Rejected (the endpoint answers with a REJECT record) if the hello cannot be served.
    """
    if hello.version != wire.PROTOCOL_VERSION:
        raise Rejected(wire.REJECT_VERSION, f"client speaks version {hello.version}")
    if hello.suite not in suites:
        raise Rejected(wire.REJECT_SUITE, f"client asked for cipher suite 0x{hello.suite:02x}")
    private, public = generate_keypair()
    try:
        shared = shared_secret(private, hello.public_key)
    except HandshakeFailure as exc:
        raise Rejected(wire.REJECT_KEY, str(exc)) from None
    unsigned = _record(hello.sender_cid, wire.encode_hello(
        wire.Hello(wire.HS_SERVER_HELLO, wire.PROTOCOL_VERSION, hello.suite, server_cid, public)))
    secrets = HandshakeSecrets(shared, transcript_hash(client_record, unsigned))
    record = _record(hello.sender_cid, wire.encode_hello(
        wire.Hello(wire.HS_SERVER_HELLO, wire.PROTOCOL_VERSION, hello.suite, server_cid, public,
                   confirm_tag=secrets.confirm_tag)))
    keys = Keys(RecordKey(hello.suite, secrets.server_secret), RecordKey(hello.suite, secrets.client_secret))
    return record, keys


def reject_record(client_cid: int, suite: int, reject_code: int) -> bytes:
    return _record(client_cid, wire.encode_hello(
        wire.Hello(wire.HS_REJECT, wire.PROTOCOL_VERSION, suite, 0, bytes(wire.PUBLIC_KEY_LEN),
                   reject_code=reject_code)))
