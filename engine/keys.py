"""Terminal keys, derived from one master secret.

The database never holds a terminal key. Each key is
``HMAC-SHA256(master, "citycard/v1/terminal-key" || terminal_id || key_version)``,
so the engine can recompute any terminal's key from its id and the key
version stored in ``terminals.key_version``; rotating a key is moving to the
next version and provisioning its key into the terminal, without downtime
(``citycard terminal rotate-key``, ``engine/key_rotation.py``).

Card-office operators authenticate to the admin interface with a token
derived the same way under another label,
``hex(HMAC-SHA256(master, "citycard/v1/operator-token" || name))``: the
engine stores no operator secret, and ``citycard admin-token NAME`` prints
an operator's token for whoever holds the master secret.

The master secret is 32 random bytes kept in ``<data dir>/master.key``
(mode 0600, created on first use) or given in hex by ``CITYCARD_MASTER_KEY``.

>>> key = derive_terminal_key(bytes(32), terminal_id=7, key_version=1)
>>> len(key)
32
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import struct
from pathlib import Path

from engine.limits import OPERATOR_NAME_MAX_CHARS

MASTER_KEY_BYTES = 32  # 256 bits, the HMAC-SHA256 block of security
MASTER_KEY_FILE = "master.key"
MASTER_KEY_ENV = "CITYCARD_MASTER_KEY"

_DERIVATION_LABEL = b"citycard/v1/terminal-key"
_TERMINAL = struct.Struct(">IH")

# Neither label is a prefix of the other, so no operator name can make an
# operator token equal to a terminal key.
_OPERATOR_LABEL = b"citycard/v1/operator-token"

# Operator names end up in the audit trail, in logs and in an HTTP header:
# a plain, bounded alphabet keeps them unambiguous in all three.
_OPERATOR_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{OPERATOR_NAME_MAX_CHARS}}}")


class MasterKeyError(Exception):
    """The master secret is missing, unreadable or malformed (a configuration fault)."""


def derive_terminal_key(master: bytes, terminal_id: int, key_version: int) -> bytes:
    """Return the 32-byte key of one terminal at one key version."""
    if len(master) != MASTER_KEY_BYTES:
        raise ValueError(f"master key must be {MASTER_KEY_BYTES} bytes, got {len(master)}")
    message = _DERIVATION_LABEL + _TERMINAL.pack(terminal_id, key_version)
    return hmac.new(master, message, hashlib.sha256).digest()


def is_operator_name(name: str) -> bool:
    """True for 1..100 characters of ``A-Z a-z 0-9 . _ -``.

    >>> is_operator_name("ana.garcia"), is_operator_name("ana garcia")
    (True, False)
    """
    return _OPERATOR_NAME.fullmatch(name) is not None


def derive_operator_token(master: bytes, operator: str) -> str:
    """Return a card-office operator's token: 64 hex digits.

    >>> len(derive_operator_token(bytes(32), "ana.garcia"))
    64
    """
    if len(master) != MASTER_KEY_BYTES:
        raise ValueError(f"master key must be {MASTER_KEY_BYTES} bytes, got {len(master)}")
    if not is_operator_name(operator):
        raise ValueError(f"operator name must be 1 to {OPERATOR_NAME_MAX_CHARS} of A-Z a-z 0-9 . _ -, got {operator!r}")
    return hmac.new(master, _OPERATOR_LABEL + operator.encode("ascii"), hashlib.sha256).hexdigest()


def load_master_key(data_dir: Path, *, create: bool = True) -> bytes:
    """Read the master secret from the environment or the data directory.

    With ``create`` and no secret anywhere, a new one is written to
    ``data_dir/master.key`` with mode 0600.
    """
    from_env = os.environ.get(MASTER_KEY_ENV)
    if from_env:
        try:
            master = bytes.fromhex(from_env.strip())
        except ValueError as error:
            raise MasterKeyError(f"{MASTER_KEY_ENV} is not hex: {error}") from None
        if len(master) != MASTER_KEY_BYTES:
            raise MasterKeyError(
                f"{MASTER_KEY_ENV} must be {MASTER_KEY_BYTES} bytes ({2 * MASTER_KEY_BYTES} hex digits),"
                f" got {len(master)} bytes"
            )
        return master
    path = data_dir / MASTER_KEY_FILE
    if path.exists():
        master = path.read_bytes()
        if len(master) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"{path} must hold exactly {MASTER_KEY_BYTES} bytes, found {len(master)}")
        return master
    if not create:
        raise MasterKeyError(f"no master key: set {MASTER_KEY_ENV} or create {path}")
    data_dir.mkdir(parents=True, exist_ok=True)
    master = secrets.token_bytes(MASTER_KEY_BYTES)
    # O_EXCL: two processes starting at once must not write two different secrets.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_master_key(data_dir, create=False)
    with os.fdopen(fd, "wb") as file:
        file.write(master)
    return master
