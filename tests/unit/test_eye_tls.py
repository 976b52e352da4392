"""VirusEye over HTTPS as the GOC deploy sets it up: the self-signed certificate made by the
role's own commands, ``mailtower-eye serve --tls-cert --tls-key`` over a real PostgreSQL hub, and
a session cookie that is Secure, HttpOnly and SameSite=Strict."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from eye_fixtures import goc_hub
from scand_fakes import free_port, wait_until

from mailtower.goc.eye.app import SESSION_COOKIE
from roles.goc import self_signed_commands

pytestmark = pytest.mark.integration

EYE = Path(sys.executable).with_name("mailtower-eye")
PASSWORD = "operator password for the TLS test"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Path]]:
    """(base URL, certificate) of ``mailtower-eye serve`` with the deploy's certificate."""
    etc = Path(tempfile.mkdtemp(prefix="mailtower-eye-tls-"))
    cert, key = etc / "tls.crt", etc / "tls.key"
    for command in self_signed_commands(["localhost", "127.0.0.1"], str(cert), str(key)):
        subprocess.run(command, shell=True, check=True, capture_output=True)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    credentials = etc / "operators"
    subprocess.run(
        [str(EYE), "operator", "add", "alice", "--credentials", str(credentials)],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    port = free_port()
    with goc_hub() as hub, (etc / "eye.log").open("w") as log:
        proc = subprocess.Popen(
            [
                str(EYE),
                "serve",
                "--dsn",
                hub.dsn(),
                "--listen",
                f"127.0.0.1:{port}",
                "--credentials",
                str(credentials),
                "--secret-file",
                str(etc / "session.key"),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"https://127.0.0.1:{port}"
        trusted = ssl.create_default_context(cafile=str(cert))

        def healthy() -> bool:
            assert proc.poll() is None, (etc / "eye.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1, context=trusted) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        try:
            wait_until(healthy, 20, "mailtower-eye to answer /healthz over HTTPS")
            yield url, cert
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            shutil.rmtree(etc, ignore_errors=True)


def test_login_over_https_sets_a_secure_cookie(served: tuple[str, Path]) -> None:
    url, cert = served

    async def test() -> None:
        trusted = ssl.create_default_context(cafile=str(cert))
        connector = aiohttp.TCPConnector(ssl=trusted)
        jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of an address, not only of a name
        async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as client:
            response = await client.post(
                f"{url}/login",
                data={"name": "alice", "password": PASSWORD},
                headers={"Origin": url},
                allow_redirects=False,
            )
            assert response.status == 303
            cookie = response.cookies[SESSION_COOKIE]
            assert cookie["secure"] is True
            assert cookie["httponly"] is True
            assert cookie["samesite"] == "Strict"
            page = await client.get(f"{url}/", allow_redirects=False)
            assert page.status == 200 and "operator <b>alice</b>" in await page.text()
            response = await client.post(
                f"{url}/logout", headers={"Origin": url}, allow_redirects=False
            )
            assert response.status == 303
            assert response.cookies[SESSION_COOKIE]["secure"] is True  # the deletion too

    asyncio.run(test())


def test_plain_http_is_not_answered(served: tuple[str, Path]) -> None:
    url, _cert = served
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url.replace("https://", "http://") + "/healthz", timeout=5)


def test_certificate_names_what_the_deploy_was_given(served: tuple[str, Path]) -> None:
    _url, cert = served
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
