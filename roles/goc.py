"""GOC: the global operations centre. A PostgreSQL hub holding customers, domains, routes and
policy (published to every tower) and the union of every tower's verdict events (subscribed
from each), and VirusEye, the live outbreak view operators log in to.

Its host data ``goc`` is a ``mailtower.settings.GocSettings`` (see inventory/lab_goc.py):
the towers it syncs with, the customers loaded at the GOC, VirusEye's operators and how it
serves HTTPS (it serves nothing else: the operator's certificate, one the deploy makes, or a
TLS proxy in front), its passwords (VirusEye's, and each tower's own: the GOC makes
``mt_sync_<tower>`` and ``mt_status_<tower>``; docs/runbook.md, "Secrets"), and optionally the
rule-bundle key pair; the GOC then serves what is published in /srv/mailtower/bundles
(``mailtower bundle publish``) over HTTP to the towers' monitors, 127.0.0.1 and
``bundle_readers``.
"""

from __future__ import annotations

from ipaddress import ip_address

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, postgres, server

from mailtower import bundles
from mailtower.goc.eye.auth import hash_password, parse_credentials, verify_password
from mailtower.goc.eye.status import status_role
from mailtower.goc.sync.deployed import GocSide, GocTower
from mailtower.goc.sync.names import goc_sync_role
from mailtower.settings import EYE_TLS_CERT, EYE_TLS_KEY, GocSettings
from roles import _common
from roles._facts import SyncPending

PG = "/etc/postgresql/15/main"
SERVICE = "postgresql@15-main"
PACKAGES = ["postgresql-15", "python3-venv", "curl"]
OPERATORS = "/etc/mailtower/eye/operators"
EYE_TLS_NAMES = "/etc/mailtower/eye/tls.names"  # what the self-signed one was made for
BUNDLE_KEYS = bundles.GOC_KEY_DIR  # signing.key (root only), signing.pub
BUNDLE_DIR = bundles.GOC_PUBLISH_DIR  # what is published: latest.json + rules-N.tar.gz


def settings() -> GocSettings:
    """The ``goc`` host data, validated: DeployError naming the host and the bad field."""
    return _common.host_settings(GocSettings, "goc", "inventory/lab_goc.py")


def sync_side(g: GocSettings) -> GocSide:
    """/etc/mailtower/sync/goc.json: what ``mailtower sync goc`` needs of these settings, each
    tower with its own passwords (GocSettings checked it has them, shared with no other)."""
    return GocSide(
        dsn=f"dbname={g.database} port={g.port}",
        eye_password=g.secrets.eye_db,
        towers=[
            GocTower(
                name=t.name,
                hosts=[str(ip) for ip in t.sql],
                sync_password=g.secrets.towers[t.name].sql_sync,  # its mt_sync: the GOC's login
                goc_sync_password=g.secrets.towers[t.name].goc_sync,  # mt_sync_<tower> here
                status_password=g.secrets.towers[t.name].goc_status,  # mt_status_<tower> here
            )
            for t in g.towers
        ],
    )


class EyeOperators(FactBase):
    """VirusEye's operators file: name → stored scrypt hash ({} when missing)."""

    def command(self) -> str:
        return f"cat {OPERATORS} 2>/dev/null || true"

    def process(self, output):
        return parse_credentials("\n".join(output), OPERATORS)


def install(g: GocSettings):
    """The mailtower user and wheel (VirusEye, the sync tool), and the programs only some GOCs
    need; returns the wheel's operation (its daemons restart when it changed)."""
    _common.service_user()
    install_op = _common.install_stack()
    if g.eye_tls_self_signed:
        apt.packages(
            name="Install openssl (makes VirusEye's certificate)",
            packages=["openssl"],
            no_recommends=True,
        )
    if g.bundles is not None:
        apt.packages(
            name="Install nginx-light (serves the published rule bundles)",
            packages=["nginx-light"],
            no_recommends=True,
        )
    return install_op


def configure(g: GocSettings) -> dict[str, list]:
    """Every file of the GOC, grouped by what activates them."""
    ops: dict[str, list] = {}
    ops["postgres"] = [
        _template("goc/etc/postgresql/15/main/conf.d/mailtower.conf", g),
        _template(
            "goc/etc/postgresql/15/main/pg_hba.conf",
            g,
            sync_role=goc_sync_role,
            status_role=status_role,
            mode="640",
            user="postgres",
            group="postgres",
        ),
    ]
    files.directory(name="Ensure /etc/mailtower/sync", path="/etc/mailtower/sync", mode="755")
    ops["sync"] = [
        _common.put_text(
            sync_side(g).model_dump_json(indent=2) + "\n",
            "/etc/mailtower/sync/goc.json",
            mode="600",
            user="postgres",
            group="postgres",
        )
    ]
    ops["customers"] = [_template("goc/etc/mailtower/goc/customers.sql", g)]
    ops["eye"] = _eye_files(g)
    ops["bundles"] = _bundle_files(g)
    return ops


def activate(g: GocSettings, ops: dict[str, list], install_op) -> None:
    changed = {k: _common.changes(v) for k, v in ops.items()}
    _common.activate(SERVICE, changed["postgres"])
    postgres.database(
        name=f"Ensure database {g.database}",
        database=g.database,
        owner="postgres",
        _su_user="postgres",
    )
    # Schema, roles, config publication, and every tower's events subscription.
    pending = host.get_fact(SyncPending, side="goc")
    apply = server.shell(
        name="Sync: GOC schema, config publication, every tower's events (mailtower sync goc)",
        commands=["cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync goc'"],
        _if=lambda: bool(pending) or changed["sync"]() or install_op.did_change(),
    )
    server.shell(
        name="Load the GOC's customers from its inventory data",
        commands=[
            f"cd /tmp && su postgres -c 'psql -v ON_ERROR_STOP=1 -q -d {g.database}"
            " -f /etc/mailtower/goc/customers.sql'"
        ],
        _if=lambda: changed["customers"]() or apply.did_change(),
    )
    _common.activate(
        "mailtower-eye",
        lambda: changed["eye"]() or install_op.did_change(),
        daemon_reload=True,
    )
    if g.bundles is not None:
        _common.activate("nginx", changed["bundles"], check="nginx -t -q", reload=True)


def _template(path: str, g: GocSettings, **extra):
    return files.template(
        name=f"Render /{path.split('/', 1)[1]}",
        src=str(_common.TEMPLATES / f"{path}.j2"),
        dest="/" + path.split("/", 1)[1],
        goc=g,
        **extra,
    )


def _eye_files(g: GocSettings) -> list:
    """VirusEye's database password, unit, certificate and operators."""
    files.directory(
        name="Ensure /etc/mailtower/eye",
        path="/etc/mailtower/eye",
        mode="750",
        user="mailtower",
        group="mailtower",
    )
    ops = [
        _common.put_text(
            f"127.0.0.1:{g.port}:{g.database}:mt_eye:{g.secrets.eye_db}\n",
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
    return ops


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


def _is_address(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


def _eye_given_pem(g: GocSettings) -> list:
    """eye_tls_cert/eye_tls_key given as PEM text: written where the service reads them."""
    pem = g.eye_tls_pem()
    if pem is None:
        return []
    # Back to eye_tls_self_signed later must make a certificate again, even for the same names.
    files.file(name=f"Remove {EYE_TLS_NAMES}", path=EYE_TLS_NAMES, present=False)
    cert, key = pem
    return [
        _common.put_text(cert, EYE_TLS_CERT, user="mailtower", group="mailtower"),
        _common.put_text(key, EYE_TLS_KEY, mode="600", user="mailtower", group="mailtower"),
    ]


def _eye_self_signed(g: GocSettings) -> list:
    """eye_tls_self_signed: a certificate made on the GOC once, and again when the names change."""
    if not g.eye_tls_self_signed:
        return []
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


def _bundle_files(g: GocSettings) -> list:
    """The signing key pair, the published directory, and nginx's site serving it read-only."""
    if g.bundles is None:
        return []
    files.directory(name=f"Ensure {BUNDLE_KEYS}", path=BUNDLE_KEYS, mode="755")
    _common.put_text(g.bundles.signing_key, f"{BUNDLE_KEYS}/signing.key", mode="600")
    _common.put_text(g.bundles.public_key, f"{BUNDLE_KEYS}/signing.pub", mode="644")
    # Published files are 0644 and the directory 0755: nginx (www-data) reads, root writes.
    files.directory(name=f"Ensure {BUNDLE_DIR}", path=BUNDLE_DIR, mode="755")
    return [
        files.link(
            name="Remove nginx's default site",
            path="/etc/nginx/sites-enabled/default",
            present=False,
        ),
        _template("goc/etc/nginx/sites-enabled/mailtower-bundles", g, publish_dir=BUNDLE_DIR),
    ]


@deploy("mailtower goc")
def deploy_goc():
    g = settings()
    install_op = install(g)
    activate(g, configure(g), install_op)
