"""Key schedule primitives against independent implementations."""
from __future__ import annotations

import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stcp import crypto, wire
from stcp.errors import CloseCode, HandshakeFailure, KeyUpdateError


def rfc5869_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2.3 written out: T(i) = HMAC(PRK, T(i-1) | info | i), an independent check."""
    out, t = b"", b""
    for i in range(1, -(-length // 32) + 1):
        t = hmac.digest(prk, t + info + bytes([i]), "sha256")
        out += t
    return out[:length]


def test_rfc5869_expand_reference_is_right():
    """The reference itself, on RFC 5869 Appendix A.1 (Test Case 1)."""
    prk = bytes.fromhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
    okm = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    assert hmac.digest(bytes(range(13)), b"\x0b" * 22, "sha256") == prk
    assert rfc5869_expand(prk, bytes(range(0xF0, 0xFA)), 42).hex() == okm


@pytest.mark.parametrize("length", [1, 12, 32, 33, 64, 100])
def test_expand_is_rfc5869_hkdf_expand(length):
    secret = bytes(range(32))
    ours = crypto.hkdf_expand(secret, b"key", b"\x01\x02", length)
    assert ours == rfc5869_expand(secret, b"stcp key\x01\x02", length)


def test_extract_then_expand_is_rfc5869_hkdf():
    shared = bytes(range(100, 132))
    ours = crypto.hkdf_expand(crypto.hkdf_extract(shared), b"c2s", b"th", 32)
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
