"""The preflight asks a dask address what answers there, over each of dask's network protocols:
tcp, ws, and tls and wss with the certificates that dask's configuration names (what prefect-dask's
client connects with). Real schedulers, started as `dask scheduler`, and real listeners that are
none. Before, tls and wss addresses got only a TCP connection."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from autoexplain.errors import UserError
from autoexplain.server_probe import probe_scheduler
from tests.test_flows import not_a_scheduler


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autoexplain test cluster")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def scheduler(protocol: str, *options: str):
    """A real `dask scheduler` on loopback speaking `protocol`; yields its address."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", protocol,
                             "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert proc.poll() is None and time.monotonic() < deadline, f"the {protocol} scheduler did not start"
            time.sleep(0.2)
        yield f"{protocol}://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def client_certificates(cert: str, key: str):
    import dask
    import distributed  # noqa: F401 - its defaults first: leaving the block removes the keys it found missing

    with dask.config.set({"distributed.comm.tls.ca-file": cert, "distributed.comm.tls.client.cert": cert,
                          "distributed.comm.tls.client.key": key}):
        yield


def refused(address: str) -> str:
    with pytest.raises(UserError) as e:
        probe_scheduler(address)
    return e.value.problem


@pytest.mark.parametrize("protocol", ["tls", "wss"])
def test_a_tls_scheduler_is_asked_with_the_configured_certificates(certificate, protocol):
    cert, key = certificate
    with scheduler(protocol, "--tls-ca-file", cert, "--tls-cert", cert, "--tls-key", key) as address:
        with client_certificates(cert, key):
            probe_scheduler(address)  # a scheduler: no error
        assert refused(address) == f"{address} needs TLS, and dask's configuration names no certificates to connect with"
    with not_a_scheduler() as plain, client_certificates(cert, key):
        address = plain.replace("tcp://", f"{protocol}://")
        assert refused(address).startswith(f"something listens at {address}, but no dask scheduler answers there")


def test_a_websocket_scheduler_is_asked_too():
    with scheduler("ws") as address:
        probe_scheduler(address)
    with not_a_scheduler() as plain:
        address = plain.replace("tcp://", "ws://")
        assert refused(address).startswith(f"something listens at {address}, but no dask scheduler answers there")
