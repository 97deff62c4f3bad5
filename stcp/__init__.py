"""STCP: a secure transport in which encryption is part of the transport itself."""
__version__ = "0.1.0"
