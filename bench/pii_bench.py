"""Recall, precision and throughput of the ``sandbox.engine.pii`` recognizers on the labelled corpus.

    python bench/pii_bench.py                    # corpus tests/data/pii_corpus.jsonl, 100,000 strings
    python bench/pii_bench.py --errors           # also print every miss and false alarm

Quality: on every line of ``tests/data/pii_corpus.jsonl`` (``bench/make_pii_corpus.py``), the
findings of both paths — the fast path (``find_pii_batch``) and the Presidio engine path
(``find_pii_batch(use_engine=True)``) — are compared with the labels, per kind and overall:

* exact: a finding is right when a label has the same kind, start and end;
* overlap: a finding is right when it overlaps a label of the same kind (type-only match), and a
  label is found when some finding of its kind overlaps it.

Precision = right findings / findings, recall = found labels / labels (exact: the same count of
matched pairs). The two paths must agree finding for finding; the script says so, or fails.

Speed: a column of ``--strings`` texts (default 100,000) made by cycling through the corpus lines
in a seeded shuffled order is redacted by ``redact_batch`` (fast path) and by
``redact_batch(use_engine=True)`` (``AnalyzerEngine`` + presidio-anonymizer); strings per second is
the column length over the wall time of one call (the engine and the compiled patterns are built
before timing). The results are printed as Markdown and added, with the exact command, the date
and the machine, at the end of the ``## PII recognizers`` section of ``bench/RESULTS.md``
(``--no-append`` to only print).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CORPUS = REPO / "tests" / "data" / "pii_corpus.jsonl"
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## PII recognizers"


def load_corpus(path: Path = CORPUS) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Score:
    """Counts for one kind (or all): labels, findings, and the matches under both rules."""

    gold: int = 0
    pred: int = 0
    exact: int = 0          # findings equal to a label (kind, start, end)
    overlap_pred: int = 0   # findings overlapping a label of their kind
    overlap_gold: int = 0   # labels overlapped by a finding of their kind

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else 1.0

    @property
    def precision(self) -> float:
        return self._ratio(self.exact, self.pred)

    @property
    def recall(self) -> float:
        return self._ratio(self.exact, self.gold)

    @property
    def overlap_precision(self) -> float:
        return self._ratio(self.overlap_pred, self.pred)

    @property
    def overlap_recall(self) -> float:
        return self._ratio(self.overlap_gold, self.gold)


def evaluate(records: list[dict], findings: list[list]) -> dict[str, Score]:
    """Per-kind scores (and ``"all"``) of ``findings`` (one list of ``Finding`` per record)."""
    from sandbox.engine.pii import KIND_PRIORITY

    scores = {k: Score() for k in (*KIND_PRIORITY, "all")}
    for rec, found in zip(records, findings, strict=True):
        gold = [(e["type"], e["start"], e["end"]) for e in rec["entities"]]
        pred = [(f.kind, f.start, f.end) for f in found]
        gold_set = set(gold)
        for k, s, e in gold:
            for key in (k, "all"):
                scores[key].gold += 1
                if any(pk == k and ps < e and s < pe for pk, ps, pe in pred):
                    scores[key].overlap_gold += 1
        for k, s, e in pred:
            for key in (k, "all"):
                scores[key].pred += 1
                scores[key].exact += (k, s, e) in gold_set
                if any(gk == k and gs < e and s < ge for gk, gs, ge in gold):
                    scores[key].overlap_pred += 1
    return scores


def errors(records: list[dict], findings: list[list]) -> list[str]:
    """One line per miss (``-``) and false alarm (``+``), exact rule."""
    out = []
    for rec, found in zip(records, findings, strict=True):
        text = rec["text"]
        gold = {(e["type"], e["start"], e["end"]) for e in rec["entities"]}
        pred = {(f.kind, f.start, f.end) for f in found}
        for sign, items in (("-", gold - pred), ("+", pred - gold)):
            for k, s, e in sorted(items, key=lambda x: x[1]):
                out.append(f"{sign} {k:13s} {text[s:e]!r:40s} in {text!r}")
    return out


def quality_table(scores: dict[str, Score]) -> str:
    lines = ["| kind | labels | findings | precision | recall | overlap precision | overlap recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, s in scores.items():
        label = "**all**" if kind == "all" else kind
        lines.append(f"| {label} | {s.gold} | {s.pred} | {s.precision:.3f} | {s.recall:.3f} | "
                     f"{s.overlap_precision:.3f} | {s.overlap_recall:.3f} |")
    return "\n".join(lines)


def column(records: list[dict], n: int, seed: int) -> list[str]:
    texts = [r["text"] for r in records]
    random.Random(seed).shuffle(texts)
    return [texts[i % len(texts)] for i in range(n)]


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def append_results(block: str) -> None:
    """Add ``block`` at the end of the ``## PII recognizers`` section (the section is added at the
    end of the file if there is none). Nothing else is rewritten."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    try:
        at = next(i for i, ln in enumerate(lines) if ln.strip() == HEADING)
    except StopIteration:
        gap = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        RESULTS.write_text(text + gap + HEADING + "\n\n" + block, encoding="utf-8")
        return
    end = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "".join(lines[:end]).rstrip("\n") + "\n\n"
    after = "".join(lines[end:])
    RESULTS.write_text(before + block + ("\n" + after if after else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--strings", type=int, default=100_000, help="length of the column timed")
    ap.add_argument("--seed", type=int, default=1, help="order of the corpus lines in the timed column")
    ap.add_argument("--errors", action="store_true", help="print every miss and false alarm")
    ap.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    from sandbox.engine import pii

    records = load_corpus(args.corpus)
    texts = [r["text"] for r in records]
    fast = pii.find_pii_batch(texts)
    engine = pii.find_pii_batch(texts, use_engine=True)
    differ = sum(a != b for a, b in zip(fast, engine))
    scores = evaluate(records, fast)
    if args.errors:
        print("\n".join(errors(records, fast)) + "\n")

    col = column(records, args.strings, args.seed)
    pii.redact_batch(col[:100])                   # compile the patterns, build the engine, warm up
    pii.redact_batch(col[:100], use_engine=True)
    load_before = os.getloadavg()[0]
    rates = []
    for label, fn in (("`redact_batch` (fast path: compiled patterns)", lambda: pii.redact_batch(col)),
                      ("`redact_batch(use_engine=True)` (AnalyzerEngine + anonymizer)",
                       lambda: pii.redact_batch(col, use_engine=True))):
        seconds = timed(fn)
        rates.append((label, seconds))
    load_after = os.getloadavg()[0]
    avg = sum(map(len, col)) / len(col)
    speed = ["| path | strings | seconds | strings/s |", "|---|---:|---:|---:|"]
    speed += [f"| {label} | {len(col):,} | {s:.1f} | {len(col) / s:,.0f} |" for label, s in rates]

    quality = quality_table(scores)
    print(quality + "\n")
    print("\n".join(speed))
    agree = (f"Both paths gave identical findings on all {len(texts)} lines." if not differ else
             f"!! The paths differ on {differ} of {len(texts)} lines.")
    print("\n" + agree)

    args_given = sys.argv[1:] if argv is None else argv
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/pii_bench.py", *args_given])
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    n_empty = sum(1 for r in records if not r["entities"])
    block = "\n".join([
        f"### {now}",
        "",
        f"Command: `{cmd}`. Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, presidio-analyzer {version('presidio_analyzer')}, "
        f"presidio-anonymizer {version('presidio_anonymizer')}, regex {version('regex')}; no-op NLP engine.",
        f"Corpus `{os.path.relpath(args.corpus, REPO)}` ({len(records)} lines, {n_empty} without PII, "
        f"{scores['all'].gold} labels; `bench/make_pii_corpus.py`). Exact: same kind, start and end; overlap: "
        f"same kind, overlapping spans. The corpus was written together with the recognizers (same "
        "author, same notion of each kind), so these figures are a regression baseline rather than an "
        f"independent estimate of quality on real records. {agree} Speed: one call on a column of "
        f"{len(col):,} corpus lines "
        f"(~{avg:.0f} characters each, cycled in a shuffled order), wall time; load average (1 min) "
        f"{load_before:.1f} before, {load_after:.1f} after.",
        "",
        quality,
        "",
        "\n".join(speed),
        "",
    ])
    if not args.no_append:
        append_results(block)
        print(f"\nappended to {os.path.relpath(RESULTS, Path.cwd())}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
