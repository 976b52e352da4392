"""Conninfo strings: building them, comparing where they point, and hiding their passwords."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mailtower.goc.sync.exceptions import SyncError


def sync_conninfo(
    host: str, port: int, dbname: str, user: str, password: str | None = None, **extra: str
) -> str:
    """A single-host conninfo, as a subscription stores it.

    One host only: a subscription's position is an LSN of one server's slot, so following the
    tower's other SQL host after a failover must be a deliberate re-point, never a silent
    libpq fallback to the next host (see ``failover``).
    """
    if "," in host:
        raise SyncError(f"a subscription connects to one server; got hosts {host!r}")
    params: dict[str, str | int] = {"host": host, "port": port, "dbname": dbname, "user": user}
    if password is not None:
        params["password"] = password
    params.update(extra)
    return make_conninfo("", **params)


def endpoint(conninfo: str) -> tuple[str, str, str]:
    """(host, port, dbname): which server and database a conninfo reaches."""
    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or params.get("hostaddr") or "")
    if "," in host:
        raise SyncError(f"{redact(conninfo)}: a subscription connects to one server; list one host")
    return host, str(params.get("port") or "5432"), str(params.get("dbname") or "")


def redact(conninfo: str) -> str:
    """The conninfo with its password hidden, for messages and health reports."""
    params = conninfo_to_dict(conninfo)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)
