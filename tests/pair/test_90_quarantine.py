"""The quarantine (issue 18) in the twin lab: messages quarantined by either tower are held in
SQL (the tower's pair and the GOC), listed in the customers' portal at the GOC, released by a
customer's admin in Chromium and delivered once; another customer's admin gets nothing for the
first one's ids and URLs; notices arrive per policy and never at a forged sender; a message
whose scanner is gone (killed, its disk wiped) is still listed and releasable.

Users are added the way an operator adds them (``mailtower portal user add`` at the GOC);
policies are set with ``mailtower customer`` and put back afterwards.

Screenshot for review: tests/output/portal-lab.png. Figures: tests/output/figures.json.
"""

from __future__ import annotations

import base64
import html
import http.cookiejar
import json
import re
import secrets
import shlex
import shutil
import smtplib
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import eyebrowser
import pytest
from conftest import ROOT, SENDER_PORT, Pair
from towerlib import MAILDIR, record_figure, wait_for

from mailtower.scanning import testdata

SCREENSHOT = ROOT / "tests" / "output" / "portal-lab.png"
PORTAL_CLI = "/opt/mailtower/venv/bin/mailtower portal"
CUSTOMER_CLI = "/opt/mailtower/venv/bin/mailtower customer"

pytestmark = pytest.mark.skipif(
    not eyebrowser.available(), reason="needs Debian's chromium and chromium-driver"
)


# -- the GOC, as an operator uses it ------------------------------------------------------------


def goc_command(pair: Pair, command: str, stdin: str | None = None):
    if stdin is not None:
        b64 = base64.b64encode(stdin.encode()).decode()
        command = f"echo {b64} | base64 -d | {command}"
    return pair.goc().run(f"cd /tmp && su postgres -c {shlex.quote(command)}")


def goc_ok(pair: Pair, command: str, stdin: str | None = None) -> str:
    result = goc_command(pair, command, stdin)
    assert result.rc == 0, f"{command}: rc {result.rc}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def admins(pair: Pair) -> Iterator[dict[str, tuple[str, str]]]:
    """An admin per lab customer (name, password), removed afterwards."""
    made = {}
    for index, customer in enumerate(pair.customers[:2]):
        name, password = f"lab-admin-{index + 1}", secrets.token_urlsafe(18)
        goc_ok(
            pair,
            f"{PORTAL_CLI} user add {name} --role admin --customer {customer.domain}",
            password + "\n",
        )
        made[customer.domain] = (name, password)
    try:
        yield made
    finally:
        for name, _ in made.values():
            goc_command(pair, f"{PORTAL_CLI} user remove {name}")


@contextmanager
def policy(pair: Pair, customer: str, value: dict) -> Iterator[None]:
    goc_ok(pair, f"{CUSTOMER_CLI} policy {customer} --file -", json.dumps(value))
    try:
        yield
    finally:
        goc_command(pair, f"{CUSTOMER_CLI} policy {customer} --file -", "{}")


def portal_url(pair: Pair) -> str:
    port = (pair.goc_data.get("portal") or {}).get("listen", "").rpartition(":")[2] or "8027"
    return f"https://{pair.goc_addr}:{port}"


def portal_cert(pair: Pair) -> bytes:
    return bytes(pair.goc().file("/etc/mailtower/portal/tls.crt").content)


# -- mail ---------------------------------------------------------------------------------------


def quarantinable(pair: Pair, kind: str, rcpt: str, sender: str) -> tuple[str, EmailMessage]:
    token = pair.token()
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = f"quarantine check {kind} {token}"
    msg["Message-ID"] = make_msgid(idstring=token, domain="internet.lab")
    msg["X-Test-Token"] = token
    msg.set_content(f"A {kind} message for the quarantine checks, {token}.\n")
    if kind == "virus":
        msg.add_attachment(
            testdata.eicar(), maintype="application", subtype="octet-stream", filename="x.com"
        )
    else:
        msg.add_attachment(
            b"not really a program\n",
            maintype="application",
            subtype="octet-stream",
            filename="invoice.pdf.exe",
        )
    return token, msg


def send(pair: Pair, msg: EmailMessage, sender: str, rcpts: list[str], relay: str | None = None):
    """Through the lab's internet sender (MX lookup: either tower), or straight to ``relay``."""
    host, port = (relay, 25) if relay else (pair.sender_addr, SENDER_PORT)
    with smtplib.SMTP(host, port, timeout=60) as smtp:
        smtp.ehlo("quarantine-check.internet.lab")
        smtp.send_message(msg, sender, rcpts)


def held_at_goc(pair: Pair, token: str) -> dict | None:
    """The GOC's row of the quarantined message with this token, once its bytes are there."""
    out = pair.goc_sql(
        "SELECT json_build_object('event_id', event_id, 'tower', tower, 'scanner', scanner,"
        " 'quarantine_id', quarantine_id, 'verdict', verdict, 'customer_id', customer_id)"
        f" FROM verdict_events WHERE message_id LIKE '%{token}%' AND message IS NOT NULL"
    )
    return json.loads(out.splitlines()[0]) if out.strip() else None


def maildir_hits(pair: Pair, index: int, needle: str) -> list[dict]:
    """Every message at customer ``index``'s server containing ``needle``: its To, From and
    whether it is a quarantine notice (From: quarantine@…)."""
    script = (
        "import os,json,sys,email,email.policy\n"
        "out=[]\n"
        f"needle={needle!r}.encode()\n"
        "for sub in ('new','cur'):\n"
        f" d='{MAILDIR}/'+sub\n"
        " for f in (os.listdir(d) if os.path.isdir(d) else []):\n"
        "  raw=open(os.path.join(d,f),'rb').read()\n"
        "  if needle not in raw: continue\n"
        "  m=email.message_from_bytes(raw,policy=email.policy.default)\n"
        "  out.append({'to':str(m['To'] or ''),'from':str(m['From'] or ''),"
        "'delivered_to':str(m['Delivered-To'] or m['X-Original-To'] or ''),"
        "'token':str(m['X-Test-Token'] or '')})\n"
        "json.dump(out,sys.stdout)\n"
    )
    b64 = base64.b64encode(script.encode()).decode()
    node = pair.customer_node(index)
    return json.loads(node.check_output(f"echo {b64} | base64 -d | python3 -"))


def copies(pair: Pair, index: int, token: str) -> int:
    return len(pair.arrivals(index).get(token, []))


# -- a plain HTTP client: what an attacker with a valid login of their own can send -----------


class PortalClient:
    def __init__(self, base: str, cert: bytes) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        ctx = ssl.create_default_context(cadata=cert.decode())
        ctx.check_hostname = False  # the lab's certificate names the GOC; its key is pinned
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx),
            urllib.request.HTTPCookieProcessor(self.jar),
            _NoRedirect(),
        )

    def request(self, path: str, form: dict | None = None) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data)
        if data is not None:
            req.add_header("Origin", self.base)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    @staticmethod
    def csrf(page: str) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, "no CSRF token on the page"
        return html.unescape(found.group(1))

    def log_in(self, name: str, password: str) -> None:
        status, page = self.request("/login")
        assert status == 200, (status, page[:300])
        status, page = self.request(
            "/login", {"name": name, "password": password, "csrf": self.csrf(page)}
        )
        assert status in (302, 303), (status, page[:300])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


# -- the tests ----------------------------------------------------------------------------------


def test_an_admin_sees_only_its_customers_quarantine_and_releases_once(
    pair: Pair, admins: dict[str, tuple[str, str]]
) -> None:
    from selenium.webdriver.common.by import By

    c1, c2 = pair.customers[0].domain, pair.customers[1].domain
    sender = "someone@internet.lab"
    sent = {}
    for kind, rcpt in (("virus", f"user@{c1}"), ("banned", f"user@{c1}"), ("virus", f"user@{c2}")):
        token, msg = quarantinable(pair, kind, rcpt, sender)
        send(pair, msg, sender, [rcpt])
        sent[(kind, rcpt)] = token
    rows = {
        key: wait_for(lambda t=token: held_at_goc(pair, t), 120, f"{key} held at the GOC")
        for key, token in sent.items()
    }
    assert rows[("virus", f"user@{c1}")]["verdict"] == "virus"
    assert rows[("banned", f"user@{c1}")]["verdict"] == "banned"
    banned = sent[("banned", f"user@{c1}")]
    other = sent[("virus", f"user@{c2}")]
    name, password = admins[c1]
    url = portal_url(pair)
    with eyebrowser.chromium(trust=portal_cert(pair)) as page:
        page.get(url + "/")
        eyebrowser.wait(page, lambda d: d.find_element(By.ID, "name"), "the sign-in form")
        started = time.monotonic()
        eyebrowser.log_in(page, name, password)
        listing = eyebrowser.wait(
            page, lambda d: d.find_element(By.ID, "messages").text, "the quarantine list"
        )
        record_figure("portal_lab_first_page_s", round(time.monotonic() - started, 3))
        for key, token in sent.items():
            mine = key[1].endswith("@" + c1)
            assert (token in listing) == mine, (key, mine)
        event_id = rows[("banned", f"user@{c1}")]["event_id"]
        page.find_element(By.CSS_SELECTOR, f'tr[data-event="{event_id}"] a').click()
        facts = eyebrowser.wait(page, lambda d: d.find_element(By.ID, "facts").text, "the page")
        assert "banned" in facts
        page.find_element(By.ID, "release").click()
        eyebrowser.wait(page, lambda d: d.find_element(By.ID, "notice"), "the request noted")
        eyebrowser.save_screenshot(page, SCREENSHOT)
        errors = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    released = time.monotonic()
    pair.wait_delivered([banned], 0, timeout=180)
    record_figure("portal_lab_release_to_delivery_s", round(time.monotonic() - released, 1))
    done = wait_for(
        lambda: pair.goc_sql(
            f"SELECT result || '|' || requested_by FROM quarantine_actions"
            f" WHERE event_id = '{event_id}' AND done_at IS NOT NULL"
        ),
        120,
        "the release answered at the GOC",
    )
    assert done == f"released|admin:{name}", done
    time.sleep(20)  # a second copy would come within the manager's next passes
    assert copies(pair, 0, banned) == 1
    assert copies(pair, 1, other) == 0  # the other customer's virus stays held


def test_another_customers_admin_gets_nothing_for_the_first_ones_ids(
    pair: Pair, admins: dict[str, tuple[str, str]]
) -> None:
    c1, c2 = pair.customers[0].domain, pair.customers[1].domain
    sender = "someone@internet.lab"
    token, msg = quarantinable(pair, "banned", f"user@{c1}", sender)
    send(pair, msg, sender, [f"user@{c1}"])
    target = wait_for(lambda: held_at_goc(pair, token), 120, "c1's message held at the GOC")
    own_token, own = quarantinable(pair, "banned", f"user@{c2}", sender)
    send(pair, own, sender, [f"user@{c2}"])
    mine = wait_for(lambda: held_at_goc(pair, own_token), 120, "c2's message held at the GOC")
    client = PortalClient(portal_url(pair), portal_cert(pair))
    client.log_in(*admins[c2])
    status, listing = client.request("/")
    assert status == 200 and own_token in listing and token not in listing
    status, own_page = client.request(f"/message/{mine['event_id']}")
    assert status == 200
    csrf = client.csrf(own_page)
    eid = target["event_id"]
    missing = "00000000-0000-4000-8000-000000000000"
    status, absent = client.request(f"/message/{missing}")
    assert status == 404
    for path in (f"/message/{eid}", f"/message/{eid}/raw", f"/message/{eid.upper()}"):
        status, body = client.request(path)
        assert status == 404 and body == absent, (path, status)
    for action in ("release", "delete", "allow"):
        status, body = client.request(f"/message/{eid}/{action}", {"csrf": csrf})
        assert status == 404, (action, status, body[:200])
    for query in (f"/?recipient=user%40{c1}", f"/?subject={token}"):
        status, body = client.request(query)  # the search box echoes the query, escaped
        assert status == 200 and eid not in body and 'id="empty"' in body, query
    status, body = client.request("/?customer=1&customer_id=1")  # no such widening exists
    assert status == 200 and eid not in body
    asked = pair.goc_sql(f"SELECT count(*) FROM quarantine_actions WHERE event_id = '{eid}'")
    assert asked == "0"
    time.sleep(5)
    assert copies(pair, 0, token) == 0


def test_notices_arrive_per_policy_and_never_at_a_forged_sender(pair: Pair) -> None:
    c1, c2 = pair.customers[0].domain, pair.customers[1].domain
    forged = f"victim-{secrets.token_hex(4)}@{c2}"  # a real mailbox the worm pretends to be
    admin = f"qadmin-{secrets.token_hex(4)}@{c1}"
    with policy(pair, c1, {"notify": "both", "admin_address": admin}):
        time.sleep(5)  # the policy reaches every scanner and monitor within seconds
        token, msg = quarantinable(pair, "virus", f"user@{c1}", forged)
        send(pair, msg, forged, [f"user@{c1}"])
        row = wait_for(lambda: held_at_goc(pair, token), 120, "the virus held")

        def notices() -> list[dict] | None:
            hits = [h for h in maildir_hits(pair, 0, row["quarantine_id"]) if not h["token"]]
            return hits if len(hits) >= 2 else None

        started = time.monotonic()
        hits = wait_for(notices, 240, "a notice to the recipient and one to the admin", 3)
        record_figure("quarantine_notice_after_held_s", round(time.monotonic() - started, 1))
    tos = sorted(h["to"].lower() for h in hits)
    assert any(f"user@{c1}" in t for t in tos) and any(admin in t for t in tos), tos
    assert all(
        h["from"].lower().startswith("quarantine@") or "quarantine@" in h["from"].lower()
        for h in hits
    ), hits
    assert copies(pair, 0, token) == 0  # the virus itself never
    time.sleep(10)
    backscatter = maildir_hits(pair, 1, forged)
    assert backscatter == [], backscatter


def test_a_message_outlives_its_scanner_and_is_released(
    pair: Pair, admins: dict[str, tuple[str, str]]
) -> None:
    c1 = pair.customers[0].domain
    tower = pair.towers["a"]
    sender = "someone@internet.lab"
    token, msg = quarantinable(pair, "banned", f"user@{c1}", sender)
    send(pair, msg, sender, [f"user@{c1}"], relay=str(tower.settings.hosts.relay))
    row = wait_for(lambda: held_at_goc(pair, token), 120, "the banned message held")
    assert row["tower"] == tower.settings.name

    def space() -> float | None:  # the space the quarantine takes, in the monitor's metrics
        metrics = tower.monitor().check_output(
            f"curl -fsS http://127.0.0.1:{tower.settings.ports.monitor_http}/metrics"
        )
        found = re.search(
            rf'^mailtower_quarantine_bytes{{customer="{re.escape(c1)}"}} (\S+)$', metrics, re.M
        )
        return float(found.group(1)) if found and float(found.group(1)) > 0 else None

    assert wait_for(space, 150, "the quarantine's space in the monitor's metrics", 5) > 0
    scanner = tower.entry(row["scanner"]).data["lab_name"]
    # The scanner is lost: powered off at once, and everything in its spool gone with it.
    subprocess.run(["lxc-stop", "-k", "-n", scanner], check=True)
    spool = Path(f"/var/lib/lxc/{scanner}/overlay/delta{tower.settings.spool_dir}")
    for entry in spool.iterdir() if spool.is_dir() else ():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    pool_name = tower.settings.scanner_name(
        [str(a) for a in tower.settings.hosts.scanners].index(row["scanner"])
    )
    try:
        client = PortalClient(portal_url(pair), portal_cert(pair))
        client.log_in(*admins[c1])
        status, listing = client.request(f"/?subject={token}")
        assert status == 200 and token in listing
        status, page = client.request(f"/message/{row['event_id']}")
        assert status == 200 and token in page
        status, _ = client.request(
            f"/message/{row['event_id']}/release", {"csrf": client.csrf(page)}
        )
        assert status in (302, 303)
        pair.wait_delivered([token], 0, timeout=180)
        time.sleep(15)
        assert copies(pair, 0, token) == 1
    finally:
        subprocess.run(["lxc-start", "-n", scanner], check=False)
        wait_for(lambda: tower.pool()[pool_name]["enabled"], 300, f"{scanner} back in the pool", 5)


def test_a_user_signs_in_by_a_mailed_link_and_sees_only_their_own_mail(pair: Pair) -> None:
    c1 = pair.customers[0].domain
    sender = "someone@internet.lab"
    user = f"portal-user-{secrets.token_hex(4)}@{c1}"
    neighbour = f"portal-other-{secrets.token_hex(4)}@{c1}"
    tokens = {}
    for rcpt in (user, neighbour):
        token, msg = quarantinable(pair, "banned", rcpt, sender)
        send(pair, msg, sender, [rcpt])
        tokens[rcpt] = token
    rows = {
        rcpt: wait_for(lambda t=token: held_at_goc(pair, t), 120, f"{rcpt}'s message held")
        for rcpt, token in tokens.items()
    }
    client = PortalClient(portal_url(pair), portal_cert(pair))
    status, page = client.request("/login")
    status, page = client.request("/link", {"address": user, "csrf": client.csrf(page)})
    assert status == 200, page[:300]
    asked = time.monotonic()
    link_re = re.compile(re.escape(portal_url(pair)) + r"/link/[A-Za-z0-9_%-]+")

    def link() -> str | None:
        for hit in maildir_hits(pair, 0, "/link/"):
            if user in hit["to"].lower():
                body = pair.customer_node(0).check_output(
                    f"grep -rl -- {shlex.quote(user)} {MAILDIR}/new {MAILDIR}/cur"
                    " | xargs grep -ho -- " + shlex.quote(portal_url(pair) + "/link/[^ ]*")
                )
                found = link_re.search(body)
                return found.group(0) if found else None
        return None

    url = wait_for(link, 120, f"the sign-in link mailed to {user}", 2)
    record_figure("portal_lab_link_mail_s", round(time.monotonic() - asked, 1))
    path = url.removeprefix(portal_url(pair))
    status, page = client.request(path)  # opening the link uses nothing up
    assert status == 200
    token_field = re.search(r'name="token" value="([^"]+)"', page)
    assert token_field
    form = {"token": html.unescape(token_field.group(1)), "csrf": client.csrf(page)}
    status, _ = client.request("/link/use", form)
    assert status in (302, 303)
    status, listing = client.request("/")
    assert status == 200
    assert rows[user]["event_id"] in listing
    assert rows[neighbour]["event_id"] not in listing
    status, _ = client.request(f"/message/{rows[neighbour]['event_id']}")
    assert status == 404
    # The link is single-use: a second sign-in with it is refused.
    other = PortalClient(portal_url(pair), portal_cert(pair))
    status, page = other.request(path)
    status, _ = other.request("/link/use", {**form, "csrf": other.csrf(page)})
    assert status == 403
