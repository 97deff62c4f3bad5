"""STCP record protection in C (stcp/_ext/aead.c; the bulk calls in aead_send.c and
aead_receive.c; OpenSSL EVP).

Record = header (length:u64 | cid:u64 | seq:u64, big-endian) + ciphertext + 16-byte tag;
nonce = iv XOR (0^32 || seq_be64); AAD = the header. stcp.crypto.RecordKey is the reference.
"""
from typing import Optional, Sequence, Tuple, Union, final

from _typeshed import ReadableBuffer

HEADER_LEN: int
TAG_LEN: int
FRAME_STREAM: int
STREAM_FLAG_FIN: int
STREAM_FRAME_OVERHEAD: int
OPENSSL_VERSION: str

class AuthError(ValueError):
    """A record failed authentication."""

@final
class RecordCipher:
    """One direction's record protection for one key epoch; thread-safe, releases the GIL for bulk calls."""

    @property
    def suite(self) -> int: ...
    def __init__(self, suite: int, key: bytes, iv: bytes) -> None: ...
    def seal(self, cid: int, seq: int, plaintext: ReadableBuffer) -> bytes:
        """The whole record: header + ciphertext + tag."""
    def open(self, record: ReadableBuffer, seq: Optional[int] = None) -> bytes:
        """Plaintext of a whole record; the nonce's seq is the header's unless given.

        Raises AuthError (a ValueError) on tag failure, ValueError if the record is shorter
        than header + tag or its length field is not len(record) - 24.
        """
    def seal_stream(self, cid: int, first_seq: int, data: ReadableBuffer, stream_offset: int, chunk: int,
                    fin: bool) -> bytes:
        """data cut into records of one STREAM frame of `chunk` bytes each (the last may be shorter and
        carries FIN if fin), sealed back to back with seqs first_seq, first_seq + 1, ...; at most 4096
        records. ValueError on empty data or chunk outside 1..65535."""
    def open_records(self, datagrams: Sequence[Union[ReadableBuffer, Tuple[ReadableBuffer, int]]], cid: int,
                     epoch: int, largest_pn: int, limit: int, max_len: int = ...
                     ) -> list[Union[Tuple[int, int, bytes, int, int], Tuple[bytes, int, int], ReadableBuffer]]:
        """One connection's datagrams of a receive batch, in order; an entry may be a (buffer,
        segment_size) pair standing for the datagrams back to back in it. In datagram order:
        (offset, count, data, first_pn, record_bytes) for each stretch of new records of plain
        in-order stream data, (plaintext, pn, record_len) for any other new authentic record,
        and the datagram itself for everything else (not new, another epoch or connection,
        longer than max_len, malformed, not authentic). stcp.crypto.RecordKey.open_records is
        the reference."""
