"""CPU time per message of scand's scanning pipeline, in process, on the scanner benchmark's corpus.

Wall-clock throughput is noisy on a shared machine; CPU time per message is not (much). This
runs ``scand.server.build_pipeline``'s stack (clamd if ``--clamd``, YARA, reputation, Skeptic,
the policy) in one thread over the corpus of ``scanner_vs_amavis.py`` and prints:

- pipeline CPU ms/message (this process, ``time.process_time``), also by kind of message;
- clamd CPU ms/message (its process, from /proc) and bytes handed to each engine per message;
- a digest of every verdict (kind, findings, anomalies), to compare two versions of the code.

Usage: ``PYTHONPATH=$PWD:$PWD/src python tests/bench/cpu_per_message.py --messages 2000
--seed 3 [--clamd] [--repeat 3] [--verdicts out.json] [--profile out.prof]``
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scand_fakes import RealClamd  # noqa: E402
from scanner_vs_amavis import build_corpus  # noqa: E402

from mailtower.scanning import pipeline as pipeline_mod  # noqa: E402
from mailtower.scanning.engines.clamd import ClamdEngine  # noqa: E402


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class _Counting:
    """Wraps an engine to count the bytes it is handed."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.name = engine.name
        self.bytes = 0
        self.calls = 0
        if hasattr(engine, "scan_objects"):
            self.scan_objects = self._scan_objects
        else:
            self.scan = self._scan
        if hasattr(engine, "meta"):
            self.meta = engine.meta

    def _scan(self, data: bytes) -> Any:
        self.bytes += len(data)
        self.calls += 1
        return self._engine.scan(data)

    def _scan_objects(self, objects: Any) -> Any:
        objects = list(objects)
        self.bytes += sum(len(o.data) for o in objects)
        self.calls += len(objects)
        return self._engine.scan_objects(objects)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--clamd", action="store_true", help="start a private clamd and use it")
    ap.add_argument("--repeat", type=int, default=3, help="passes over the corpus; best kept")
    ap.add_argument("--verdicts", type=Path, help="write every verdict here (JSON)")
    ap.add_argument("--profile", type=Path, help="cProfile one extra pass into this file")
    args = ap.parse_args(argv)

    corpus = build_corpus(args.messages, args.seed)
    total_bytes = sum(len(s.raw) for s in corpus)
    clamd: RealClamd | None = None
    work = tempfile.TemporaryDirectory(prefix="mt-cpu-")
    engines: list[Any] = []
    try:
        if args.clamd:
            clamd = RealClamd(Path(work.name), max_threads=4).start()
            engines.append(ClamdEngine(str(clamd.socket)))
        pipe = pipeline_mod.in_process(engines=engines)
        pipe.engines = [_Counting(e) for e in pipe.engines]
        for sample in corpus[:48]:  # warm-up (imports, caches, clamd's first scans)
            pipe.scan(sample.raw)
        for e in pipe.engines:
            e.bytes = e.calls = 0

        passes: list[tuple[float, float]] = []
        by_kind: list[list[float]] = []  # per pass, per message: CPU seconds
        verdicts: list[dict[str, Any]] = []
        for n in range(args.repeat):
            clamd_before = _proc_cpu_s(clamd.proc.pid) if clamd and clamd.proc else 0.0
            results = []
            each: list[float] = []
            cpu = time.process_time()
            for s in corpus:
                started = time.process_time()
                results.append(pipe.scan(s.raw))
                each.append(time.process_time() - started)
            cpu = time.process_time() - cpu
            by_kind.append(each)
            clamd_cpu = _proc_cpu_s(clamd.proc.pid) - clamd_before if clamd and clamd.proc else 0.0
            passes.append((cpu, clamd_cpu))
            if n == 0:
                verdicts = [
                    {
                        "index": s.index,
                        "kind": str(v.kind),
                        "findings": sorted(f"{f.engine}:{f.name}@{f.part}" for f in v.findings),
                        "anomalies": sorted(v.anomalies),
                    }
                    for s, v in zip(corpus, results, strict=True)
                ]
        count = len(corpus)
        best = min(passes)
        digest = hashlib.sha256(json.dumps(verdicts, sort_keys=True).encode()).hexdigest()
        kinds: dict[str, int] = {}
        for v in verdicts:
            kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
        best_pass = by_kind[passes.index(best)]
        kind_ms: dict[str, list[float]] = {}
        for sample, seconds in zip(corpus, best_pass, strict=True):
            kind_ms.setdefault(sample.kind, []).append(seconds * 1000)
        report = {
            "code": str(Path(pipeline_mod.__file__).parents[2]),
            "messages": count,
            "mean_kb": round(total_bytes / count / 1000, 1),
            "pipeline_cpu_ms_per_message": [round(p[0] / count * 1000, 2) for p in passes],
            "clamd_cpu_ms_per_message": [round(p[1] / count * 1000, 2) for p in passes],
            "best_pipeline_cpu_ms": round(best[0] / count * 1000, 2),
            "engine_bytes_per_message": {
                e.name: round(e.bytes / count / args.repeat) for e in pipe.engines
            },
            "engine_calls_per_message": {
                e.name: round(e.calls / count / args.repeat, 2) for e in pipe.engines
            },
            "cpu_ms_by_kind": {k: round(sum(v) / len(v), 2) for k, v in sorted(kind_ms.items())},
            "verdicts": kinds,
            "verdicts_sha256": digest,
        }
        print(json.dumps(report, indent=2))
        if args.verdicts:
            args.verdicts.write_text(json.dumps(verdicts, indent=1))
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for s in corpus:
                pipe.scan(s.raw)
            prof.disable()
            prof.dump_stats(str(args.profile))
    finally:
        if clamd is not None:
            clamd.stop()
        work.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
