"""invoke tasks: the lab (throwaway towers on this machine), deploy, verify, bench.

invoke lab            build the twin lab, init its inventories, deploy them as an operator's
                      pair (GOC, towers, GOC, DNS), verify (the main job)
invoke lab --tower lab-a   the same for tower A alone
invoke lab.up         build or reuse the lab's hosts
invoke lab.status     what the lab runs, and its memory
invoke lab.down       destroy the lab's hosts (--purge: the base image and bridge too)
invoke init [--answers FILE]     write a real pair's inventories and secrets (mailtower init)
invoke preflight --tower T       check a tower's (or GOC's) hosts before anything is changed
invoke deploy --tower lab-a      one tower or GOC, by name or inventory file (--tower lab: the
                                 pair, its internet and DNS, from the inventories invoke lab chose)
invoke deploy --tower lab-a --relay-packages   …and upgrade the relay's Postfix and HAProxy
invoke dns [--dry-run]           publish the pair's MX records into the lab's DNS
invoke verify --tower lab-a      one tower (--tower lab: both, then failover across the pair)
invoke prereqs                   every program the lab and the tests call is on this machine
invoke prereqs.pristine          …and a new machine gets each from scripts/bootstrap
invoke bench.scanner             scand against amavisd-new on this machine (same clamd, corpus)
invoke sql.failover --tower lab-a   promote the SQL standby, re-point the GOC sync
invoke sql.rebuild --tower lab-a --host 10.201.1.12   make the old primary a standby again
invoke sql.restore --tower lab-a --host 10.201.1.13 [--target-time T] [--fenced H]   restore
invoke sql.upgrade --tower lab-a   PostgreSQL minor upgrade: standby, switchover, old primary
invoke goc.restore [--goc lab-goc] [--target-time T]   restore the GOC from backup
invoke bundle.publish [--rules DIR] [--version N]   sign and publish a rule bundle at the lab GOC
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from invoke import Collection, Exit, task

ROOT = Path(__file__).resolve().parent
PY = sys.executable
BIN = Path(PY).parent


def _say(text: str) -> None:
    print(f"[mailtower {time.strftime('%H:%M:%S')}] {text}", flush=True)


def inventory_path(tower: str) -> Path:
    """inventory/<tower>.py, with dashes as underscores (lab-a → inventory/lab_a.py), or the
    inventory file given (a path: init's --inventory-dir may be elsewhere). The lab's towers,
    GOC and pair file are init's (.lab/inventory/) when `invoke lab` built the lab from them
    (mailtower.controller.firstpair.lab.lab_inventory)."""
    from mailtower.controller.firstpair.lab import lab_inventory

    if tower.endswith(".py") or "/" in tower:
        path = Path(tower).expanduser().resolve()
    else:
        path = lab_inventory(ROOT, f"{tower.replace('-', '_')}.py")
    if not path.exists():
        raise Exit(f"no inventory for tower {tower!r}: expected {_shown(path)}", code=2)
    return path


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it is in it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


PAIR = "lab"  # the twin lab: towers lab-a and lab-b at two sites, linked by MX records


def _lab_towers(tower: str) -> tuple[str, ...]:
    if tower == PAIR:
        return ("a", "b")
    match = re.fullmatch(r"lab-([ab])", tower)
    return (match.group(1),) if match else ()


def _scanners() -> int:
    from mailtower.controller.lab import plan

    return int(os.environ.get("MAILTOWER_LAB_SCANNERS", plan.DEFAULT_SCANNERS))


@task(help={"towers": "lab towers to build, e.g. a or a,b", "scanners": "scanners per tower"})
def up(c, towers="a", scanners=None):
    """Build (or reuse) the lab's throwaway hosts."""
    from mailtower.controller.lab import lxc, plan

    if scanners:
        os.environ["MAILTOWER_LAB_SCANNERS"] = str(scanners)
    started = time.monotonic()
    hosts = plan.lab_hosts(tuple(towers.split(",")), _scanners())
    try:
        lxc.ensure_controller(_say)
        lxc.ensure_base(_say)
        lxc.ensure_hosts(hosts, _say)
    except lxc.LabError as exc:
        raise Exit(f"lab.up: {exc}", code=1) from exc
    _say(f"lab up: {len(hosts)} hosts in {time.monotonic() - started:.0f} s")


@task(help={"purge": "also remove the cached base image and the bridge"})
def down(c, purge=False):
    """Destroy the lab's hosts."""
    from mailtower.controller.firstpair import lab as lab_mod
    from mailtower.controller.lab import lxc

    lxc.destroy(lxc.lab_containers(), _say)
    # The lab's inventories and secrets from init belong to the hosts just destroyed: a later
    # lab (lab-a alone, or the lab's own inventories) must not load them, and no password or
    # signing key of a lab that is gone stays on the machine.
    for gone in lab_mod.forget_init_lab():
        _say(f"removed {_shown(gone)}")
    if purge:
        lxc.purge(_say)


@task(help={"json": "print JSON for programs"})
def status(c, json_=False):
    """Show the lab's hosts, their state and memory."""
    from mailtower.controller.lab import lxc, plan

    rows = lxc.status(plan.lab_hosts(("a", "b"), _scanners()))
    rows = [r for r in rows if r["state"] != "ABSENT"]
    if json_:
        print(json.dumps(rows, indent=2))
        return
    total = sum(r["memory_mib"] for r in rows)
    for r in rows:
        print(
            f"{r['name']:16} {r['address']:14} {r['group']:10} {r['state']:8} "
            f"ssh={'yes' if r['ssh'] else 'no ':3} {r['memory_mib']:8.1f} MiB"
        )
    print(f"{len(rows)} hosts, {total:.0f} MiB in all")


def _pyinfra(c, inv: Path, script: str, what: str, extra: str = "") -> None:
    _say(f"deploying {what}: pyinfra {_shown(inv)} {script}{extra}")
    started = time.monotonic()
    with c.cd(str(ROOT)):
        result = c.run(
            f"{BIN}/pyinfra -y {_shown(inv)} {script}{extra}",
            warn=True,
            env={"PYTHONPATH": str(ROOT)},
        )
    elapsed = time.monotonic() - started
    if result.exited != 0:
        raise Exit(f"deploy of {what} failed after {elapsed:.0f} s (see the errors above)", code=1)
    _say(f"deployed {what} in {elapsed:.0f} s")


def _preflight_plan(tower: str) -> tuple[list[Path], set[str], set[str] | None]:
    """The inventories a deploy of ``tower`` touches, the checks that cannot pass there, and
    the towers whose SQL the lab GOC probes (None: all it lists)."""
    towers = _lab_towers(tower)
    if not towers:
        return [inventory_path(tower)], set(), None
    from mailtower.controller.lab import lxc, plan

    paths = [inventory_path("lab-goc")] + [inventory_path(f"lab-{t}") for t in towers]
    # The lab GOC's stand-in ClamAV upstream lives on the twin lab's DNS host: a lab-a alone
    # has none (its GOC records upstream errors, docs/runbook.md).
    twin = (lxc.LXC_DIR / "mt-dns" / "config").exists()
    # It is the lab's internet, which this deploy makes first: on a new lab nothing serves
    # there yet (a real GOC's way out exists before its deploy), so it is checked from then on.
    if twin and not _lab_upstream_serves():
        _say("preflight note: way out not checked: the lab's internet is not deployed yet")
        twin = False
    # The GOC's data lists both lab towers; it probes the SQL of those deployed now and of
    # those whose containers exist (lab-a alone: no lab-b hosts to reach).
    built = {
        t
        for t in plan.TOWER_NETS
        if all(
            (lxc.LXC_DIR / h.name / "config").exists()
            for h in plan.tower_hosts(t, 0)
            if h.group == "sql"
        )
    }
    goc_towers = {f"lab-{t}" for t in set(towers) | built}
    return paths, set() if twin else {"way out"}, goc_towers


def _lab_upstream_serves() -> bool:
    """Does the lab's stand-in ClamAV upstream announce a version (its internet deployed)?"""
    from mailtower.controller.lab import clamav_upstream

    try:
        return clamav_upstream.served_version() is not None
    except Exception:  # no DNS server there yet: refused, timed out
        return False


def run_preflight(tower: str) -> None:
    """Every host the deploy of ``tower`` changes, checked before any is (Exit on a failure)."""
    from mailtower.controller.errors import PreflightError
    from mailtower.controller.preflight import preflight as check

    paths, skip, goc_towers = _preflight_plan(tower)
    _say(f"preflight {tower}: {', '.join(str(_shown(p)) for p in paths)}")
    try:
        report = check(paths, skip=skip, goc_towers=goc_towers)
    except PreflightError as exc:
        raise Exit(f"preflight {tower}: {exc}", code=2) from exc
    for note in report.notes:
        _say(f"preflight note: {note}")
    summary = f"{report.hosts} hosts, {report.checks} checks in {report.seconds:.1f} s"
    if report.findings:
        print("\n".join(f.line() for f in report.findings), flush=True)
        raise Exit(f"preflight {tower}: {len(report.findings)} failed ({summary})", code=1)
    _say(f"preflight {tower}: every check passed ({summary})")


@task(help={"tower": "inventory/<tower>.py (a tower or a GOC); lab: the lab's GOC and towers"})
def preflight(c, tower="lab-a"):
    """Check the hosts before a deploy: SSH, Debian 12, size, clock, ports, DNS, way out."""
    run_preflight(tower)


@task(
    help={
        "answers": "a JSON file of answers (else asked for on a terminal)",
        "force": "replace inventories that differ (secrets are kept; missing ones added)",
        "secrets_dir": "default ~/.config/mailtower/<pair>",
        "inventory_dir": "where the inventories go (default inventory/)",
        "tsig_file": "the DNS server's update key (BIND syntax; default: init makes one)",
    }
)
def init(c, answers="", force=False, secrets_dir="", inventory_dir="", tsig_file=""):
    """Write a pair's inventories, GOC inventory, pair file and secrets (mailtower init)."""
    from mailtower.cli import main

    argv = ["init", "--inventory-dir", inventory_dir or str(ROOT / "inventory")]
    argv += ["--answers", answers] if answers else []
    argv += ["--secrets-dir", secrets_dir] if secrets_dir else []
    argv += ["--tsig-file", tsig_file] if tsig_file else []
    argv += ["--force"] if force else []
    rc = main(argv)
    if rc:
        raise Exit("init: refused (see above)", code=rc)


def _is_goc_inventory(path: Path) -> bool:
    from mailtower.controller import inventory as inventory_mod

    return bool(inventory_mod.load(path).groups.get("goc"))


@task(
    help={
        "tower": "inventory/<tower>.py (a tower or a GOC); lab = the twin lab (both towers, "
        "internet, DNS)",
        "engines": "also upgrade the scanners' clamd/c-icap packages (restarted in the "
        "monitor's drained windows)",
        "relay_packages": "also upgrade the relay's Postfix and HAProxy (HAProxy reloaded, "
        "Postfix restarted once the filter hop drained); ='<apt-get install arguments>' "
        "instead, e.g. ='--reinstall postfix haproxy'",
        "preflight": "check the hosts first (--no-preflight: skip it)",
    },
    optional=["relay_packages"],
)
def deploy(c, tower="lab-a", engines=False, relay_packages=None, preflight=True):
    """Deploy a tower or a GOC with pyinfra (a lab tower: the GOC first and after; the twin
    lab: its internet first, and from init's inventories when `invoke lab` chose them); the
    preflight first, before any host is changed."""
    towers = _lab_towers(tower)
    extra = " --data upgrade_engines=true" if engines else ""
    if relay_packages:
        given = True if relay_packages is True else shlex.split(relay_packages)
        extra += " --data " + shlex.quote(f"upgrade_relay_packages={json.dumps(given)}")
    if tower == PAIR and _lab_source() == "init":
        deploy_lab_from_init(c, engines, relay_packages, preflight)
        return
    if preflight:
        run_preflight(tower)
    if not towers:
        path = inventory_path(tower)
        script = "deploys/goc.py" if _is_goc_inventory(path) else "deploys/tower.py"
        _pyinfra(c, path, script, tower, "" if script == "deploys/goc.py" else extra)
        return
    if tower == PAIR:
        _pyinfra(c, inventory_path("lab-internet"), "deploys/lab_internet.py", "the lab's internet")
        _clamav_upstream_initial()
    _pyinfra(c, inventory_path("lab-goc"), "deploys/goc.py", "the lab's GOC")
    for name in towers:
        _pyinfra(c, inventory_path(f"lab-{name}"), "deploys/lab.py", f"lab-{name}", extra)
    # Its events subscription to each tower needs the tower's publication: a second pass.
    _pyinfra(c, inventory_path("lab-goc"), "deploys/goc.py", "the GOC (towers' events)")
    if tower == PAIR:
        dns(c, pair=PAIR)


def _lab_source() -> str:
    """Which inventories the lab is deployed from: "init" or "repo" (its environment variable,
    else what `invoke lab` recorded)."""
    from mailtower.controller.firstpair.lab import inventory_source

    try:
        return inventory_source()
    except ValueError as exc:
        raise Exit(f"lab: {exc}", code=2) from exc


def _choose_lab_source(tower: str) -> None:
    """`invoke lab` (and bench) record which inventories the lab is built from: the twin lab
    from init's (CI's way; MAILTOWER_LAB_INVENTORY=repo: the lab's own inventory/lab_*.py), a
    lab tower alone from the lab's own (init's inventories are the twin pair's)."""
    from mailtower.controller.firstpair.lab import SOURCE_ENV, record_inventory_source

    given = os.environ.get(SOURCE_ENV, "").strip()
    if tower != PAIR and given == "init":
        raise Exit(f"{SOURCE_ENV}=init: init's lab inventories are the twin lab's (--tower lab)")
    source = (given or "init") if tower == PAIR else "repo"
    if source not in ("init", "repo"):
        raise Exit(f"{SOURCE_ENV}={given!r}: give init or repo", code=2)
    record_inventory_source(source)
    _say(f"lab: deployed from {'init' if source == 'init' else 'the lab'}'s inventories")


def lab_init(c) -> dict[str, Path]:
    """`invoke init` with the twin lab's answers and the lab's extra (inventory/_lab.py
    init_answers), the inventories into .lab/inventory/, the secrets outside the clone
    (firstpair.lab.lab_secrets_dir), the lab DNS server's update key given (it is the
    lab's, as an operator's DNS server's is theirs). A second run says unchanged. With
    --force: the lab's inventories follow the lab's code when it changed (replaced, said so);
    a secret is never replaced, --force or not."""
    from inventory._lab import init_answers
    from mailtower.controller.dns.server import TsigKey
    from mailtower.controller.firstpair import lab as lab_mod
    from mailtower.controller.lab import lxc

    state = lxc.state_dir()
    answers = state / "init-answers.json"
    answers.write_text(json.dumps(init_answers(), indent=2) + "\n")
    key = json.loads(lxc.tsig_key_file().read_text())
    tsig = state / "dns-update.key"
    text = TsigKey(key["name"], key["secret"], key["algorithm"]).to_bind()
    if not tsig.exists() or tsig.read_text() != text:
        tsig.write_text(text)
        tsig.chmod(0o600)
    out = lab_mod.generated_dir()
    _say(f"init: the lab's answers ({_shown(answers)}) into {_shown(out)}")
    init(
        c,
        answers=str(answers),
        inventory_dir=str(out),
        secrets_dir=str(lab_mod.lab_secrets_dir()),
        tsig_file=str(tsig),
        force=True,
    )
    return {f.removesuffix(".py"): out / f for f in lab_mod.GENERATED}


def deploy_lab_from_init(c, engines=False, relay_packages=None, preflight=True) -> None:
    """The twin lab as an operator's pair (docs/first-real-pair.md): init writes its
    inventories, then the guide's commands deploy them, each with its preflight — the GOC,
    each tower, the GOC again, the DNS. Before them, what only the lab has: its internet (DNS
    server, sender, customers' servers) and the stand-in ClamAV upstream serving."""
    paths = lab_init(c)
    _pyinfra(c, inventory_path("lab-internet"), "deploys/lab_internet.py", "the lab's internet")
    _clamav_upstream_initial()
    goc = str(paths["lab_goc"])
    deploy(c, tower=goc, preflight=preflight)
    for name in ("lab_a", "lab_b"):
        deploy(
            c,
            tower=str(paths[name]),
            engines=engines,
            relay_packages=relay_packages,
            preflight=preflight,
        )
    deploy(c, tower=goc, preflight=preflight)  # its events subscription to each tower
    dns(c, pair=str(paths["pair_lab"]))


def _clamav_upstream_initial() -> None:
    """The stand-in ClamAV upstream serves its first version (once: later deploys keep what
    the tests moved it to)."""
    from mailtower.controller.errors import ControllerError
    from mailtower.controller.lab import clamav_upstream

    try:
        version = clamav_upstream.ensure_initial(_say)
    except ControllerError as exc:
        raise Exit(f"stand-in ClamAV upstream: {exc}", code=1) from exc
    _say(f"stand-in ClamAV upstream serves test version {version}")


def _pair_path(pair: str) -> Path:
    """inventory/pair_<pair>.py (the lab's: init's when the lab was built from them), or the
    pair file given."""
    from mailtower.controller.firstpair.lab import lab_inventory

    if pair.endswith(".py") or "/" in pair:
        return Path(pair).expanduser().resolve()
    return lab_inventory(ROOT, f"pair_{pair.replace('-', '_')}.py")


@task(
    help={
        "pair": "inventory/pair_<pair>.py or a pair file (lab: the twin lab)",
        "dry_run": "show the difference only, change nothing",
    }
)
def dns(c, pair=PAIR, dry_run=False):
    """Publish the pair's MX, A and PTR records (RFC 2136 + TSIG), then check what is served."""
    from mailtower.controller.dns import pairfile, update, verify
    from mailtower.controller.dns.exceptions import DnsError

    started = time.monotonic()
    try:
        model, server = pairfile.load(_pair_path(pair))
        _say(
            f"dns: {len(model.domains)} customer domains, towers "
            f"{' + '.join(t.name for t in model.towers)}, server {server}"
        )
        plan = update.publish(model, server, dry_run=dry_run)
        print(plan.to_text(), flush=True)
        if dry_run:
            _say("dns: dry run, nothing sent")
            return
        problems = verify.check_published(model, server)
    except DnsError as exc:
        raise Exit(f"dns: {exc}", code=1) from exc
    if problems:
        raise Exit("dns: published, but the server serves:\n  " + "\n  ".join(problems), code=1)
    _say(f"dns: published and checked in {time.monotonic() - started:.1f} s")


@task(
    help={
        "tower": "the tower's name: inventory/<tower>.py",
        "k": "pytest -k expression",
        "workers": "parallel pytest workers",
    }
)
def verify(c, tower="lab-a", k="", workers=4):
    """Prove a built tower: testinfra per role, then real mail end to end."""
    if tower == PAIR:
        return verify_pair(c, k=k, workers=workers)
    inventory_path(tower)
    started = time.monotonic()
    out = ROOT / "tests" / "output"
    out.mkdir(parents=True, exist_ok=True)
    sel = f"-k '{k}'" if k else ""
    with c.cd(str(ROOT)):
        infra = c.run(
            f"{PY} -m pytest -p no:cacheprovider tests/infra --tower {tower} -n {workers} "
            f"-q {sel} --junitxml {out}/infra.xml",
            warn=True,
            env={"PYTHONPATH": str(ROOT)},
        )
        e2e = c.run(
            f"{PY} -m pytest -p no:cacheprovider tests/e2e --tower {tower} -q -x {sel} "
            f"--durations=10 --junitxml {out}/e2e.xml",
            warn=True,
            env={"PYTHONPATH": str(ROOT)},
        )
    elapsed = time.monotonic() - started
    ok = infra.exited == 0 and e2e.exited == 0
    _say(
        f"verify {tower}: infra {'PASS' if infra.exited == 0 else 'FAIL'}, "
        f"end-to-end {'PASS' if e2e.exited == 0 else 'FAIL'} ({elapsed:.0f} s)"
    )
    if not ok:
        raise Exit(f"tower {tower} FAILED verification", code=1)


def verify_pair(c, k="", workers=4):
    """Both towers, then the pair: DNS, mail through both, failover, store and forward."""
    started = time.monotonic()
    failed = []
    for name in ("lab-a", "lab-b"):
        try:
            verify(c, tower=name, k=k, workers=workers)
        except Exit:
            failed.append(name)
    out = ROOT / "tests" / "output"
    sel = f"-k '{k}'" if k else ""
    with c.cd(str(ROOT)):
        pair = c.run(
            f"{PY} -m pytest -p no:cacheprovider tests/pair -q -x {sel} --durations=20 "
            f"--junitxml {out}/pair.xml",
            warn=True,
            env={"PYTHONPATH": str(ROOT)},
        )
    if pair.exited != 0:
        failed.append("the pair (tests/pair)")
    _say(
        f"verify lab pair: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} "
        f"({time.monotonic() - started:.0f} s)"
    )
    if failed:
        raise Exit(f"lab pair FAILED verification: {', '.join(failed)}", code=1)


@task(default=True)
def lab(c, tower=PAIR):
    """The main job: build the lab, deploy the tower, verify it."""
    towers = _lab_towers(tower)
    if not towers:
        raise Exit(f"{tower!r} is not a lab tower (lab, lab-a or lab-b)", code=2)
    _choose_lab_source(tower)
    up(c, towers=",".join(towers))
    deploy(c, tower=tower)
    verify(c, tower=tower)


@task(name="check")
def prereqs_check(c):
    """Every program the lab and the tests call is on this machine (names the package if not)."""
    from mailtower.controller.lab import prereqs

    try:
        prereqs.check()
    except prereqs.PrerequisiteError as exc:
        raise Exit(f"prereqs: {exc}", code=1) from exc
    _say(f"prereqs: all {len(prereqs.PROGRAMS)} programs the lab and the tests call are here")


@task(name="pristine")
def prereqs_pristine(c):
    """On a freshly debootstrapped root, scripts/bootstrap brings every program the project
    calls (what a new machine would show; this machine's own packages can hide a gap)."""
    from mailtower.controller.lab import lxc, prereqs, pristine

    started = time.monotonic()
    try:
        lxc.ensure_controller(_say)  # the apt proxy the pristine root installs through
        absent = pristine.check(_say)
    except lxc.LabError as exc:
        raise Exit(f"prereqs.pristine: {exc}", code=1) from exc
    if absent:
        raise Exit("prereqs.pristine: on a new machine " + prereqs.explain(absent), code=1)
    _say(
        f"prereqs.pristine: a new machine gets all {len(prereqs.PROGRAMS)} programs from "
        f"scripts/bootstrap ({time.monotonic() - started:.0f} s)"
    )


@task(
    help={
        "fast": "only the pure unit tests (no real servers), in parallel: the inner loop",
    }
)
def unit(c, fast=False):
    """Unit and deploy tests (no hosts needed), plus integration tests on real local programs."""
    if fast:
        with c.cd(str(ROOT)):
            c.run(
                f"{PY} -m pytest -p no:cacheprovider tests/unit tests/deploy -q "
                "-m 'not integration' -n auto",
                env={"PYTHONPATH": str(ROOT)},
            )
        return
    prereqs_check(c)
    with c.cd(str(ROOT)):
        c.run(f"{BIN}/ruff check src tests roles deploys inventory tasks.py")
        c.run(f"{BIN}/mypy")
        c.run(f"{BIN}/lint-imports")  # the import contract in pyproject.toml
        # Two processes (xdist): 4.6 against 5.7 minutes on this 2-core machine.
        c.run(
            f"{PY} -m pytest -p no:cacheprovider tests/unit tests/deploy -q -n 2",
            env={"PYTHONPATH": str(ROOT)},
        )


@task
def test(c):
    """What CI runs: the new-machine check, unit tests, then the twin lab built, deployed,
    verified, torn down."""
    # The pristine root's check (debootstrap, apt through the proxy: mostly waiting on I/O)
    # runs beside the unit tests, which keep one core busy; its output follows theirs.
    import subprocess

    out = ROOT / "tests" / "output"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "pristine.log"
    _say(f"prereqs.pristine: running beside the unit tests (its log: {log_path.relative_to(ROOT)})")
    with log_path.open("w") as log:
        pristine = subprocess.Popen(
            [str(BIN / "invoke"), "prereqs.pristine"],
            cwd=str(ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            unit(c)
        finally:
            rc = pristine.wait()
            print(log_path.read_text(), end="", flush=True)
    if rc != 0:
        raise Exit(f"prereqs.pristine failed (rc {rc}): see above", code=1)
    try:
        lab(c)
    finally:
        down(c)


@task(help={"fresh": "destroy the lab's hosts first (the base image cache is kept)"})
def bench(c, tower="lab-a", fresh=True):
    """Measure a lab tower: build + deploy from scratch, no-change redeploy, verify, memory."""
    from mailtower.controller.lab import lxc, plan

    towers = _lab_towers(tower)
    if not towers:
        raise Exit(f"{tower!r} is not a lab tower", code=2)
    figures_path = ROOT / "tests" / "output" / "figures.json"
    figures_path.unlink(missing_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, **kw):
        started = time.monotonic()
        fn(c, **kw)
        timings[name] = round(time.monotonic() - started, 1)

    if fresh:
        down(c)
    _choose_lab_source(tower)
    timed("lab_up_s", up, towers=",".join(towers))
    timed("deploy_from_scratch_s", deploy, tower=tower)
    timed("redeploy_no_change_s", deploy, tower=tower)
    timed("verify_s", verify, tower=tower)
    with c.cd(str(ROOT)):
        c.run(
            f"{PY} -m pytest -p no:cacheprovider tests/bench --tower {tower} -q -s",
            env={"PYTHONPATH": str(ROOT)},
        )
    rows = lxc.status(plan.lab_hosts(towers, _scanners()))
    by_group: dict[str, float] = {}
    for r in rows:
        by_group[r["group"]] = by_group.get(r["group"], 0) + r["memory_mib"]
    measured = json.loads(figures_path.read_text()) if figures_path.exists() else {}
    report = {
        "tower": tower,
        "hosts": len(rows),
        **timings,
        "build_and_deploy_s": round(timings["lab_up_s"] + timings["deploy_from_scratch_s"], 1),
        "lab_memory_mib": round(sum(by_group.values())),
        "memory_mib_by_group": {g: round(v) for g, v in sorted(by_group.items())},
        **measured,
    }
    out = ROOT / "tests" / "output" / "bench.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    _say(f"bench figures written to {out.relative_to(ROOT)}")


@task(
    help={
        "messages": "messages in the generated corpus (1 % infected)",
        "seed": "the corpus's random seed",
        "amavisd_children": "amavisd-new's $max_servers",
        "floor": "also run the floor: scand's receiving and re-injection, no scanning, "
        "then with clamd (--no-floor: without)",
        "clamav_db": "a directory of ClamAV signature files for the shared clamd "
        "(tests/bench/clamav_db_gen.py's official-size database)",
        "customers": "customers' policies scand holds, messages spread over their domains",
    }
)
def scanner(c, messages=2000, seed=3, amavisd_children=4, floor=True, clamav_db="", customers=0):
    """scand against amavisd-new on this machine, side by side: same clamd, sink and corpus."""
    out = ROOT / "tests" / "output" / "bench_scanner.json"
    _say(f"scanner bench: {messages} messages through amavisd-new and mailtower-scand")
    with c.cd(str(ROOT)):
        c.run(
            f"{PY} tests/bench/scanner_vs_amavis.py --messages {messages} --seed {seed} "
            f"--amavisd-children {amavisd_children} --json {out.relative_to(ROOT)}"
            + (" --floor" if floor else "")
            + (f" --clamav-db {shlex.quote(clamav_db)}" if clamav_db else "")
            + (f" --customers {int(customers)}" if customers else ""),
            env={"PYTHONPATH": str(ROOT)},
        )
    _say(f"scanner bench figures written to {out.relative_to(ROOT)}")


def _sql_tower(tower: str, goc: str):
    from mailtower.controller import sqlpair

    goc_path = inventory_path(goc) if goc else None
    try:
        return sqlpair.SqlTower.load(inventory_path(tower), goc_path)
    except sqlpair.PairError as exc:
        raise Exit(f"sql: {exc}", code=2) from exc


def _goc_default(tower: str) -> str:
    return "lab-goc" if _lab_towers(tower) else ""


@task(
    help={
        "tower": "inventory/<tower>.py",
        "goc": "the GOC's inventory (default for lab towers: lab-goc; none: no GOC)",
    }
)
def sql_failover(c, tower="lab-a", goc=None):
    """Promote the tower's SQL standby (the primary is dead or fenced), re-point the GOC sync."""
    from mailtower.controller import sqlpair

    pair = _sql_tower(tower, _goc_default(tower) if goc is None else goc)
    try:
        timings = sqlpair.failover(pair, _say)
    except sqlpair.PairError as exc:
        raise Exit(f"sql.failover {tower}: {exc}", code=1) from exc
    print(json.dumps({k: round(v, 2) for k, v in timings.items()}))


@task(
    help={
        "tower": "inventory/<tower>.py",
        "goc": "the GOC's inventory (default for lab towers: lab-goc; none: no GOC)",
    }
)
def sql_upgrade(c, tower="lab-a", goc=None):
    """A PostgreSQL minor upgrade: the standby, a planned switchover, the old primary."""
    from mailtower.controller import sqlpair, sqlupgrade

    pair = _sql_tower(tower, _goc_default(tower) if goc is None else goc)
    try:
        timings = sqlupgrade.upgrade(pair, _say)
    except sqlpair.PairError as exc:
        raise Exit(f"sql.upgrade {tower}: {exc}", code=1) from exc
    print(json.dumps({k: round(v, 2) for k, v in timings.items()}))


@task(help={"tower": "inventory/<tower>.py", "host": "the SQL host to make a standby again"})
def sql_rebuild(c, tower="lab-a", host=""):
    """Clone ``host`` afresh from the tower's current SQL primary and start it as its standby."""
    from mailtower.controller import sqlpair

    if not host:
        raise Exit("sql.rebuild: give --host ADDRESS (the SQL host to rebuild)", code=2)
    pair = _sql_tower(tower, _goc_default(tower))
    try:
        sqlpair.rebuild(pair, host, _say)
    except sqlpair.PairError as exc:
        raise Exit(f"sql.rebuild {tower}: {exc}", code=1) from exc


@task(
    help={
        "tower": "inventory/<tower>.py",
        "host": "the SQL host to restore onto (deployed; its data directory is replaced)",
        "target_time": "point in time, e.g. '2026-12-07 13:05:00+00' (default: latest)",
        "fenced": "another SQL host SSH cannot reach that you powered off or cut off (repeatable)",
    },
    iterable=["fenced"],
)
def sql_restore(c, tower="lab-a", host="", target_time=None, fenced=None):
    """Restore the tower's SQL from its pgBackRest repository onto ``host`` as the primary."""
    from mailtower.controller import backup, sqlpair

    if not host:
        raise Exit("sql.restore: give --host ADDRESS (the SQL host to restore onto)", code=2)
    pair = _sql_tower(tower, _goc_default(tower))
    try:
        timings = backup.restore(
            pair, host, _say, target_time=target_time, fenced=tuple(fenced or ())
        )
    except sqlpair.PairError as exc:
        raise Exit(f"sql.restore {tower}: {exc}", code=1) from exc
    print(json.dumps({k: round(v, 2) for k, v in timings.items()}))


@task(
    help={
        "rules": "rules directory (yara/, skeptic/, reputation/, clamav/); default: the rules "
        "shipped in the package",
        "version": "bundle version (default: the version published at the GOC + 1)",
    }
)
def bundle_publish(c, rules="", version=0):
    """Copy a rules directory to the lab GOC, build and sign the bundle there, publish it."""
    from mailtower.controller.errors import PublishError
    from mailtower.controller.lab.bundles import publish_at_goc
    from mailtower.scanning.rules import RULES_DIR

    rules_dir = Path(rules) if rules else RULES_DIR
    if version < 0:
        raise Exit("bundle.publish: --version must be a positive number", code=2)
    try:
        number = publish_at_goc(rules_dir, version or None, say=_say)
    except PublishError as exc:
        raise Exit(f"bundle.publish: {exc}", code=1) from exc
    _say(f"bundle version {number} of {rules_dir} published at the lab GOC")


@task(
    help={
        "goc": "the GOC's inventory (default: lab-goc)",
        "host": "the GOC's address (the only one accepted: a new host takes that address)",
        "target_time": "point in time, e.g. '2026-12-07 13:05:00+00' (default: latest)",
    }
)
def goc_restore(c, goc="lab-goc", host="", target_time=None):
    """Restore the GOC's PostgreSQL from its pgBackRest repository; re-make the towers' sync."""
    from mailtower.controller import backup, sqlpair
    from mailtower.controller import inventory as inventory_mod
    from mailtower.controller.firstpair.lab import lab_inventory

    inventory = inventory_mod.load(inventory_path(goc))
    hosts = inventory.groups.get("goc", [])
    if not hosts:
        raise Exit(f"goc.restore: {inventory_path(goc)} has no host in group goc", code=2)
    remote = sqlpair.Remote.of(hosts[0])
    try:
        backup.goc_restore_host(remote.address, host)
    except sqlpair.PairError as exc:
        raise Exit(f"goc.restore: {exc}", code=2) from exc
    # Each tower of the GOC whose inventory is here (inventory/<tower>.py): its SQL hosts.
    towers = {}
    data = inventory.group_data.get("goc", {}).get("goc") or hosts[0].data.get("goc", {})
    for t in data.get("towers", []):
        path = lab_inventory(ROOT, f"{t['name'].replace('-', '_')}.py")
        if not path.exists():
            _say(f"{t['name']}: no {_shown(path)}; run `mailtower sync tower` there")
            continue
        inv = inventory_mod.load(path)
        towers[t["name"]] = [sqlpair.Remote.of(h) for h in inv.groups.get("sql", [])]
    try:
        timings = backup.restore_goc(remote, towers, _say, target_time=target_time)
    except sqlpair.PairError as exc:
        raise Exit(f"goc.restore: {exc}", code=1) from exc
    print(json.dumps({k: round(v, 2) for k, v in timings.items()}))


goc_ns = Collection("goc")
goc_ns.add_task(goc_restore, name="restore")

bundle_ns = Collection("bundle")
bundle_ns.add_task(bundle_publish, name="publish")

sql_ns = Collection("sql")
sql_ns.add_task(sql_failover, name="failover")
sql_ns.add_task(sql_rebuild, name="rebuild")
sql_ns.add_task(sql_restore, name="restore")
sql_ns.add_task(sql_upgrade, name="upgrade")

bench_ns = Collection("bench")
bench_ns.add_task(bench, name="tower", default=True)
bench_ns.add_task(scanner)

lab_ns = Collection("lab")
lab_ns.add_task(lab, name="run", default=True)
lab_ns.add_task(up)
lab_ns.add_task(down)
lab_ns.add_task(status)

prereqs_ns = Collection("prereqs")
prereqs_ns.add_task(prereqs_check, default=True)
prereqs_ns.add_task(prereqs_pristine)

ns = Collection(
    init,
    preflight,
    deploy,
    dns,
    verify,
    unit,
    test,
    bench_ns,
    lab_ns,
    sql_ns,
    goc_ns,
    bundle_ns,
    prereqs_ns,
)
