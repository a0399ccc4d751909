"""TLS on the terminal connection, as an option on both ends.

The protocol authenticates every frame by itself (the handshake and the
seals of ``engine/seal.py``), but sends card uids, amounts and balances in
clear. Where terminals reach the engine over a network the city does not
control, ``citycard serve --tls-cert FILE --tls-key FILE`` wraps the
listener in TLS (1.2 at least) and terminals verify the engine's
certificate (``citycard tap --tls-ca FILE``).

>>> context = client_context()          # the system's trusted CAs
>>> context.minimum_version == MINIMUM_VERSION
True
"""

from __future__ import annotations

import ssl

# TLS 1.0 and 1.1 are deprecated (RFC 8996); every supported terminal stack has 1.2.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(Exception):
    """A certificate, key or CA file is missing, unreadable or invalid (a configuration fault)."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The listener's context: its certificate chain and private key (PEM)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as error:
        raise TlsConfigError(f"TLS: no such file: {error.filename or cert_file}") from None
    except ssl.SSLError as error:
        raise TlsConfigError(
            f"TLS: cannot use certificate {cert_file} with key {key_file}: {error.reason or error}"
        ) from None
    except OSError as error:
        raise TlsConfigError(f"TLS: cannot read {error.filename or cert_file}: {error.strerror or error}") from None
    return context


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A terminal's context: verify the engine against ``ca_file`` (PEM), or
    the system's trusted CAs when None; the host name is checked too."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except FileNotFoundError:
        raise TlsConfigError(f"TLS: no such CA file: {ca_file}") from None
    except ssl.SSLError as error:
        raise TlsConfigError(f"TLS: cannot use CA file {ca_file}: {error.reason or error}") from None
    except OSError as error:
        raise TlsConfigError(f"TLS: cannot read CA file {ca_file}: {error.strerror or error}") from None
    context.minimum_version = MINIMUM_VERSION
    return context
