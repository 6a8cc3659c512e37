"""TLS and mutual TLS on the gRPC port, with certificates made here (cryptography)."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.client import MnistClient, tls_credentials
from mnist_serving.client.__main__ import main as client_main
from mnist_serving.server import tls
from mnist_serving.server.errors import StartupError

from .certs import Authority, Issued, TLSFiles, key_pem, make_files, new_key, write
from .support import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_port(server: ServerProcess) -> int:
    match = re.search(r"\bhealth_port=(\d+)", server.log)
    assert match, server.log
    return int(match.group(1))


def check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        check(channel)
    return raised.value.code()


def secure(target: str, ca: bytes, client: Issued | None = None) -> grpc.Channel:
    if client is None:
        return grpc.secure_channel(target, tls_credentials(ca))
    credentials = tls_credentials(ca, client.cert, client.key)
    return grpc.secure_channel(target, credentials)


# TLS: server certificate only.


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, tls_files: TLSFiles) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--health-port", "0", *tls_files.server_flags()
    )
    yield server
    assert server.stop() == 0, server.log


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(
    tls_server: ServerProcess, tls_files: TLSFiles
) -> None:
    with MnistClient(
        tls_server.target, credentials=tls_credentials(tls_files.ca), timeout=30
    ) as client:
        assert client.predict(np.zeros((2, 28, 28), np.uint8)).classes.shape == (2,)
        assert client.health() == "SERVING"
    with grpc.insecure_channel(tls_server.target) as plaintext:
        assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    with secure(tls_server.target, Authority("someone-else").pem) as untrusting:
        assert refused(untrusting) == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_answers_in_plaintext_and_serves_nothing_else(
    tls_server: ServerProcess,
) -> None:
    target = f"127.0.0.1:{health_port(tls_server)}"
    with grpc.insecure_channel(target) as channel:
        assert check(channel) == SERVING
        predict = channel.unary_unary("/mnist.v1.MnistService/Predict", None, None)
        with pytest.raises(grpc.RpcError) as raised:
            predict(b"", timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_rotated_certificate_is_used_for_new_connections(
    tls_server: ServerProcess, tls_files: TLSFiles
) -> None:
    old = tls_files.authority
    with secure(tls_server.target, old.pem) as channel:
        assert check(channel) == SERVING
    renewed = Authority("ca-2")
    tls_files.install(renewed)  # no restart, no signal
    with secure(tls_server.target, renewed.pem) as channel:
        assert check(channel) == SERVING
    with secure(tls_server.target, old.pem) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE
    assert 'msg="TLS certificates reloaded"' in tls_server.log


# Mutual TLS: clients need a certificate the configured CA signed.


@pytest.fixture(scope="module")
def mtls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_files(tmp_path_factory.mktemp("mtls"))


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir: Path, mtls_files: TLSFiles) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", *mtls_files.server_flags(client_ca=True)
    )
    yield server
    assert server.stop() == 0, server.log


def test_mutual_tls_refuses_clients_without_a_good_certificate(
    mtls_server: ServerProcess, mtls_files: TLSFiles
) -> None:
    ca = mtls_files.authority
    with secure(mtls_server.target, ca.pem) as anonymous:
        assert refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    stranger = Authority("other-ca").issue("stranger", server=False)
    with secure(mtls_server.target, ca.pem, stranger) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE
    good = ca.issue("scoring-job", server=False)
    credentials = tls_credentials(ca.pem, good.cert, good.key)
    with MnistClient(mtls_server.target, credentials=credentials, timeout=30) as client:
        assert client.predict(np.zeros((1, 28, 28), np.uint8)).classes.shape == (1,)


async def test_the_async_client_presents_its_certificate(
    mtls_server: ServerProcess, mtls_files: TLSFiles
) -> None:
    from mnist_serving.client import AsyncMnistClient

    ca = mtls_files.authority
    good = ca.issue("async-job", server=False)
    credentials = tls_credentials(ca.pem, good.cert, good.key)
    async with AsyncMnistClient(mtls_server.target, credentials=credentials) as client:
        assert (await client.predict(np.zeros((3, 28, 28), np.uint8))).classes.shape == (3,)


def test_the_cli_speaks_mutual_tls(
    mtls_server: ServerProcess,
    mtls_files: TLSFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = mtls_files.authority.issue("cli", server=False)
    cert, key = write(tmp_path / "c.pem", good.cert), write(tmp_path / "c.key", good.key)
    common = ["--target", mtls_server.target, "--ca-cert", str(mtls_files.ca)]
    assert (
        client_main(["health", *common, "--client-cert", str(cert), "--client-key", str(key)]) == 0
    )
    assert capsys.readouterr().out.strip() == "SERVING"
    assert client_main(["health", *common]) == 1  # no client certificate: refused
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert client_main(["health", *common, "--client-cert", str(cert)]) == 2


# Start-up checks and the HTTP port's SSLContext.


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tls_settings_that_cannot_work_stop_start_up(tmp_path: Path, tiny_model_dir: Path) -> None:
    files = make_files(tmp_path / "tls")
    only_cert = run_serve("--tls-cert", str(files.cert))
    assert only_cert.returncode == 2
    assert "both --tls-cert and --tls-key" in only_cert.stderr
    missing = run_serve("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(files.key))
    assert missing.returncode == 2
    assert "--tls-cert" in missing.stderr
    write(files.key, key_pem(new_key()))  # a key that is not the certificate's
    mismatch = run_serve(
        "--model-dir", str(tiny_model_dir), "--port", "0", "--metrics-port", "0",
        "--tls-cert", str(files.cert), "--tls-key", str(files.key),
    )  # fmt: skip
    assert mismatch.returncode == 1
    assert "cannot use the TLS files" in mismatch.stderr
    assert "Traceback" not in mismatch.stderr


def test_certificate_files_refuse_a_key_that_does_not_match(tmp_path: Path) -> None:
    files = make_files(tmp_path)
    write(files.key, key_pem(new_key()))
    with pytest.raises(StartupError, match="cannot use the TLS files"):
        tls.CertificateFiles(files.cert, files.key)


async def _handshake(port: int, ca: bytes, client: Issued | None, folder: Path) -> str:
    """Connect with TLS; the common name of the server's certificate if the server let the
    connection in (it sends "ok" to each connection it accepts), else ""."""
    context = ssl.create_default_context(cadata=ca.decode())
    if client is not None:
        cert = write(folder / "client.pem", client.cert)
        context.load_cert_chain(cert, write(folder / "client.key", client.key))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert()
        try:
            greeting = await reader.read(2)
        except (ssl.SSLError, ConnectionError):  # TLS 1.3: a refused client learns it here
            greeting = b""
    finally:
        writer.close()
    subject = dict(item[0] for item in peer["subject"])
    return str(subject["commonName"]) if greeting == b"ok" else ""


async def test_the_http_ssl_context_rotates_and_can_require_client_certificates(
    tmp_path: Path,
) -> None:
    files = make_files(tmp_path)
    client_ca = files.authority
    context = tls.ssl_context(files.cert, files.key, files.ca)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        good = client_ca.issue("http-client", server=False)
        assert await _handshake(port, files.authority.pem, good, tmp_path) == "mnist-server"
        assert await _handshake(port, files.authority.pem, None, tmp_path) == ""
        renewed = Authority("ca-2")
        files.install(renewed)  # the server certificate changes; the client CA stays
        assert await _handshake(port, renewed.pem, good, tmp_path) == "mnist-server"
        with pytest.raises(ssl.SSLCertVerificationError):
            await _handshake(port, client_ca.pem, good, tmp_path)
    finally:
        server.close()
        await server.wait_closed()
