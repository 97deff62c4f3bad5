"""Errors of the kernel datapaths (XDP, AF_XDP): each str() is one line saying what to do."""
from __future__ import annotations

from ..errors import STCPError


class XdpSetupError(STCPError):
    """The XDP datapath cannot be set up or inspected; str() is one line saying what to do."""


class XdpAlreadyAttached(XdpSetupError):
    pass


class XdpNotAttached(XdpSetupError):
    pass
