"""``mailtower customer``: the GOC's customers, their domains and routes, policies and
recipient lists.

The GOC is the source of truth: what this command writes reaches every tower by logical
replication (``mt_config``). So everything is validated here, before any write, and each
command is one transaction: a tower never sees half a change. A policy is stored as
``policy.dump(policy.parse(...))`` (the fields that differ from the default), so every reader
of it (scand, the relay) can apply it whole. Every row a command changes gets
``updated_at = now()``: scand's change check reads it.

Run it at the GOC as ``postgres`` (``sudo -u postgres mailtower customer ...``): it connects
with the DSN of ``/etc/mailtower/sync/goc.json`` (the local socket, peer authentication), as
``mailtower sync goc`` does; ``--dsn`` gives another.

Exit status: 0 done, 1 refused or failed (no such customer, a domain of another customer, the
database unreachable or refusing: the host and database are named), 2 bad input (nothing is
written; the field or the lines are named).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO, Any, get_origin

import psycopg
from psycopg.conninfo import conninfo_to_dict

from mailtower.customers import policy as policies
from mailtower.goc.errors import InputError, Refused
from mailtower.goc.sync import deployed
from mailtower.goc.sync.exceptions import SyncError
from mailtower.settings import _DOMAIN_RE

GOC_CONFIG = Path("/etc/mailtower/sync/goc.json")
EXIT_FAILED, EXIT_INPUT = 1, 2

NAME_RE = re.compile(r"^[a-z0-9._-]{1,64}$")
# A Postfix transport as the tower's routes table takes it (CHECK transport ~ '^(smtp|lmtp):'):
# smtp:[host]:port (no MX lookup, settings.Customer.transport) or smtp:host[:port] (MX lookup).
_TRANSPORT_RE = re.compile(r"^(smtp|lmtp):(?:\[([^\[\]]+)\]|([^\[\]:]+))(?::([0-9]{1,5}))?$")
MAX_ADDRESS = 254  # RFC 5321's path limit, less the angle brackets
MAX_RECIPIENTS = 1_000_000  # addresses in one domain's list
MAX_LINE = 4096  # bytes of one line of a recipients file (longer: a bad line)
# Never in an unquoted address (RFC 5322 specials; quoted local parts are not taken).
_ADDRESS_SPECIALS = frozenset('"<>(),;:[]\\')
_SHOWN_BAD_LINES = 20


# --- validation ------------------------------------------------------------------------------


def customer_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):  # fullmatch: "$" would let a trailing newline through
        raise InputError(f"customer name {value!r}: 1-64 of a-z 0-9 . _ - (lower case)")
    return value


def domain_name(value: str) -> str:
    """A customer domain, as settings.Customer takes it (lower case, no trailing dot)."""
    domain = value.strip().rstrip(".").lower()
    if len(domain) > 253 or not _DOMAIN_RE.fullmatch(domain):
        raise InputError(f"domain {value!r} is not a valid domain name (e.g. example.com)")
    return domain


def transport(value: str) -> str:
    """A route: ``smtp:[host]:port`` (or lmtp, or without brackets: with an MX lookup)."""
    match = _TRANSPORT_RE.fullmatch(value)
    if match is None:
        raise InputError(
            f"route {value!r}: a transport like smtp:[mail.example.com]:25 (smtp or lmtp,"
            " a host name or IPv4 address, an optional port)"
        )
    proto, bracketed, bare, port = match.groups()
    host = (bracketed or bare).rstrip(".").lower()
    try:
        IPv4Address(host)
    except ValueError:
        if len(host) > 253 or not _DOMAIN_RE.fullmatch(host):
            raise InputError(
                f"route {value!r}: {host!r} is neither an IPv4 address nor a host name"
            ) from None
    if port is not None and not 1 <= int(port) <= 65535:
        raise InputError(f"route {value!r}: port {port} is not 1-65535")
    shown = f"[{host}]" if bracketed else host
    return f"{proto}:{shown}" + (f":{int(port)}" if port is not None else "")


def address_problem(address: str, domain: str) -> str | None:
    """Why ``address`` (already lower case) cannot be a recipient of ``domain`` (None: it can)."""
    if len(address) > MAX_ADDRESS:
        return f"longer than {MAX_ADDRESS} characters"
    for char in address:
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return "a space or control character"
        if char in _ADDRESS_SPECIALS:
            return f"{char!r} is not allowed in an address"
    local, at, rest = address.rpartition("@")
    if not at or rest != domain:
        return f"not an address @{domain}"
    if not local or "@" in local:
        return "not one local part before @"
    return None


def read_recipients(stream: IO[bytes], domain: str) -> tuple[list[str], int]:
    """The addresses of a recipients file (one a line, ``#`` comment lines, blank lines), lower
    case, each once; and how many duplicate lines there were. InputError lists the bad lines."""
    seen: dict[str, None] = {}
    bad: list[tuple[int, str]] = []
    duplicates = 0
    for number, raw in _lines(stream):
        if raw is None:
            bad.append((number, f"longer than {MAX_LINE} bytes"))
            continue
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            bad.append((number, "not UTF-8"))
            continue
        if not text or text.startswith("#"):
            continue
        address = text.lower()
        problem = address_problem(address, domain)
        if problem is not None:
            bad.append((number, problem))
        elif address in seen:
            duplicates += 1
        else:
            seen[address] = None
            if len(seen) > MAX_RECIPIENTS:
                raise InputError(f"more than {MAX_RECIPIENTS} addresses for {domain}")
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_SHOWN_BAD_LINES])
        more = f" (and {len(bad) - _SHOWN_BAD_LINES} more)" if len(bad) > _SHOWN_BAD_LINES else ""
        raise InputError(f"{len(bad)} bad line(s), nothing written: {shown}{more}")
    return list(seen), duplicates


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(number, line) of ``stream``; None for a line longer than MAX_LINE (never held whole)."""
    number = 0
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of it
                line = stream.readline(1 << 16)
            yield number, None
            continue
        yield number, line


def policy_changes(sets: Sequence[str], resets: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` and ``--reset key`` as changes for ``policy.merge``.

    A value is JSON when it parses as JSON (``3``, ``["exe", "scr"]``, ``null``), else text; a
    list field also takes ``a,b,c``. Unknown keys are left to ``parse``, which names them.
    """
    fields = policies.CustomerPolicy.model_fields
    changes: dict[str, Any] = {}
    for item in sets:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise InputError(f"--set {item!r}: KEY=VALUE is needed")
        value: Any
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        field = fields.get(key)
        if isinstance(value, str) and field is not None and get_origin(field.annotation) is tuple:
            value = [v.strip() for v in value.split(",") if v.strip()]
        changes[key] = value
    for key in resets:
        if key not in fields:
            raise InputError(f"--reset {key!r}: no such policy field")
        changes[key] = None
    return changes


def _policy_or_input_error(action: Any) -> policies.CustomerPolicy:
    try:
        return action()  # type: ignore[no-any-return]
    except policies.PolicyError as exc:
        raise InputError(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    first, *rest = text.strip().splitlines()
    return first + (" " + "; ".join(r.strip() for r in rest) if rest else "")


# --- the database ------------------------------------------------------------------------------

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Target:
    """Where the GOC's database is, for connecting and for messages."""

    dsn: str

    def where(self) -> str:
        try:
            params = conninfo_to_dict(self.dsn)
        except psycopg.ProgrammingError:
            return "the GOC's database (an invalid DSN)"
        host = str(params.get("host") or "the local socket")
        port = f":{params['port']}" if params.get("port") else ""
        return f"{host}{port}, database {params.get('dbname') or '(default)'}"

    def connect(self) -> Conn:
        extra: dict[str, Any] = {}
        if "connect_timeout" not in conninfo_to_dict(self.dsn):
            extra["connect_timeout"] = 10
        return psycopg.connect(
            self.dsn, autocommit=True, options="-c statement_timeout=300000", **extra
        )


def _customer_id(conn: Conn, name: str, *, lock: bool = False) -> int:
    query = "SELECT id FROM public.customers WHERE name = %s" + (" FOR UPDATE" if lock else "")
    row = conn.execute(query, (name,)).fetchone()
    if row is None:
        raise Refused(f"no customer {name!r} (mailtower customer list)")
    return int(row[0])


def _domain_owner(conn: Conn, domain: str) -> str | None:
    row = conn.execute(
        "SELECT c.name FROM public.domains d JOIN public.customers c ON c.id = d.customer_id"
        " WHERE d.name = %s",
        (domain,),
    ).fetchone()
    return None if row is None else str(row[0])


def _stored_policy(conn: Conn, customer_id: int) -> tuple[str | None, policies.CustomerPolicy]:
    """(the stored JSON or None, the policy); Refused when what is stored is invalid."""
    row = conn.execute(
        "SELECT policy::text FROM public.policies WHERE customer_id = %s", (customer_id,)
    ).fetchone()
    if row is None:
        return None, policies.DEFAULT
    try:
        return str(row[0]), policies.parse(str(row[0]), what="stored policy")
    except policies.PolicyError as exc:
        raise Refused(
            f"{_one_line(str(exc))}; replace it whole with --file (it was written around"
            " this command)"
        ) from None


def add_customer(conn: Conn, name: str, domains: Sequence[str], route: str) -> str:
    with conn.transaction():
        if conn.execute("SELECT 1 FROM public.customers WHERE name = %s", (name,)).fetchone():
            raise Refused(f"customer {name!r} exists already")
        for domain in domains:
            owner = _domain_owner(conn, domain)
            if owner is not None:
                raise Refused(f"domain {domain} belongs to customer {owner!r} already")
        row = conn.execute(
            "INSERT INTO public.customers (name) VALUES (%s) RETURNING id", (name,)
        ).fetchone()
        assert row is not None
        for domain in domains:
            conn.execute(
                "INSERT INTO public.domains (name, customer_id) VALUES (%s, %s)", (domain, row[0])
            )
            conn.execute(
                "INSERT INTO public.routes (domain, transport) VALUES (%s, %s)", (domain, route)
            )
    return f"added customer {name} ({', '.join(domains)} via {route}; default policy)"


def list_customers(conn: Conn) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT c.name,"
        " (SELECT count(*) FROM public.domains d WHERE d.customer_id = c.id),"
        " (SELECT count(*) FROM public.recipients r JOIN public.domains d ON d.name = r.domain"
        "   WHERE d.customer_id = c.id),"
        " (SELECT p.policy::text FROM public.policies p WHERE p.customer_id = c.id)"
        " FROM public.customers c ORDER BY c.name"
    ).fetchall()
    return [
        {
            "name": name,
            "domains": int(domains),
            "recipients": int(recipients),
            "policy": "default" if stored in (None, "{}") else "custom",
        }
        for name, domains, recipients, stored in rows
    ]


def show_customer(conn: Conn, name: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT id, created_at FROM public.customers WHERE name = %s", (name,)
    ).fetchone()
    if row is None:
        raise Refused(f"no customer {name!r} (mailtower customer list)")
    customer_id, created_at = row
    domains = [
        {"name": d, "route": route, "active": bool(active), "recipients": int(count)}
        for d, route, active, count in conn.execute(
            "SELECT d.name, r.transport, d.active,"
            " (SELECT count(*) FROM public.recipients x WHERE x.domain = d.name)"
            " FROM public.domains d LEFT JOIN public.routes r ON r.domain = d.name"
            " WHERE d.customer_id = %s ORDER BY d.name",
            (customer_id,),
        ).fetchall()
    ]
    stored = conn.execute(
        "SELECT policy::text FROM public.policies WHERE customer_id = %s", (customer_id,)
    ).fetchone()
    shown: dict[str, Any] = {
        "name": name,
        "created_at": created_at.isoformat(),
        "domains": domains,
    }
    try:
        policy = policies.parse(stored[0] if stored else "{}", what="stored policy")
        shown["policy"] = policy.model_dump(mode="json")
        shown["policy_stored"] = json.loads(policies.dump(policy))
    except policies.PolicyError as exc:
        shown["policy"] = None
        shown["policy_error"] = _one_line(str(exc))
        shown["policy_stored"] = json.loads(stored[0]) if stored else {}
    return shown


def _unlisted_domains(conn: Conn, customer_id: int) -> list[str]:
    """The customer's domains with no recipient listed (list mode would refuse all their mail)."""
    return [
        str(row[0])
        for row in conn.execute(
            "SELECT d.name FROM public.domains d WHERE d.customer_id = %s AND NOT EXISTS"
            " (SELECT 1 FROM public.recipients r WHERE r.domain = d.name) ORDER BY d.name",
            (customer_id,),
        ).fetchall()
    ]


def set_policy(
    conn: Conn,
    name: str,
    *,
    replace: str | None = None,
    changes: dict[str, Any] | None = None,
    force: bool = False,
) -> tuple[bool, policies.CustomerPolicy]:
    """Replace (``replace``: JSON text) or change the policy; (whether it changed, the policy).

    Validated before anything is written; the customer's row is locked meanwhile, so two
    changes at once do not lose one another.
    """
    if replace is not None:
        new = _policy_or_input_error(lambda: policies.parse(replace))
    with conn.transaction():
        customer_id = _customer_id(conn, name, lock=True)
        if replace is None:
            _, old = _stored_policy(conn, customer_id)
            new = _policy_or_input_error(lambda: policies.merge(old, changes or {}))
        if new.recipient_check == "list" and not force:
            empty = _unlisted_domains(conn, customer_id)
            if empty:  # every RCPT of those domains would get a permanent 550
                raise Refused(
                    f"{name}: recipient_check=list, but no recipient is listed for "
                    f"{', '.join(empty)}: upload them first (mailtower customer recipients), "
                    "or --force to refuse all their mail"
                )
        row = conn.execute(
            "INSERT INTO public.policies (customer_id, policy) VALUES (%s, %s::jsonb)"
            " ON CONFLICT (customer_id) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()"
            " WHERE policies.policy IS DISTINCT FROM EXCLUDED.policy RETURNING 1",
            (customer_id, policies.dump(new)),
        ).fetchone()
    return row is not None, new


def add_domain(conn: Conn, name: str, domain: str, route: str | None) -> str:
    with conn.transaction():
        customer_id = _customer_id(conn, name, lock=True)
        owner = _domain_owner(conn, domain)
        if owner is not None and owner != name:
            raise Refused(f"domain {domain} belongs to customer {owner!r}")
        if owner == name:
            if route is None:
                return f"{name}: {domain} is its domain already (unchanged)"
            changed = conn.execute(
                "INSERT INTO public.routes (domain, transport) VALUES (%s, %s)"
                " ON CONFLICT (domain) DO UPDATE SET transport = EXCLUDED.transport,"
                " updated_at = now() WHERE routes.transport IS DISTINCT FROM EXCLUDED.transport",
                (domain, route),
            ).rowcount
            return f"{name}: {domain} routed via {route}" + ("" if changed else " (unchanged)")
        if route is None:
            routes = {
                str(r[0])
                for r in conn.execute(
                    "SELECT r.transport FROM public.routes r JOIN public.domains d"
                    " ON d.name = r.domain WHERE d.customer_id = %s",
                    (customer_id,),
                ).fetchall()
            }
            if len(routes) != 1:
                raise InputError(
                    f"--route is needed: {name}'s domains have "
                    + (f"{len(routes)} different routes" if routes else "no route")
                )
            route = routes.pop()
        conn.execute(
            "INSERT INTO public.domains (name, customer_id) VALUES (%s, %s)", (domain, customer_id)
        )
        conn.execute(
            "INSERT INTO public.routes (domain, transport) VALUES (%s, %s)", (domain, route)
        )
    return f"{name}: added {domain} via {route}"


def remove_domain(conn: Conn, name: str, domain: str) -> str:
    with conn.transaction():
        _customer_id(conn, name, lock=True)
        if _domain_owner(conn, domain) != name:
            raise Refused(f"{domain} is not a domain of {name}")
        recipients = conn.execute(
            "DELETE FROM public.recipients WHERE domain = %s", (domain,)
        ).rowcount
        conn.execute("DELETE FROM public.domains WHERE name = %s", (domain,))  # and its route
    return f"{name}: removed {domain} (its route and {recipients} recipient(s))"


@dataclass(frozen=True)
class RecipientsResult:
    added: int
    removed: int
    listed: int
    recipient_check: str


def replace_recipients(
    conn: Conn, name: str, domain: str, addresses: Sequence[str], *, force: bool = False
) -> RecipientsResult:
    """Make ``addresses`` the whole list of ``domain``, in one transaction.

    The new list is copied into a temporary table (COPY: a 100,000-line list takes a moment);
    rows that stay are not touched (their ``updated_at`` neither), gone ones are deleted, new
    ones inserted.
    """
    with conn.transaction():
        customer_id = _customer_id(conn, name, lock=True)
        if _domain_owner(conn, domain) != name:
            raise Refused(f"{domain} is not a domain of {name}")
        if not addresses and not force:
            _, current = _stored_policy(conn, customer_id)
            if current.recipient_check == "list":
                raise Refused(
                    f"{name} uses recipient_check=list: an empty list refuses all mail for "
                    f"{domain} (--force to do so, or set recipient_check first)"
                )
        conn.execute("CREATE TEMPORARY TABLE mt_new_recipients (address text) ON COMMIT DROP")
        with conn.cursor().copy("COPY mt_new_recipients (address) FROM STDIN") as copy:
            for address in addresses:
                copy.write_row((address,))
        conn.execute("ANALYZE mt_new_recipients")
        removed = conn.execute(
            "DELETE FROM public.recipients r WHERE r.domain = %s AND NOT EXISTS"
            " (SELECT 1 FROM mt_new_recipients n WHERE lower(n.address) = r.address)",
            (domain,),
        ).rowcount
        added = conn.execute(
            "INSERT INTO public.recipients (address, domain)"
            " SELECT DISTINCT lower(address), %s::text FROM mt_new_recipients"
            " ON CONFLICT (address) DO UPDATE SET domain = EXCLUDED.domain, updated_at = now()"
            " WHERE recipients.domain IS DISTINCT FROM EXCLUDED.domain",
            (domain,),
        ).rowcount
        check = conn.execute(
            "SELECT policy->>'recipient_check' FROM public.policies WHERE customer_id = %s",
            (customer_id,),
        ).fetchone()
    return RecipientsResult(
        added, removed, len(addresses), str(check[0]) if check and check[0] else "none"
    )


def remove_customer(conn: Conn, name: str) -> str:
    with conn.transaction():
        customer_id = _customer_id(conn, name, lock=True)
        row = conn.execute(
            "SELECT (SELECT count(*) FROM public.domains WHERE customer_id = %s),"
            " (SELECT count(*) FROM public.recipients r JOIN public.domains d"
            "  ON d.name = r.domain WHERE d.customer_id = %s)",
            (customer_id, customer_id),
        ).fetchone()
        assert row is not None
        conn.execute("DELETE FROM public.customers WHERE id = %s", (customer_id,))  # cascades
    return f"removed customer {name} ({row[0]} domain(s), {row[1]} recipient(s), its policy)"


# --- the command ---------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``customer`` and its actions to the ``mailtower`` command."""
    customer = commands.add_parser(
        "customer",
        help="the GOC's customers: domains, routes, policies, recipient lists",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = customer.add_subparsers(dest="customer_action", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="a new customer with its domains and their route")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--domain", action="append", required=True, metavar="DOMAIN")
    add.add_argument("--route", required=True, metavar="TRANSPORT", help="smtp:[host]:25")
    add.set_defaults(func=_add)

    lst = actions.add_parser("list", help="every customer: domains, recipients, policy")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)

    show = actions.add_parser("show", help="a customer: domains, routes, policy (all fields)")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    pol = actions.add_parser(
        "policy",
        help="change a customer's policy: --set key=value, --reset key, or --file",
        description='VALUE is JSON when it parses as JSON (3, true, ["exe"]), else text; a'
        " list field also takes a,b,c. --file replaces the whole policy (JSON object; '-' is"
        " standard input). Without options: print the policy.",
    )
    pol.add_argument("name", metavar="NAME")
    pol.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    pol.add_argument("--reset", action="append", default=[], metavar="KEY", dest="resets")
    pol.add_argument("--file", metavar="FILE", help="the whole policy as JSON")
    pol.add_argument(
        "--force", action="store_true", help="recipient_check=list although a domain lists none"
    )
    pol.set_defaults(func=_policy)

    domain = actions.add_parser("domain", help="add or remove one of a customer's domains")
    dactions = domain.add_subparsers(dest="domain_action", metavar="ACTION", required=True)
    dadd = dactions.add_parser("add", help="add a domain (or change its route: --route)")
    dadd.add_argument("name", metavar="NAME")
    dadd.add_argument("domain", metavar="DOMAIN")
    dadd.add_argument("--route", metavar="TRANSPORT", help="default: the customer's one route")
    dadd.set_defaults(func=_domain_add)
    dremove = dactions.add_parser("remove", help="remove a domain, its route and recipients")
    dremove.add_argument("name", metavar="NAME")
    dremove.add_argument("domain", metavar="DOMAIN")
    dremove.set_defaults(func=_domain_remove)

    rcpt = actions.add_parser(
        "recipients",
        help="replace one domain's recipient list (recipient_check = list)",
        description="FILE: one address a line, '#' comment lines; '-' is standard input. The"
        " domain's whole list is replaced at once; a bad line writes nothing.",
    )
    rcpt.add_argument("name", metavar="NAME")
    rcpt.add_argument("--domain", required=True, metavar="DOMAIN")
    rcpt.add_argument("--file", required=True, metavar="FILE")
    rcpt.add_argument(
        "--force", action="store_true", help="an empty list although the customer uses list"
    )
    rcpt.set_defaults(func=_recipients)

    remove = actions.add_parser("remove", help="remove a customer and all it has")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--yes", action="store_true", help="needed: nothing asks again")
    remove.set_defaults(func=_remove)

    for parser in (add, lst, show, pol, dadd, dremove, rcpt, remove):
        parser.add_argument("--dsn", help="the GOC's database (default: from --config)")
        parser.add_argument("--config", type=Path, default=GOC_CONFIG, help="the GOC's sync file")


def _run(args: argparse.Namespace, action: Any) -> int:
    """Validate, connect, act; print the outcome, or one line why not (exit 1 or 2)."""
    label = f"mailtower customer {args.customer_action}"
    target: Target | None = None
    try:
        target = Target(args.dsn or deployed.load(args.config, deployed.GocSide).dsn)
        with target.connect() as conn:
            return int(action(conn))
    except InputError as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Refused as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SyncError as exc:
        print(f"{label}: {exc} (or give --dsn)", file=sys.stderr)
        return EXIT_FAILED
    except psycopg.Error as exc:
        where = target.where() if target is not None else "the GOC's database"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{label}: database error at {where}: {reason}", file=sys.stderr)
        return EXIT_FAILED


def _input(action: Any) -> Any:
    """Validate before connecting: InputError exits 2 with nothing written."""
    try:
        return action()
    except InputError as exc:
        return exc


def _validated(args: argparse.Namespace, check: Any) -> Any:
    result = _input(check)
    if isinstance(result, InputError):
        print(f"mailtower customer {args.customer_action}: {result}", file=sys.stderr)
    return result


def _add(args: argparse.Namespace) -> int:
    checked = _validated(
        args,
        lambda: (
            customer_name(args.name),
            list(dict.fromkeys(domain_name(d) for d in args.domain)),
            transport(args.route),
        ),
    )
    if isinstance(checked, InputError):
        return EXIT_INPUT
    name, domains, route = checked

    def action(conn: Conn) -> int:
        print(add_customer(conn, name, domains, route))
        return 0

    return _run(args, action)


def _list(args: argparse.Namespace) -> int:
    def action(conn: Conn) -> int:
        customers = list_customers(conn)
        if args.json:
            print(json.dumps(customers, indent=2))
            return 0
        width = max([len("NAME"), *(len(c["name"]) for c in customers)])
        print(f"{'NAME':<{width}}  DOMAINS  RECIPIENTS  POLICY")
        for c in customers:
            print(f"{c['name']:<{width}}  {c['domains']:>7}  {c['recipients']:>10}  {c['policy']}")
        return 0

    return _run(args, action)


def _show(args: argparse.Namespace) -> int:
    checked = _validated(args, lambda: customer_name(args.name))
    if isinstance(checked, InputError):
        return EXIT_INPUT

    def action(conn: Conn) -> int:
        shown = show_customer(conn, checked)
        if args.json:
            print(json.dumps(shown, indent=2, sort_keys=True))
            return 0
        print(f"customer {shown['name']} (since {shown['created_at']})")
        print("domains:")
        for d in shown["domains"]:
            state = "" if d["active"] else "  (inactive)"
            print(
                f"  {d['name']}  via {d['route'] or '(no route)'}"
                f"  {d['recipients']} recipient(s){state}"
            )
        if shown["policy"] is None:
            print(f"policy: INVALID, {shown['policy_error']}")
            print(f"  stored: {json.dumps(shown['policy_stored'], sort_keys=True)}")
            return EXIT_FAILED
        print("policy (* set for this customer, else the default):")
        for key, value in shown["policy"].items():
            mark = "*" if key in shown["policy_stored"] else " "
            print(f" {mark} {key}: {json.dumps(value)}")
        return 0

    return _run(args, action)


def _read_limited(path: str, limit: int) -> str:
    """The text of ``path`` ('-': standard input), refused when over ``limit`` bytes."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8") from None


def _policy(args: argparse.Namespace) -> int:
    def check() -> tuple[str, str | None, dict[str, Any]]:
        name = customer_name(args.name)
        if args.file is not None and (args.sets or args.resets):
            raise InputError("--file replaces the whole policy: not with --set or --reset")
        if args.file is not None:
            text = _read_limited(args.file, policies.MAX_POLICY_BYTES)
            _policy_or_input_error(lambda: policies.parse(text))
            return name, text, {}
        changes = policy_changes(args.sets, args.resets)
        return name, None, changes

    checked = _validated(args, check)
    if isinstance(checked, InputError):
        return EXIT_INPUT
    name, text, changes = checked

    def action(conn: Conn) -> int:
        if text is None and not changes:
            with conn.transaction():
                _, policy = _stored_policy(conn, _customer_id(conn, name))
            print(json.dumps(policy.model_dump(mode="json"), indent=2, sort_keys=True))
            return 0
        changed, policy = set_policy(conn, name, replace=text, changes=changes, force=args.force)
        state = "changed" if changed else "unchanged"
        print(f"{name}: policy {state}: {policies.dump(policy)}")
        return 0

    return _run(args, action)


def _domain_add(args: argparse.Namespace) -> int:
    checked = _validated(
        args,
        lambda: (
            customer_name(args.name),
            domain_name(args.domain),
            None if args.route is None else transport(args.route),
        ),
    )
    if isinstance(checked, InputError):
        return EXIT_INPUT

    def action(conn: Conn) -> int:
        print(add_domain(conn, *checked))
        return 0

    return _run(args, action)


def _domain_remove(args: argparse.Namespace) -> int:
    checked = _validated(args, lambda: (customer_name(args.name), domain_name(args.domain)))
    if isinstance(checked, InputError):
        return EXIT_INPUT

    def action(conn: Conn) -> int:
        print(remove_domain(conn, *checked))
        return 0

    return _run(args, action)


def _recipients(args: argparse.Namespace) -> int:
    def check() -> tuple[str, str, list[str], int]:
        name, domain = customer_name(args.name), domain_name(args.domain)
        try:
            if args.file == "-":
                addresses, duplicates = read_recipients(sys.stdin.buffer, domain)
            else:
                with open(args.file, "rb") as f:
                    addresses, duplicates = read_recipients(f, domain)
        except OSError as exc:
            raise InputError(f"{args.file}: {exc.strerror or exc}") from None
        return name, domain, addresses, duplicates

    checked = _validated(args, check)
    if isinstance(checked, InputError):
        return EXIT_INPUT
    name, domain, addresses, duplicates = checked

    def action(conn: Conn) -> int:
        result = replace_recipients(conn, name, domain, addresses, force=args.force)
        dup = f", {duplicates} duplicate line(s) ignored" if duplicates else ""
        print(
            f"{name} {domain}: {result.added} added, {result.removed} removed,"
            f" {result.listed} listed{dup}"
        )
        if result.recipient_check != "list":
            print(
                f"note: {name}'s recipient_check is {result.recipient_check}: the relay uses the"
                f" list once it is list (mailtower customer policy {name} --set"
                " recipient_check=list)"
            )
        return 0

    return _run(args, action)


def _remove(args: argparse.Namespace) -> int:
    checked = _validated(args, lambda: customer_name(args.name))
    if isinstance(checked, InputError):
        return EXIT_INPUT
    if not args.yes:
        print(
            f"mailtower customer remove: removing {checked} removes its domains, routes,"
            " recipients and policy at every tower; give --yes",
            file=sys.stderr,
        )
        return EXIT_INPUT

    def action(conn: Conn) -> int:
        print(remove_customer(conn, checked))
        return 0

    return _run(args, action)
