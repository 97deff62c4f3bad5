"""STCP: a secure transport in which encryption is part of the transport itself.

    server = await stcp.start_server(handler, "127.0.0.1", 7443, server_key="server.key")
    reader, writer = await stcp.open_connection("127.0.0.1", 7443, server_key=server.public_key)
    server = await stcp.serve(handler, "127.0.0.1", 7443)      # datapath="socket"|"xdp"|"afxdp"
    with stcp.connect(("127.0.0.1", 7443), server_key=KEY) as conn: conn.sendall(b"hello")

A client names the server key it accepts (server_key=: the server's public key, or
stcp.UNAUTHENTICATED, which lets an active attacker read and change everything).
"""
__version__ = "0.1.0"

from .api import UNAUTHENTICATED, StreamReader, StreamWriter, make_config, open_connection
from .blocking import BlockingConnection, connect
from .connection import Config
from .errors import ConnectionTerminated, HandshakeFailed, HandshakeTimeout, NotEncrypted, STCPError
from .identity import InvalidKey, fingerprint, generate_private_key, public_key
from .server import Server, serve, start_server

__all__ = ["open_connection", "serve", "start_server", "connect", "make_config", "Config", "Server",
           "StreamReader", "StreamWriter", "BlockingConnection", "STCPError", "ConnectionTerminated",
           "HandshakeFailed", "HandshakeTimeout", "NotEncrypted", "UNAUTHENTICATED", "InvalidKey",
           "generate_private_key", "public_key", "fingerprint"]
