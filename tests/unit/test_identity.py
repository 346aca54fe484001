"""Ed25519 identities persisted in the data directory."""

from __future__ import annotations

import stat

import pytest

from protocol.errors import IdentityError
from protocol.identity import Identity, verify


def test_key_is_created_once_with_owner_only_permissions(tmp_path):
    path = tmp_path / "data" / "identity.pem"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).author == first.author
    assert len(first.author) == 64


def test_signatures_verify_only_for_the_signer_and_message():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"msg")
    assert verify(a.author, sig, b"msg")
    assert not verify(b.author, sig, b"msg")
    assert not verify(a.author, sig, b"msh")
    assert not verify("zz" * 32, sig, b"msg")
    assert not verify(a.author, sig[:-1], b"msg")


def test_unreadable_or_foreign_key_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(IdentityError, match="garbage.pem.*not an unencrypted PEM"):
        Identity.load(garbage)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "ec.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        Identity.load(other)
