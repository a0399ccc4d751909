"""Signatures on the lists a terminal keeps for working offline.

A terminal that loses its link decides taps from its own copy of the hot
list and of its service's rules, and may keep them for days: it must be able
to tell, at any time and without the engine, that they come from the engine.
Every HOTLIST page and RULES message is signed with Ed25519 (RFC 8032):

    signature = Ed25519-Sign(list_key, label || content)

``content`` is the message's body without its last 64 bytes (the signature);
``label`` is ``citycard/v1/hotlist`` or ``citycard/v1/rules`` (ASCII, no
terminator; neither is a prefix of the other), so a page of one list can
never pass for the other. The content names the list's versions (and for
rules, the service) but no terminal: one signed page serves every terminal
of the city, and a terminal can keep it and verify it again later.

The private key is not stored anywhere: its 32-byte seed is derived from the
engine's master secret with HKDF-SHA256 under its own label::

    seed = HKDF-SHA256(ikm = master, salt = (none), info = "citycard/v1/list-signing-key", L = 32)

Terminals are provisioned with the public key (``citycard list-key``), which
changes only with the master secret.

>>> signer = ListSigner(bytes(32))
>>> signature = signer.sign(HOTLIST_LABEL, b"content")
>>> verify(signer.public_key, HOTLIST_LABEL, b"content", signature)
True
>>> verify(signer.public_key, RULES_LABEL, b"content", signature)
False
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine.keys import MASTER_KEY_BYTES
from engine.seal import hkdf_sha256

# HKDF "info" of the list-signing key: its own label, so that it has nothing
# in common with terminal keys or operator tokens derived from the same secret.
LIST_KEY_LABEL = b"citycard/v1/list-signing-key"

# What each signature is over, before the content.
HOTLIST_LABEL = b"citycard/v1/hotlist"
RULES_LABEL = b"citycard/v1/rules"

SEED_BYTES = 32  # an Ed25519 private key
PUBLIC_KEY_BYTES = 32


def derive_list_seed(master: bytes) -> bytes:
    """The Ed25519 seed of the list-signing key, from the master secret."""
    if len(master) != MASTER_KEY_BYTES:
        raise ValueError(f"master key must be {MASTER_KEY_BYTES} bytes, got {len(master)}")
    return hkdf_sha256(master, b"", LIST_KEY_LABEL, SEED_BYTES)


class ListSigner:
    """Signs list contents with the key derived from the master secret."""

    __slots__ = ("_key", "public_key")

    def __init__(self, master: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(derive_list_seed(master))
        self.public_key: bytes = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, label: bytes, content: bytes) -> bytes:
        """The 64-byte signature of ``label || content``."""
        return self._key.sign(label + content)

    def __repr__(self) -> str:
        return f"ListSigner(public_key={self.public_key.hex()})"


def verify(public_key: bytes, label: bytes, content: bytes, signature: bytes) -> bool:
    """True when ``signature`` is the list key's over ``label || content``
    (what a terminal checks before it believes a page)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, label + content)
    except InvalidSignature:
        return False
    return True
