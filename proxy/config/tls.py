"""An https upstream's ``ssl.SSLContext``, built once from its ``tls`` settings.

The config check builds one too, so a missing or unreadable file, a file
without a certificate or a key that does not match is reported with its
setting's path before the gateway starts (or before a reload is applied).
"""

from __future__ import annotations

import ssl

from .types import TlsSettings


class TlsFileError(Exception):
    """A file named in ``tls`` cannot be used; ``setting`` is the key that names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.message = message


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's
    # password, and a gateway in a container would wait there for ever.
    raise _EncryptedKey


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context for connections to one upstream: its CA file or the system's CAs
    (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` included), hostname checked, and its client
    certificate when it has one. Raises ``TlsFileError``."""
    ca_file = settings.ca_file if settings.verify else None
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError is one: a file without a PEM certificate
        raise TlsFileError("ca_file", f"cannot use {ca_file}: {_reason(exc)}") from None
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert_file is not None:
        _load_client_certificate(context, settings.cert_file, settings.key_file)
    return context


def _load_client_certificate(context: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
    for setting, path in (("cert_file", cert_file), ("key_file", key_file)):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise TlsFileError(setting, f"cannot read {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKey:
        raise TlsFileError("key_file", f"{key_file or cert_file} holds an encrypted private key; "
                                       "give the gateway an unencrypted one (kept in a Secret)") from None
    except ssl.SSLError as exc:
        if key_file is None:
            raise TlsFileError("cert_file", f"{cert_file}: not a PEM certificate with its private key "
                                            "(or set key_file)") from None
        why = f" ({exc.reason.lower().replace('_', ' ')})" if exc.reason else ""
        raise TlsFileError("cert_file", f"{cert_file} and {key_file}: not a PEM certificate and "
                                        f"its private key{why}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    return exc.strerror or str(exc)
