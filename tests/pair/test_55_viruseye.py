"""VirusEye on the lab's GOC, in headless Chromium on the controller: an operator logs in, an
infected message goes through a tower, and its outbreak appears on the open page, without a
reload, with both towers' state reported by their monitors.

Screenshot for review: tests/output/viruseye-lab.png.
"""

from __future__ import annotations

import time

import eyebrowser
import pytest
from conftest import ROOT, Pair
from towerlib import record_figure

from mailtower.scanning import testdata

SCREENSHOT = ROOT / "tests" / "output" / "viruseye-lab.png"

pytestmark = pytest.mark.skipif(
    not eyebrowser.available(), reason="needs Debian's chromium and chromium-driver"
)


def unseen_outbreak(pair: Pair) -> int:
    """A test outbreak the GOC has never recorded (names carry clamd's .UNOFFICIAL suffix)."""
    seen = pair.goc_sql(
        "SELECT string_agg(DISTINCT findings -> 0 ->> 'name', '\n') FROM verdict_events"
        " WHERE verdict = 'virus'"
    ).splitlines()
    for index in range(testdata.OUTBREAKS):
        name = testdata.outbreak_name(index)
        if not any(s == name or s.startswith(name + ".") for s in seen):
            return index
    raise AssertionError(
        f"all {testdata.OUTBREAKS} test outbreaks were already seen at the GOC: rebuild the lab"
    )


def test_operator_sees_a_new_outbreak_arrive_live(pair: Pair) -> None:
    url = pair.eye_url()  # HTTPS; the browser trusts the GOC's certificate (read over SSH) alone
    (operator, password), *_ = pair.goc_data["operators"].items()
    towers = {t.settings.name for t in pair.towers.values()}
    index = unseen_outbreak(pair)
    name = testdata.outbreak_name(index)
    with eyebrowser.chromium(trust=pair.eye_cert()) as page:
        page.get(f"{url}/login")
        eyebrowser.log_in(page, operator, password)
        eyebrowser.wait(page, lambda d: d.current_url == f"{url}/", "the page after login")
        cookie = page.get_cookie("viruseye_session")
        assert cookie is not None and cookie["secure"] and cookie["httpOnly"], cookie
        state = eyebrowser.wait(
            page,
            lambda d: (
                (s := eyebrowser.page_state(d))["live"] == "live"
                and towers <= set(s["towers"])
                and s
            ),
            "the live page with both towers' state",
        )
        assert name not in " ".join(state["outbreaks"])
        page.execute_script("window.__viruseyeMark = 'no reload';")
        marker = testdata.outbreak_marker(index).decode()
        sent = time.monotonic()
        pair.submit(pair.rcpt(1), body=f"attachment text: {marker}\n")

        def outbreak_shown(driver):  # type: ignore[no-untyped-def]
            s = eyebrowser.page_state(driver)
            return any(v.startswith(name) for v in s["outbreaks"]) and s

        state = eyebrowser.wait(
            page, outbreak_shown, f"the new outbreak {name} on the open page", deadline_s=120
        )
        shown = time.monotonic() - sent
        assert state["mark"] == "no reload"
        virus = next(v for v in state["outbreaks"] if v.startswith(name))
        row = state["outbreaks"][virus]
        assert "customer2.lab" in row["text"]
        assert any(t in row["text"] for t in towers)
        assert all(state["towers"][t] == "OK" for t in towers), state["towers"]
        eyebrowser.save_screenshot(page, SCREENSHOT)
        errors = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    record_figure("viruseye_new_outbreak_shown_s", round(shown, 1))
