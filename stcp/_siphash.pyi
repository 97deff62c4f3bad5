"""SipHash-2-4 with the 128-bit output in C (stcp/_ext/siphash.c); stcp.siphash.siphash128_ref
is the reference."""
from _typeshed import ReadableBuffer

def siphash128(key: ReadableBuffer, data: ReadableBuffer) -> bytes:
    """16 bytes: SipHash-2-4-128 of data under the 16-byte key."""
