"""The blocking client, `stcp.connect`: a socket-like STCP connection driven in the caller's thread.

The sans-IO Connection runs on its own connected UDP socket. A call that has to wait (the
handshake, recv with nothing buffered, sendall past the write limit, close) polls the socket
until a datagram arrives, the connection's timer is due or the call's timeout passes, as a
blocking socket does; a call that need not wait makes no system call beyond the send it
causes. There is no event loop and no thread per connection.

Between calls one thread per process, the keeper (stcp/keeper.py), runs the timers of connections
nobody is calling in: when a connection's timer is due and no call holds it, the keeper reads
what has arrived, runs the timer and sends what it causes (keepalive PINGs, acks, probes,
retransmissions). So a connection whose application simply does not call for a while stays
open (Config.keepalive, 10 s by default, is well inside the idle timeout at both ends), and
one that really went silent ends at its idle timeout by itself; the next call then raises
ConnectionTerminated (IDLE_TIMEOUT). The keeper acts at timer deadlines only: data the peer
sends while nobody calls waits in the socket until the next deadline or call. It never runs
while a call is in progress, and calls never wait for it: a call finding the lock held by the
keeper waits at most for one pass of its work.

Two threads may share a connection as they may share a socket (one sending, one receiving):
one of them at a time polls and acts on what arrives, the other waits for it to say so.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import threading
import warnings
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Hashable, List, Optional, Self, Tuple, Union

from . import wire
from .address import hostport
from .api import (
    MISSING,
    WRITE_HIGH_WATER,
    Missing,
    PrivateKey,
    ServerKey,
    client_config,
    closed_error,
    explain_timeout,
    handshake_error,
)
from .chunks import ChunkBuffer
from .connection import Config, Connection, ConnectionClosed, DataReceived, HandshakeCompleted, StreamFinished
from .datapath.heap import tune_heap
from .datapath.socket import (
    RECV_BATCH,
    RECV_ROUNDS,
    Outbox,
    connect_udp,
    enable_gro,
    own_records,
    recv_batch,
    send_datagrams,
    tune_socket,
)
from .errors import CloseCode, HandshakeTimeout, PeerUnreachable
from .keeper import Keeper

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

CLOSE_TIMEOUT = 10.0      # close() waits this long for the peer's acknowledgement when no timeout is set
KEEPER_RETRY = 0.005      # a due timer found while a call holds the connection: look again this soon

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


class BlockingConnection:
    """sendall, send, recv, recv_into, shutdown, close, settimeout, context manager.

    `timeout` (seconds, None to wait forever) bounds each call as a socket timeout does:
    recv and sendall raise socket.timeout when it passes. The handshake waits at most the
    timeout too (and at most Config.handshake_timeout), raising HandshakeTimeout.
    """

    def __init__(self, address: Tuple[str, int], timeout: Optional[float] = None, *,
                 server_key: Union[ServerKey, Missing] = MISSING, client_key: Optional[PrivateKey] = None,
                 config: Optional[Config] = None, cipher: Optional[str] = None):
        host, port = address[0], address[1]
        config = client_config(config, cipher, server_key, client_key, "connect")
        if timeout is not None and 0 < timeout < config.handshake_timeout:
            config = dataclasses.replace(config, handshake_timeout=timeout)
        self.timeout = timeout
        self._lock = threading.Lock()
        # made on first use (a second thread waiting, under the lock): most connections have
        # one thread, and a Condition costs ~10 us of a ~1 ms handshake
        self._cond_made: Optional[threading.Condition] = None
        self._call = _Call(self)          # `with self._call:` a public call (the lock, then the keeper told)
        self._waiting = 0               # threads waiting on _cond for the poller
        self._polling = False           # a thread is in poll(), without the lock
        self._poll_until: Optional[float] = None     # ... until then at the latest
        self._inbox = ChunkBuffer()
        self._eof = False
        self._established = False
        self._closed_info: Optional[ConnectionClosed] = None
        self._error: Optional[Exception] = None
        self._discard = False           # close(): received data is dropped (and credited)
        self._released = False
        self.icmp_errors = 0
        self.dropped = 0                # datagrams that named no record of this connection
        sock = self._sock = connect_udp(host, port)
        self._fd = sock.fileno()        # -1 once released, as sock.fileno() then says
        try:
            tune_socket(sock)
            tune_heap()
            self._gro = enable_gro(sock)
            self._outbox = Outbox(self._send_group)
            # another thread's call wakes a poller through this (a new timer, output waiting)
            self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._poller = select.poll()
            self._poll_mask = _POLLIN
            self._poller.register(self._fd, _POLLIN)
            self._poller.register(self._wakeup, _POLLIN)
            self._conn = Connection.client(config, monotonic())
            with self._lock:
                self._flush(monotonic())
                self._wait(self._is_open, None)
            _keeper.add(self, self._conn.get_timer())
        except BaseException as exc:
            if isinstance(exc, HandshakeTimeout):
                explain_timeout(exc, host, port, self.icmp_errors, self.dropped)
            with self._lock:
                self._release()
            if isinstance(exc, PeerUnreachable):
                raise PeerUnreachable(hostport(host, port)) from None
            raise

    def _cond(self) -> threading.Condition:
        """The Condition of threads waiting for the poller (call with the lock held)."""
        cond = self._cond_made
        if cond is None:
            cond = self._cond_made = threading.Condition(self._lock)
        return cond

    # --- the socket-like API ------------------------------------------------
    def sendall(self, data: bytes) -> None:
        """Queue data and send what the congestion window allows; waits (up to the timeout)
        only while more than the write limit (4 MiB) is unacknowledged."""
        with self._call:
            conn = self._conn
            self._check_sendable()
            now = monotonic()
            timer = conn.get_timer()
            if timer is not None and timer <= now:      # e.g. the idle timeout, after a long pause
                conn.handle_timer(now)
                self._flush(now)
                self._check_sendable()
            conn.send(data)
            self._flush(now)
            if conn.send_buffered > WRITE_HIGH_WATER:
                self._wait(self._can_write, self._deadline())
                if self._error is not None:
                    raise self._error
            elif self._polling:
                self._nudge()

    def send(self, data: bytes) -> int:
        """As sendall (STCP takes every byte given); returns len(data)."""
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        """Up to bufsize bytes, one received piece at a time; b"" once the peer has finished and
        everything was read. Raises the connection's end if it ended abnormally (after the data
        that arrived before), socket.timeout if the timeout passes first."""
        with self._call:
            if self._released:
                raise OSError(errno.EBADF, "the connection was closed")
            inbox = self._inbox
            if not inbox.size and not self._eof and self._error is None:
                self._wait(self._readable, self._deadline())
            if inbox.size:
                if bufsize <= 0:
                    return b""
                data = inbox.take_some(bufsize)
                if self._conn.consume(len(data)):      # a window update is due: send it now
                    self._flush(monotonic())
                    if self._polling:
                        self._nudge()
                return data
            if self._error is not None and not self._eof and bufsize > 0:
                raise self._error
            return b""

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0) -> int:
        """As recv, into buffer (at most nbytes, or len(buffer) if 0); returns the count."""
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view))
        view[:len(data)] = data
        return len(data)

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        """SHUT_WR (or SHUT_RDWR): finish sending; the peer reads EOF once it has every byte."""
        if how not in (socket.SHUT_WR, socket.SHUT_RDWR):
            return
        with self._call:
            conn = self._conn
            if self._closed_info is None and not conn.write_finished:
                conn.shutdown_write()
                self._flush(monotonic())
                if self._polling:
                    self._nudge()

    def close(self) -> None:
        """As a TCP socket's close: finish sending, give up reading (unread data is dropped and
        the peer told to stop), release the socket. Waits (up to the timeout, else 10 s) only
        until the peer has acknowledged everything sent, as the kernel would in the background;
        if it has not by then, the connection is aborted."""
        with self._lock:
            if self._released:
                return
            try:
                self._finish()
            finally:
                self._release()
        _keeper.forget(self)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.timeout = timeout

    def gettimeout(self) -> Optional[float]:
        return self.timeout

    def getpeername(self) -> Tuple[Any, ...]:
        return self._sock.getpeername()

    def getsockname(self) -> Tuple[Any, ...]:
        return self._sock.getsockname()

    def cipher(self) -> str:
        """The negotiated AEAD, as named in make_config (e.g. "aes-256-gcm")."""
        return {v: k for k, v in wire.SUITES.items()}[self._conn.suite]

    def peer_key(self) -> bytes:
        """The server's static public key, as it proved it in the handshake."""
        key = self._conn.peer_static_key
        assert key is not None          # a client is ENCRYPTED only with the server's key proven
        return key

    @property
    def connection(self) -> Connection:
        """The sans-IO connection (stats, rtt, close_info); drive it only through this object."""
        return self._conn

    def __enter__(self) -> Self:
        return self

    def __del__(self) -> None:
        # forgotten without close(): free the descriptors (nothing is sent), as a socket does
        if not getattr(self, "_released", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
            self._released = True
            self._fd = -1
            self._sock.close()
            if hasattr(self, "_wakeup"):
                os.close(self._wakeup)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- waiting ---------------------------------------------------------------
    def _is_open(self) -> bool:
        if self._error is not None:
            raise self._error
        return self._established

    def _readable(self) -> bool:
        return self._inbox.size > 0 or self._eof or self._error is not None

    def _can_write(self) -> bool:
        return self._conn.send_buffered <= WRITE_HIGH_WATER or self._error is not None

    def _write_done(self) -> bool:
        return self._closed_info is not None or self._conn.write_acknowledged

    def _deadline(self) -> Optional[float]:
        return None if self.timeout is None else monotonic() + self.timeout

    def _wait(self, ready: Callable[[], bool], deadline: Optional[float]) -> None:
        """Until ready() (the lock held): poll and act on what arrives, or, while another thread
        polls, wait for it to act. socket.timeout once deadline has passed; a timeout of 0 still
        looks at what is waiting once."""
        looked = False
        while not ready():
            if self._released:
                raise OSError(errno.EBADF, "the connection was closed")
            if looked and deadline is not None and monotonic() >= deadline:
                raise socket.timeout("timed out")
            if self._polling:
                self._waiting += 1
                try:
                    self._cond().wait(None if deadline is None else max(0.0, deadline - monotonic()))
                finally:
                    self._waiting -= 1
            else:
                self._pump(deadline)
            looked = True

    def _pump(self, deadline: Optional[float]) -> None:
        """One wait in poll() (the lock released meanwhile) until a datagram arrives, the
        connection's timer or deadline is due, or another thread nudges; then act on it."""
        conn = self._conn
        wake = conn.get_timer()
        if deadline is not None and (wake is None or deadline < wake):
            wake = deadline
        mask = _POLLIN | _POLLOUT if self._outbox.entries else _POLLIN
        if mask != self._poll_mask:
            self._poller.modify(self._fd, mask)
            self._poll_mask = mask
        self._polling, self._poll_until = True, wake
        self._lock.release()
        try:
            ready = self._poller.poll(None if wake is None else max(0.0, (wake - monotonic()) * 1000))
        finally:
            self._lock.acquire()
            self._polling = False
        if self._released:                # closed by another thread meanwhile
            if self._waiting:
                self._cond().notify_all()
            return
        now = monotonic()
        readable = False
        for fd, _ in ready:
            if fd == self._wakeup:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
            else:
                readable = True
        if wake is not None and now >= wake:        # else a datagram came first: no timer is due
            timer = conn.get_timer()
            if timer is not None and timer <= now:
                conn.handle_timer(now)
        if readable:
            self._receive(now)
        else:
            self._flush(now)
        if self._waiting:
            self._cond().notify_all()

    def _nudge(self) -> None:
        """Another thread polls: wake it if what this call did needs it sooner (a timer now due
        earlier, output waiting for the socket buffer to drain)."""
        timer = self._conn.get_timer()
        until = self._poll_until
        if self._outbox.entries or (timer is not None and (until is None or timer < until)):
            os.eventfd_write(self._wakeup, 1)

    # --- the keeper's side -------------------------------------------------------
    def run_timers(self, now: float) -> Optional[float]:
        """The keeper's pass (stcp/keeper.py) (its thread, never while a call runs): if the timer is due, take
        what has arrived, run the timer, send what it causes. Returns when to look again,
        None once released. While a call polls, the call runs the timers; the keeper still
        sleeps until the timer (not forever), so the reminder at the end of every call of a
        busy connection finds it asleep until then and need not wake it."""
        if not self._lock.acquire(blocking=False):
            return now + KEEPER_RETRY       # a call holds it, or is about to release it
        try:
            if self._released:
                return None
            conn = self._conn
            timer = conn.get_timer()
            if timer is None or timer > now:
                return timer
            if self._polling:               # due, and the polling call is about to run it
                return now + KEEPER_RETRY
            try:
                self._receive(now)          # an ACK that arrived may make the timer moot
                timer = conn.get_timer()
                if timer is not None and timer <= now:
                    conn.handle_timer(now)
                self._flush(now)
            except Exception as exc:        # the next call raises it; the keeper keeps the others
                self._error = exc
                return None
            if self._waiting:
                self._cond().notify_all()
            return conn.get_timer()
        finally:
            self._lock.release()

    # --- datagrams in and out ------------------------------------------------
    def _receive(self, now: float) -> None:
        conn = self._conn
        fd, gro, cid = self._fd, self._gro, conn.local_cid
        for _ in range(RECV_ROUNDS):
            try:
                batch = recv_batch(fd, gro)
            except ConnectionRefusedError:       # ICMP port unreachable: ends a handshake that heard nothing
                self.icmp_errors += 1
                conn.port_unreachable(now)
                continue
            except OSError:
                break
            if not batch:
                break
            mine, dropped = own_records(batch, cid)
            self.dropped += dropped
            if mine:
                conn.receive_datagrams(mine, now)
            # answer (acks, window updates) after every batch, as the socket datapath does
            self._flush(now)
            if len(batch) < RECV_BATCH:
                return
        self._flush(now)

    def _send_group(self, datagrams: List[bytes], addr: Optional[Hashable], segment_size: int = 0) -> int:
        return send_datagrams(self._fd, datagrams, addr, segment_size)

    def _flush(self, now: float) -> None:
        """Send what the connection has to say, then take its events."""
        conn = self._conn
        batches = conn.datagram_batches(now)
        outbox = self._outbox
        if len(batches) == 1 and not outbox.entries and batches[0][1] >= len(batches[0][0]):
            # the small-message case, one record: straight out, without the Outbox's grouping
            try:
                if send_datagrams(self._fd, [batches[0][0]], None):
                    batches = []
            except OSError:
                pass              # the Outbox knows which errors lose a datagram and which fail
        if batches:
            outbox.add(batches, None)
        if outbox.entries:
            outbox.send()         # what does not fit the socket buffer waits for POLLOUT
        events = conn.events
        while events:
            ev = events.popleft()     # stcp.events classes have no subclasses: `type() is`, not isinstance
            if type(ev) is DataReceived:
                if self._discard:
                    conn.consume(ev.size)
                else:
                    self._inbox.extend(ev.chunks)
            elif type(ev) is StreamFinished:
                self._eof = True
            elif type(ev) is HandshakeCompleted:
                self._established = True
            elif type(ev) is ConnectionClosed:
                self._on_closed(ev)

    def _on_closed(self, info: ConnectionClosed) -> None:
        self._closed_info = info
        if not self._established:
            self._error = handshake_error(info, self._conn.config)
            return
        self._error = closed_error(info)
        if self._error is None:
            self._eof = True

    def _check_sendable(self) -> None:
        if self._released:
            raise OSError(errno.EBADF, "the connection was closed")
        if self._error is not None:
            raise self._error

    # --- the end ---------------------------------------------------------------
    def _finish(self) -> None:
        """close() as TCP's: our direction finishes reliably, reading is given up. The peer's
        acknowledgement of our end is awaited (there is no kernel to finish it later); then,
        unless the peer has finished too, a CLOSE tells it we read no more, which ends the
        connection cleanly at its side since it has our end (docs/PROTOCOL.md, CLOSE)."""
        conn = self._conn
        self._flush(monotonic())          # take what has happened (the end may be news)
        if self._closed_info is not None or conn.is_closed:
            return
        self._discard = True              # unread data is dropped, as it arrives, and credited
        if self._inbox:
            conn.consume(len(self._inbox))
            self._inbox = ChunkBuffer()
        now = monotonic()
        if not conn.write_finished:
            conn.shutdown_write()
        self._flush(now)
        try:
            self._wait(self._write_done, now + (self.timeout or CLOSE_TIMEOUT))
        except socket.timeout:
            conn.close(CloseCode.APPLICATION_ABORT, "closed by the application before the peer "
                                                   "acknowledged its data")
        else:
            if self._closed_info is None:
                conn.close(CloseCode.NO_ERROR)
        self._flush(monotonic())

    def _release(self) -> None:
        """Close the socket, once no thread polls it (a thread waiting in this connection
        then gets OSError, as with a socket closed under it)."""
        if self._released:
            return
        self._released = True
        while self._polling:
            os.eventfd_write(self._wakeup, 1)
            self._waiting += 1
            try:
                self._cond().wait()
            finally:
                self._waiting -= 1
        self._fd = -1                   # the number may name another file once closed
        self._sock.close()
        if hasattr(self, "_wakeup"):
            os.close(self._wakeup)

class _Call:
    """`with conn._call:` around a public call: the connection's lock, and after it the
    keeper told of the connection's next timer (the call may have made it sooner)."""
    __slots__ = ("_conn",)

    def __init__(self, conn: BlockingConnection):
        self._conn = conn

    def __enter__(self) -> None:
        self._conn._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        conn = self._conn
        try:
            timer = None if conn._released else conn._conn.get_timer()    # when the keeper should look next
        finally:
            conn._lock.release()
        if timer is not None:
            _keeper.remind(timer)


_keeper = Keeper()


def connect(address: Tuple[str, int], timeout: Optional[float] = None, *,
            server_key: Union[ServerKey, Missing] = MISSING, client_key: Optional[PrivateKey] = None,
            config: Optional[Config] = None, cipher: Optional[str] = None) -> BlockingConnection:
    """Blocking client: `with stcp.connect(("127.0.0.1", 7443), server_key=KEY) as c: c.sendall(b"hi")`.
    Returns once the handshake is done (HandshakeTimeout if it is not within the timeout).

    server_key (required) and client_key are as for stcp.open_connection: the server's
    public key (bytes or base64), or stcp.UNAUTHENTICATED: accept any server key: an active
    attacker can read and change everything."""
    return BlockingConnection(address, timeout, server_key=server_key, client_key=client_key, config=config,
                              cipher=cipher)
