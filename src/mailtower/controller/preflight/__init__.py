"""The preflight: hosts checked as they are before a deploy changes anything (issue 21).

    report = preflight([Path("inventory/tower_a.py")])   every host of the inventories, over
                                                        the SSH the deploy uses, in parallel
    report.findings                                     one FailedCheck per failed check: host,
                                                        check, what was seen, the fix

sizing.SIZING     the per-role table (CPUs, RAM, the /var filesystem), also in the guide
ports.TOWER_RULES the TCP paths between hosts, from the typed settings, also in the guide
checks            the script each host runs and how its answers are judged (runners injected)
targets           what to check, from tower and GOC inventories
See docs/first-real-pair.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

from mailtower.controller.preflight.checks import PreflightReport, run_all
from mailtower.controller.preflight.targets import targets_of

WAY_OUT = "way out"


def preflight(
    paths: Iterable[Path],
    *,
    skip: Iterable[str] = (),
    progress: Callable[[str], None] | None = None,
    goc_towers: Iterable[str] | None = None,
) -> PreflightReport:
    """Check every host of these inventories; ``skip``: check names not to run (e.g. "way
    out"); ``goc_towers``: the towers whose SQL a GOC probes (None: every tower it lists)."""
    skipped = set(skip)
    towers = None if goc_towers is None else set(goc_towers)
    targets, mx = targets_of(list(paths), goc_towers=towers)
    if WAY_OUT in skipped:
        targets = [dataclasses.replace(t, way_out=None) for t in targets]
    report = run_all(targets, mx_names=mx if "dns" not in skipped else None, progress=progress)
    report.findings = [f for f in report.findings if f.check not in skipped]
    return report


def with_tables(doc: str) -> str:
    """``doc`` (docs/first-real-pair.md) with its sizing and port tables as the code has them,
    between their ``<!-- NAME: begin -->`` and ``<!-- NAME: end -->`` markers."""
    from mailtower.controller.preflight import ports, sizing

    for name, table in (("sizing", sizing.markdown_table()), ("ports", ports.markdown_matrix())):
        start, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
        head, _, rest = doc.partition(start)
        _, _, tail = rest.partition(end)
        doc = f"{head}{start}\n{table}\n{end}{tail}"
    return doc
