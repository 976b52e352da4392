"""The ICAP engine against a real c-icap (Debian's, virus_scan over clamd_mod) and a real clamd
with the project's test signatures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest
from scand_fakes import RealCicap, RealClamd, free_port, make_settings

from mailtower.scanning import testdata
from mailtower.scanning.engines import from_settings
from mailtower.scanning.engines.icap import REPLACED, IcapClient, IcapEngine
from mailtower.scanning.errors import EngineError, EngineScanError, EngineUnavailable
from mailtower.scanning.pipeline import Pipeline
from mailtower.scanning.scan import Kind, scan_message
from mailtower.settings import TowerSettings

pytestmark = pytest.mark.integration

EICAR_NAME = "Mailtower.Test.EICAR"
BIG = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealClamd]:
    daemon = RealClamd(tmp_path_factory.mktemp("clamd")).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def cicap(clamd: RealClamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCicap]:
    server = RealCicap(tmp_path_factory.mktemp("cicap"), clamd.socket).start()
    yield server
    server.stop()


def _mail(subject: str, attachment: bytes | None = None, filename: str = "file.bin") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "to@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.org>"
    msg.set_content("hello\n")
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename=filename
        )  # base64 transfer encoding
    return msg.as_bytes().replace(b"\n", b"\r\n")


def _names(engine: IcapEngine, raw: bytes) -> list[str]:
    findings = engine.scan(raw)
    assert all(finding.engine == "icap" for finding in findings)
    return [finding.name for finding in findings]


def test_health_names_the_service(cicap: RealCicap) -> None:
    health = IcapEngine(cicap.url()).health(2.0)
    assert health.startswith("C-ICAP/")
    assert "ISTag" in health


def test_eicar_in_base64_attachment_is_found_by_name(cicap: RealCicap) -> None:
    raw = _mail("eicar", attachment=testdata.eicar())
    assert testdata.eicar() not in raw  # only a MIME decoder (clamd's, behind c-icap) sees it
    [name] = _names(IcapEngine(cicap.url(), timeout_s=10), raw)
    assert name.startswith(EICAR_NAME)


def test_marker_in_text_is_found_by_name(cicap: RealCicap) -> None:
    raw = _mail("marker").replace(b"hello", b"see " + testdata.marker() + b" here")
    [name] = _names(IcapEngine(cicap.url(), timeout_s=10), raw)
    assert name.startswith("Mailtower.Test.Marker")


def test_clean_mail_is_clean_and_unmodified(cicap: RealCicap) -> None:
    raw = _mail("clean", attachment=os.urandom(20_000))
    response = IcapClient(cicap.url(), timeout_s=10).respmod(raw)
    assert response.status == 204  # c-icap honours Allow: 204
    assert _names(IcapEngine(cicap.url(), timeout_s=10), raw) == []


@pytest.mark.parametrize("infected", [False, True], ids=["clean", "eicar-at-the-end"])
def test_large_message(cicap: RealCicap, infected: bool) -> None:
    payload = os.urandom(BIG) + (testdata.eicar() if infected else b"")
    raw = _mail(f"big-{infected}", attachment=payload)
    assert len(raw) > BIG
    names = _names(IcapEngine(cicap.url(), timeout_s=60), raw)
    if infected:
        assert len(names) == 1 and names[0].startswith(EICAR_NAME)
    else:
        assert names == []


def test_trickle_mode_cuts_an_infected_large_message_short(cicap: RealCicap) -> None:
    # Debian's default mode starts sending a large object back before it is scanned; a
    # virus found later can only end the body early, with no name. Still never clean.
    raw = _mail("trickle", attachment=os.urandom(BIG) + testdata.eicar())
    engine = IcapEngine(cicap.url(RealCicap.TRICKLE), timeout_s=60)
    assert _names(engine, raw) == [REPLACED]
    assert scan_message(raw, [engine]).kind is Kind.VIRUS


def test_concurrent_scans_get_their_own_answers(cicap: RealCicap) -> None:
    engine = IcapEngine(cicap.url(), timeout_s=30)
    messages = [
        _mail(f"c{n}", attachment=testdata.eicar() if n % 2 else os.urandom(50_000))
        for n in range(12)
    ]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda raw: _names(engine, raw), messages))
    for n, names in enumerate(results):
        if n % 2:
            assert len(names) == 1 and names[0].startswith(EICAR_NAME), (n, names)
        else:
            assert names == [], (n, names)


def test_scan_message_with_engines_from_settings(cicap: RealCicap, tmp_path: Path) -> None:
    base = make_settings(tmp_path / "spool", reinject_port=free_port(), engine_timeout_s=10)
    settings = TowerSettings.model_validate(
        {**base.model_dump(), "engines": ["icap"], "icap_url": cicap.url()}
    )
    engines = from_settings(settings)
    verdict = scan_message(_mail("eicar", attachment=testdata.eicar()), engines)
    assert verdict.kind is Kind.VIRUS
    assert verdict.findings[0].engine == "icap"
    assert verdict.findings[0].name.startswith(EICAR_NAME)
    assert scan_message(_mail("plain"), engines).kind is Kind.CLEAN


def test_pipeline_stops_the_virus(cicap: RealCicap) -> None:
    pipeline = Pipeline([IcapEngine(cicap.url(), timeout_s=10)], deadline_s=30)
    verdict = pipeline.scan(_mail("eicar", attachment=testdata.eicar()))
    assert verdict.kind is Kind.VIRUS
    assert any(f.engine == "icap" and f.name.startswith(EICAR_NAME) for f in verdict.findings)


def test_cicap_down_is_unavailable(clamd: RealClamd, tmp_path: Path) -> None:
    doomed = RealCicap(tmp_path / "cicap", clamd.socket).start()
    engine = IcapEngine(doomed.url(), timeout_s=5)
    assert engine.scan(_mail("before")) == []
    doomed.stop()
    with pytest.raises(EngineUnavailable):
        engine.scan(_mail("after"))
    with pytest.raises(EngineError):
        engine.health(1.0)
    assert scan_message(_mail("after"), [engine]).kind is Kind.TEMPFAIL


def test_clamd_down_behind_cicap_is_an_error_not_clean(tmp_path: Path) -> None:
    own_clamd = RealClamd(tmp_path / "clamd").start()
    server = RealCicap(tmp_path / "cicap", own_clamd.socket).start()
    try:
        engine = IcapEngine(server.url(), timeout_s=10)
        assert engine.scan(_mail("before")) == []
        own_clamd.stop()
        with pytest.raises(EngineScanError, match="500"):  # PassOnError off
            engine.scan(_mail("after", attachment=testdata.eicar()))
        assert scan_message(_mail("after"), [engine]).kind is Kind.TEMPFAIL
    finally:
        server.stop()
        own_clamd.stop()
