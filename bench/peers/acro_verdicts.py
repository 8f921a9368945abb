"""ACRO's per-cell verdicts on the crafted disclosure tables; runs with bench/.peers-venv's Python.

    bench/.peers-venv/bin/python bench/peers/acro_verdicts.py [DATA_DIR] [--out FILE | --stdout]

DATA_DIR (default tests/data/disclosure) holds the crafted CSV microdata and tables.json, which
lists each file with the key lists to group it by, the value column and, optionally, thresholds
(pdao's names, mapped onto ACRO's config keys; ACRO's defaults otherwise). For every file and key
list this calls ACRO 1.0.x (``acro.ACRO(suppress=False)``) twice, the way a researcher would:

* the frequency table — ``crosstab(df[k0], df[k1])`` for two keys, ``pivot_table(df, index=k0,
  values=value, aggfunc="count")`` for one;
* the sum table — the same with ``values=df[value], aggfunc="sum"``, with ACRO's
  ``check_missing_values`` turned on (it is off in ACRO's default.yaml; pdao always checks).

and writes, for each output, ACRO's overall status and per check its status (pass / fail /
review) and the cells its mask flags (``sdc["cells"]`` positions turned into key values), to
DATA_DIR/acro_verdicts.json together with the thresholds, the acro and pandas versions, ACRO's
defaults and this command. The file is deterministic (no time stamps, cells sorted), so a re-run that changes it
means ACRO's verdicts moved; tests/test_disclosure.py compares sandbox/results/disclosure.py with it.

This file runs in the peers venv (acro pins pandas <= 2.3.3); it imports nothing of pdao.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND = "bench/.peers-venv/bin/python bench/peers/acro_verdicts.py"
#: pdao's threshold names (sandbox.results.disclosure.Thresholds) -> ACRO's config keys (acro/default.yaml)
ACRO_KEYS = {"min_cell_count": "safe_threshold", "dominance_n": "safe_nk_n", "dominance_k": "safe_nk_k",
             "p_ratio": "safe_pratio_p", "zeros_disclosive": "zeros_are_disclosive"}


def _plain(v):
    """A pandas/numpy label as a JSON value."""
    return v.item() if hasattr(v, "item") else v


def _cells(table, keys: list[str], positions: list[list[int]]) -> list[dict]:
    """ACRO's mask positions (row, column) as the key values of the cells of ``table``."""
    out = []
    for r, c in positions:
        cell = {keys[0]: _plain(table.index[r])}
        if len(keys) == 2:
            cell[keys[1]] = _plain(table.columns[c])
        out.append(cell)
    return sorted(out, key=lambda d: [str(d[k]) for k in keys])


def _record(session, table, keys: list[str], call: str) -> dict:
    result = list(session.results.results.values())[-1]
    statuses = result.fair["check_status"]
    cells = result.sdc["cells"]
    return {
        "call": call,
        "status": result.status,
        "checks": {name: {"status": statuses[name], "cells": _cells(table, keys, cells.get(name, []))}
                   for name in sorted(statuses)},
    }


def verdicts(data_dir: Path) -> dict:
    import acro
    import pandas as pd

    logging.disable(logging.CRITICAL)   # ACRO logs every call at INFO
    manifest = json.loads((data_dir / "tables.json").read_text(encoding="utf-8"))
    value = manifest["value"]
    session = acro.ACRO(suppress=False)
    defaults = {ours: session.config[theirs] for ours, theirs in ACRO_KEYS.items()}
    tables = []
    for entry in manifest["tables"]:
        df = pd.read_csv(data_dir / entry["file"], keep_default_na=False, na_values=[""])
        thresholds = {**defaults, **entry.get("thresholds", {})}
        for ours, theirs in ACRO_KEYS.items():   # the session's config is the checks' risk appetite
            session.config[theirs] = thresholds[ours]
        for keys in entry["keys"]:
            outputs = {}
            session.config["check_missing_values"] = False   # ACRO's default; its crosstab count cannot
            if len(keys) == 2:
                table = session.crosstab(df[keys[0]], df[keys[1]])
                call = f"crosstab(df.{keys[0]}, df.{keys[1]})"
            else:
                table = session.pivot_table(df, index=keys[0], values=value, aggfunc="count")
                call = f"pivot_table(df, index={keys[0]!r}, values={value!r}, aggfunc='count')"
            outputs["count"] = _record(session, table, keys, call)
            session.config["check_missing_values"] = True
            if len(keys) == 2:
                table = session.crosstab(df[keys[0]], df[keys[1]], values=df[value], aggfunc="sum")
                call = f"crosstab(df.{keys[0]}, df.{keys[1]}, values=df.{value}, aggfunc='sum')"
            else:
                table = session.pivot_table(df, index=keys[0], values=value, aggfunc="sum")
                call = f"pivot_table(df, index={keys[0]!r}, values={value!r}, aggfunc='sum')"
            outputs["sum"] = _record(session, table, keys, call)
            tables.append({"file": entry["file"], "keys": keys, "value": value, "thresholds": thresholds,
                           "outputs": outputs})
    return {
        "acro_version": acro.__version__ if hasattr(acro, "__version__") else _version("acro"),
        "pandas_version": pd.__version__,
        "command": COMMAND,
        "session": "acro.ACRO(suppress=False); config['check_missing_values'] = True for the sum tables",
        "acro_defaults": defaults,
        "tables": tables,
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="ACRO's per-cell verdicts on the crafted disclosure tables")
    parser.add_argument("data_dir", nargs="?", type=Path, default=REPO / "tests" / "data" / "disclosure")
    parser.add_argument("--out", type=Path, help="default: DATA_DIR/acro_verdicts.json")
    parser.add_argument("--stdout", action="store_true", help="print the JSON instead of writing it")
    args = parser.parse_args(argv)
    result = json.dumps(verdicts(args.data_dir), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    if args.stdout:
        sys.stdout.write(result)
        return 0
    out = args.out or args.data_dir / "acro_verdicts.json"
    out.write_text(result, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
