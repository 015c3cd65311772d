"""TLS in the node (``TLS_CERT``, ``TLS_KEY``; server/tls.py): https:// and wss:// on one port
with a self-signed certificate made here, real clients trusting it, and the certificate read
again on SIGHUP by a real node process."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from polysignal.config import ConfigError, Settings
from polysignal.server.tls import Tls
from rooms_client import PASSWORD, check_flow, rooms_settings

from rawws import Raw, frame, request
from support import (
    UNIT,
    NodeProcess,
    node_ready,
    node_settings,
    receive_json,
    run_node,
    running_server,
)

pytestmark = pytest.mark.timeout(90)


@dataclass
class Cert:
    name: str
    cert: Path
    key: Path


def make_cert(directory: Path, name: str) -> Cert:
    """A self-signed certificate for 127.0.0.1 and localhost, with its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Cert(name, directory / f"{name}.pem", directory / f"{name}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def trusting(*certs: Cert) -> ssl.SSLContext:
    """A client context that trusts exactly ``certs``."""
    context = ssl.create_default_context()
    context.load_verify_locations(cadata="".join(c.cert.read_text() for c in certs))
    return context


def tls_settings(cert: Cert, **overrides: object) -> Settings:
    return node_settings(tls_cert=str(cert.cert), tls_key=str(cert.key), **overrides)


async def served_name(port: int, context: ssl.SSLContext) -> str:
    """The common name of the certificate a new TLS connection to ``port`` is served."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        subject = dict(item[0] for item in sslobj.getpeercert()["subject"])
        return str(subject["commonName"])
    finally:
        writer.close()


async def tls_raw(port: int, context: ssl.SSLContext) -> Raw:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    return Raw(reader, writer)


async def test_https_and_wss_of_every_kind_on_one_port(tmp_path):
    cert = make_cert(tmp_path, "node")
    settings = tls_settings(cert, allowed_origins=("https://app.example.com",), **rooms_settings())
    context = trusting(cert)
    async with (
        running_server(settings) as srv,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
    ):
        base = f"https://127.0.0.1:{srv.port}"
        async with session.get(base + "/healthz") as response:
            assert (response.status, await response.text()) == (200, "okay")
        # Topics over wss://, both ends.
        wss = f"wss://127.0.0.1:{srv.port}/"
        async with session.ws_connect(wss) as a, session.ws_connect(wss) as b:
            await a.send_str('{"type":"subscribe","topics":["t"]}')
            await a.send_str('{"type":"ping"}')
            assert await receive_json(a) == {"type": "pong"}
            await b.send_str('{"type":"publish","topic":"t","data":1}')
            assert await receive_json(a) == {
                "type": "publish",
                "topic": "t",
                "data": 1,
                "clients": 1,
                "_origin": srv.node.node_id,
            }
            assert sorted(conn.address for conn in srv.node.connections) == ["127.0.0.1"] * 2
        # socket.io's WebSocket, served by aiohttp over the same TLS transport.
        async with session.ws_connect(wss + "socket.io/?EIO=4&transport=websocket") as sio:
            opened = await sio.receive(timeout=5 * UNIT)
            assert opened.type is aiohttp.WSMsgType.TEXT and opened.data.startswith("0{")
        # A refusal is written, then the TLS connection closes (no half-close over TLS).
        upgrade = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            "Origin": "https://evil.example",
        }
        async with session.get(base + "/", headers=upgrade) as response:
            assert (response.status, await response.text()) == (403, "origin not allowed\n")


async def test_a_websocket_asked_for_on_a_kept_alive_https_connection(tmp_path):
    """After a plain request aiohttp served over TLS, an upgrade on the same connection."""
    cert = make_cert(tmp_path, "node")
    async with running_server(tls_settings(cert)) as srv:
        raw = await tls_raw(srv.port, trusting(cert))
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.response()).body == b"okay"
        raw.send(request("/"))
        assert (await raw.response()).status == 101
        raw.send(frame(b'{"type":"ping"}'))
        assert await raw.frame() == (0x1, b'{"type":"pong"}')
        await raw.aclose()


async def test_plain_http_is_not_served_on_a_tls_port(tmp_path):
    cert = make_cert(tmp_path, "node")
    async with running_server(tls_settings(cert)) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5 * UNIT)
        assert not answer.startswith(b"HTTP/")
        writer.close()


async def test_the_published_socketio_client_over_https_and_wss(tmp_path, monkeypatch):
    """socket.io-client (Node) with POST /app over https://, long-polling, then wss://."""
    node_ready()
    cert = make_cert(tmp_path, "node")
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(cert.cert))
    async with running_server(tls_settings(cert, **rooms_settings())) as srv:
        url = f"https://127.0.0.1:{srv.port}"
        result = await run_node("rooms_socketio.mjs", url, url, PASSWORD, timeout=40 * UNIT)
    check_flow(result)


# --- SIGHUP -------------------------------------------------------------------------------------


class TlsNode(NodeProcess):
    """A node process serving TLS: its readiness asked over TLS."""

    context: ssl.SSLContext

    async def wait_tls(self, timeout: float = 20 * UNIT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.alive, f"node exited:\n{self.log()}"
            try:
                raw = await tls_raw(self.port, self.context)
            except OSError:
                assert loop.time() < deadline, f"node not answering over TLS:\n{self.log()}"
                await asyncio.sleep(0.1)
                continue
            raw.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = await raw.response()
            await raw.aclose()
            if response.status == 200:
                return
            await asyncio.sleep(0.1)


async def until_async(check, timeout: float = 10 * UNIT) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_sighup_serves_new_connections_the_new_certificate(tmp_path):
    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    live = Cert("live", tmp_path / "live.pem", tmp_path / "live.key")
    live.cert.write_bytes(first.cert.read_bytes())
    live.key.write_bytes(first.key.read_bytes())
    node = TlsNode({"TLS_CERT": str(live.cert), "TLS_KEY": str(live.key)})
    node.context = trusting(first, second)
    node.launch()
    try:
        await node.wait_tls()
        assert f"listening on https://127.0.0.1:{node.port} " in node.log()
        assert await served_name(node.port, node.context) == "first"
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=node.context))
        async with session, session.ws_connect(f"wss://127.0.0.1:{node.port}/") as ws:
            # The files are replaced (as certbot does), then SIGHUP.
            live.cert.write_bytes(second.cert.read_bytes())
            live.key.write_bytes(second.key.read_bytes())
            node.send_signal(signal.SIGHUP)

            async def second_served() -> bool:
                return await served_name(node.port, node.context) == "second"

            await until_async(second_served)
            assert f"TLS certificate reloaded from {live.cert}" in node.log()
            # The connection opened before is served on, with the certificate it had.
            await ws.send_str('{"type":"ping"}')
            assert await receive_json(ws) == {"type": "pong"}

            # A bad file: one error line, and the certificate loaded last is kept.
            live.cert.write_text("not a certificate\n")
            node.send_signal(signal.SIGHUP)

            async def refused() -> bool:
                return "TLS reload failed" in node.log()

            await until_async(refused)
            assert await served_name(node.port, node.context) == "second"
            lines = [line for line in node.log().splitlines() if "TLS reload failed" in line]
            assert len(lines) == 1
            assert "ERROR" in lines[0]
            assert lines[0].endswith(
                "TLS reload failed, still serving the previous certificate: TLS_CERT: "
                f"'{live.cert}' holds no PEM certificate"
            )
            assert "Traceback" not in node.log()
            await ws.send_str('{"type":"ping"}')
            assert await receive_json(ws) == {"type": "pong"}
        assert node.alive
    finally:
        assert node.stop() == 0


@pytest.mark.redis
async def test_sighup_reaches_every_worker(tmp_path, redis_url):
    """Under --workers the parent passes SIGHUP on: every worker reloads, none is ended by it."""
    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    live = Cert("live", tmp_path / "live.pem", tmp_path / "live.key")
    live.cert.write_bytes(first.cert.read_bytes())
    live.key.write_bytes(first.key.read_bytes())
    env = {"TLS_CERT": str(live.cert), "TLS_KEY": str(live.key), "REDIS_URL": redis_url}
    node = TlsNode(env, args=["--workers", "2"])
    node.context = trusting(first, second)
    node.launch()
    try:
        await node.wait_tls()

        async def both_listening() -> bool:
            return node.log().count(f"listening on https://127.0.0.1:{node.port} ") == 2

        await until_async(both_listening)
        live.cert.write_bytes(second.cert.read_bytes())
        live.key.write_bytes(second.key.read_bytes())
        node.send_signal(signal.SIGHUP)

        async def both_reloaded() -> bool:
            return node.log().count(f"TLS certificate reloaded from {live.cert}") == 2

        await until_async(both_reloaded)
        # New connections land on either worker: each is served the new certificate.
        names = {await served_name(node.port, node.context) for _ in range(8)}
        assert names == {"second"}
        assert "exited unexpectedly" not in node.log()
        assert node.alive
    finally:
        assert node.stop() == 0


# --- settings -----------------------------------------------------------------------------------


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polysignal", "serve"],
        env={**os.environ, "HOST": "127.0.0.1", "PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
    )


def cli_cases(tmp: Path) -> list[tuple[dict[str, str], str]]:
    one, other = make_cert(tmp, "one"), make_cert(tmp, "other")
    missing = tmp / "missing.pem"
    return [
        ({"TLS_CERT": str(one.cert)}, "TLS_KEY: must be set with TLS_CERT (set both, or neither)"),
        ({"TLS_KEY": str(one.key)}, "TLS_CERT: must be set with TLS_KEY (set both, or neither)"),
        (
            {"TLS_CERT": str(missing), "TLS_KEY": str(one.key)},
            f"TLS_CERT: cannot read '{missing}' (No such file or directory)",
        ),
        (
            {"TLS_CERT": str(one.cert), "TLS_KEY": str(other.key)},
            f"TLS_KEY: '{other.key}' is not the private key of the certificate in '{one.cert}'",
        ),
        (
            {"TLS_CERT": str(one.key), "TLS_KEY": str(one.key)},
            f"TLS_CERT: '{one.key}' holds no PEM certificate",
        ),
        (
            {"TLS_CERT": str(one.cert), "TLS_KEY": str(one.cert)},
            f"TLS_KEY: '{one.cert}' holds no PEM private key (or an encrypted one)",
        ),
    ]


def test_tls_misconfigurations_stop_the_server_with_one_line(tmp_path):
    for env, message in cli_cases(tmp_path):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(env)
        assert str(caught.value) == message
        done = run_cli(env)
        expected = f"polysignal: configuration error: {message}\n"
        assert (done.returncode, done.stderr) == (2, expected)


def test_a_reload_keeps_the_context_when_the_files_break(tmp_path):
    cert = make_cert(tmp_path, "node")
    tls = Tls(str(cert.cert), str(cert.key))
    assert tls.current is tls.context
    tls.key = str(tmp_path / "gone.key")
    assert not tls.reload()
    assert tls.current is tls.context and tls.reloads == 0
    tls.key = str(cert.key)
    assert tls.reload()
    assert tls.current is not tls.context and tls.reloads == 1
