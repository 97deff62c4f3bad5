"""Key schedule primitives against independent implementations."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from stcp import crypto, wire
from stcp.errors import CloseCode, HandshakeFailure, KeyUpdateError


@pytest.mark.parametrize("length", [1, 12, 32, 33, 64, 100])
def test_expand_is_rfc5869_hkdf_expand(length):
    secret = bytes(range(32))
    ours = crypto._expand(secret, b"key", b"\x01\x02", length)
    theirs = HKDFExpand(hashes.SHA256(), length, b"stcp key\x01\x02").derive(secret)
    assert ours == theirs


def test_extract_then_expand_is_rfc5869_hkdf():
    shared = bytes(range(100, 132))
    ours = crypto._expand(crypto._extract(shared), b"c2s", b"th", 32)
    theirs = HKDF(hashes.SHA256(), 32, crypto.HKDF_SALT, b"stcp c2sth").derive(shared)
    assert ours == theirs


@pytest.mark.parametrize("peer", [bytes(32), (1).to_bytes(32, "little"),
                                  bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")])
def test_small_order_public_keys_are_rejected(peer):
    with pytest.raises(HandshakeFailure):
        crypto.shared_secret(X25519PrivateKey.generate(), peer)


def test_running_out_of_key_epochs_is_a_key_update_error():
    """The epoch is 16 bits of the seq: past wire.MAX_EPOCH there is no next key, and that is
    a key-update failure (close code KEY_UPDATE_ERROR), not a forged record."""
    last = crypto.RecordKey(wire.SUITE_AES_256_GCM, bytes(32), wire.MAX_EPOCH)
    with pytest.raises(KeyUpdateError, match="epochs exhausted") as info:
        last.next()
    assert info.value.code == CloseCode.KEY_UPDATE_ERROR
    assert crypto.RecordKey(wire.SUITE_AES_256_GCM, bytes(32), wire.MAX_EPOCH - 1).next().epoch == wire.MAX_EPOCH
