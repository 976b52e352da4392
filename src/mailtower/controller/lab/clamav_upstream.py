"""The lab's stand-in for ClamAV's CDN: which version of the test database it serves.

The lab has no internet. Its DNS host (roles/lab_clamav_upstream.py) serves :data:`SERVE_DIR`
over HTTP on port 80, and its BIND serves zone ``clamav.net`` (dynamic, like the lab's other
zones), whose ``current.cvd.clamav.net`` TXT record is what cvdupdate at the GOC reads for the
versions. The files are ClamAV's own signed test databases (``clamav_testfiles.ensure()``):
version N served is ``test-N.cvd`` as ``test.cvd`` and ``test-2.cdiff`` … ``test-N.cdiff``,
with the TXT record's field :data:`TXT_FIELD` (daily's) saying N.

    from mailtower.controller.lab import clamav_upstream
    clamav_upstream.publish(4)                          # serve version 4
    clamav_upstream.publish(5, corrupt="test-5.cdiff")  # …with one byte of that file flipped

The files go over SSH as root (the lab's key); the TXT record by an RFC 2136 update signed
with the lab's TSIG key, which the DNS host takes from the controller only. Files first, the
record last: cvdupdate never learns of a version whose files are not served yet.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import tarfile
import time
from pathlib import Path

import dns.name
import dns.rcode
import dns.rdatatype
import dns.update

from mailtower.controller.dns.exceptions import DnsError
from mailtower.controller.dns.records import RRsetKey
from mailtower.controller.dns.server import AuthServer, TsigKey, exchange, served
from mailtower.controller.errors import PublishError, StepFailed
from mailtower.controller.lab import clamav_testfiles, plan
from mailtower.controller.lab.bundles import Say, Shell, ssh_shell

ZONE = "clamav.net"
RECORD = f"current.cvd.{ZONE}"  # what cvdupdate and freshclam ask for the versions
DATABASE = "test"  # the name inside ClamAV's test files (test.info, test.hdb, …)
TXT_FIELD = 2  # daily's field; the lab GOC's ClamavUpstream.databases = {"test": 2}
TXT_TTL = 60
SERVE_DIR = "/srv/clamav-upstream"
PORT = 80
# What a newly deployed lab serves; the pair test moves it up (cvdupdate never goes down).
INITIAL_VERSION = 2
# The rest of a real record ("1.4.3:62:27850:1734950400:1:90:49192:336"): engine version,
# main, daily, time, …, bytecode. Fields not served carry 0.
_TXT_FIELDS = 8
_ENGINE = "1.4.3"
# One third-party feed in URLhaus's shape (Fangfrisch's "urlhaus" provider): its ClamAV file
# and the .sha256 Fangfrisch checks it against, generated here (the lab has no internet).
FEED = "urlhaus"
FEED_FILE = "urlhaus_clamav.ndb"
FEED_URL = "http://malware.urlhaus.lab.invalid/dropper-{n}.exe"  # what its signatures find
_CORRUPTIBLE = re.compile(rf"^({DATABASE}(\.cvd|-\d+\.cdiff)|{re.escape(FEED_FILE)})$")


def dns_host() -> str:
    """The lab's DNS host: the stand-in upstream's HTTP server and the clamav.net zone."""
    return str(next(h for h in plan.internet_hosts() if h.group == "dns").address)


def base_url() -> str:
    """The lab GOC's ClamavUpstream.url."""
    return f"http://{dns_host()}" if PORT == 80 else f"http://{dns_host()}:{PORT}"


def txt_text(version: int, field: int = TXT_FIELD, now: float | None = None) -> str:
    """The TXT record's text: ``field`` carries ``version``, as current.cvd.clamav.net does."""
    if not 0 < field < _TXT_FIELDS or field == 3:
        raise PublishError(
            f"controller: TXT field {field} cannot carry a version (1 … 7, not 3: the time)"
        )
    tokens = [_ENGINE, "0", "0", str(int(time.time() if now is None else now)), "1", "90", "0", "0"]
    tokens[field] = str(version)
    return ":".join(tokens)


def served_files(testfiles: Path, version: int) -> dict[str, Path]:
    """Served name → file of ClamAV's test databases, for version ``version``."""
    versions = list(clamav_testfiles.VERSIONS)
    if version not in versions:
        raise PublishError(
            f"controller: the stand-in upstream serves test versions {versions[0]} … "
            f"{versions[-1]} (ClamAV's signed test files); {version} is not one of them"
        )
    names = {f"{DATABASE}.cvd": testfiles / f"{DATABASE}-{version}.cvd"}
    for n in range(versions[0] + 1, version + 1):
        names[f"{DATABASE}-{n}.cdiff"] = testfiles / f"{DATABASE}-{n}.cdiff"
    return names


def feed_files(revision: int = 1) -> dict[str, bytes]:
    """The feed's served files at ``revision`` (revision N: N signatures, one per URL)."""
    lines = [
        f"Urlhaus.Lab.Url-{n}:0:*:{FEED_URL.format(n=n).encode().hex()}"
        for n in range(1, revision + 1)
    ]
    data = ("\n".join(lines) + "\n").encode()
    digest = hashlib.sha256(data).hexdigest()
    return {FEED_FILE: data, f"{FEED_FILE}.sha256": f"{digest}  {FEED_FILE}\n".encode()}


def feed_options() -> dict[str, str]:
    """The lab GOC's Fangfrisch options for :data:`FEED`: its URL on the stand-in (Fangfrisch
    fetches ``<url>.sha256`` first and refuses a file whose digest differs)."""
    # interval 0m: every check looks (Fangfrisch's own default waits between downloads; the
    # lab's tests move the feed and look at once)
    return {"auth_key": "lab", "url_urlhaus": f"{base_url()}/{FEED_FILE}", "interval": "0m"}


def flip_byte(data: bytes) -> bytes:
    """``data`` with one byte inverted: in the middle of what follows a CVD's 512-byte header
    (the signed body), so the file still parses but its signature no longer holds."""
    if len(data) < 2:
        raise PublishError("controller: a file of fewer than 2 bytes cannot be corrupted")
    start = 512 if len(data) > 1024 else 0
    offset = start + (len(data) - start) // 2
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def served_tar(
    files: dict[str, Path], corrupt: str | None = None, extra: dict[str, bytes] | None = None
) -> bytes:
    """The served files (and ``extra``'s generated ones) as a tar (names flat, 0644),
    ``corrupt`` with one byte flipped."""
    contents: dict[str, Path | bytes] = {**files, **(extra or {})}
    if corrupt is not None and corrupt not in contents:
        raise PublishError(
            f"controller: corrupt={corrupt!r} is not served at this version; served: "
            f"{', '.join(sorted(contents))}"
            + ("" if _CORRUPTIBLE.match(corrupt) else f" (names are {DATABASE}.cvd, …)")
        )
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, source in sorted(contents.items()):
            data = source if isinstance(source, bytes) else source.read_bytes()
            if name == corrupt:
                data = flip_byte(data)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def install_command(names: list[str], serve_dir: str = SERVE_DIR) -> str:
    """Shell run on the DNS host with the tar on stdin: each file renamed into place (cdiffs
    before the CVD), then the files of other versions removed."""
    cdiffs = sorted((n for n in names if n.endswith(".cdiff")), key=_cdiff_number)
    order = [*cdiffs, *(n for n in names if not n.endswith(".cdiff"))]
    keep = " ".join(shlex.quote(n) for n in order)
    d = shlex.quote(serve_dir)
    moves = "; ".join(f'mv -f "$tmp"/{shlex.quote(n)} {d}/{shlex.quote(n)}' for n in order)
    return (
        f"set -e; mkdir -p {d}; tmp=$(mktemp -d {d}/.publish.XXXXXX); "
        f'trap \'rm -rf "$tmp"\' EXIT; tar -xf - -C "$tmp" --no-same-owner; '
        f'chmod 644 "$tmp"/*; {moves}; '
        f"cd {d}; for f in {DATABASE}-*.cdiff; do "
        f'case " {keep} " in *" $f "*) ;; *) rm -f -- "$f" ;; esac; done'
    )


def _cdiff_number(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])


def txt_update(text: str) -> dns.update.UpdateMessage:
    """The (unsigned) update replacing current.cvd.clamav.net's TXT record with ``text``."""
    message = dns.update.UpdateMessage(ZONE)
    message.replace(dns.name.from_text(RECORD), TXT_TTL, "TXT", f'"{text}"')
    return message


def lab_server() -> AuthServer:
    """The lab's BIND with the lab's update key (mailtower.controller.lab.lxc)."""
    from mailtower.controller.lab import lxc

    key = json.loads(lxc.tsig_key_file().read_text())
    return AuthServer(dns_host(), key=TsigKey(key["name"], key["secret"], key["algorithm"]))


def set_txt(server: AuthServer, text: str) -> None:
    """Send the TXT update to ``server``; PublishError naming it and the fix if refused."""
    if server.key is None:
        raise PublishError(f"DNS host {server}: the TXT update needs the lab's TSIG key")
    message = txt_update(text)
    message.use_tsig(server.key.dnspython_key())
    try:
        answer = exchange(server, message, f"the update of {RECORD} TXT")
    except DnsError as exc:
        raise PublishError(f"DNS host {server}: {exc}") from exc
    if answer.rcode() != dns.rcode.NOERROR:
        raise PublishError(
            f"DNS host {server}: the update of {RECORD} TXT was answered "
            f"{dns.rcode.to_text(answer.rcode())}; fix: deploy the lab's internet "
            "(invoke deploy --tower lab) so BIND serves zone clamav.net for the controller's key"
        )


def served_txt(server: AuthServer) -> str | None:
    """The text of current.cvd.clamav.net's TXT record as served (None: none)."""
    key = RRsetKey(dns.name.from_text(ZONE), dns.name.from_text(RECORD), dns.rdatatype.TXT)
    try:
        records = served(server, key)
    except DnsError as exc:
        raise PublishError(f"DNS host {server}: {exc}") from exc
    texts = [b"".join(r.strings).decode() for r in records.rdatas]  # type: ignore[attr-defined]
    return texts[0] if texts else None


def publish(
    version: int,
    corrupt: str | None = None,
    *,
    feed_revision: int = 1,
    say: Say = lambda _: None,
    shell: Shell | None = None,
    server: AuthServer | None = None,
    testfiles: Path | None = None,
) -> None:
    """Make the stand-in upstream serve version ``version`` of the test database (its CVD and
    CDIFFs 2 … N, then the TXT record) and revision ``feed_revision`` of the URLhaus-shaped
    feed (:func:`feed_files`), with one byte of ``corrupt`` flipped if given.

    By default the lab's DNS host: SSH for the files, the lab's TSIG key for the record.
    """
    files = served_files(testfiles or clamav_testfiles.ensure(say), version)
    extra = feed_files(feed_revision)
    upload = served_tar(files, corrupt, extra)
    if shell is None:
        from mailtower.controller.lab import lxc

        shell = ssh_shell(dns_host(), lxc.ssh_key(), lxc.known_hosts())
    server = server or lab_server()
    where = f"DNS host {server.address}"
    say(
        f"{where}: serving test version {version} ({', '.join(sorted(files))}) and feed "
        f"{FEED} revision {feed_revision}"
        + (f", {corrupt} with one byte flipped" if corrupt else "")
    )
    try:
        shell(install_command([*files, *extra]), upload)
    except StepFailed as exc:
        raise PublishError(
            f"{where}: installing the files in {SERVE_DIR} failed ({exc.returncode}): "
            f"{exc.output}; fix: is the lab's internet up and deployed (invoke deploy --tower lab)?"
        ) from None
    set_txt(server, txt_text(version))
    say(f"{where}: {RECORD} TXT field {TXT_FIELD} = {version}")


def served_version(server: AuthServer | None = None) -> int | None:
    """The version the TXT record announces (None: no record yet)."""
    text = served_txt(server or lab_server())
    if text is None:
        return None
    tokens = text.split(":")
    try:
        return int(tokens[TXT_FIELD])
    except (IndexError, ValueError):
        return None


def ensure_initial(say: Say = lambda _: None, version: int = INITIAL_VERSION) -> int:
    """A newly deployed lab serves ``version``; one already serving keeps what it serves
    (the tests move it). Returns the version served."""
    current = served_version()
    if current is not None:
        say(f"stand-in ClamAV upstream already serves test version {current}")
        return current
    publish(version, say=say)
    return version
