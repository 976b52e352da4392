"""VirusEye over HTTPS only (issue 15): the real aiohttp server on TLS in this process, then
``mailtower-eye serve`` with the certificate the GOC deploy makes, over a real PostgreSQL hub.

What must hold: the session cookie is Secure, HttpOnly and SameSite=Strict; every answer carries
HSTS; plain HTTP to the port gets no HTTP answer, so no session; clients verify the certificate.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from ipaddress import ip_address
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from eye_fixtures import ServedEye, goc_hub, serve_eye
from scand_fakes import free_port

from mailtower.goc.eye.app import HSTS, SESSION_COOKIE, EyeConfig, make_app
from mailtower.goc.eye.auth import Credentials

PASSWORD = "operator password for the TLS test"


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1, made in Python (no openssl needed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@asynccontextmanager
async def tls_eye(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """make_app on aiohttp's own TCPSite with TLS, as ``mailtower-eye serve --tls-cert`` runs
    it: yields (base URL, certificate)."""
    cert, key = write_certificate(tmp_path)
    credentials = tmp_path / "operators"
    Credentials(credentials).set_password("alice", PASSWORD)
    config = EyeConfig(credentials=credentials, secret=b"k" * 64, secure_cookie=True)
    app = make_app(config, lambda: {"outbreaks": []})
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield f"https://127.0.0.1:{port}", cert
    finally:
        await runner.cleanup()


def client(cert: Path) -> aiohttp.ClientSession:
    """A client that trusts ``cert`` only; cookies kept for an address, not only for a name."""
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(cert)))
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def log_in_and_out(url: str, cert: Path) -> None:
    """The session cookie's flags at login and at logout, and HSTS on each answer."""
    async with client(cert) as http:
        response = await http.post(
            f"{url}/login",
            data={"name": "alice", "password": PASSWORD},
            headers={"Origin": url},
            allow_redirects=False,
        )
        assert response.status == 303
        assert response.headers["Strict-Transport-Security"] == HSTS
        cookie = response.cookies[SESSION_COOKIE]
        assert cookie["secure"] is True
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        page = await http.get(f"{url}/", allow_redirects=False)
        assert page.status == 200 and "operator <b>alice</b>" in await page.text()
        response = await http.post(f"{url}/logout", headers={"Origin": url}, allow_redirects=False)
        assert response.status == 303
        assert response.cookies[SESSION_COOKIE]["secure"] is True  # the deletion too


def plain_http_login(url: str) -> bytes:
    """What the HTTPS port answers a right login sent in plain HTTP (b'' when it hangs up)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    body = f"name=alice&password={PASSWORD.replace(' ', '+')}".encode()
    request = (
        f"POST /login HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: http://{host}:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def assert_no_http_answer(answer: bytes) -> None:
    assert b"HTTP/" not in answer and b"Set-Cookie" not in answer, answer[:200]


# -- the aiohttp server on TLS, in this process ---------------------------------------------


def test_login_over_tls_sets_a_secure_cookie_and_hsts(tmp_path: Path) -> None:
    async def test() -> None:
        async with tls_eye(tmp_path) as (url, cert):
            await log_in_and_out(url, cert)

    asyncio.run(test())


@pytest.mark.parametrize(("path", "status"), [("/login", 200), ("/api/snapshot", 401)])
def test_every_answer_carries_hsts(tmp_path: Path, path: str, status: int) -> None:
    async def test() -> None:
        async with tls_eye(tmp_path) as (url, cert), client(cert) as http:
            response = await http.get(url + path, allow_redirects=False)
            assert response.status == status
            assert response.headers["Strict-Transport-Security"] == HSTS

    asyncio.run(test())


def test_plain_http_gets_no_session(tmp_path: Path) -> None:
    async def test() -> None:
        async with tls_eye(tmp_path) as (url, _cert):
            assert_no_http_answer(await asyncio.to_thread(plain_http_login, url))

    asyncio.run(test())


def test_a_client_that_does_not_trust_the_certificate_is_stopped(tmp_path: Path) -> None:
    """The tests' trust is real: without the certificate, verification fails."""

    async def test() -> None:
        async with tls_eye(tmp_path) as (url, _cert), aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(f"{url}/healthz")

    asyncio.run(test())


# -- mailtower-eye serve with the deploy's certificate, over a real hub ----------------------


@pytest.fixture(scope="module")
def served() -> Iterator[ServedEye]:
    with goc_hub() as hub, serve_eye(hub.dsn(), "alice", PASSWORD) as eye:
        yield eye


@pytest.mark.integration
def test_served_login_sets_a_secure_cookie(served: ServedEye) -> None:
    asyncio.run(log_in_and_out(served.url, served.cert))


@pytest.mark.integration
def test_served_plain_http_is_not_answered(served: ServedEye) -> None:
    assert_no_http_answer(plain_http_login(served.url))
    assert served.status("/healthz")[0] == 200  # still serving HTTPS afterwards


@pytest.mark.integration
def test_served_certificate_names_what_the_deploy_was_given(served: ServedEye) -> None:
    text = subprocess.run(
        ["openssl", "x509", "-in", str(served.cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert oct(served.cert.with_name("tls.key").stat().st_mode & 0o777) == "0o600"
