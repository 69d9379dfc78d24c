"""TLS settings (services/rpc/tls.py): files are read and checked when the settings are made, with errors
that name the flag; the processes that use them are in tests/e2e/test_tls.py."""

from __future__ import annotations

import pytest

from specserve.errors import InvalidRequestError
from specserve.rpc.tls import ClientTls, ServerTls


def test_settings_read_their_pem_files(tls_files):
    server = ServerTls.from_files(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    assert server.cert_chain.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" in server.private_key
    assert server.client_ca_pem == tls_files.ca.read_bytes()
    assert server.ssl_context() is not None and server.credentials() is not None
    client = ClientTls.from_files(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    assert client.ca == tls_files.ca.read_bytes() and client.credentials() is not None
    assert ClientTls.from_files().ca is None  # TLS with gRPC's public roots


def test_a_missing_or_non_pem_file_names_its_flag(tls_files, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"--tls-key .*missing.key: cannot read it"):
        ServerTls.from_files(tls_files.server_cert, tmp_path / "missing.key")
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(InvalidRequestError, match=r"--tls-ca .*ca.der: not a PEM file"):
        ClientTls.from_files(ca=not_pem)


def test_a_client_certificate_needs_its_key(tls_files):
    with pytest.raises(InvalidRequestError, match="--tls-client-cert and --tls-client-key together"):
        ClientTls.from_files(ca=tls_files.ca, cert=tls_files.client_cert)


def test_a_key_that_does_not_match_the_certificate_is_refused_for_https(tls_files):
    mismatched = ServerTls.from_files(tls_files.server_cert, tls_files.client_key)
    with pytest.raises(InvalidRequestError, match="--tls-cert / --tls-key"):
        mismatched.ssl_context()
