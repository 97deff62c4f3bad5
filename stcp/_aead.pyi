"""STCP record protection in C (stcp/_ext/aead.c, OpenSSL EVP).

Record = header (length:u64 | cid:u64 | seq:u64, big-endian) + ciphertext + 16-byte tag;
nonce = iv XOR (0^32 || seq_be64); AAD = the header. stcp.crypto.RecordKey is the reference.
"""
from typing import Optional, Sequence, Union

from _typeshed import ReadableBuffer, WriteableBuffer

HEADER_LEN: int
TAG_LEN: int
FRAME_STREAM: int
STREAM_FLAG_FIN: int
STREAM_FRAME_OVERHEAD: int
OPENSSL_VERSION: str

class AuthError(ValueError):
    """A record failed authentication."""

class RecordCipher:
    """One direction's record protection for one key epoch; thread-safe, releases the GIL in batches."""

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
    def seal_batch(self, cid: int, first_seq: int, plaintexts: Sequence[ReadableBuffer]) -> list[bytes]:
        """Records with seqs first_seq, first_seq + 1, ..."""
    def seal_into(self, cid: int, first_seq: int, plaintexts: Sequence[ReadableBuffer],
                  out: WriteableBuffer) -> int:
        """Records laid back to back from out[0]; returns bytes written; ValueError if out is too small."""
    def seal_stream(self, cid: int, first_seq: int, data: ReadableBuffer, stream_offset: int, chunk: int,
                    fin: bool) -> bytes:
        """data cut into records of one STREAM frame of `chunk` bytes each (the last may be shorter and
        carries FIN if fin), sealed back to back with seqs first_seq, first_seq + 1, ...; at most 4096
        records. ValueError on empty data or chunk outside 1..65535."""
    def open_records(self, datagrams: Sequence[Union[ReadableBuffer, tuple]], cid: int, epoch: int,
                     largest_pn: int, limit: int, max_len: int = ...) -> list:
        """One connection's datagrams of a receive batch (stcp.crypto.RecordKey.open_records is the
        reference): stretches of in-order stream data, other new authentic records, and the rest."""
    def open_batch(self, records: Sequence[ReadableBuffer]) -> list[Union[bytes, None]]:
        """Plaintexts, None where a record is malformed or fails authentication (seq from each header)."""
