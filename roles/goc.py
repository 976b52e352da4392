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

With ``portal`` it serves the customers' quarantine portal (``mailtower-portal``, issue 18):
its own port, certificate, pgpass (role ``mt_portal``) and session key (secrets.portal_db,
secrets.portal_session_key); ``mailtower portal schema`` makes its tables and grants, and
``mailtower portal user add`` its operators and customers' admins (docs/runbook.md).

With ``clamav`` it mirrors ClamAV's official databases: cvdupdate (pinned, its own venv and
wheelhouse, run by its own user ``mtcvd``) on the ``mailtower-cvdupdate`` timer, then
``mailtower clamavdb publish`` verifies what it fetched into /srv/mailtower/clamav, which the
same nginx site serves at ``/clamav/`` (docs/runbook.md, "The GOC's ClamAV mirror"). With
``clamav.feeds`` enabled, Fangfrisch (pinned, its own venv, also ``mtcvd``) fetches those
third-party feeds in the same script, and publish serves their files under ``/clamav/feeds/``
(docs/runbook.md, "Third-party feeds").
"""

from __future__ import annotations

import json
from ipaddress import ip_address

from pyinfra import host, inventory
from pyinfra.api import FactBase, deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, postgres, server, systemd

from mailtower import bundles
from mailtower.goc import cvdupdate, fangfrisch
from mailtower.goc.eye.auth import hash_password, parse_credentials, verify_password
from mailtower.goc.eye.status import status_role
from mailtower.goc.sync.deployed import GocSide, GocTower
from mailtower.goc.sync.names import goc_sync_role
from mailtower.settings import (
    EYE_TLS_CERT,
    EYE_TLS_KEY,
    PORTAL_TLS_CERT,
    PORTAL_TLS_KEY,
    Goc,
    GocSettings,
)
from roles import _common, backup
from roles._facts import SyncPending

PG = "/etc/postgresql/15/main"
SERVICE = "postgresql@15-main"
PACKAGES = ["postgresql-15", "python3-venv", "curl", *backup.PACKAGES]
# The GOC's backup repository host (the inventory's goc_backup group): python3 runs the
# backup metrics script there.
# python3 runs the backup metrics script there; the node exporter serves its textfile to the
# tower monitor that scrapes it (TowerSettings.goc_backup_metrics).
REPOSITORY_PACKAGES = [*backup.PACKAGES, "python3", _common.NODE_EXPORTER]
OPERATORS = "/etc/mailtower/eye/operators"
PORTAL_DIR = "/etc/mailtower/portal"
PORTAL_TLS_NAMES = f"{PORTAL_DIR}/tls.names"
# mt_portal's password for the schema step (run as postgres, fed on standard input): root only.
PORTAL_ROLE_PASSWORD = f"{PORTAL_DIR}/role.password"
EYE_TLS_NAMES = "/etc/mailtower/eye/tls.names"  # what the self-signed one was made for
BUNDLE_KEYS = bundles.GOC_KEY_DIR  # signing.key (root only), signing.pub
BUNDLE_DIR = bundles.GOC_PUBLISH_DIR  # what is published: latest.json + rules-N.tar.gz
CLAMAV_DIR = "/srv/mailtower/clamav"  # the verified mirror the monitors pull (/clamav/)
CVD_USER = "mtcvd"  # runs cvdupdate and the publish step; never root
CVD_VENV = "/opt/mailtower/cvdupdate"  # cvdupdate's own venv (requirements-cvdupdate.txt)
CVD_WHEELHOUSE = "/opt/mailtower/cvdupdate-wheelhouse"
CVD_REQUIREMENTS = _common.ROOT / "requirements-cvdupdate.txt"
CVD_RUN = "/usr/local/lib/mailtower/cvdupdate-run"  # the timer's script: update, then publish
# Fangfrisch (third-party feeds, only when clamav.feeds enables one): its own venv, same user.
FF_VENV = "/opt/mailtower/fangfrisch"
FF_WHEELHOUSE = "/opt/mailtower/fangfrisch-wheelhouse"
FF_REQUIREMENTS = _common.ROOT / "requirements-fangfrisch.txt"


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
    if g.eye_tls_self_signed or (g.portal is not None and g.portal.tls_self_signed):
        apt.packages(
            name="Install openssl (makes VirusEye's certificate)",
            packages=["openssl"],
            no_recommends=True,
        )
    if g.bundles is not None or g.clamav is not None:
        apt.packages(
            name="Install nginx-light (serves the rule bundles and the ClamAV mirror)",
            packages=["nginx-light"],
            no_recommends=True,
        )
    if g.clamav is not None:
        _install_cvdupdate()
    if fangfrisch.enabled(g.clamav):
        _install_fangfrisch()
    return install_op


def _install_cvdupdate() -> None:
    """sigtool (``clamav``, for publish's checks) with freshclam off, the mtcvd user, and
    cvdupdate into its own venv from its pinned wheelhouse (the GOC needs no PyPI)."""
    apt.packages(
        name="Install clamav (sigtool verifies what cvdupdate fetched)",
        packages=["clamav"],
        no_recommends=True,
    )
    # clamav depends on clamav-freshclam: the GOC's databases come from cvdupdate only.
    systemd.service(
        name="Keep clamav-freshclam stopped and disabled",
        service="clamav-freshclam",
        running=False,
        enabled=False,
    )
    server.user(
        name=f"Ensure user {CVD_USER}",
        user=CVD_USER,
        system=True,
        home=cvdupdate.HOME,
        shell="/usr/sbin/nologin",
        ensure_home=False,
    )
    files.directory(
        name=f"Ensure {cvdupdate.HOME}",
        path=cvdupdate.HOME,
        mode="750",
        user=CVD_USER,
        group=CVD_USER,
    )
    tarball = _common.pinned_wheelhouse_tar("cvdupdate", CVD_REQUIREMENTS)
    upload = files.put(
        name=f"Upload {CVD_WHEELHOUSE}.tar", src=str(tarball), dest=f"{CVD_WHEELHOUSE}.tar"
    )
    missing = host.get_fact(File, path=f"{CVD_VENV}/bin/cvd") is None
    server.shell(
        name=f"Install cvdupdate into {CVD_VENV} from its wheelhouse",
        commands=[
            f"rm -rf {CVD_WHEELHOUSE} && mkdir -p {CVD_WHEELHOUSE}"
            f" && tar -xf {CVD_WHEELHOUSE}.tar -C {CVD_WHEELHOUSE}",
            # A new venv each time the pins change: exactly the pinned set, nothing left over.
            f"rm -rf {CVD_VENV} && python3 -m venv {CVD_VENV}",
            f"{CVD_VENV}/bin/pip install --quiet --no-index --no-deps {CVD_WHEELHOUSE}/*.whl",
            f"{CVD_VENV}/bin/pip check",
        ],
        _if=lambda: missing or upload.did_change(),
    )


def _install_fangfrisch() -> None:
    """Fangfrisch into its own venv from its pinned wheelhouse; its home for mtcvd."""
    files.directory(
        name=f"Ensure {fangfrisch.HOME}",
        path=fangfrisch.HOME,
        mode="750",
        user=CVD_USER,
        group=CVD_USER,
    )
    tarball = _common.pinned_wheelhouse_tar("fangfrisch", FF_REQUIREMENTS)
    upload = files.put(
        name=f"Upload {FF_WHEELHOUSE}.tar", src=str(tarball), dest=f"{FF_WHEELHOUSE}.tar"
    )
    missing = host.get_fact(File, path=f"{FF_VENV}/bin/fangfrisch") is None
    server.shell(
        name=f"Install Fangfrisch into {FF_VENV} from its wheelhouse",
        commands=[
            f"rm -rf {FF_WHEELHOUSE} && mkdir -p {FF_WHEELHOUSE}"
            f" && tar -xf {FF_WHEELHOUSE}.tar -C {FF_WHEELHOUSE}",
            f"rm -rf {FF_VENV} && python3 -m venv {FF_VENV}",
            f"{FF_VENV}/bin/pip install --quiet --no-index --no-deps {FF_WHEELHOUSE}/*.whl",
            f"{FF_VENV}/bin/pip check",
        ],
        _if=lambda: missing or upload.did_change(),
    )


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
    stanza = backup_stanza(g)
    ops["backup"] = [] if stanza is None else backup.db_configure(stanza)
    if stanza is not None:
        if stanza.repo == _common.address(host):
            raise DeployError(
                f"{host.name}: goc.backup.repo_host is the GOC itself; name another host"
                " (docs/runbook.md, The GOC's backups)"
            )
        # WAL archiving: PostgreSQL restarts on a change (archive_mode needs it).
        ops["postgres"] += backup.db_archive(stanza)
    ops["eye"] = _eye_files(g)
    ops["portal"] = _portal_files(g)
    ops["nginx"] = _served_files(g)
    ops["clamav"] = _clamav_files(g)
    return ops


def activate(g: GocSettings, ops: dict[str, list], install_op) -> None:
    changed = {k: _common.changes(v) for k, v in ops.items()}
    _common.activate(SERVICE, changed["postgres"])
    if g.backup is not None:
        backup.db_activate(changed["backup"])  # before the repository's first backup
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
    if g.portal is not None:
        # Its tables, indexes and mt_portal's grants (idempotent), after the sync step: they
        # need the sync's verdict_events. quarantine_actions' grants and policy for mt_portal
        # come from the sync module either way (ensure_portal here, ensure in the sync step
        # once mt_portal exists, whose check reports them missing), so one run converges.
        server.shell(
            name="Portal: schema, role mt_portal and its grants (mailtower portal schema)",
            commands=[
                "cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower portal schema"
                f" --role-password-stdin' < {PORTAL_ROLE_PASSWORD}"
            ],
            _if=lambda: changed["portal"]() or apply.did_change() or install_op.did_change(),
        )
        _common.activate(
            "mailtower-portal",
            lambda: changed["portal"]() or install_op.did_change(),
            daemon_reload=True,
        )
    if g.bundles is not None or g.clamav is not None:
        _common.activate("nginx", changed["nginx"], check="nginx -t -q", reload=True)
    if g.clamav is not None:
        # The timer only: it starts the check (OnActiveSec) and repeats it; a changed unit
        # restarts the timer, so new settings are checked within a minute.
        _common.activate("mailtower-cvdupdate.timer", changed["clamav"], daemon_reload=True)


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


def _portal_files(g: GocSettings) -> list:
    """The portal's database password (pgpass for the service, a root-only copy for the
    schema step), its session key, unit and certificate."""
    if g.portal is None:
        return []
    assert g.secrets.portal_db is not None and g.secrets.portal_session_key is not None
    files.directory(
        name=f"Ensure {PORTAL_DIR}",
        path=PORTAL_DIR,
        mode="750",
        user="mailtower",
        group="mailtower",
    )
    ops = [
        _common.put_text(
            f"127.0.0.1:{g.port}:{g.database}:mt_portal:{g.secrets.portal_db}\n",
            f"{PORTAL_DIR}/pgpass",
            mode="600",
            user="mailtower",
            group="mailtower",
        ),
        _common.put_text(
            g.secrets.portal_db + "\n", PORTAL_ROLE_PASSWORD, mode="600", user="root", group="root"
        ),
        _common.put_text(
            g.secrets.portal_session_key + "\n",
            f"{PORTAL_DIR}/session.key",
            mode="600",
            user="mailtower",
            group="mailtower",
        ),
        _template("goc/etc/systemd/system/mailtower-portal.service", g),
    ]
    if g.portal.tls_self_signed:
        names = _common.put_text(
            "\n".join(g.portal.tls_self_signed) + "\n",
            PORTAL_TLS_NAMES,
            user="mailtower",
            group="mailtower",
        )
        missing = host.get_fact(File, path=PORTAL_TLS_KEY) is None or (
            host.get_fact(File, path=PORTAL_TLS_CERT) is None
        )
        commands = self_signed_commands(g.portal.tls_self_signed, PORTAL_TLS_CERT, PORTAL_TLS_KEY)
        commands.append(f"chown mailtower:mailtower {PORTAL_TLS_CERT} {PORTAL_TLS_KEY}")
        make = server.shell(
            name=f"Make the portal's self-signed certificate {PORTAL_TLS_CERT}",
            commands=commands,
            _if=lambda: missing or names.did_change(),
        )
        ops += [names, make]
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


def serve_port(g: GocSettings) -> int:
    """The port of the GOC's nginx site (bundles and the ClamAV mirror): the towers'
    ``goc.bundle_port``."""
    return g.bundles.port if g.bundles is not None else Goc.model_fields["bundle_port"].default


def _served_files(g: GocSettings) -> list:
    """The signing key pair, the published directories, and nginx's site serving them
    read-only to the towers' monitors."""
    if g.bundles is None and g.clamav is None:
        return []
    if g.bundles is not None:
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
        _template(
            "goc/etc/nginx/sites-enabled/mailtower-bundles",
            g,
            publish_dir=BUNDLE_DIR,
            clamav_dir=CLAMAV_DIR,
            port=serve_port(g),
        ),
    ]


def cvdupdate_run(g: GocSettings) -> dict:
    """What the timer's script and units are rendered with (paths, the publish arguments)."""
    assert g.clamav is not None
    interval = cvdupdate.interval_seconds(g.clamav.check_interval)
    return {
        "user": CVD_USER,
        "home": cvdupdate.HOME,
        "run": CVD_RUN,
        "python": f"{_common.VENV}/bin/python",
        "mailtower": f"{_common.VENV}/bin/mailtower",
        "cvd": f"{CVD_VENV}/bin/cvd",
        "wanted": cvdupdate.WANTED,
        "config": f"{cvdupdate.HOME}/config.json",
        "state": f"{cvdupdate.HOME}/state.json",
        "db_dir": f"{cvdupdate.HOME}/database",
        "dest": CLAMAV_DIR,
        "databases": ",".join(sorted(g.clamav.databases)),
        # Always given (possibly none): a feed turned off stops being served.
        "feeds": ",".join(fangfrisch.enabled(g.clamav)),
        "feeds_dir": fangfrisch.FEEDS_DIR,
        "fangfrisch": {
            "bin": f"{FF_VENV}/bin/fangfrisch",
            "config": fangfrisch.CONFIG,
            "home": fangfrisch.HOME,
            "log": f"{fangfrisch.HOME}/refresh.log",
        }
        if fangfrisch.enabled(g.clamav)
        else None,
        "interval_s": interval,
        # Spread the checks (ClamAV's CDN sees every mirror at once otherwise): a tenth of the
        # interval, at most 5 minutes, so the checks stay at most one per interval on average.
        "delay_s": max(1, min(300, interval // 10)),
    }


def _clamav_files(g: GocSettings) -> list:
    """cvdupdate's wanted config, the served mirror directory, the timer's script and units."""
    if g.clamav is None:
        return []
    # mtcvd writes the mirror (0755, files 0644); nginx (www-data) only reads it.
    files.directory(
        name=f"Ensure {CLAMAV_DIR}", path=CLAMAV_DIR, mode="755", user=CVD_USER, group=CVD_USER
    )
    files.directory(
        name="Ensure /usr/local/lib/mailtower", path="/usr/local/lib/mailtower", mode="755"
    )
    run = cvdupdate_run(g)
    return [
        *_fangfrisch_files(g),
        _common.put_text(
            json.dumps(cvdupdate.wanted(g.clamav), indent=2, sort_keys=True) + "\n",
            cvdupdate.WANTED,
        ),
        files.template(
            name=f"Render {CVD_RUN}",
            src=str(_common.TEMPLATES / "goc/usr/local/lib/mailtower/cvdupdate-run.j2"),
            dest=CVD_RUN,
            mode="755",
            goc=g,
            cvd=run,
        ),
        _template("goc/etc/systemd/system/mailtower-cvdupdate.service", g, cvd=run),
        _template("goc/etc/systemd/system/mailtower-cvdupdate.timer", g, cvd=run),
    ]


def _fangfrisch_files(g: GocSettings) -> list:
    """fangfrisch.conf (options may hold a feed's key: mtcvd reads it, nobody else) and its
    refresh log database, made once (``fangfrisch initdb``)."""
    if not fangfrisch.enabled(g.clamav):
        return []
    assert g.clamav is not None
    conf = _common.put_text(
        fangfrisch.config_text(g.clamav), fangfrisch.CONFIG, mode="640", group=CVD_USER
    )
    missing = host.get_fact(File, path=f"{fangfrisch.HOME}/db.sqlite") is None
    server.shell(
        name="Fangfrisch: create its database (initdb, once)",
        commands=[
            f"runuser -u {CVD_USER} -- {FF_VENV}/bin/fangfrisch --conf {fangfrisch.CONFIG} initdb"
        ],
        _if=lambda: missing,
    )
    return [conf]


@deploy("mailtower goc")
def deploy_goc():
    g = settings()
    install_op = install(g)
    activate(g, configure(g), install_op)


def _goc_address() -> str:
    """The GOC's address: this host's, or (on its repository host) the goc group's."""
    if "goc" in host.groups:
        return _common.address(host)
    gocs = list(inventory.get_group("goc", []))
    if len(gocs) != 1:
        raise DeployError(
            f"{host.name}: the inventory's goc group must hold the GOC (one host) for its"
            f" backup repository; it holds {len(gocs)}"
        )
    return _common.address(gocs[0])


def backup_stanza(g: GocSettings) -> backup.Stanza | None:
    """The GOC's pgBackRest stanza (None: no ``backup`` in its settings)."""
    return None if g.backup is None else backup.goc_stanza(g, _goc_address())


def _repository_stanza() -> backup.Stanza:
    g = settings()
    stanza = backup_stanza(g)
    if stanza is None or stanza.repo != _common.address(host):
        raise DeployError(
            f"{host.name}: in the inventory's goc_backup group, but the GOC's backup.repo_host"
            f" is {stanza.repo if stanza else 'not set'}; make them agree"
        )
    return stanza


@deploy("mailtower goc backup repository")
def deploy_goc_repository():
    """The GOC's repository host: configured and serving; its first backup comes after the
    GOC archives (``goc_repository_first_backup``, after a barrier)."""
    stanza = _repository_stanza()
    ops = backup.repo_configure(stanza)
    backup.repo_activate(stanza, _common.changes(ops), first_backup=False)
    exporter = _common.put_text(
        repository_exporter_args(settings(), stanza.repo),
        f"/etc/default/{_common.NODE_EXPORTER}",
    )
    _common.activate_node_exporter(_common.changes([exporter]))


def repository_exporter_args(g: GocSettings, address: str) -> str:
    """The repository host's node exporter: its backup metrics (and host metrics) on its
    repository address, for the tower monitor that scrapes it."""
    return (
        "# Managed by mailtower (roles/goc.py). The GOC's backup metrics (textfile) for the\n"
        "# tower monitor whose goc_backup_metrics names this host (docs/runbook.md).\n"
        f'ARGS="--web.listen-address={address}:{g.backup_exporter_port}"\n'
    )


@deploy("mailtower goc first backup")
def goc_repository_first_backup():
    backup.repo_first_backup(_repository_stanza())


def deploy_goc_and_repository() -> None:
    """What a deploy script runs on every host of a GOC inventory (and the lab's internet):
    the GOC, its backup repository host, and, once both are configured, the stanza and its
    first full backup. Call it on every host: the barrier orders them."""
    if "goc" in host.groups:
        deploy_goc()
    if "goc_backup" in host.groups:
        deploy_goc_repository()
    _common.barrier("the GOC archives and its repository serves, before the first backup")
    if "goc_backup" in host.groups:
        goc_repository_first_backup()
