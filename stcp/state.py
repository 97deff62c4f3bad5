"""The connection state machine (docs/PROTOCOL.md §10.1) as data: states, events, one table.

`transition` is the only place that decides whether a move is legal; anything not in
TRANSITIONS raises InvalidTransition.
"""
from __future__ import annotations

import enum

from .errors import InvalidTransition


class State(enum.Enum):
    INIT = "INIT"
    KEY_EXCHANGE = "KEY_EXCHANGE"
    ENCRYPTED = "ENCRYPTED"
    ERROR = "ERROR"
    CLOSED = "CLOSED"


class Event(enum.Enum):
    SEND_HELLO = "send_hello"            # client: hello sent
    RECV_HELLO = "recv_hello"            # server: a valid client hello accepted
    KEYS_CONFIRMED = "keys_confirmed"    # client: server's tag verified; server: first authenticated record
    FAILURE = "failure"                  # malformed/unauthenticated record, protocol or state violation, reject
    FINISHED = "finished"                # graceful close completed, or the peer's clean CLOSE
    TIMEOUT = "timeout"                  # handshake or idle timeout
    ABORT = "abort"                      # the local application aborted
    TERMINATED = "terminated"            # ERROR has been reported (and the peer told where possible)


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.INIT, E.SEND_HELLO): S.KEY_EXCHANGE,
    (S.INIT, E.RECV_HELLO): S.KEY_EXCHANGE,
    (S.INIT, E.ABORT): S.CLOSED,
    (S.KEY_EXCHANGE, E.KEYS_CONFIRMED): S.ENCRYPTED,
    (S.KEY_EXCHANGE, E.FAILURE): S.ERROR,
    (S.KEY_EXCHANGE, E.TIMEOUT): S.CLOSED,
    (S.KEY_EXCHANGE, E.ABORT): S.CLOSED,
    (S.ENCRYPTED, E.FAILURE): S.ERROR,
    (S.ENCRYPTED, E.FINISHED): S.CLOSED,
    (S.ENCRYPTED, E.TIMEOUT): S.CLOSED,
    (S.ENCRYPTED, E.ABORT): S.CLOSED,
    (S.ERROR, E.TERMINATED): S.CLOSED,
}


def transition(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"event {event.value} is not allowed in state {state.value}") from None
