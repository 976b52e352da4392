"""Script worms (issue 20): the detection figures and what recognising code costs, in one run.

Prints, for the generated padded script worms (tests/unit/script_worms.py) and the harmless
corpus, how many messages come out non-clean, and for the scanner benchmark's corpus
(scanner_vs_amavis.build_corpus) every verdict and Skeptic's time per message. ``--verdicts``
writes the bench corpus's verdicts as JSON, so two trees can be compared::

    PYTHONPATH=src:tests/unit:tests/bench python tests/bench/script_worms_bench.py \
        --worms 1000 --bench 2000 --verdicts /tmp/new.json

No anti-virus engine runs: the figures are the parsing stages', Skeptic's and the policy's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from skeptic_fixtures import NoEngine

from mailtower.scanning.pipeline import Pipeline
from mailtower.scanning.scan import Kind
from mailtower.scanning.skeptic import Skeptic


def _skeptic_seconds(verdict: object) -> float:
    return sum(run.seconds for run in getattr(verdict, "runs", ()) if run.engine == "skeptic")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worms", type=int, default=1000, help="generated worm messages (0: none)")
    ap.add_argument("--bench", type=int, default=2000, help="bench corpus messages (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verdicts", type=Path, help="write the bench corpus's verdicts here")
    args = ap.parse_args(argv)
    pipeline = Pipeline([NoEngine()], skeptic=Skeptic.from_rules())

    if args.worms:
        from script_worms import clean_cases, generate

        cases = generate(args.worms)
        missed = sum(pipeline.scan(c.raw).kind is Kind.CLEAN for c in cases)
        print(
            f"padded script worms: {args.worms - missed}/{args.worms} non-clean "
            f"({(args.worms - missed) / args.worms:.1%})"
        )
        harmless = clean_cases()
        flagged = sum(pipeline.scan(raw).kind is not Kind.CLEAN for _, _, raw in harmless)
        print(f"harmless scripts and text: {flagged}/{len(harmless)} not clean")

    if args.bench:
        from scanner_vs_amavis import build_corpus

        corpus = build_corpus(args.bench, args.seed)
        for sample in corpus[:50]:  # warm-up: imports, caches
            pipeline.scan(sample.raw)
        kinds: Counter[str] = Counter()
        verdicts = []
        skeptic_s = []
        started = time.process_time()
        for sample in corpus:
            verdict = pipeline.scan(sample.raw)
            kinds[verdict.kind.value] += 1
            skeptic_s.append(_skeptic_seconds(verdict))
            verdicts.append([verdict.kind.value, sorted({f.name for f in verdict.findings})])
        cpu = time.process_time() - started
        print(f"bench corpus: {len(corpus)} messages, verdicts {dict(sorted(kinds.items()))}")
        print(f"  CPU per message (parsing + Skeptic + policy): {cpu / len(corpus) * 1000:.2f} ms")
        print(
            f"  Skeptic per message: mean {statistics.mean(skeptic_s) * 1000:.3f} ms, "
            f"median {statistics.median(skeptic_s) * 1000:.3f} ms"
        )
        if args.verdicts:
            args.verdicts.write_text(json.dumps(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
