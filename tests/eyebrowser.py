"""VirusEye in Debian's headless Chromium (selenium): the browser, the login, and what the page
shows; used by tests/unit/test_eye_browser.py (a local hub) and tests/pair (the lab's GOC)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DEADLINE_S = 60.0  # generous: CI machines can be loaded; a pass takes about a second


def available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def spki_pin(cert_pem: bytes) -> str:
    """The base64 SHA-256 of a certificate's public key, as Chromium's pin list takes it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def chromium(trust: bytes | None = None) -> Iterator[Any]:
    """Headless Chromium; ``trust``: the PEM certificate of a self-signed server it accepts
    (its key pinned: any other certificate error still stops the page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mailtower-eye-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # we run as root in CI
        "--disable-dev-shm-usage",
        "--window-size=1600,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    if trust is not None:
        # Not --ignore-certificate-errors: only a certificate with this very key is let through
        # (the flag needs --user-data-dir, set above).
        options.add_argument(f"--ignore-certificate-errors-spki-list={spki_pin(trust)}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console: CSP, JS errors
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: Any, condition: Any, what: str, deadline_s: float = DEADLINE_S) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws as it updates: an element found a moment ago can be gone (stale) or
    # not there yet; both mean "not yet", and the condition is asked again.
    return WebDriverWait(
        driver,
        deadline_s,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(lambda d: condition(d), message=f"waiting {deadline_s}s for {what}")


def log_in(driver: Any, name: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-button").click()


# What the page shows, read in one script run: the page redraws every refresh, so elements
# found one by one could belong to different snapshots (or be gone: stale element errors).
PAGE_STATE = """
const all = (selector) => [...document.querySelectorAll(selector)];
return {
  live: document.getElementById("live").textContent,
  towers: Object.fromEntries(all("#towers .tower").map(
    (card) => [card.dataset.tower, card.querySelector(".state").textContent])),
  rules: Object.fromEntries(all("#towers .tower").map((card) => [card.dataset.tower,
    [...card.querySelectorAll("dt")].find((dt) => dt.textContent === "rules")
      ?.nextElementSibling.textContent ?? null])),
  engines: all("#engines .engine").map((e) => e.dataset.engine),
  lines: all("#timeline polyline").length,
  outbreaks: Object.fromEntries(all("#outbreaks tbody tr").map(
    (row) => [row.dataset.virus, {text: row.innerText, classes: row.className}])),
  toasts: all("#toasts .toast").map((t) => t.innerText),
  mark: window.__viruseyeMark || null,
};
"""


def page_state(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(PAGE_STATE))


def save_screenshot(driver: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight;"))
    driver.set_window_size(1600, max(1100, height + 40))
    assert driver.save_screenshot(str(path)), f"could not write {path}"
