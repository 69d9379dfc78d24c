"""Session fixtures shared by every test: the default model's GGUF, the shared data directory, throwaway
TLS certificates.

Triton kernels are tested on CPU through the interpreter. `triton.jit` picks interpreter or compiler when
triton itself is first imported (torch and transformers may import it while other folders are collected),
so the variable is set here, before any test module is imported;
tests/unit/kernels/test_tree_attention.py checks that it took effect.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from specserve.errors import ModelFetchError  # noqa: E402
from specserve.model_fetch import ensure_default_model, specserve_home  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The verified default GGUF, fetched once if missing."""
    offline = os.environ.get("SPECSERVE_OFFLINE") == "1"
    try:
        return ensure_default_model(specserve_home(os.environ), offline=offline)
    except ModelFetchError as exc:
        if offline:  # an explicit offline run without the model skips; anywhere else it is a failure
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`$SPECSERVE_DATA_DIR`, else the `shared/data` folder beside the repository."""
    path = Path(os.environ.get("SPECSERVE_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        message = f"no data directory at {path}; set SPECSERVE_DATA_DIR"
        if os.environ.get("CI") == "true":  # CI always has shared/ beside the clone: missing is a failure
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tokenizer(model_path: Path):
    from specserve.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(model_path)


@pytest.fixture(scope="session")
def llama_model(model_path: Path):
    """Our float32 Llama on the real weights, shared read-only by every engine a test builds."""
    from specserve.engine.llm_engine import build_model

    return build_model(str(model_path), "float32")


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """transformers' model on the same GGUF: a test-only reference, loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def spec_bench_prompts(data_dir: Path) -> list[str]:
    """First-turn questions of Spec-Bench, in file order."""
    import json

    with open(data_dir / "spec_bench" / "question.jsonl") as f:
        return [json.loads(line)["turns"][0] for line in f]


# ---- throwaway certificates for the TLS tests ----------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key,
                 ca: bool, usages: list | None = None, hosts: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_files(folder: Path) -> TlsFiles:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("specserve test CA", ca_key, _name("specserve test CA"), ca_key, ca=True)
    _write(folder / "ca.pem", None, ca_cert)
    server_key = ec.generate_private_key(ec.SECP256R1())
    # serverAuth and clientAuth: `specserve up` lets the router show the services' own certificate.
    _write(folder / "server.pem", server_key, _certificate(
        "specserve server", server_key, ca_cert.subject, ca_key, ca=False,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], hosts=True))
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(folder / "client.pem", client_key, _certificate(
        "specserve client", client_key, ca_cert.subject, ca_key, ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH]))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _certificate("another CA", other_key, _name("another CA"), other_key, ca=True)
    _write(folder / "other-ca.pem", None, other_ca)
    return TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                    folder / "client.key", folder / "other-ca.pem")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost, a client certificate it signed,
    and an unrelated CA (whose trust must not reach a server)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))
