"""A peer's identity: one RSA key that is both its libp2p peer id and its DHT signing key.

libp2p derives the peer id from the public key (sha256 multihash of the protobuf-wrapped DER key),
and hivemind's RSASignatureValidator signs DHT records whose subkey holds the owner's public key in
OpenSSH form. Using the same key for both lets anyone turn the owner key found in a DHT subkey back
into the peer id that signed it, so "signed by the coordinator" means "signed by the peer id in the
address the volunteer was given".
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

_OWNER_PREFIX = b"[owner:"
_OWNER_SUFFIX = b"]"
_TAG_SEPARATOR = b"#"


@dataclass(frozen=True)
class Identity:
    """An RSA private key with the libp2p peer id and DHT owner marker derived from it."""

    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Read a libp2p identity file, writing a new one (mode 0400) if it does not exist."""
        path = Path(path)
        if path.exists():
            return cls.from_libp2p_bytes(path.read_bytes())
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(identity.to_libp2p_bytes())
        os.chmod(path, 0o400)
        return identity

    @classmethod
    def from_libp2p_bytes(cls, data: bytes) -> Identity:
        message = crypto_pb2.PrivateKey.FromString(data)
        if message.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("only RSA identities are supported (hivemind signs DHT records with RSA)")
        key = serialization.load_der_private_key(message.data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("identity file does not hold an RSA private key")
        return cls(key)

    def to_libp2p_bytes(self) -> bytes:
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()

    @property
    def peer_id(self) -> PeerID:
        return peer_id_from_public_key(self.private_key.public_key())

    @property
    def owner_marker(self) -> bytes:
        """The '[owner:ssh-rsa ...]' marker that protects DHT subkeys written by this peer."""
        return self.validator().local_public_key

    def validator(self) -> RSASignatureValidator:
        """hivemind's record signer/validator, holding this identity's key."""
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": self.to_der()})
        return RSASignatureValidator(key)

    def to_der(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )


def peer_id_from_public_key(public_key: rsa.RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (same rule as the libp2p spec and p2pd)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256")))


def split_subkey(subkey: bytes | str) -> tuple[bytes, str]:
    """A DHT subkey '[owner:ssh-rsa ...]#Tag' as (owner marker, record type tag); the tag may be absent."""
    if isinstance(subkey, str):
        subkey = subkey.encode()
    marker, sep, tag = subkey.rpartition(_OWNER_SUFFIX + _TAG_SEPARATOR)
    if not sep:
        return subkey, ""
    try:
        return marker + _OWNER_SUFFIX, tag.decode("ascii")
    except UnicodeDecodeError:
        return subkey, ""


def tagged_subkey(marker: bytes, tag: str) -> bytes:
    """The subkey a writer stores a record of type `tag` under: its owner marker, then the tag."""
    return marker + _TAG_SEPARATOR + tag.encode("ascii")


def public_key_from_owner_marker(subkey: bytes | str) -> rsa.RSAPublicKey | None:
    """The RSA key in an '[owner:ssh-rsa ...]' subkey (optionally tagged); None if it holds no valid marker."""
    subkey, _ = split_subkey(subkey)
    if not (subkey.startswith(_OWNER_PREFIX) and subkey.endswith(_OWNER_SUFFIX)):
        return None
    try:
        key = serialization.load_ssh_public_key(subkey[len(_OWNER_PREFIX) : -len(_OWNER_SUFFIX)])
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


def peer_id_from_owner_marker(subkey: bytes | str) -> PeerID | None:
    """Peer id of the key in an '[owner:ssh-rsa ...]' subkey; None if the subkey holds no valid marker."""
    key = public_key_from_owner_marker(subkey)
    return None if key is None else peer_id_from_public_key(key)


def sign_bytes(identity: Identity, data: bytes) -> bytes:
    """An RSA PKCS#1 v1.5 / SHA-256 signature of data by this identity (deterministic)."""
    return identity.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def verify_bytes(public_key: rsa.RSAPublicKey, data: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
