"""TLS on real processes: `serve --embedded` over gRPC and HTTPS, mutual TLS, and `specserve up` whose
router reaches its replicas over mutual TLS. A client has to trust the server's CA (plaintext or another
CA is refused), and with --tls-client-ca the server has to trust the client's certificate."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.client import Client, ClientTls
from specserve.errors import UnavailableError

MAX_TOKENS = 16


def refused(address: str, tls: ClientTls | None) -> bool:
    """True when a Generate call through `tls` (None: plaintext) cannot get through."""
    with Client(address, timeout=10, tls=tls) as client:
        try:
            client.generate("Hi", max_tokens=1)
        except UnavailableError:
            return True
    return False


def health_status(address: str, tls: ClientTls | None) -> str:
    channel = grpc.insecure_channel(address) if tls is None else grpc.secure_channel(address, tls.credentials())
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_embedded_serves_grpc_and_https_over_tls_only(launch, model_path, tls_files, short_prompts, greedy_reference):
    served = launch(["serve", "--embedded", "--spec", "ngram", "--num-blocks", "32", "--port", "0", "--http-port", "0",
                     "--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key),
                     "--model", str(model_path)], last="router")
    address = served.addresses["router"]
    trusted = ClientTls.from_files(ca=tls_files.ca)
    with Client(address, tls=trusted) as client:
        output = client.generate(short_prompts[0], max_tokens=MAX_TOKENS)
    assert output.token_ids == greedy_reference(short_prompts[:1], MAX_TOKENS)[0]
    assert refused(address, None)  # plaintext
    assert refused(address, ClientTls.from_files(ca=tls_files.other_ca))  # a CA that did not sign it

    http = dict(f.split("=", 1) for f in served.lines["router"].split()[1:])["http"]
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    with urllib.request.urlopen(f"https://{http}/v1/models", context=context, timeout=10) as response:
        assert json.load(response)["object"] == "list"
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # trusting another CA fails
        urllib.request.urlopen(f"https://{http}/v1/models", timeout=10,
                               context=ssl.create_default_context(cafile=str(tls_files.other_ca)))
    with pytest.raises(OSError):  # and speaks no plaintext HTTP
        urllib.request.urlopen(f"http://{http}/v1/models", timeout=10)
    with urllib.request.urlopen(f"https://{http}/v1/models", context=context, timeout=10) as response:
        assert response.status == 200  # still serving after the failed handshakes


def test_mutual_tls_admits_only_clients_with_a_certificate_of_its_ca(launch, model_path, tls_files):
    served = launch(["serve", "--embedded", "--spec", "off", "--num-blocks", "32", "--port", "0",
                     "--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key),
                     "--tls-client-ca", str(tls_files.ca), "--model", str(model_path)], last="router")
    address = served.addresses["router"]
    with_cert = ClientTls.from_files(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    with Client(address, tls=with_cert) as client:
        assert len(client.generate("Say hi.", max_tokens=4).token_ids) == 4
    assert refused(address, ClientTls.from_files(ca=tls_files.ca))  # no client certificate


def test_up_runs_every_service_over_mutual_tls(launch, model_path, tls_files, short_prompts, greedy_reference):
    """The router calls its verifier and drafter over mutual TLS; none of them answers plaintext."""
    cluster = launch(["up", "--verifiers", "1", "--drafters", "1", "--spec", "ngram", "--num-blocks", "64",
                      "--port", "0", "--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key),
                      "--tls-ca", str(tls_files.ca), "--tls-client-ca", str(tls_files.ca),
                      "--model", str(model_path)], last="router")
    client_tls = ClientTls.from_files(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    prompts = short_prompts[1:3]
    with Client(cluster.addresses["router"], tls=client_tls) as client:
        outputs = [client.generate(prompt, max_tokens=MAX_TOKENS) for prompt in prompts]
    assert [o.token_ids for o in outputs] == greedy_reference(prompts, MAX_TOKENS)
    assert sum(o.spec["drafted"] for o in outputs) > 0  # the drafter replica was reached
    for name in ("verifier-0", "drafter-0", "router"):
        assert health_status(cluster.addresses[name], client_tls) == "SERVING"
        assert health_status(cluster.addresses[name], None) == "UNAVAILABLE"
