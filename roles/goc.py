"""GOC: the global operations centre. A PostgreSQL hub holding customers, domains, routes and
policy (published to every tower) and the union of every tower's verdict events (subscribed
from each), and VirusEye, the live outbreak view operators log in to.

Host data ``goc`` (see inventory/lab_goc.py):

- ``towers``: ``[{name, sql: [primary, standby], monitor}]``, the towers it syncs with
- ``customers``: ``[{domain, server}]`` loaded at the GOC (operators add more there)
- ``operators``: ``{name: password}`` who may log in to VirusEye
- how VirusEye serves HTTPS (it serves nothing else), one of: ``eye_tls_cert`` + ``eye_tls_key``
  (paths on the GOC, or the PEM text), ``eye_tls_self_signed: [names]`` (made by the deploy),
  ``eye_origin`` (a TLS proxy on the GOC host in front of it)
- ``secrets``: ``sync`` (the GOC's mt_sync), ``status`` (mt_status), ``eye_db`` (mt_eye),
  ``towers: {name: that tower's mt_sync password}``
- ``bundles`` (optional): ``{signing_key, public_key, port}``, the rule-bundle key pair (PEM
  text, as ``mailtower bundle keygen`` writes it); the GOC then serves what is published in
  /srv/mailtower/bundles (``mailtower bundle publish``) over HTTP on ``port`` to the towers'
  monitors, 127.0.0.1 and ``bundle_readers``
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, ip_address

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pyinfra import host
from pyinfra.api import DeployError, FactBase, deploy
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, postgres, server

from mailtower import bundles
from mailtower.goc.eye.auth import hash_password, parse_credentials, verify_password
from mailtower.goc.sync.deployed import GocSide, GocTower
from mailtower.settings import Customer, Goc
from roles import _common
from roles._facts import SyncPending

PG = "/etc/postgresql/15/main"
SERVICE = "postgresql@15-main"
PACKAGES = ["postgresql-15", "python3-venv", "curl"]
OPERATORS = "/etc/mailtower/eye/operators"
EYE_PORT = 8025
EYE_TLS_CERT = "/etc/mailtower/eye/tls.crt"  # eye_tls_self_signed: made by the deploy
EYE_TLS_KEY = "/etc/mailtower/eye/tls.key"
EYE_TLS_NAMES = "/etc/mailtower/eye/tls.names"  # what the self-signed one was made for
TLS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$")
BUNDLE_KEYS = bundles.GOC_KEY_DIR  # signing.key (root only), signing.pub
BUNDLE_DIR = bundles.GOC_PUBLISH_DIR  # what is published: latest.json + rules-N.tar.gz


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GocTowerData(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    sql: list[IPv4Address] = Field(min_length=1, max_length=2)
    monitor: IPv4Address


class GocBundlesData(_Model):
    """The rule-bundle key pair the GOC signs with, and the port it serves bundles on."""

    signing_key: str  # PEM (PKCS#8), secret: it never leaves the GOC
    public_key: str  # PEM; every tower holds the same one (TowerSettings.bundles.public_key)
    port: int = Field(Goc.model_fields["bundle_port"].default, ge=1, le=65535)

    def check(self) -> None:
        """Both keys load and are one pair (a mismatch would make every tower refuse)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PrivateKey,
            Ed25519PublicKey,
        )

        try:
            private = serialization.load_pem_private_key(self.signing_key.encode(), None)
            public = serialization.load_pem_public_key(self.public_key.encode())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bundles: a key is not PEM: {exc}") from exc
        if not isinstance(private, Ed25519PrivateKey) or not isinstance(public, Ed25519PublicKey):
            raise ValueError("bundles: signing_key and public_key must be Ed25519 keys")
        if bundles.key_id(private.public_key()) != bundles.key_id(public):
            raise ValueError(
                f"bundles: public_key (key {bundles.key_id(public)}) is not the public half of "
                f"signing_key (key {bundles.key_id(private.public_key())})"
            )


class GocData(_Model):
    """The ``goc`` host data, validated before anything is changed."""

    database: str = "goc"
    port: int = 5432
    towers: list[GocTowerData] = []
    customers: list[Customer] = []
    operators: dict[str, str] = {}
    secrets: dict[str, str | dict[str, str]]
    eye_listen: str = f"127.0.0.1:{EYE_PORT}"
    # VirusEye serves HTTPS only (its session cookie Secure, HSTS); one of three is needed:
    # the operator's certificate chain and key, each either a path on the GOC host (the key
    # readable by the mailtower user) or the PEM text itself (the deploy writes it to
    # /etc/mailtower/eye/tls.crt and tls.key, the key 0600)…
    eye_tls_cert: str | None = None
    eye_tls_key: str | None = None
    # …or a self-signed certificate the deploy makes for these DNS names and addresses
    # (once, and again when the list changes); browsers must be told to trust it…
    eye_tls_self_signed: list[str] = Field([], max_length=20)
    # …or a TLS proxy on the GOC host in front of it: its public origin (https://NAME), with
    # eye_listen on a loopback address.
    eye_origin: str | None = Field(None, pattern=r"^https://[A-Za-z0-9.:\[\]-]+$")
    bundles: GocBundlesData | None = None
    # Who else may fetch bundles besides every tower's monitor and 127.0.0.1 (the lab's
    # controller, to check what was published).
    bundle_readers: list[IPv4Address] = []

    @field_validator("eye_tls_self_signed")
    @classmethod
    def _tls_names(cls, names: list[str]) -> list[str]:
        for name in names:  # they go into an openssl command line
            if not (_is_address(name) or TLS_NAME.match(name)):
                raise ValueError(f"eye_tls_self_signed: {name!r} is not a DNS name or an address")
        return names

    @model_validator(mode="after")
    def _one_tls(self) -> GocData:
        if bool(self.eye_tls_cert) != bool(self.eye_tls_key):
            raise ValueError("eye_tls_cert and eye_tls_key go together")
        given = [bool(self.eye_tls_cert), bool(self.eye_tls_self_signed), bool(self.eye_origin)]
        if sum(given) != 1:
            raise ValueError(
                "VirusEye serves HTTPS only: give exactly one of eye_tls_cert + eye_tls_key "
                "(paths on the GOC or PEM text), eye_tls_self_signed: [names] or eye_origin "
                "(a TLS proxy on the GOC host)"
            )
        if self.eye_origin:
            host = self.eye_listen.rpartition(":")[0].strip("[]")
            if not (_is_address(host) and ip_address(host).is_loopback):
                raise ValueError(f"eye_origin: eye_listen {self.eye_listen} must be loopback")
        if self.eye_tls_cert and self.eye_tls_key and _is_pem(self.eye_tls_cert):
            check_tls_pair(self.eye_tls_cert, self.eye_tls_key)
        return self

    def eye_tls(self) -> tuple[str, str] | None:
        """The certificate and key VirusEye serves HTTPS with; None: behind a TLS proxy."""
        if self.eye_tls_self_signed:
            return EYE_TLS_CERT, EYE_TLS_KEY
        if self.eye_tls_cert and self.eye_tls_key:
            if _is_pem(self.eye_tls_cert):
                return EYE_TLS_CERT, EYE_TLS_KEY
            return self.eye_tls_cert, self.eye_tls_key
        return None

    def secret(self, name: str) -> str:
        value = self.secrets.get(name)
        if not isinstance(value, str) or len(value) < 16:
            raise ValueError(f"secrets.{name}: a password of 16 characters or more is needed")
        return value

    def side(self) -> GocSide:
        tower_passwords = self.secrets.get("towers")
        if not isinstance(tower_passwords, dict):
            raise ValueError("secrets.towers: {tower name: its mt_sync password} is needed")
        towers = []
        for t in self.towers:
            if t.name not in tower_passwords:
                raise ValueError(f"secrets.towers.{t.name}: the tower's mt_sync password")
            towers.append(
                GocTower(
                    name=t.name,
                    hosts=[str(ip) for ip in t.sql],
                    sync_password=tower_passwords[t.name],
                )
            )
        return GocSide(
            dsn=f"dbname={self.database} port={self.port}",
            sync_password=self.secret("sync"),
            status_password=self.secret("status"),
            eye_password=self.secret("eye_db"),
            towers=towers,
        )


def goc_data() -> GocData:
    try:
        data = GocData.model_validate(host.data.get("goc") or {})
        data.side()
        if data.bundles is not None:
            data.bundles.check()
    except (ValidationError, ValueError) as exc:
        raise DeployError(f"{host.name}: invalid 'goc' host data: {exc}") from exc
    return data


class EyeOperators(FactBase):
    """VirusEye's operators file: name → stored scrypt hash ({} when missing)."""

    def command(self) -> str:
        return f"cat {OPERATORS} 2>/dev/null || true"

    def process(self, output):
        return parse_credentials("\n".join(output), OPERATORS)


def _template(path: str, g: GocData, **extra):
    return files.template(
        name=f"Render /{path.split('/', 1)[1]}",
        src=str(_common.TEMPLATES / f"{path}.j2"),
        dest="/" + path.split("/", 1)[1],
        goc=g,
        **extra,
    )


def _postgres(g: GocData):
    ops = [
        _template("goc/etc/postgresql/15/main/conf.d/mailtower.conf", g),
        _template(
            "goc/etc/postgresql/15/main/pg_hba.conf",
            g,
            mode="640",
            user="postgres",
            group="postgres",
        ),
    ]
    _common.activate(SERVICE, _common.changes(ops))
    postgres.database(
        name=f"Ensure database {g.database}",
        database=g.database,
        owner="postgres",
        _su_user="postgres",
    )


def _sync(g: GocData, install_op):
    """Schema, roles, config publication, and every tower's events subscription."""
    files.directory(name="Ensure /etc/mailtower/sync", path="/etc/mailtower/sync", mode="755")
    side = _common.put_text(
        g.side().model_dump_json(indent=2) + "\n",
        "/etc/mailtower/sync/goc.json",
        mode="600",
        user="postgres",
        group="postgres",
    )
    pending = host.get_fact(SyncPending, side="goc")
    apply = server.shell(
        name="Sync: GOC schema, config publication, every tower's events (mailtower sync goc)",
        commands=["cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync goc'"],
        _if=lambda: bool(pending) or side.did_change() or install_op.did_change(),
    )
    customers = _template("goc/etc/mailtower/goc/customers.sql", g)
    server.shell(
        name="Load the GOC's customers from its inventory data",
        commands=[
            f"cd /tmp && su postgres -c 'psql -v ON_ERROR_STOP=1 -q -d {g.database}"
            " -f /etc/mailtower/goc/customers.sql'"
        ],
        _if=lambda: customers.did_change() or apply.did_change(),
    )


def _eye(g: GocData, install_op):
    files.directory(
        name="Ensure /etc/mailtower/eye",
        path="/etc/mailtower/eye",
        mode="750",
        user="mailtower",
        group="mailtower",
    )
    ops = [
        _common.put_text(
            f"127.0.0.1:{g.port}:{g.database}:mt_eye:{g.secret('eye_db')}\n",
            "/etc/mailtower/eye/pgpass",
            mode="600",
            user="mailtower",
            group="mailtower",
        ),
        _template("goc/etc/systemd/system/mailtower-eye.service", g),
        *_eye_self_signed(g),
        *_eye_given_pem(g),
    ]
    # Hashes are salted: the file is rewritten only when an operator is missing, removed or
    # has another password, so an unchanged GOC changes nothing.
    stored = host.get_fact(EyeOperators) or {}  # None when the file is absent
    same = set(stored) == set(g.operators) and all(
        verify_password(password, stored[name]) for name, password in g.operators.items()
    )
    if not same:
        lines = ["# VirusEye operators (mailtower-eye operator add|remove): name:scrypt hash"]
        lines += [f"{n}:{hash_password(p)}" for n, p in sorted(g.operators.items())]
        ops.append(
            _common.put_text(
                "\n".join(lines) + "\n", OPERATORS, mode="600", user="mailtower", group="mailtower"
            )
        )
    _common.activate(
        "mailtower-eye",
        lambda: _common.changes(ops)() or install_op.did_change(),
        daemon_reload=True,
    )


def self_signed_commands(names: list[str], cert: str, key: str) -> list[str]:
    """Shell commands making a self-signed certificate for ``names`` (DNS names, addresses)."""
    san = ",".join(f"IP:{n}" if _is_address(n) else f"DNS:{n}" for n in names)
    return [
        # P-256, two years: what browsers accept for a certificate an operator trusts by hand.
        f"umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        f" -days 730 -subj '/CN={names[0]}' -addext 'subjectAltName={san}'"
        f" -keyout {key}.new -out {cert}.new",
        f"chmod 600 {key}.new && chmod 644 {cert}.new",
        f"mv {key}.new {key} && mv {cert}.new {cert}",
    ]


def _is_pem(value: str) -> bool:
    return value.lstrip().startswith("-----BEGIN ")


def check_tls_pair(cert_pem: str, key_pem: str) -> None:
    """Certificate (chain) and key given as PEM text load and are one pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not _is_pem(key_pem):
        raise ValueError("eye_tls_cert is PEM text: give eye_tls_key as PEM text too")
    try:
        cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
        key = serialization.load_pem_private_key(key_pem.encode(), None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"eye_tls_cert/eye_tls_key: not a PEM certificate and key: {exc}") from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError("eye_tls_key is not the key of eye_tls_cert (the first certificate)")


def _is_address(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


def _eye_given_pem(g: GocData) -> list:
    """eye_tls_cert/eye_tls_key given as PEM text: written where the service reads them."""
    if not (g.eye_tls_cert and g.eye_tls_key and _is_pem(g.eye_tls_cert)):
        return []
    # Back to eye_tls_self_signed later must make a certificate again, even for the same names.
    files.file(name="Remove /etc/mailtower/eye/tls.names", path=EYE_TLS_NAMES, present=False)
    return [
        _common.put_text(g.eye_tls_cert, EYE_TLS_CERT, user="mailtower", group="mailtower"),
        _common.put_text(
            g.eye_tls_key, EYE_TLS_KEY, mode="600", user="mailtower", group="mailtower"
        ),
    ]


def _eye_self_signed(g: GocData) -> list:
    """eye_tls_self_signed: a certificate made on the GOC once, and again when the names change."""
    if not g.eye_tls_self_signed:
        return []
    apt.packages(
        name="Install openssl (makes VirusEye's certificate)",
        packages=["openssl"],
        no_recommends=True,
    )
    names = _common.put_text(
        "\n".join(g.eye_tls_self_signed) + "\n",
        EYE_TLS_NAMES,
        user="mailtower",
        group="mailtower",
    )
    missing = host.get_fact(File, path=EYE_TLS_KEY) is None or (
        host.get_fact(File, path=EYE_TLS_CERT) is None
    )
    commands = self_signed_commands(g.eye_tls_self_signed, EYE_TLS_CERT, EYE_TLS_KEY)
    commands.append(f"chown mailtower:mailtower {EYE_TLS_CERT} {EYE_TLS_KEY}")
    make = server.shell(
        name=f"Make VirusEye's self-signed certificate {EYE_TLS_CERT}",
        commands=commands,
        _if=lambda: missing or names.did_change(),
    )
    return [names, make]


def _bundles(g: GocData) -> None:
    """The signing key pair, the published directory, and nginx serving it read-only."""
    if g.bundles is None:
        return
    files.directory(name=f"Ensure {BUNDLE_KEYS}", path=BUNDLE_KEYS, mode="755")
    _common.put_text(g.bundles.signing_key, f"{BUNDLE_KEYS}/signing.key", mode="600")
    _common.put_text(g.bundles.public_key, f"{BUNDLE_KEYS}/signing.pub", mode="644")
    # Published files are 0644 and the directory 0755: nginx (www-data) reads, root writes.
    files.directory(name=f"Ensure {BUNDLE_DIR}", path=BUNDLE_DIR, mode="755")
    apt.packages(
        name="Install nginx-light (serves the published rule bundles)",
        packages=["nginx-light"],
        no_recommends=True,
    )
    ops = [
        files.link(
            name="Remove nginx's default site",
            path="/etc/nginx/sites-enabled/default",
            present=False,
        ),
        _template("goc/etc/nginx/sites-enabled/mailtower-bundles", g, publish_dir=BUNDLE_DIR),
    ]
    _common.activate("nginx", _common.changes(ops), check="nginx -t -q", reload=True)


@deploy("mailtower goc")
def deploy_goc():
    g = goc_data()
    _common.service_user()
    install_op = _common.install_stack()
    _postgres(g)
    _sync(g, install_op)
    _eye(g, install_op)
    _bundles(g)
