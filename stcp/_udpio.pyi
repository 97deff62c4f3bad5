"""Batch UDP I/O in C (stcp/_ext/udpio.c): sendmmsg/recvmmsg, UDP GSO and GRO.

Non-blocking whatever the socket's mode; the GIL is released around each system call.
Addresses are numeric, as the socket module gives them: (host, port) for AF_INET,
(host, port, flowinfo, scope_id) for AF_INET6 (an AF_INET6 socket also takes an IPv4 host).
"""
from socket import socket
from typing import Any, Literal, Optional, Sequence, Tuple, Union, overload

from _typeshed import ReadableBuffer

Address = Union[Tuple[str, int], Tuple[str, int, int, int]]
FileDescriptorLike = Union[int, socket]

MAX_BATCH: int
SOL_UDP: int
UDP_SEGMENT: int
UDP_GRO: int

def sendmmsg(fd: FileDescriptorLike, datagrams: Sequence[ReadableBuffer], addr: Optional[Address] = None,
             segment_size: int = 0) -> int:
    """Datagrams sent (fewer than given when the socket buffer is full; 0 on EAGAIN).

    With segment_size > 0, each datagram longer than it is a UDP GSO buffer that the kernel
    cuts into segment_size-byte datagrams (the last may be shorter). OSError if the first fails.
    """
@overload
def recvmmsg(fd: FileDescriptorLike, max_n: int, bufsize: int,
             gro: Literal[False] = ...) -> list[Tuple[bytes, Optional[Address]]]: ...
@overload
def recvmmsg(fd: FileDescriptorLike, max_n: int, bufsize: int,
             gro: Literal[True]) -> list[Tuple[bytes, Optional[Address], int]]: ...
@overload
def recvmmsg(fd: FileDescriptorLike, max_n: int, bufsize: int, gro: bool) -> list[Any]:
    """Up to max_n waiting datagrams, [] if none; with gro, each item carries its segment size."""
