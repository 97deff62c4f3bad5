"""Exceptions and the close codes carried in CLOSE frames (docs/PROTOCOL.md §Close codes)."""
from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NO_ERROR = 0x00
    PROTOCOL_VIOLATION = 0x01   # a frame or record the state does not allow
    MALFORMED_RECORD = 0x02     # invalid record formatting
    AUTH_FAILURE = 0x03         # authentication / decryption failure
    FLOW_CONTROL_ERROR = 0x04
    HANDSHAKE_FAILED = 0x05
    STATE_ERROR = 0x06          # unexpected state transition
    INTERNAL_ERROR = 0x07
    APPLICATION_ABORT = 0x08
    KEY_UPDATE_ERROR = 0x09
    ACCESS_DENIED = 0x0A        # the client proved a static key the server does not admit
    # never sent on the wire, only reported locally
    IDLE_TIMEOUT = 0x100
    HANDSHAKE_TIMEOUT = 0x101
    STATELESS_RESET = 0x102     # the server answered with a valid RESET: it has no state for us
    PORT_UNREACHABLE = 0x103    # ICMP port unreachable for the client's hello: no server listens there


class STCPError(Exception):
    """Base class of every error STCP raises."""


class MalformedRecord(STCPError):
    code = CloseCode.MALFORMED_RECORD


class ProtocolViolation(STCPError):
    code = CloseCode.PROTOCOL_VIOLATION


class AuthenticationFailure(STCPError):
    code = CloseCode.AUTH_FAILURE


class FlowControlError(STCPError):
    code = CloseCode.FLOW_CONTROL_ERROR


class HandshakeFailure(STCPError):
    code = CloseCode.HANDSHAKE_FAILED


class KeyUpdateError(STCPError):
    code = CloseCode.KEY_UPDATE_ERROR


class AccessDenied(STCPError):
    code = CloseCode.ACCESS_DENIED


class InvalidTransition(STCPError):
    """A (state, event) pair that the transition table does not allow."""
    code = CloseCode.STATE_ERROR


class NotEncrypted(STCPError):
    """Application data was offered or requested outside the ENCRYPTED state."""


class ConnectionTerminated(STCPError, ConnectionError):
    """The connection ended abnormally; `code` and `reason` say why."""

    def __init__(self, code: int, reason: str = "", by_peer: bool = False):
        self.code = code
        self.reason = reason
        self.by_peer = by_peer
        try:
            name = CloseCode(code).name
        except ValueError:
            name = f"code 0x{code:x}"
        who = "peer terminated the connection" if by_peer else "connection terminated"
        super().__init__(f"{who}: {name}" + (f" ({reason})" if reason else ""))


class PeerUnreachable(STCPError, ConnectionRefusedError):
    """The server's host answered the client hello with ICMP "port unreachable": nothing listens
    on that UDP port (the handshake ends at once instead of at its timeout)."""

    def __init__(self, address: str = ""):
        self.address = address
        super().__init__(f"nothing listens on UDP {address or 'the server port'}: the host answered "
                         f"'port unreachable' (is the STCP server running?)")
class HandshakeFailed(ConnectionTerminated):
    """The client's handshake ended without an acceptable server hello, having seen one it
    refused or a REJECT: `reason` says what (e.g. "expected server key SHA256:..., presented
    SHA256:..." when the server, or a relay, holds another key than the one pinned)."""

    def __init__(self, reason: str):
        super().__init__(CloseCode.HANDSHAKE_FAILED, reason)
        self.args = (f"handshake failed: {reason}",)


class HandshakeTimeout(STCPError, TimeoutError):
    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"handshake timed out after {seconds:g} s")
