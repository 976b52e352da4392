"""The relay's own packages (Postfix, HAProxy) upgraded on a running relay (issue 19): apt with
Debian's restarts held back, HAProxy reloaded (its master re-executes the new binary), Postfix
restarted only after the filter transport was held and its deliveries finished, and the
transport released whatever happens. The rendered script runs here against fakes of apt-get,
postconf, postfix, postqueue, systemctl, ss and socat that log what they were asked, in order,
and real processes whose binary is deleted (the old code still running)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sample_settings

from roles.relay import (
    FILTER_TRANSPORT,
    PACKAGES,
    RELAY_PACKAGES,
    RELAY_RECORD,
    RELAY_UPGRADE,
    upgrade_command,
)

TEMPLATE = f"relay{RELAY_UPGRADE}"
MAIN_CF = "# Managed by mailtower\ncontent_filter = scan:[127.0.0.1]:10024\n"


def render_script(render, **over) -> str:
    s = sample_settings()
    data = {
        "packages": RELAY_PACKAGES,
        "record": RELAY_RECORD,
        "transport": FILTER_TRANSPORT,
        "drain_s": s.upgrade.relay_drain_s,
        **over,
    }
    return render(TEMPLATE, s, **data)


def test_the_held_transport_is_the_one_main_cf_filters_through(render, settings) -> None:
    main = render("relay/etc/postfix/main.cf", settings, tls_pem="/t")
    conf = dict(re.findall(r"^(\w+) = ?(.*)$", main, re.M))
    assert conf["content_filter"].split(":", 1)[0] == FILTER_TRANSPORT
    master = render("relay/etc/postfix/master.cf", settings)
    assert re.search(rf"^{FILTER_TRANSPORT}\s+unix\s.*\ssmtp$", master, re.M)
    assert "defer_transports" not in conf  # what the script restores when it held nothing before
    text = render_script(render)
    assert f"TRANSPORT={FILTER_TRANSPORT}\n" in text
    assert f"FILTER=127.0.0.1:{settings.ports.filter}\n" in text
    assert "--only-upgrade " + " ".join(RELAY_PACKAGES) in text
    assert set(RELAY_PACKAGES) <= set(PACKAGES) and "iproute2" in PACKAGES  # ss


def test_the_deploy_passes_the_operators_apt_arguments_quoted() -> None:
    assert upgrade_command(True) == RELAY_UPGRADE
    assert upgrade_command(["--reinstall", "postfix", "haproxy"]) == (
        f"{RELAY_UPGRADE} --reinstall postfix haproxy"
    )
    assert upgrade_command(["x; rm -rf /"]) == f"{RELAY_UPGRADE} 'x; rm -rf /'"


class Rig:
    """The script with its system paths under tmp, fakes on PATH, two processes standing for
    the masters: one whose binary was replaced (deleted), one current."""

    def __init__(self, render, tmp: Path, old_pid: int, new_pid: int) -> None:
        self.tmp, self.old_pid, self.new_pid = tmp, old_pid, new_pid
        self.sbin, self.bin, self.etc = tmp / "usr-sbin", tmp / "bin", tmp / "etc-postfix"
        for d in (self.sbin, self.bin, self.etc, tmp / "run", tmp / "lib"):
            d.mkdir()
        self.main_cf, self.calls, self.log = self.etc / "main.cf", tmp / "calls", tmp / "dpkg.log"
        self.main_cf.write_text(MAIN_CF)
        self.log.write_text("2026-12-01 10:00:00 status installed haproxy:amd64 2.6.12-1\n")
        self.haproxy_pid, self.postfix_pid = tmp / "run/haproxy.pid", tmp / "run/master.pid"
        self.state, self.record = tmp / "lib/server-state", tmp / "lib/relay-packages"
        text = render_script(render, record=str(self.record), drain_s=4)
        for old, new in {
            "/usr/sbin/": f"{self.sbin}/",
            "/etc/postfix/": f"{self.etc}/",
            "/var/log/dpkg.log": str(self.log),
            "/run/haproxy.pid": str(self.haproxy_pid),
            "/var/lib/haproxy/server-state": str(self.state),
            "/var/spool/postfix/pid/master.pid": str(self.postfix_pid),
            "HAPROXY_WAIT_S=30": "HAPROXY_WAIT_S=3",
        }.items():
            text = text.replace(old, new)
        self.script = tmp / "mailtower-relay-upgrade"
        self.script.write_text(text)
        self.script.chmod(0o755)
        policy = f"{self.sbin}/policy-rc.d"
        log = f'echo "$(basename "$0") $*" >> {self.calls}'
        fakes = {
            # apt-get: Debian's restarts must be refused while it runs
            "apt-get": f'{log}\n[ "$1" = update ] && exit 0\n'
            f'"{policy}" postfix restart; [ $? -eq 101 ] || exit 9\n'
            f'"{policy}" haproxy reload; [ $? -eq 101 ] || exit 9\n'
            # any other service: the host's own policy answers (none here: allowed)
            f'if [ -z "$HOST_POLICY_DENIES" ]; then "{policy}" ssh restart || exit 8\n'
            f'else "{policy}" ssh restart; [ $? -eq 101 ] || exit 7; fi\n'
            f'"{policy}" --quiet postfix restart; [ $? -eq 101 ] || exit 9\n'
            f'"{policy}" postfix@-.service restart; [ $? -eq 101 ] || exit 9\n'
            f'"{policy}" postfix-resolvconf.path stop; [ $? -eq 101 ] || exit 9\n'
            '[ -n "$APT_FAIL" ] && exit 100\n'
            "for p in $INSTALLS; do\n"
            f'  echo "2026-12-07 13:00:00 status installed $p" >> {self.log}\n'
            "done\n",
            "dpkg-query": '[ "$1" = --control-show ] && { echo "00  usr/sbin/postfix"; exit 0; }\n'
            'shift 3; for p in "$@"; do echo "$p 3.7.11"; done\n',  # -W -f FORMAT PACKAGE…
            "postconf": f"{log}\n"
            f'if [ "$1" = -h ]; then sed -n "s/^defer_transports = //p" {self.main_cf}\n'
            f'else echo "${{2%%=*}} = ${{2#*=}}" >> {self.main_cf}; fi\n',
            "postfix": f'{log}\n[ "$1" = check ] && [ -n "$CHECK_FAIL" ] && exit 1\n'
            f'if [ "$1" = reload ] && [ -n "$RELOAD_FAIL_AFTER" ]; then\n'
            f'  n=$(grep -c "^postfix reload" {self.calls})\n'
            '  [ "$n" -gt "$RELOAD_FAIL_AFTER" ] && exit 1\n'
            "fi\nexit 0\n",
            "postqueue": f"{log}\n",
            "logger": f"{log}\n",
            "haproxy": f"{log}\n",
            # socat: the admin socket; "show info" names the worker that answers ($WORKER_FILE,
            # a new one after the reload unless $NO_NEW_WORKER)
            "socat": f"{log}\nread -r cmd\n"
            'if [ "$cmd" = "show info" ]; then echo "Name: HAProxy";'
            ' echo "Pid: $(cat "$WORKER_FILE")";'
            " else echo '1\n# be_id be_name srv_id'; fi\n",
            # systemctl: record what the world looked like when it was asked; a reload or
            # restart puts the current process in the pid file
            "systemctl": f"{log}\n"
            f'grep -qs mailtower "{policy}" && echo "  our policy present" >> {self.calls}\n'
            f'grep -q "^defer_transports = " {self.main_cf}'
            f' && echo "  {FILTER_TRANSPORT} held" >> {self.calls}\n'
            f'[ "$1 $2" = "reload haproxy" ] && echo {new_pid} > {self.haproxy_pid}'
            ' && { [ -n "$NO_NEW_WORKER" ] || echo 222 > "$WORKER_FILE"; }\n'
            f'[ "$1 $2" = "restart postfix@-" ] && echo {new_pid} > {self.postfix_pid}\n'
            "exit 0\n",
            # ss: $OPEN_FILE holds how many filter connections are still open; each look one
            # fewer (deliveries finishing), never fewer than $STUCK
            "ss": f"{log}\n"
            '[ -n "$SS_FAIL" ] && exit 1\n'
            'if [ "$1" = -Hltn ]; then\n'
            '  [ -n "$NO_LISTENER" ] || echo "LISTEN 0 1 127.0.0.1:10024"; exit 0\nfi\n'
            'n=$(cat "$OPEN_FILE"); i=0; while [ $i -lt $n ]; do echo conn; i=$((i+1)); done\n'
            'n=$((n - 1)); [ $n -lt "${STUCK:-0}" ] && n=${STUCK:-0}; [ $n -lt 0 ] && n=0\n'
            'echo $n > "$OPEN_FILE"\n',
        }
        for name, body in fakes.items():
            f = self.bin / name
            f.write_text("#!/bin/sh\n" + body)
            f.chmod(f.stat().st_mode | stat.S_IXUSR)

    def _prepare(self, old: tuple[str, ...], open_: int, **env: str) -> dict[str, str]:
        """The masters' pid files, the open filter connections, a fresh call log; the env."""
        self.haproxy_pid.write_text(f"{self.old_pid if 'haproxy' in old else self.new_pid}\n")
        self.postfix_pid.write_text(f"{self.old_pid if 'postfix' in old else self.new_pid:>6}\n")
        (self.tmp / "open").write_text(str(open_))
        (self.tmp / "worker").write_text("111\n")
        if self.calls.exists():
            self.calls.unlink()
        return {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "OPEN_FILE": str(self.tmp / "open"),
            "WORKER_FILE": str(self.tmp / "worker"),
            "INSTALLS": "",
            **env,
        }

    def run(
        self, *args: str, old: tuple[str, ...] = ("haproxy", "postfix"), open_: int = 0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args],
            env=self._prepare(old, open_, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, *args: str, open_: int = 0, **env: str) -> subprocess.Popen[str]:
        """The script in the background, Postfix's code replaced."""
        return subprocess.Popen(
            [str(self.script), *args],
            env=self._prepare(("postfix",), open_, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def called(self, logged: bool = False) -> list[str]:
        """The commands run, in order (what went to the journal only if ``logged``)."""
        calls = self.calls.read_text().splitlines() if self.calls.exists() else []
        return [c for c in calls if logged or not c.startswith("logger ")]


@pytest.fixture
def rig(render, tmp_path: Path) -> Iterator[Rig]:
    """A process whose binary was deleted (`readlink /proc/<pid>/exe` ends in " (deleted)", as
    after dpkg replaced it) and one whose binary is on disk."""
    binary, current = tmp_path / "old-master", tmp_path / "new-master"
    shutil.copy("/bin/sleep", binary)
    shutil.copy("/bin/sleep", current)
    old = subprocess.Popen([str(binary), "300"])
    new = subprocess.Popen([str(current), "300"])
    binary.unlink()
    try:
        assert os.readlink(f"/proc/{old.pid}/exe").endswith(" (deleted)")
        yield Rig(render, tmp_path, old.pid, new.pid)
    finally:
        old.kill()
        new.kill()
        old.wait()
        new.wait()


def test_upgrade_reloads_haproxy_then_restarts_postfix_with_the_filter_drained(rig: Rig) -> None:
    (rig.sbin / "policy-rc.d").write_text("#!/bin/sh\nexit 0\n")  # the host's own
    done = rig.run(open_=2, INSTALLS="postfix:amd64 haproxy:amd64")
    assert done.returncode == 0, done.stderr
    calls = rig.called()
    apt = next(c for c in calls if c.startswith("apt-get install"))
    assert "--force-confold" in apt and apt.endswith("--only-upgrade " + " ".join(RELAY_PACKAGES))
    # in order: HAProxy checked, its state saved, reloaded; then the transport held, drained,
    # Postfix restarted, the transport released, Postfix reloaded, the queue flushed
    order = [
        "haproxy -c -q -f /etc/haproxy/haproxy.cfg",
        "socat stdio unix-connect:/run/haproxy/admin.sock",
        "systemctl reload haproxy",
        "postfix check",
        "postconf -h defer_transports",
        f"postconf -e defer_transports={FILTER_TRANSPORT}",
        "postfix reload",
        "ss -Htn state established state syn-sent dst 127.0.0.1:10024",
        "systemctl restart postfix@-",
        f"  {FILTER_TRANSPORT} held",
        "postfix reload",
        "postqueue -f",
    ]
    _positions(calls, order)
    # the restart came after the last open connection was seen, and 3 quiet looks in a row
    restart = calls.index("systemctl restart postfix@-")
    assert len([c for c in calls[:restart] if c.startswith("ss -Htn ")]) == 2 + 3
    assert "  our policy present" not in calls  # no reload or restart was refused
    assert (rig.sbin / "policy-rc.d").read_text() == "#!/bin/sh\nexit 0\n"  # restored
    assert not (rig.sbin / "policy-rc.d.mailtower-saved").exists()
    assert rig.main_cf.read_text() == MAIN_CF  # byte for byte: the next deploy changes nothing
    assert not (rig.etc / "main.cf.mailtower-held").exists()
    # the monitor's marks saved for the new worker, removed once it answered (a later reload
    # must not bring back today's)
    assert calls.index("socat stdio unix-connect:/run/haproxy/admin.sock") < calls.index(
        "systemctl reload haproxy"
    )
    assert not rig.state.exists()
    assert rig.record.read_text().startswith("postfix 3.7.11\n")
    assert "haproxy reloaded" in done.stdout and "postfix restarted" in done.stdout
    assert "installed: haproxy postfix" in done.stdout


def _positions(calls: list[str], order: list[str]) -> list[int]:
    """Where each of ``order`` is found in ``calls``, each searched after the one before."""
    found, start = [], 0
    for c in order:
        assert c in calls[start:], f"{c!r} not after position {start} in {calls}"
        start = calls.index(c, start) + 1
        found.append(start - 1)
    return found


def test_nothing_changed_restarts_nothing(rig: Rig) -> None:
    done = rig.run(old=())
    assert done.returncode == 0, done.stderr
    calls = rig.called()
    assert not any(c.startswith(("systemctl", "postconf", "ss ")) for c in calls), calls
    assert "installed: nothing; haproxy kept; postfix kept" in done.stdout
    assert not (rig.sbin / "policy-rc.d").exists()  # services start again as usual
    assert not rig.record.exists()


def test_a_reinstall_with_only_postfix_code_replaced_restarts_only_postfix(rig: Rig) -> None:
    done = rig.run("--reinstall", "postfix", old=("postfix",), INSTALLS="postfix:amd64")
    assert done.returncode == 0, done.stderr
    calls = rig.called()
    assert calls[1].endswith("--force-confdef --reinstall postfix")
    assert "systemctl reload haproxy" not in calls
    assert "systemctl restart postfix@-" in calls


def test_a_filter_hop_that_does_not_drain_restarts_nothing_and_releases(rig: Rig) -> None:
    main_cf = "# Managed by mailtower\ndefer_transports = relay\n"
    rig.main_cf.write_text(main_cf)
    done = rig.run(old=("postfix",), open_=5, STUCK="1")
    assert done.returncode == 1
    err = done.stderr
    assert "drain scan:" in err and "1 deliveries to the filter" in err and "after 4 s" in err
    assert "nothing was restarted" in err and "run again" in err
    assert os.uname().nodename in err  # the host
    calls = rig.called()
    assert "postconf -e defer_transports=scan relay" in calls
    assert "systemctl restart postfix@-" not in calls
    assert rig.main_cf.read_text() == main_cf  # the operator's own value back
    assert calls[-2:] == ["postfix reload", "postqueue -f"]
    assert "waiting for" in done.stdout  # progress while it waited


def test_a_failed_apt_leaves_no_policy_and_touches_no_service(rig: Rig) -> None:
    done = rig.run(APT_FAIL="1")
    assert done.returncode == 1
    assert "apt-get install:" in done.stderr and "were not restarted" in done.stderr
    assert not (rig.sbin / "policy-rc.d").exists()
    assert not any(c.startswith(("systemctl", "postconf")) for c in rig.called())


def test_a_refused_postfix_check_holds_nothing(rig: Rig) -> None:
    done = rig.run(old=("postfix",), CHECK_FAIL="1")
    assert done.returncode == 1 and "postfix check:" in done.stderr
    assert not any(c.startswith(("postconf", "systemctl restart")) for c in rig.called())
    assert rig.main_cf.read_text() == MAIN_CF


def test_an_interrupted_run_is_named_and_not_run_over(rig: Rig) -> None:
    (rig.etc / "main.cf.mailtower-held").write_text(MAIN_CF + "defer_transports = scan\n")
    done = rig.run()
    assert done.returncode == 1
    assert "interrupted while it held scan" in done.stderr and "postfix reload" in done.stderr
    assert rig.called() == []  # not even apt
    assert (rig.etc / "main.cf.mailtower-held").exists()


def test_the_state_file_stays_when_no_new_haproxy_worker_answers(rig: Rig) -> None:
    done = rig.run("--reinstall", "haproxy", old=("haproxy",), NO_NEW_WORKER="1")
    assert done.returncode == 0, done.stderr
    assert rig.state.read_text().startswith("1\n")
    assert "did not answer" in done.stdout


def test_a_drain_that_cannot_be_measured_holds_and_restarts_nothing(rig: Rig) -> None:
    for env, said in (
        ({"SS_FAIL": "1"}, "ss cannot list sockets"),
        ({"NO_LISTENER": "1"}, "nothing listens"),
    ):
        done = rig.run(old=("postfix",), **env)
        assert done.returncode == 1 and said in done.stderr, done.stderr
        calls = rig.called()
        assert not any(c.startswith(("postconf", "systemctl restart")) for c in calls), calls
        assert rig.main_cf.read_text() == MAIN_CF


def test_a_release_whose_reload_fails_is_a_failure(rig: Rig) -> None:
    done = rig.run(old=("postfix",), RELOAD_FAIL_AFTER="1")  # the hold's reload works
    assert done.returncode == 1
    assert "postfix reload failed 5 times" in done.stderr and "may still be held" in done.stderr
    assert "released" not in done.stdout
    assert rig.main_cf.read_text() == MAIN_CF  # main.cf is back; the running Postfix is named


def test_a_bad_drain_wait_is_refused_before_anything(rig: Rig) -> None:
    done = rig.run(MAILTOWER_DRAIN_S="2m")
    assert done.returncode == 2 and "whole seconds" in done.stderr
    assert rig.called() == []


def test_a_hangup_while_holding_releases_the_transport(rig: Rig) -> None:
    """The controller gone (SSH dropped) during the drain: the clean-up runs all the same."""
    proc = rig.start(open_=50, STUCK="50")
    try:
        deadline = time.monotonic() + 20
        while "defer_transports = scan" not in rig.main_cf.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 129, err
    assert rig.main_cf.read_text() == MAIN_CF
    assert rig.called()[-2:] == ["postfix reload", "postqueue -f"]
    assert "systemctl restart postfix@-" not in rig.called()


def test_the_hosts_own_policy_still_answers_for_other_services(rig: Rig) -> None:
    (rig.sbin / "policy-rc.d").write_text("#!/bin/sh\nexit 101\n")  # e.g. an image's
    (rig.sbin / "policy-rc.d").chmod(0o755)
    done = rig.run(old=(), HOST_POLICY_DENIES="1")
    assert done.returncode == 0, done.stderr
    assert (rig.sbin / "policy-rc.d").read_text() == "#!/bin/sh\nexit 101\n"  # put back


def test_errors_and_the_summary_reach_the_journal(rig: Rig) -> None:
    done = rig.run(old=("postfix",), CHECK_FAIL="1")
    assert done.returncode == 1
    logged = [c for c in rig.called(logged=True) if c.startswith("logger ")]
    assert any("postfix check refuses" in c and "user.err" in c for c in logged), logged
    done = rig.run(old=())
    logged = [c for c in rig.called(logged=True) if c.startswith("logger ")]
    assert logged and "installed: nothing; haproxy kept; postfix kept" in logged[-1]
