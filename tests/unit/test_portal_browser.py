"""The quarantine portal end to end in Debian's headless Chromium: the real
``mailtower-portal serve`` (``python -m mailtower.goc.portal``) over HTTPS with the GOC deploy's
self-signed certificate (the browser trusts its key alone), as ``mt_portal`` on a real
PostgreSQL: an admin signs in, lists, opens a message with hostile values, releases it; the
browser logs no error (a CSP violation would be one) and runs no script of the message's.

Screenshot for review: tests/output/portal.png.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import eyebrowser
import needs
import pytest
from eye_fixtures import ROOT, ServedEye, make_certificate
from portal_fixtures import add_customer, add_quarantined, portal_dsn, portal_hub, small_message
from scand_fakes import free_port, wait_until

from mailtower.goc.portal import store as portal_store

pytestmark = pytest.mark.integration

SCREENSHOT = ROOT / "tests" / "output" / "portal.png"
PASSWORD = "admin password for the browser test"

if not eyebrowser.available():
    needs.missing("Debian's chromium and chromium-driver", module=True)

from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServedEye, Any, str]]:
    with portal_hub("goc-browser") as hub:
        with hub.connect() as conn:
            acme = add_customer(conn, "acme", "acme.example")
            portal_store.set_user(conn, "admin-acme", "admin", "acme", PASSWORD)
            for i in range(5):
                add_quarantined(
                    conn, customer_id=acme, recipients=[f"u{i}@acme.example"], subject=f"Mail {i}"
                )
            raw = small_message(
                "x@evil.example",
                ["alice@acme.example"],
                "hostile",
                "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned=2'>\n",
                **{"<img src=x onerror=alert(1)>.exe": b"MZ"},
            )
            eid = add_quarantined(
                conn,
                customer_id=acme,
                recipients=["alice@acme.example"],
                subject="<script>window.__pwned = 3</script> \u202egpj.exe",
                message=raw,
            )
        etc = Path(tempfile.mkdtemp(prefix="mailtower-portal-etc-"))
        cert, key = make_certificate(etc, ["localhost", "127.0.0.1"])
        port = free_port()
        argv = [sys.executable, "-m", "mailtower.goc.portal", "serve"]
        argv += ["--dsn", portal_dsn(hub), "--listen", f"127.0.0.1:{port}"]
        argv += ["--secret-file", str(etc / "session.key"), "--tls-cert", str(cert)]
        argv += ["--tls-key", str(key), "--relay", "127.0.0.1:1"]
        served = ServedEye(f"https://127.0.0.1:{port}", cert, etc / "portal.log")
        with served.log.open("w") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

            def healthy() -> bool:
                assert proc.poll() is None, served.log.read_text()
                try:
                    return served.status("/healthz")[0] == 200
                except OSError:
                    return False

            try:
                wait_until(healthy, 20, "mailtower-portal to answer /healthz over HTTPS")
                yield served, hub, eid
            finally:
                proc.terminate()
                proc.wait(10)
                shutil.rmtree(etc, ignore_errors=True)


def test_sign_in_list_open_and_release(served: tuple[ServedEye, Any, str]) -> None:
    portal, hub, eid = served
    with eyebrowser.chromium(trust=portal.cert.read_bytes()) as driver:
        driver.get(portal.url + "/")
        eyebrowser.wait(driver, lambda d: d.find_element(By.ID, "name"), "the sign-in form")
        eyebrowser.log_in(driver, "admin-acme", PASSWORD)
        rows = eyebrowser.wait(
            driver,
            lambda d: d.find_elements(By.CSS_SELECTOR, "#messages tbody tr"),
            "the list",
        )
        assert len(rows) == 6
        driver.find_element(By.CSS_SELECTOR, f'tr[data-event="{eid}"] a').click()
        eyebrowser.wait(driver, lambda d: d.find_element(By.ID, "facts"), "the message page")
        attachments = driver.find_element(By.ID, "attachments").text
        assert "<img src=x onerror=alert(1)>.exe" in attachments  # shown as text
        assert "<script>" in driver.find_element(By.ID, "text").text
        assert driver.execute_script("return window.__pwned || null") is None
        driver.find_element(By.ID, "release").click()
        notice = eyebrowser.wait(driver, lambda d: d.find_element(By.ID, "notice"), "the notice")
        assert "Asked" in notice.text
        assert "release pending" in driver.find_element(By.ID, "facts").text
        eyebrowser.save_screenshot(driver, SCREENSHOT)
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    with hub.connect() as conn:
        rows = conn.execute(
            "SELECT action, requested_by FROM quarantine_actions WHERE event_id = %s", (eid,)
        ).fetchall()
    assert rows == [("release", "admin:admin-acme")]
