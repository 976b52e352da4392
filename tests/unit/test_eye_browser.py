"""VirusEye end to end in Debian's headless Chromium: the real ``mailtower-eye serve`` over a real
PostgreSQL hub, on HTTPS with the deploy's self-signed certificate (the browser trusts its key
alone); a tower's event arriving shows up on an open page without a reload.

Screenshot for review: tests/output/viruseye.png.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import eyebrowser
import needs
import pytest
from eye_fixtures import ROOT, ServedEye, add_event, finding, goc_hub, serve_eye

from mailtower.goc.eye import queries
from mailtower.goc.eye.status import TowerStatus, upsert_tower_status

pytestmark = pytest.mark.integration

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
def served(hub: Any) -> Iterator[ServedEye]:
    """``mailtower-eye serve`` as the GOC deploy runs it: HTTPS with a self-signed certificate."""
    with serve_eye(hub.dsn(), "alice", PASSWORD, "--refresh", "0.5") as eye:
        yield eye


@pytest.fixture(scope="module")
def eye_url(served: ServedEye) -> str:
    return served.url


@pytest.fixture(scope="module")
def browser(served: ServedEye) -> Iterator[webdriver.Chrome]:
    with eyebrowser.chromium(trust=served.cert.read_bytes()) as driver:
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


def test_unauthenticated_access_refused(
    page: webdriver.Chrome, eye_url: str, served: ServedEye
) -> None:
    page.get(f"{eye_url}/")
    assert page.current_url == f"{eye_url}/login"
    assert page.find_element(By.ID, "login-button").is_displayed()
    assert served.status("/api/snapshot")[0] == 401
    assert served.status("/events")[0] == 401


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
    assert cookie["secure"]
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


CLAMAV_ROWS = """
const card = document.querySelector('#towers .tower[data-tower="tower-d"]');
if (!card) return null;
return {
  state: card.querySelector(".state").textContent,
  rows: [...card.querySelectorAll("dt")].filter((dt) => dt.textContent.startsWith("clamav"))
    .map((dt) => [dt.textContent, dt.nextElementSibling.textContent,
                  dt.nextElementSibling.className]),
  images: card.querySelectorAll("img").length,
  pwned: window.__pwned || null,
};
"""


def test_clamav_mirror_shown_per_tower_as_text(page: webdriver.Chrome, eye_url: str, hub: Any):
    """Each database of a tower's ClamAV mirror: its version, age and scanners behind; what a
    tower reports is shown as text, never as markup."""
    markup = "<img src=x onerror=window.__pwned=1>"
    with hub.connect() as conn:
        now = queries.db_now(conn).timestamp()
        mirror = {
            "databases": {
                "daily": {"version": 27500, "built_at": now - 3 * 3600 - 60, "behind": 2},
                markup: {"version": 62, "built_at": None, "behind": 0},
            },
            "upstream_last_ok": now - 600,
            "scanners_behind": 2,
            "rejected": False,
        }
        upsert_tower_status(conn, TowerStatus("tower-d", 23, 23, 0, 0.1, 8, 8, 0, mirror))
    log_in(page, PASSWORD)
    wait(page, lambda d: d.current_url == f"{eye_url}/", "the page after login")
    shown = wait(page, lambda d: d.execute_script(CLAMAV_ROWS), "tower-d's card")
    assert shown["state"] == "DEGRADED"  # two scanners behind the mirror
    assert shown["rows"] == [
        ["clamav daily", "v27500 · built 3 h 1 min ago · 2 behind", "warn"],
        [f"clamav {markup}", "v62", ""],
        ["clamav upstream", "GOC checked 10 min ago", ""],
    ]
    assert shown["images"] == 0 and shown["pwned"] is None


def save_screenshot(driver: webdriver.Chrome) -> None:
    eyebrowser.save_screenshot(driver, SCREENSHOT)
