"""STCP: a secure transport in which encryption is part of the transport itself.

    reader, writer = await stcp.open_connection("127.0.0.1", 7443)
    server = await stcp.serve(handler, "127.0.0.1", 7443)      # datapath="socket"|"xdp"|"afxdp"
    with stcp.connect(("127.0.0.1", 7443)) as conn: conn.sendall(b"hello")
"""
__version__ = "0.1.0"

from .api import StreamReader, StreamWriter, make_config, open_connection
from .blocking import BlockingConnection, connect
from .connection import Config
from .errors import ConnectionTerminated, HandshakeTimeout, NotEncrypted, STCPError
from .server import Server, serve, start_server

__all__ = ["open_connection", "serve", "start_server", "connect", "make_config", "Config", "Server",
           "StreamReader", "StreamWriter", "BlockingConnection", "STCPError", "ConnectionTerminated",
           "HandshakeTimeout", "NotEncrypted"]
