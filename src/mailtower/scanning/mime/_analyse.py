"""Run every reading of a message and return the union of what they yield."""

from __future__ import annotations

import logging

from mailtower.scanning.mime import _anomalies as A
from mailtower.scanning.mime import _boundary_reader, _email_reader, _encoded_blocks
from mailtower.scanning.mime._collect import STRUCTURAL_VIEWS, Collector
from mailtower.scanning.mime._limits import Budget, MimeLimitExceeded, MimeLimits
from mailtower.scanning.objects import Analysis

log = logging.getLogger(__name__)

MESSAGE_PATH = "message"


def _run_reader(
    view: str,
    data: bytes,
    col: Collector,
    prefix: str,
    depth: int,
    shared: _email_reader.SharedParse,
) -> None:
    if view == _boundary_reader.VIEW:
        _boundary_reader.read(data, col, prefix=prefix, depth=depth)
    else:
        _email_reader.read(view, data, col, prefix=prefix, depth=depth, shared=shared)


def analyse(raw: bytes, *, limits: MimeLimits | None = None) -> Analysis:
    """Every plausible reading of ``raw``: the union of decoded objects, and the anomalies.

    Never raises on hostile input: a reading that fails is reported as
    ``mime.reader-error:<reading>`` and the others go on; a limit stops all parsing and is
    reported as its anomaly. The whole message is always the first object.
    """
    budget = Budget(limits or MimeLimits())
    col = Collector(budget)
    # The whole message is always scanned, even when a limit stops everything else.
    col.add(
        raw, path=MESSAGE_PATH, view=MESSAGE_PATH, content_types=["message/rfc822"], check=False
    )
    try:
        if b"\x00" in raw:
            col.anomaly(A.NUL_BYTE)
        col.embedded.append((raw, "", 0))
        done: set[bytes] = set()
        while col.embedded:
            data, prefix, depth = col.embedded.pop(0)
            budget.check_depth(depth)
            if data in done:
                continue
            done.add(data)
            shared = _email_reader.SharedParse(data)  # both email readings, parsed once
            for view in STRUCTURAL_VIEWS:
                budget.check_time()
                try:
                    _run_reader(view, data, col, prefix, depth, shared)
                except MimeLimitExceeded:
                    raise
                except (Exception, RecursionError) as exc:
                    log.debug("MIME reading %s failed: %r", view, exc)
                    col.anomaly(f"{A.READER_ERROR}:{view}")
                    col.failed.add(view)
        _encoded_blocks.extract(col)
    except MimeLimitExceeded as exc:
        col.limit_hit = True
        col.anomaly(exc.anomaly)
    except Exception as exc:  # a bug of ours must not pass a message: report, fail closed
        log.warning("MIME analysis failed: %r", exc)
        col.limit_hit = True
        col.anomaly(f"{A.READER_ERROR}:analyse")
    return col.finish()
