"""The ACK and STREAM frames of a request/response record in C (stcp/_ext/frames.c);
stcp.wire.encode_ack_stream_ref and stcp.wire.decode_ack_stream_ref are the references."""
from typing import Optional, Sequence, Tuple

from _typeshed import ReadableBuffer

FRAME_ACK: int
FRAME_STREAM: int
MAX_ACK_RANGES: int
STREAM_FRAME_OVERHEAD: int

def encode_ack_stream(ranges: Optional[Sequence[Tuple[int, int]]], delay_us: int, offset: int,
                      data: Optional[ReadableBuffer]) -> bytes:
    """An ACK of `ranges` (none when empty or None; the first MAX_ACK_RANGES), then a STREAM
    frame of `data` at `offset` without FIN (none when data is None). ValueError for values
    no frame can carry."""
def decode_ack_stream(plaintext: ReadableBuffer
                      ) -> Optional[Tuple[Optional[Tuple[Tuple[int, int], ...]], int, int, Optional[bytes], bool]]:
    """(ack ranges or None, delay_us, offset, data or None, fin) of a plaintext that is an ACK,
    a STREAM frame filling the rest, or both in that order; None for any other plaintext;
    stcp.errors.ProtocolViolation for a malformed ACK."""
