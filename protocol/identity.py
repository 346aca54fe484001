"""Ed25519 identities: one key per peer, persisted with 0600 permissions.

An author is named by the 32-byte raw public key, written as 64 hex digits.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import IdentityError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class Identity:
    """A peer's signing key.

    :param private_key: the Ed25519 key; use :meth:`load_or_create` to persist one.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def author(self) -> str:
        """The public key as 64 hex digits, the form records and headers carry."""
        return self.public_key.hex()

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Read the PEM key at ``path``, creating it (mode 0600, atomically) if absent."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        pem = identity._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise IdentityError(f"cannot create key file {path}: {exc.strerror}") from None
        return identity

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"key file {path} is not an unencrypted PEM key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def verify(author: str, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``author``'s Ed25519 signature of ``message``."""
    try:
        raw = bytes.fromhex(author)
    except ValueError:
        return False
    if len(raw) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
