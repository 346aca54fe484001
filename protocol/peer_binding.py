"""Binding a swarm author to the libp2p peer it runs: a provider record may name only the
author's own peer.

A libp2p peer id is the multihash (SHA-256) of the peer's public key, serialized as libp2p's
``PublicKey`` protobuf. A :class:`PeerBinding` carries that serialized key and the peer's
signature, made with its libp2p private key (RSA, as hivemind makes them), of the author's
key under a domain string. Anyone can check, without dialing, that the peer id a record names
hashes from the key and that the key signed for the record's author: a stranger can no
longer point fetchers at somebody else's peer, and every made-up peer costs an RSA key.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from pydantic import StringConstraints

from protocol.errors import MergeswarmError
from protocol.schema import Body

_DOMAIN = b"mergeswarm-peer-v1\n"
# hivemind makes 2048-bit keys, the in-memory test swarm 1024-bit ones; larger ones would not
# leave room in a provider record
RSA_BITS = (1024, 2048)

Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{16,1400}={0,2}$")]


class PeerBindingError(MergeswarmError):
    """A libp2p key that cannot be read or used."""


class PeerBinding(Body):
    """A libp2p peer vouches for a swarm author: its public key and its signature."""

    key: Base64  # libp2p PublicKey protobuf: what the peer id hashes
    sig: Base64  # PKCS#1 v1.5 / SHA-256 signature of _DOMAIN + the author's key (hex)


def peer_id_of(binding: PeerBinding) -> str:
    """The base58 peer id the binding's key hashes to."""
    digest = hashlib.sha256(base64.b64decode(binding.key)).digest()
    return PeerID(b"\x12\x20" + digest).to_base58()


def bound(binding: PeerBinding, peer_id: str, author: str) -> bool:
    """Whether ``binding`` shows that peer ``peer_id`` vouches for ``author``."""
    try:
        if peer_id_of(binding) != peer_id:
            return False
        key = crypto_pb2.PublicKey.FromString(base64.b64decode(binding.key))
        if key.key_type != crypto_pb2.RSA:
            return False
        public = serialization.load_der_public_key(key.data)
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size not in RSA_BITS:
            return False
        message = _DOMAIN + author.encode()
        public.verify(base64.b64decode(binding.sig), message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, Exception):  # noqa: BLE001 - base64, protobuf and DER all raise
        return False
    return True


def bind(private_key: rsa.RSAPrivateKey, author: str) -> PeerBinding:
    """The binding of the peer whose libp2p key is ``private_key`` to ``author``."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    sig = private_key.sign(_DOMAIN + author.encode(), padding.PKCS1v15(), hashes.SHA256())
    return PeerBinding(key=base64.b64encode(key).decode(), sig=base64.b64encode(sig).decode())


def load_p2p_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA private key of a libp2p key file (libp2p's ``PrivateKey`` protobuf, as hivemind
    writes it)."""
    try:
        stored = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        key = serialization.load_der_private_key(stored.data, password=None)
    except Exception as exc:  # noqa: BLE001 - file, protobuf and DER errors have no common base
        raise PeerBindingError(f"{path}: not a readable libp2p key ({exc})") from None
    if stored.key_type != crypto_pb2.RSA or not isinstance(key, rsa.RSAPrivateKey):
        raise PeerBindingError(f"{path}: not an RSA libp2p key")
    return key


def write_p2p_key(path: Path, bits: int = 2048) -> rsa.RSAPrivateKey:
    """Make a libp2p RSA key file at ``path`` (mode 0400, as hivemind does)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = key.private_bytes(  # PKCS#1, as hivemind and go-libp2p write RSA keys
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString())
    path.chmod(0o400)
    return key
