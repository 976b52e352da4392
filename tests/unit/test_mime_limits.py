"""Limits stop parsing with a hostile anomaly; a failing reading never hides the others."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
from mime_builders import EICAR, assert_found, attachment_message, b64_lines, hostile

from mailtower.scanning.containers import ContainerLimits
from mailtower.scanning.engines.testing import PatternEngine
from mailtower.scanning.mime import (
    INFORMATIONAL_ANOMALIES,
    MimeLimits,
    _email_reader,
    analyse,
    is_hostile,
)
from mailtower.scanning.mime._anomalies import HOSTILE_ANOMALIES
from mailtower.scanning.mime._limits import Budget, MimeLimitExceeded
from mailtower.scanning.pipeline import Pipeline
from mailtower.scanning.scan import Kind


def _nested(depth: int) -> bytes:
    head = "".join(
        f'--b{i}x\nContent-Type: multipart/mixed; boundary="b{i + 1}x"\n\n' for i in range(depth)
    )
    tail = "".join(f"--b{i}x--\n" for i in reversed(range(depth + 1)))
    body = f"--b{depth}x\nContent-Transfer-Encoding: base64\n\n{b64_lines(EICAR)}\n"
    text = f'Content-Type: multipart/mixed; boundary="b0x"\n\n{head}{body}{tail}'
    return text.encode()


def test_nesting_within_the_limit_is_read() -> None:
    result = analyse(_nested(10))
    assert_found(result)
    assert hostile(result) == []


def test_too_deep() -> None:
    result = analyse(_nested(25))
    assert "mime.too-deep" in result.anomalies
    assert result.objects[0].path == "message"


def test_too_deep_forwarded_chain() -> None:
    msg = attachment_message()
    for _ in range(25):
        msg = b"Content-Type: message/rfc822\r\n\r\n" + msg
    assert "mime.too-deep" in analyse(msg).anomalies


def test_too_many_parts() -> None:
    parts = "".join(f"--b\nContent-Type: text/plain\n\npart {i}\n" for i in range(1100))
    data = f"Content-Type: multipart/mixed; boundary=b\n\n{parts}--b--\n".encode()
    result = analyse(data)
    assert "mime.too-many-parts" in result.anomalies
    assert "mime.views-disagree" not in result.anomalies  # partial readings are not compared


def test_too_many_parts_with_a_lower_limit() -> None:
    assert (
        "mime.too-many-parts"
        in analyse(attachment_message(), limits=MimeLimits(max_parts=2)).anomalies
    )


def test_too_large() -> None:
    data = attachment_message(payload=EICAR * 100)
    result = analyse(data, limits=MimeLimits(max_decoded_bytes=len(data) + 1000))
    assert "mime.too-large" in result.anomalies


def test_timeout() -> None:
    result = analyse(attachment_message(), limits=MimeLimits(max_time_s=0.0))
    assert "mime.timeout" in result.anomalies
    assert "mime.timeout" in HOSTILE_ANOMALIES
    assert result.objects[0].data == attachment_message()


class _Clocks:
    """A thread's CPU clock and the wall clock, moved by hand."""

    def __init__(self) -> None:
        self.cpu = 100.0
        self.wall = 5000.0
        self.cpu_reads = 0

    def read_cpu(self) -> float:
        self.cpu_reads += 1
        return self.cpu

    def budget(self, limits: MimeLimits) -> Budget:
        return Budget(limits, cpu_clock=self.read_cpu, wall_clock=lambda: self.wall)


def test_cpu_clock_is_read_only_once_the_limit_is_possible() -> None:
    """CPU time cannot run ahead of wall time: the CPU clock (a system call) is left alone
    until max_time_s of wall time has passed, which ordinary messages never see."""
    clocks = _Clocks()
    budget = clocks.budget(MimeLimits(max_time_s=10.0, max_wall_s=60.0))
    for _ in range(100):
        clocks.wall += 0.05
        clocks.cpu += 0.05
        budget.check_time()
    assert clocks.cpu_reads == 1  # when the budget was made
    clocks.wall += 6.0
    budget.check_time()
    assert clocks.cpu_reads == 2


def test_time_limit_counts_cpu_not_wall_time() -> None:
    clocks = _Clocks()
    budget = clocks.budget(MimeLimits(max_time_s=10.0, max_wall_s=60.0))
    clocks.wall += 45.0  # a starved machine: much wall time passes, little CPU
    clocks.cpu += 9.0
    budget.check_time()  # no limit yet: the message itself cost 9 s of CPU
    clocks.cpu += 2.0
    with pytest.raises(MimeLimitExceeded) as exc:
        budget.check_time()
    assert exc.value.anomaly == "mime.timeout"


def test_wall_clock_backstop_still_ends_a_starved_message() -> None:
    clocks = _Clocks()
    budget = clocks.budget(MimeLimits(max_time_s=10.0, max_wall_s=60.0))
    clocks.cpu += 1.0
    clocks.wall += 61.0
    with pytest.raises(MimeLimitExceeded) as exc:
        budget.check_time()
    assert exc.value.anomaly == "mime.wall-timeout"
    # Not the message's fault: neither hostile (it would be quarantined) nor informational.
    assert not is_hostile(exc.value.anomaly)
    assert exc.value.anomaly not in INFORMATIONAL_ANOMALIES


def test_time_a_thread_does_not_run_is_not_counted() -> None:
    """The real clocks: wall time passes while the parsing thread sleeps, no CPU time does."""
    budget = Budget(MimeLimits(max_time_s=0.2, max_wall_s=30.0))
    time.sleep(0.4)  # the point of the test: wall time passing without CPU time
    budget.check_time()  # a wall-clock limit of 0.2 s would have stopped here


def test_wall_timeout_is_a_tempfail_never_clean_nor_suspicious() -> None:
    pipeline = Pipeline(
        [PatternEngine(timeout_s=1.0)], mime_limits=MimeLimits(max_time_s=10.0, max_wall_s=0.0)
    )
    verdict = pipeline.scan(attachment_message(payload=b"quarterly figures\n" * 40))
    assert "mime.wall-timeout" in verdict.anomalies
    assert verdict.kind is Kind.TEMPFAIL, verdict
    assert "wall-clock backstop" in verdict.reason


def test_big_message_within_time() -> None:
    data = attachment_message(payload=bytes(range(256)) * 12000 + EICAR)  # ~4 MB
    start = time.process_time()  # CPU time: the machine may be busy with other work
    result = analyse(data)
    assert time.process_time() - start < 5
    assert_found(result)
    assert hostile(result) == []


def test_a_failing_reading_is_reported_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = _email_reader.read

    def broken(view: str, *args, **kwargs) -> None:
        if view == "email-default":
            raise RuntimeError("simulated parser bug")
        real(view, *args, **kwargs)

    monkeypatch.setattr(_email_reader, "read", broken)
    result = analyse(attachment_message())
    assert "mime.reader-error:email-default" in result.anomalies
    obj = assert_found(result, filename="eicar.com")
    assert "email-default" not in obj.views
    assert {"email-compat32", "raw-boundary"} <= obj.views


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 100,
        b"\r\n\r\n",
        b"--",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
        b"Content-Type: multipart/mixed; boundary=-\r\n\r\n" + b"---\r\n" * 2000,
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!",
        bytes(range(256)) * 10,
    ],
)
def test_garbage_never_raises(data: bytes) -> None:
    result = analyse(data)
    if data:
        assert result.objects[0].data == data


def test_container_wall_timeout_is_a_tempfail_never_clean_nor_suspicious() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("report.txt", "quarterly figures\n" * 40)
    pipeline = Pipeline(
        [PatternEngine(timeout_s=1.0)],
        container_limits=ContainerLimits(max_time_s=10.0, max_wall_s=0.0),
    )
    verdict = pipeline.scan(attachment_message(buf.getvalue(), name="report.zip"))
    assert "container.wall-timeout" in verdict.anomalies
    assert verdict.kind is Kind.TEMPFAIL, verdict
    assert "wall-clock backstop" in verdict.reason
