"""VirusEye end to end in Debian's headless Chromium: the real ``mailtower-eye serve`` over a real
PostgreSQL hub; a tower's event arriving shows up on an open page without a reload.

Screenshot for review: tests/output/viruseye.png.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import eyebrowser
import needs
import pytest
from eye_fixtures import ROOT, add_event, finding, goc_hub
from scand_fakes import free_port, wait_until

from mailtower.goc.eye import queries
from mailtower.goc.eye.status import TowerStatus, upsert_tower_status

pytestmark = pytest.mark.integration

EYE = Path(sys.executable).with_name("mailtower-eye")
SCREENSHOT = ROOT / "tests" / "output" / "viruseye.png"
PASSWORD = "operator password for the browser test"

if not eyebrowser.available():
    needs.missing("Debian's chromium and chromium-driver", module=True)

from selenium import webdriver  # noqa: E402  (after the skip: selenium is a controller extra)
from selenium.webdriver.common.by import By  # noqa: E402


def seed(conn: Any) -> None:
    """A plausible afternoon at the GOC: a few outbreaks over two towers, a third tower silent."""
    rng = random.Random(5)
    now = queries.db_now(conn)
    customers = ["acme.example", "globex.example", "initech.example", "umbrella.example"]
    outbreaks = [
        ("Win.Worm.Mydoom-9", "clamd", "W32/Mydoom.o@MM", 300, 60),
        ("Doc.Downloader.Emotet-7", "clamd", None, 200, 25),
        ("W32/Netsky.P@mm", "icap", None, 120, 12),
        ("skeptic.known-worm.netsky", "skeptic", None, 90, 6),
    ]
    for name, engine, icap_name, start_min, count in outbreaks:
        for i in range(count):
            # Later minutes are denser: the outbreak is growing.
            minutes = start_min * (1 - (i / count) ** 0.5) + rng.random()
            found = [finding(engine, name)]
            if icap_name and rng.random() < 0.6:
                found.append(finding("icap", icap_name))
            add_event(
                conn,
                tower=rng.choice(["tower-a", "tower-b"]),
                at=now - timedelta(minutes=minutes),
                findings=found,
                recipients=[f"user{i}@{rng.choice(customers)}"],
            )
    report_towers(conn)


def report_towers(conn: Any) -> None:
    """Monitors' reports: tower-a fine, tower-b short of scanners with a long queue and two
    scanners still on the previous rule bundle, tower-c silent for 10 minutes."""
    upsert_tower_status(conn, TowerStatus("tower-a", 23, 23, 41, 0.2, 8, 8, 0))
    upsert_tower_status(conn, TowerStatus("tower-b", 21, 23, 1288, 3.5, 7, 8, 2))
    upsert_tower_status(conn, TowerStatus("tower-c", 23, 23, 0, 0.1))
    conn.execute(
        "UPDATE tower_status SET updated_at = now() - interval '10 minutes' WHERE tower = 'tower-c'"
    )


@pytest.fixture(scope="module")
def hub() -> Iterator[Any]:
    with goc_hub() as cluster:
        with cluster.connect() as conn:
            seed(conn)
        yield cluster


@pytest.fixture(scope="module")
def eye_url(hub: Any) -> Iterator[str]:
    """``mailtower-eye serve`` as an operator would run it; yields its base URL."""
    etc = Path(tempfile.mkdtemp(prefix="mailtower-eye-etc-"))
    credentials = etc / "operators"
    subprocess.run(
        [str(EYE), "operator", "add", "alice", "--credentials", str(credentials)],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    port = free_port()
    log = (etc / "eye.log").open("w")
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
            "--refresh",
            "0.5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (etc / "eye.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until(healthy, 20, "mailtower-eye to answer /healthz")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with eyebrowser.chromium() as driver:
        yield driver


@pytest.fixture
def page(browser: webdriver.Chrome, eye_url: str) -> webdriver.Chrome:
    """The browser, logged out, on the login form."""
    browser.get(f"{eye_url}/login")
    browser.delete_all_cookies()
    browser.get(f"{eye_url}/login")
    return browser


def wait(driver: webdriver.Chrome, condition: Any, what: str) -> Any:
    return eyebrowser.wait(driver, condition, what)


def log_in(driver: webdriver.Chrome, password: str) -> None:
    eyebrowser.log_in(driver, "alice", password)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unauthenticated_access_refused(page: webdriver.Chrome, eye_url: str) -> None:
    page.get(f"{eye_url}/")
    assert page.current_url == f"{eye_url}/login"
    assert page.find_element(By.ID, "login-button").is_displayed()
    assert status_of(f"{eye_url}/api/snapshot") == 401
    assert status_of(f"{eye_url}/events") == 401


def test_wrong_password_refused(page: webdriver.Chrome, eye_url: str) -> None:
    log_in(page, "not the password at all")
    error = wait(page, lambda d: d.find_element(By.ID, "login-error").text, "the login error")
    assert error == "Wrong name or password."
    assert page.current_url == f"{eye_url}/login"
    assert page.get_cookies() == []
    page.get(f"{eye_url}/")
    assert page.current_url == f"{eye_url}/login"


page_state = eyebrowser.page_state


def test_new_outbreak_appears_live(page: webdriver.Chrome, eye_url: str, hub: Any) -> None:
    page.get_log("browser")  # drop what earlier tests logged (their refused logins)
    with hub.connect() as conn:
        report_towers(conn)  # fresh reports: a slow machine must not make them stale
    log_in(page, PASSWORD)
    wait(page, lambda d: d.current_url == f"{eye_url}/", "the page after login")
    cookie = page.get_cookie("viruseye_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    state = wait(
        page,
        lambda d: (s := page_state(d))["outbreaks"] and s,
        "the seeded outbreaks",
    )
    assert "Win.Worm.Mydoom-9" in state["outbreaks"]
    assert state["live"] == "live"
    assert state["towers"] == {"tower-a": "OK", "tower-b": "DEGRADED", "tower-c": "STALE"}
    assert state["rules"] == {
        "tower-a": "rules v8",
        "tower-b": "rules v7 · 2 behind v8",
        "tower-c": "no bundle",
    }
    assert state["engines"][:2] == ["clamd", "icap"]
    assert state["lines"] == 3  # one per tower, the silent one included

    # A mark that only survives if the page is never reloaded.
    page.execute_script("window.__viruseyeMark = 'no reload';")
    name = f"Mailtower.Test.Outbreak-{uuid.uuid4().hex[:8]}"
    assert name not in state["outbreaks"]
    with hub.connect() as conn:  # what logical replication does when a tower's event arrives
        add_event(
            conn,
            tower="tower-b",
            at=queries.db_now(conn),
            findings=[finding("clamd", name)],
            recipients=["ceo@initech.example"],
        )
    state = wait(
        page,
        lambda d: name in (s := page_state(d))["outbreaks"] and s,
        f"the new outbreak {name} on the open page",
    )
    assert state["mark"] == "no reload"
    row = state["outbreaks"][name]
    assert "NEW" in row["text"] and "tower-b" in row["text"] and "initech.example" in row["text"]
    assert "arrived" in row["classes"]
    assert any(name in toast for toast in state["toasts"])
    save_screenshot(page)
    # No script error and no Content-Security-Policy violation on the page.
    errors = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_logout(page: webdriver.Chrome, eye_url: str) -> None:
    log_in(page, PASSWORD)
    wait(page, lambda d: d.current_url == f"{eye_url}/", "the page after login")
    page.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    wait(page, lambda d: d.current_url == f"{eye_url}/login", "the login form after logout")
    assert page.get_cookie("viruseye_session") is None
    page.get(f"{eye_url}/")
    assert page.current_url == f"{eye_url}/login"


def save_screenshot(driver: webdriver.Chrome) -> None:
    eyebrowser.save_screenshot(driver, SCREENSHOT)
