"""Peer identity: one Ed25519 key gives the libp2p peer id and signs the peer's DHT records.

The key is stored in libp2p's protobuf ``PrivateKey`` format (key type Ed25519, 64 bytes seed + public key),
which the libp2p daemon reads directly, so the peer id that the transport announces is the one that the
record signatures prove. A libp2p peer id of an Ed25519 key is the *identity* multihash of the protobuf
``PublicKey`` (libp2p peer-id spec), so any reader can check that a public key belongs to a peer id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

_IDENTITY_MULTIHASH = 0x00


def peer_id_from_public_key(public_key: bytes) -> PeerID:
    """The libp2p peer id of a raw 32-byte Ed25519 public key.

    :raises ValueError: if ``public_key`` is not 32 bytes.
    """
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public_key).SerializeToString()
    return PeerID(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key`` (raw 32 bytes)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass
class Identity:
    """An Ed25519 key pair; ``peer_id`` is the libp2p peer id the transport uses with this key."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> PeerID:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    def to_libp2p_bytes(self) -> bytes:
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + self.public_key).SerializeToString()

    @classmethod
    def from_libp2p_bytes(cls, data: bytes) -> "Identity":
        """:raises ValueError: if ``data`` is not a libp2p Ed25519 private key."""
        try:
            message = crypto_pb2.PrivateKey.FromString(data)
        except Exception as e:
            raise ValueError(f"not a libp2p private key: {e}") from e
        if message.key_type != crypto_pb2.KeyType.Ed25519 or len(message.data) not in (64, 96):
            raise ValueError("identity file must hold an Ed25519 key (libp2p protobuf format)")
        return cls(Ed25519PrivateKey.from_private_bytes(message.data[:32]))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.to_libp2p_bytes())

    @classmethod
    def load_or_create(cls, path: str) -> "Identity":
        """Load the key at ``path``, or create it there (mode 0600) if the file does not exist.

        :raises ValueError: if the file exists but does not hold an Ed25519 key, or the path cannot be read or
            written (a directory, no permission); the message names the path.
        """
        try:
            if os.path.isdir(path):
                raise ValueError("it is a directory, not a key file")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return cls.from_libp2p_bytes(f.read())
            identity = cls.generate()
            identity.save(path)
            return identity
        except (OSError, ValueError) as e:
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(f"identity {path}: {text}") from e


_HELD_LOCKS: list = []  # open key files whose locks this process holds until it exits


def lock_identity(path: str) -> None:
    """Take an exclusive lock on the key file at ``path`` for the rest of this process's life (``flock``: the
    kernel drops it when the process exits, even on SIGKILL; the libp2p daemon does not inherit it).

    Two processes with one key are one libp2p peer id: libp2p accepts that without a word, and the swarm then mixes
    them up (connections reach either, each one's DHT record overwrites the other's). A second peer or DHT node
    started with a key file that a running one on this machine holds is refused instead.

    :raises ValueError: if another process holds the key, or the file cannot be opened; the message names the path
    """
    import fcntl

    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"identity {path}: {e.strerror or e}") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"identity {path} is already used by another running peer or DHT node on this machine; "
                         "two processes with one key would share one peer id: give each its own --identity") from None
    _HELD_LOCKS.append(f)
