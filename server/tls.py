"""TLS for the server's ports, with certificates re-read when their files change.

The gRPC port gets `server_credentials` (grpc.dynamic_ssl_server_credentials: gRPC asks for
the current certificates at every new connection, and the files are read again only once
their size, inode or mtime changed); the HTTP port gets `ssl_context`, which swaps in a
context made from the new files for each new connection in the same way. Connections
already open keep the certificate they started with. A file caught half-written (or a key
that does not match its certificate) is logged and the previous certificates stay in use
until the files are whole again.

With `client_ca`, clients must present a certificate signed by it (mutual TLS).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from .errors import StartupError

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Certificates:
    cert: bytes
    key: bytes
    client_ca: bytes | None


class CertificateFiles:
    """The PEM files of a TLS set-up, and whether they changed since they were last loaded."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.paths = (cert, key, *((client_ca,) if client_ca is not None else ()))
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._loaded: Fingerprint | None = None
        self._refused: Fingerprint | None = None
        self.current = self.load()

    def fingerprint(self) -> Fingerprint:
        stats = [path.stat() for path in self.paths]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def load(self) -> Certificates:
        """Read and check the files; raises StartupError saying what is wrong."""
        try:
            seen = self.fingerprint()
            loaded = Certificates(
                self.cert.read_bytes(),
                self.key.read_bytes(),
                None if self.client_ca is None else self.client_ca.read_bytes(),
            )
            # The ssl module checks what gRPC would only report at the first handshake:
            # PEM syntax, that the key matches the certificate, that the CA bundle parses.
            build_context(self.cert, self.key, self.client_ca)
        except (OSError, ssl.SSLError, ValueError) as error:
            raise StartupError(f"cannot use the TLS files {_names(self.paths)}: {error}") from None
        self._loaded = seen
        return loaded

    def refresh(self) -> Certificates | None:
        """The new certificates if the files changed and load cleanly, else None."""
        with self._lock:
            try:
                seen = self.fingerprint()
            except OSError:
                return None  # mid-replacement: the old files are still in use
            if seen == self._loaded or seen == self._refused:
                return None
            try:
                self.current = self.load()
            except StartupError as error:
                self._refused = seen  # logged once per version of the files
                logger.warning(
                    "new TLS files refused; the previous certificates stay in use",
                    extra={"error": str(error)},
                )
                return None
            logger.info("TLS certificates reloaded", extra={"cert": str(self.cert)})
            return self.current


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Credentials for grpc's add_secure_port that follow the files as they change."""

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        fresh = files.refresh()
        return None if fresh is None else _configuration(fresh)  # None: keep the current one

    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)  # stubs lack None
    return grpc.dynamic_ssl_server_credentials(
        _configuration(files.current),
        fetcher,
        require_client_authentication=files.client_ca is not None,
    )


def _configuration(certificates: Certificates) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(certificates.key, certificates.cert)], root_certificates=certificates.client_ca
    )


def build_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server-side SSLContext from the files as they are now (TLS 1.2 or newer)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


def ssl_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """An SSLContext for an asyncio/aiohttp server that picks up rotated certificates.

    Each new connection checks the files; once they changed, it (and every later one) is
    switched to a context built from the new files during its TLS handshake.
    """
    files = CertificateFiles(cert, key, client_ca)  # StartupError on a bad set of files
    initial = build_context(cert, key, client_ca)
    current = [initial]

    def on_hello(connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
        if files.refresh() is not None:
            try:
                current[0] = build_context(cert, key, client_ca)
            except (OSError, ssl.SSLError):  # changed again since refresh() read them
                logger.warning("new TLS files refused; the previous certificates stay in use")
        if current[0] is not initial:
            connection.context = current[0]

    initial.sni_callback = on_hello
    return initial


def _names(paths: tuple[Path, ...]) -> str:
    return ", ".join(str(p) for p in paths)
