"""TLS for every specserve gRPC connection: the services' server side, and the channels that call them
(the router's to its replicas, the launcher's health checks, the client SDK, `generate --url`).

Certificates and keys are PEM files. A server presents `cert` and `key`; given `client_ca` it also
requires each client to present a certificate that CA signed (mutual TLS). A client checks the server's
certificate against `ca` (default: gRPC's bundled public roots) and, given `cert` and `key`, presents its
own. Without TLS settings everything stays plaintext, as on loopback; across hosts, use TLS.

A file that cannot be read is a clear error when the setting is made, not at the first call.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from specserve.errors import InvalidRequestError


def read_pem(path: str | Path, flag: str) -> bytes:
    """The bytes of a PEM file named by `flag`; InvalidRequestError when it is missing or holds no PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise InvalidRequestError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class ServerTls:
    """What a service presents, and (with `client_ca`) whom it lets in: the PEM files, read and checked
    once by `from_files`."""

    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by it
    cert_chain: bytes = b""
    private_key: bytes = b""
    client_ca_pem: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ServerTls:
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca else None, read_pem(cert, "--tls-cert"),
                   read_pem(key, "--tls-key"), read_pem(client_ca, "--tls-client-ca") if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca_pem,
                                           require_client_auth=self.client_ca_pem is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """The same settings for the router's HTTP API (HTTPS)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as exc:
            raise InvalidRequestError(f"--tls-cert / --tls-key / --tls-client-ca: {exc.reason or exc}") from None
        return context


@dataclass(frozen=True)
class ClientTls:
    """How a channel checks the server (`ca`), and what it presents for mutual TLS (`cert_chain`, `private_key`)."""

    ca: bytes | None = None  # None: gRPC's bundled public roots
    cert_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(cls, ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None) -> ClientTls:
        if (cert is None) != (key is None):
            raise InvalidRequestError("a client certificate needs its key: give --tls-client-cert and --tls-client-key "
                                      "together")
        return cls(read_pem(ca, "--tls-ca") if ca else None,
                   read_pem(cert, "--tls-client-cert") if cert else None,
                   read_pem(key, "--tls-client-key") if key else None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.private_key,
                                            certificate_chain=self.cert_chain)


def open_channel(target: str, tls: ClientTls | None, options: list | None = None) -> grpc.Channel:
    """A blocking channel to `target`: plaintext without `tls`."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def open_aio_channel(target: str, tls: ClientTls | None, options: list | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `target`: plaintext without `tls`."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
