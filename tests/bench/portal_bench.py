"""The quarantine portal's pages with 100,000 quarantined messages (issue 18).

    python tests/bench/portal_bench.py [--rows 100000] [--repeat 20] [--sql-only]

Starts a throwaway PostgreSQL 15 (tests/pgclusters.py) with the GOC's schema and the portal's
(``mt_portal``, its grants, its indexes), fills ``--rows`` quarantined verdict events for two
customers (70 % / 30 %; realistic senders, recipients, subjects and findings; a 2 KiB message
each) spread over 30 days, ANALYZEs, and times the store's queries as the pages run them, as
``mt_portal``: for an operator, the big customer's admin and one of its users, the first page,
a deep keyset page (the 40th: the cursor of the 39th), a subject search, a sender search,
(for the admin) a recipient search and a message (``Store.message``). Prints one line per
case: the median and the worst of ``--repeat`` runs in milliseconds, and the rows the page had.

Then (unless ``--sql-only``) the pages as a client waits for them: the real portal server
(``python -m mailtower.goc.portal serve``, this checkout's ``src``) over HTTPS with a
self-signed certificate made by the GOC deploy's commands, as ``mt_portal``. Its expiry task
first NULLs the copies past ``expires_at`` (about half of the rows: 30 days kept, 14 days'
expiry); the bench times a first page while that sweep runs, waits for its end, VACUUM
ANALYZEs (as autovacuum would), and then, for each role, signs in as a browser does (operator
and admin: GET /login for the pre-cookie and the form's csrf, POST /login with an Origin; the
user: a link from ``Store.new_link`` used through GET /link/<token> and POST /link/use) and
times, over one keep-alive HTTPS connection, the complete HTML body of GET / , the 40th page
(the "Older messages" link followed 39 times), the searches and /message/<event_id> (the first
row's, its stored bytes replaced by a real ~24 KiB MIME message with an attachment). Beside
each: the median of the same store call timed directly, after the sweep. Prints median / p95
/ worst of ``--repeat`` and the server's RSS (and peak). Nothing is asserted: the figures go
to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import html
import http.client
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "unit"), str(ROOT)]

import pgclusters  # noqa: E402
from eye_fixtures import make_certificate  # noqa: E402
from portal_fixtures import PORTAL_PASSWORD, QUARANTINE_ACTIONS, small_message  # noqa: E402
from scand_fakes import free_port, wait_until  # noqa: E402

from mailtower.goc.portal import render  # noqa: E402
from mailtower.goc.portal import store as portal  # noqa: E402
from mailtower.goc.sync.goc import ensure_goc  # noqa: E402

FILL = """
INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, message_id, sender,
    recipients, findings, quarantine_id, size_bytes, customer_id, subject, expires_at, message,
    quarantine_meta)
SELECT gen_random_uuid(),
       CASE WHEN i %% 2 = 0 THEN 'tower-a' ELSE 'tower-b' END,
       'scanner-' || (i %% 23),
       now() - (i * interval '26 seconds'),
       (ARRAY['virus', 'banned', 'suspicious'])[1 + i %% 3],
       '<' || i || '@mail.example>',
       (ARRAY['billing', 'noreply', 'promo', 'hr', 'ceo'])[1 + i %% 5] || i %% 997
           || '@' || (ARRAY['spam.example', 'phish.example', 'bulk.example'])[1 + i %% 3],
       ARRAY['user' || (i %% 500) || '@' || CASE WHEN i %% 10 < 7 THEN 'big.example'
                                                ELSE 'small.example' END],
       jsonb_build_array(jsonb_build_object('engine', 'clamd', 'name',
           'Win.Trojan.Agent-' || (i %% 300), 'part', 'invoice.zip')),
       'q-' || i,
       2048,
       CASE WHEN i %% 10 < 7 THEN %(big)s ELSE %(small)s END,
       (ARRAY['Invoice ', 'Your parcel ', 'Payment overdue ', 'Meeting notes ',
              'Password reset '])[1 + i %% 5] || (i %% 10007),
       now() - (i * interval '26 seconds') + interval '14 days',
       convert_to(repeat('x', 2000), 'UTF8'),
       '{"reason": "virus"}'
FROM generate_series(1, %(rows)s) AS i
"""


ADMIN_PASSWORD = "admin password for the portal bench"
OPERATOR_PASSWORD = "operator password for the portal bench"
USER = "user3@big.example"
DEPTH = 40  # the deep page: the 40th
# (label, query string) of the list pages timed besides the first and the deep one.
SEARCHES = [
    ("subject contains 'overdue 42'", {"subject": "overdue 42"}),
    ("subject contains 'reset 9999' (rare)", {"subject": "reset 9999"}),
    ("sender contains 'promo12'", {"sender": "promo12"}),
]
RECIPIENT_SEARCH = ("recipient user3@big.example", {"recipient": USER})
NEXT = re.compile(r'<a id="next" href="([^"]*)"')
EVENT = re.compile(r'<tr data-event="([^"]*)"')


def stats(times: list[float]) -> tuple[float, float, float]:
    """Median, p95 (nearest rank) and worst of ``times``."""
    ordered = sorted(times)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
    return statistics.median(ordered), p95, ordered[-1]


def timed(label: str, repeat: int, run: object) -> float:
    times = []
    rows = 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = run()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    print(
        f"{label:44s} median {statistics.median(times):7.2f} ms"
        f"  worst {max(times):7.2f} ms  rows {rows}"
    )
    return statistics.median(times)


def fill(cluster: Any, rows: int) -> dict[str, int]:
    with cluster.connect() as conn:
        conn.execute(QUARANTINE_ACTIONS)
        portal.apply_schema(conn)
        portal.ensure_role(conn, PORTAL_PASSWORD)
        portal.apply_grants(conn)
        ids = {}
        for name in ("big", "small"):
            row = conn.execute(
                "INSERT INTO customers (name) VALUES (%s) RETURNING id", (name,)
            ).fetchone()
            assert row is not None
            ids[name] = row[0]
            conn.execute(
                "INSERT INTO domains (name, customer_id) VALUES (%s, %s)",
                (f"{name}.example", row[0]),
            )
        started = time.perf_counter()
        conn.execute(FILL, {"rows": rows, **ids})  # type: ignore[arg-type]
        conn.execute("VACUUM ANALYZE verdict_events")
        print(f"filled {rows} rows in {time.perf_counter() - started:.1f} s")
        portal.set_user(conn, "op", "operator", None, OPERATOR_PASSWORD)
        portal.set_user(conn, "admin-big", "admin", "big", ADMIN_PASSWORD)
    return ids


def sql_figures(store: portal.Store, scopes: dict[str, portal.Scope], repeat: int) -> None:
    """The store's queries alone, as before the server (every message still held)."""
    for role, scope in scopes.items():

        def first(scope: portal.Scope = scope) -> int:
            return len(store.page(scope, portal.Search(), None)[0])

        cursor = None
        for _ in range(DEPTH - 1):
            cursor = store.page(scope, portal.Search(), cursor)[1]
            if cursor is None:
                break

        def deep(scope: portal.Scope = scope, cursor: object = cursor) -> int:
            return len(store.page(scope, portal.Search(), cursor)[0])  # type: ignore[arg-type]

        def subject(scope: portal.Scope = scope) -> int:
            return len(store.page(scope, portal.Search(subject="overdue 42"), None)[0])

        def sender(scope: portal.Scope = scope) -> int:
            return len(store.page(scope, portal.Search(sender="promo12"), None)[0])

        timed(f"{role}: first page", repeat, first)
        if cursor is not None:
            timed(f"{role}: 40th page (keyset)", repeat, deep)

        def rare(scope: portal.Scope = scope) -> int:
            return len(store.page(scope, portal.Search(subject="reset 9999"), None)[0])

        timed(f"{role}: subject contains 'overdue 42'", repeat, subject)
        timed(f"{role}: subject contains 'reset 9999' (rare)", repeat, rare)
        timed(f"{role}: sender contains 'promo12'", repeat, sender)
        if role == "admin":

            def recipient(scope: portal.Scope = scope) -> int:
                search = portal.Search(recipient=USER)
                return len(store.page(scope, search, None)[0])

            timed(f"{role}: recipient {USER}", repeat, recipient)
        eid = str(store.page(scope, portal.Search(), None)[0][0]["event_id"])

        def message(scope: portal.Scope = scope, eid: str = eid) -> int:
            return 1 if store.message(scope, eid) is not None else 0

        timed(f"{role}: message (Store.message)", repeat, message)


# -- the real server over HTTPS ---------------------------------------------------------------


class Browser:
    """One keep-alive HTTPS connection and its cookies, as a browser tab has them."""

    def __init__(self, base: str, port: int, tls: ssl.SSLContext) -> None:
        self.base = base
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=60)
        self.cookies: dict[str, str] = {}
        self.sockets: set[int] = set()  # the local ports used

    def go(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        """(status, body) of one request, the body read whole; cookies kept."""
        headers = {"Accept": "text/html"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if form is not None:
            data = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Origin"] = self.base
        self.conn.request(method, path, data, headers)
        response = self.conn.getresponse()
        body = response.read().decode()
        # The client's port: a new connection would have another one.
        self.sockets.add(self.conn.sock.getsockname()[1] if self.conn.sock else 0)
        for cookie in response.headers.get_all("Set-Cookie") or []:
            name, _, value = cookie.split(";")[0].partition("=")
            if value and "max-age=0" not in cookie.lower():
                self.cookies[name.strip()] = value.strip().strip('"')
            else:
                self.cookies.pop(name.strip(), None)
        return response.status, body

    def csrf(self, path: str) -> str:
        status, body = self.go("GET", path)
        match = re.search(r'name="csrf" value="([^"]*)"', body)
        assert status == 200 and match, (status, body[:300])
        return html.unescape(match.group(1))

    def login(self, name: str, password: str) -> None:
        csrf = self.csrf("/login")
        status, body = self.go("POST", "/login", {"name": name, "password": password, "csrf": csrf})
        assert status == 303 and "mtportal_session" in self.cookies, (status, body[:300])

    def use_link(self, token: str) -> None:
        csrf = self.csrf(f"/link/{token}")
        status, body = self.go("POST", "/link/use", {"token": token, "csrf": csrf})
        assert status == 303 and "mtportal_session" in self.cookies, (status, body[:300])

    def close(self) -> None:
        self.conn.close()


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()[0] if value.split() else "0"
    return int(fields.get("VmRSS", 0)), int(fields.get("VmHWM", 0))


class Table:
    """The figures by page and role: client median / p95 / worst, and the query's median."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], str] = {}
        self.pages: list[str] = []

    def add(self, page: str, role: str, times: list[float], query_ms: float | None) -> None:
        if page not in self.pages:
            self.pages.append(page)
        median, p95, worst = stats(times)
        cell = f"{median:.1f} / {p95:.1f} / {worst:.1f}"
        if query_ms is not None:
            cell += f" ({query_ms:.1f})"
        self.cells[(page, role)] = cell

    def print(self, roles: list[str], repeat: int) -> None:
        print()
        print(
            f"| page (ms over HTTPS: median / p95 / worst of {repeat}; (the query's median)) | "
            + " | ".join(roles)
            + " |"
        )
        print("|---" * (len(roles) + 1) + "|")
        for page in self.pages:
            cells = [self.cells.get((page, role), "—") for role in roles]
            print(f"| {page} | " + " | ".join(cells) + " |")


def client_times(browser: Browser, path: str, repeat: int, want: str) -> tuple[list[float], str]:
    times = []
    body = ""
    for _ in range(repeat):
        started = time.perf_counter()
        status, body = browser.go("GET", path)
        times.append((time.perf_counter() - started) * 1000)
        assert status == 200 and want in body, (path, status, body[:300])
    return times, body


def query_median(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def parts(store: portal.Store, scope: portal.Scope, eid: str, repeat: int) -> None:
    """Where a page's time goes besides its query, in this process: the session lookup every
    request makes, and building the HTML of a list page and of a message page."""
    token, _ = store.open_session(scope, 3600, 1800)
    rows, cursor = store.page(scope, portal.Search(), None)
    assert cursor is not None
    row = store.message(scope, eid)
    assert row is not None
    figures = {
        "Store.session (every request)": lambda: store.session(token),
        "render.list_page (50 rows)": lambda: render.list_page(
            rows, {}, cursor.text(), who=scope.who, role=scope.role, csrf="x" * 43
        ),
        "render.message_page (~24 KiB MIME)": lambda: render.message_page(
            row, who=scope.who, role=scope.role, csrf="x" * 43
        ),
    }
    print()
    for label, run in figures.items():
        print(f"{label:44s} median {query_median(run, repeat):7.2f} ms")


def http_figures(
    cluster: Any, store: portal.Store, scopes: dict[str, portal.Scope], repeat: int
) -> None:
    etc = Path(tempfile.mkdtemp(prefix="mailtower-portal-bench-etc-"))
    cert, key = make_certificate(etc, ["localhost", "127.0.0.1"])
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mailtower.goc.portal", "serve"]
    argv += ["--dsn", cluster.conninfo(portal.PORTAL_ROLE, PORTAL_PASSWORD)]
    argv += ["--listen", f"127.0.0.1:{port}", "--secret-file", str(etc / "session.key")]
    argv += ["--tls-cert", str(cert), "--tls-key", str(key), "--relay", "127.0.0.1:1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    tls = ssl.create_default_context(cafile=str(cert))
    logfile = etc / "portal.log"
    # The messages the message pages show: a real MIME message (text and an attachment).
    events = {
        role: str(store.page(s, portal.Search(), None)[0][0]["event_id"])
        for role, s in scopes.items()
    }
    raw = small_message(
        "billing1@phish.example",
        [USER],
        "Invoice 4711",
        "Please find the invoice attached.\n" * 40,
        **{"invoice.zip": os.urandom(16 * 1024)},
    )
    with cluster.connect() as conn:
        for eid in set(events.values()):
            conn.execute("UPDATE verdict_events SET message = %s WHERE event_id = %s", (raw, eid))
    with logfile.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:

        def healthy() -> bool:
            assert proc.poll() is None, logfile.read_text()
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=5)
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
                conn.close()
                return ok
            except OSError:
                return False

        launched = started = time.perf_counter()
        wait_until(healthy, 30, "mailtower-portal to answer /healthz over HTTPS")
        print(
            f"\nserver up in {time.perf_counter() - started:.2f} s, RSS {rss_kib(proc.pid)[0]} KiB"
        )

        def backlog() -> int:
            return int(
                cluster.scalar(
                    "SELECT count(*) FROM verdict_events WHERE message IS NOT NULL"
                    " AND expires_at <= now() - interval '1 minute'"
                )
            )

        print(f"expired copies at start: {backlog()}")
        # A first page while the server's first expiry sweep NULLs them (batches of 1000, on
        # the store's one connection).
        sweeping = Browser(base, port, tls)
        sweeping.login("op", OPERATOR_PASSWORD)
        during: list[float] = []
        while backlog() > 0 and len(during) < repeat:
            started = time.perf_counter()
            status, body = sweeping.go("GET", "/")
            during.append((time.perf_counter() - started) * 1000)
            assert status == 200, body[:300]
        sweeping.close()
        wait_until(lambda: backlog() == 0, 600, "the first expiry sweep")
        print(f"first expiry sweep done {time.perf_counter() - launched:.1f} s after start")
        if during:
            median, p95, worst = stats(during)
            print(
                f"operator: first page during the sweep ({len(during)} runs): median"
                f" {median:.1f} ms  p95 {p95:.1f} ms  worst {worst:.1f} ms"
            )
        with cluster.connect() as conn:
            conn.execute("VACUUM ANALYZE verdict_events")
        rss_before = rss_kib(proc.pid)[0]
        print(f"server RSS before the timed pages: {rss_before} KiB")

        table = Table()
        for role, scope in scopes.items():
            browser = Browser(base, port, tls)
            # The floor: a request with no session and no query (TLS, aiohttp, the client).
            times, _ = client_times(browser, "/healthz", repeat, "ok")
            table.add("GET /healthz, no cookie (the floor)", role, times, None)
            if role == "operator":
                browser.login("op", OPERATOR_PASSWORD)
            elif role == "admin":
                browser.login("admin-big", ADMIN_PASSWORD)
            else:
                browser.use_link(store.new_link(USER, 900))

            def case(
                page: str,
                path: str,
                query: Callable[[], object],
                want: str = "<html",
                browser: Browser = browser,
                role: str = role,
            ) -> str:
                times, body = client_times(browser, path, repeat, want)
                query_ms = query_median(query, repeat)
                table.add(page, role, times, query_ms)
                median, p95, worst = stats(times)
                rows = body.count("<tr data-event=")
                print(
                    f"{role}: {page:44s} median {median:7.2f}  p95 {p95:7.2f}  worst"
                    f" {worst:7.2f} ms  query {query_ms:6.2f} ms  rows {rows}"
                    f"  {len(body.encode()) // 1024} KiB"
                )
                return body

            first = case(
                "first page",
                "/",
                lambda scope=scope: store.page(scope, portal.Search(), None),
                'id="messages"',
            )
            # The deep page: the "Older messages" link followed as a reader would.
            path = "/"
            body = first
            depth = 1
            while depth < DEPTH and (match := NEXT.search(body)):
                path = html.unescape(match.group(1))
                status, body = browser.go("GET", path)
                assert status == 200, body[:300]
                depth += 1
            if depth == DEPTH:
                after = portal.Cursor.parse(parse_qs(urlsplit(path).query)["after"][0])
                assert after is not None, path
                case(
                    "40th page, keyset (Older messages x 39)",
                    path,
                    lambda scope=scope, after=after: store.page(scope, portal.Search(), after),
                    'id="messages"',
                )
            else:
                print(f"{role}: only {depth} pages: no 40th")
            searches = SEARCHES + ([RECIPIENT_SEARCH] if role == "admin" else [])
            for label, params in searches:
                case(
                    label,
                    "/?" + urlencode(params),
                    lambda scope=scope, params=params: store.page(
                        scope, portal.Search(**params), None
                    ),
                )
            eid = EVENT.search(first)
            assert eid is not None and eid.group(1) == events[role]
            case(
                "message page (~24 KiB MIME, an attachment)",
                f"/message/{events[role]}",
                lambda scope=scope, eid=events[role]: store.message(scope, eid),
                'id="facts"',
            )
            assert len(browser.sockets) == 1, "the connection was not kept alive"
            browser.close()
        rss, hwm = rss_kib(proc.pid)
        table.print(list(scopes), repeat)
        parts(store, scopes["operator"], events["operator"], repeat)
        print(f"\nserver RSS after the pages: {rss} KiB (peak {hwm} KiB)")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(etc, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--sql-only", action="store_true", help="the queries alone, no server")
    args = parser.parse_args()
    workdir = pgclusters.make_workdir("mailtower-portal-bench-")
    cluster = pgclusters.Cluster.create("goc", workdir)
    try:
        ensure_goc(cluster.dsn(), sync_password="sync-password-0123456789")
        ids = fill(cluster, args.rows)
        store = portal.Store(cluster.conninfo(portal.PORTAL_ROLE, PORTAL_PASSWORD))
        scopes = {
            "operator": portal.Scope("operator", "op"),
            "admin": portal.Scope("admin", "admin-big", customer_id=ids["big"]),
            "user": portal.Scope("user", USER, address=USER),
        }
        sql_figures(store, scopes, args.repeat)
        if not args.sql_only:
            http_figures(cluster, store, scopes, args.repeat)
        store.close()
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
