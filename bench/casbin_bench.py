"""Benchmark of scene authorization decisions: casbin with one small enforcer per scene
(`policies.enforcer.SceneEnforcers`) against one plain `casbin.Enforcer` holding every scene.

    python bench/casbin_bench.py                     # 10,000 scenes, 100 datasets, 2,000 requests

A SQLite metadata database (migrated with `pdao.kernel.db.migrate`) receives the casbin rows of N active
scenes (`policies.enforcer.scene_policy_rows`: one `g` line for the tenant, one `p` line per item;
8–12 items per scene drawn from 100 synthetic dataset codes × 6 fields × the 5 usages), inserted in
bulk. Then random requests (org, scene, dataset, field, usage), half allowed and half denied (of the
denied: three in four ask for an item not in the scene's list, one in four is another tenant asking
for a listed item), each on a different scene, are timed one by one with `perf_counter_ns`:

(a) ``SceneEnforcers.may``, warm   — every scene's enforcer already cached (the steady state);
(b) ``SceneEnforcers.may``, cold   — a fresh cache: the first touch of each scene, which includes
                                     the filtered load of that scene's rows from the database;
(c) ``casbin.Enforcer``            — the baseline: `casbin.Enforcer(scene_model.conf, adapter)` with
                                     every scene's policies loaded, calling `enforce()`; it scans
                                     the rules linearly, so it is timed on a subset of the requests
                                     (``--bare-requests``, half allowed, half denied);
(d) ``casbin.FastEnforcer``        — a second baseline: the same, with ``cache_key_order=[1, 2]``
                                     (policies indexed by domain, then object).

Every method's decisions are checked against the expected ones (and hence against each other).
It prints a Markdown table and appends it, with the exact command line, the date and the machine,
to ``bench/RESULTS.md`` under the heading ``## casbin decisions`` (``--no-append`` to only print).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## casbin decisions"
FIELDS = ("f0", "f1", "f2", "f3", "f4", "f5")
USAGES = ("aggregate", "group_by", "filter", "join_key", "masked_output")


@dataclass(frozen=True)
class Request:
    org: str
    scene: int
    dataset: str
    field: str
    usage: str
    expected: bool


@dataclass
class Result:
    name: str
    label: str
    micros: list[float] = field(default_factory=list)
    setup_s: float | None = None
    agree: int = 0
    disagree: int = 0
    note: str = ""

    def pct(self, q: float) -> float:
        xs = sorted(self.micros)
        # nearest rank
        k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
        return xs[k]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(url: str, scenes: int, datasets: int, seed: int) -> tuple[dict[int, str], dict[int, list[tuple[str, str, str]]]]:
    """Migrate the database and insert every scene's casbin rows in bulk. Answers each scene's
    tenant and items."""
    from sqlalchemy import insert

    from pdao.kernel.db import make_engine, migrate
    from policies.enforcer import scene_policy_rows
    from sandbox.scenes.models import CasbinRule

    migrate(url)
    rnd = random.Random(seed)
    codes = [f"bench.ds{d:03d}" for d in range(datasets)]
    orgs = [f"co{o:03d}" for o in range(max(2, scenes // 50))]
    tenant: dict[int, str] = {}
    items: dict[int, list[tuple[str, str, str]]] = {}
    engine = make_engine(url)
    batch: list[dict] = []
    cols = ("ptype", "v0", "v1", "v2", "v3", "v4", "v5")
    with engine.begin() as conn:
        for sid in range(1, scenes + 1):
            tenant[sid] = rnd.choice(orgs)
            chosen: set[tuple[str, str, str]] = set()
            want = rnd.randint(8, 12)
            while len(chosen) < want:
                chosen.add((rnd.choice(codes), rnd.choice(FIELDS), rnd.choice(USAGES)))
            items[sid] = sorted(chosen)
            for row in scene_policy_rows(sid, tenant[sid], items[sid], tenant_holds=True):
                batch.append({c: getattr(row, c) for c in cols})
            if len(batch) >= 20_000:
                conn.execute(insert(CasbinRule.__table__), batch)
                batch.clear()
        if batch:
            conn.execute(insert(CasbinRule.__table__), batch)
    engine.dispose()
    return tenant, items


def make_requests(tenant: dict[int, str], items: dict[int, list[tuple[str, str, str]]], n: int, datasets: int,
                  seed: int) -> list[Request]:
    """n requests on n distinct scenes, alternately allowed and denied."""
    rnd = random.Random(seed + 1)
    codes = [f"bench.ds{d:03d}" for d in range(datasets)]
    orgs = sorted(set(tenant.values()))
    out = []
    for i, sid in enumerate(rnd.sample(sorted(tenant), n)):
        own = items[sid]
        if i % 2 == 0:
            d, f, u = rnd.choice(own)
            out.append(Request(tenant[sid], sid, d, f, u, True))
        elif i % 4 == 1:  # another tenant asks for a listed item
            other = rnd.choice([o for o in orgs if o != tenant[sid]])
            d, f, u = rnd.choice(own)
            out.append(Request(other, sid, d, f, u, False))
        else:  # the tenant asks for something not in the list
            while True:
                cand = (rnd.choice(codes), rnd.choice(FIELDS), rnd.choice(USAGES))
                if cand not in own:
                    break
            out.append(Request(tenant[sid], sid, *cand, False))
    return out


def timed(result: Result, reqs: list[Request], decide) -> None:  # noqa: ANN001
    clock = time.perf_counter_ns
    for r in reqs:
        t0 = clock()
        got = decide(r)
        t1 = clock()
        result.micros.append((t1 - t0) / 1000)
        if bool(got) == r.expected:
            result.agree += 1
        else:
            result.disagree += 1


def run(args: argparse.Namespace) -> tuple[list[Result], dict]:
    import casbin
    from casbin_sqlalchemy_adapter import Adapter

    from pdao.kernel.db import make_engine
    from policies.enforcer import SCENE_MODEL, SceneEnforcers, item_object, org_subject, scene_domain
    from sandbox.scenes.models import CasbinRule

    work = Path(tempfile.mkdtemp(prefix="casbin-bench-"))
    url = f"sqlite:///{work / 'bench.db'}"
    info: dict = {}
    t = time.perf_counter()
    tenant, items = build(url, args.scenes, args.datasets, args.seed)
    info["build_s"] = time.perf_counter() - t
    info["p_rows"] = sum(len(v) for v in items.values())
    info["g_rows"] = len(tenant)
    info["orgs"] = len(set(tenant.values()))
    reqs = make_requests(tenant, items, args.requests, args.datasets, args.seed)
    bare_reqs = reqs[: args.bare_requests]
    engine = make_engine(url)

    def args_of(r: Request) -> tuple[str, str, str, str]:
        return org_subject(r.org), scene_domain(r.scene), item_object(r.dataset, r.field), r.usage

    results: list[Result] = []

    # (b) cold, then (a) warm on the same cache
    enforcers = SceneEnforcers(engine)
    gc.collect()
    before = rss_mb()
    cold = Result("b", "`SceneEnforcers.may`, cold cache (first touch: filtered load of one scene)")
    timed(cold, reqs, lambda r: enforcers.may(r.scene, 1, r.org, r.dataset, r.field, r.usage))
    gc.collect()
    info["cache_mb"] = rss_mb() - before
    warm = Result("a", "`SceneEnforcers.may`, warm cache")
    shuffled = list(reqs)
    random.Random(args.seed + 2).shuffle(shuffled)
    timed(warm, shuffled, lambda r: enforcers.may(r.scene, 1, r.org, r.dataset, r.field, r.usage))
    results += [warm, cold]

    # (c) the bare enforcer with every scene loaded
    adapter = Adapter(engine, db_class=CasbinRule, create_all_models=False)
    t = time.perf_counter()
    bare = casbin.Enforcer(str(SCENE_MODEL), adapter)
    bare_result = Result("c", "bare `casbin.Enforcer.enforce`, all scenes loaded", setup_s=time.perf_counter() - t)
    timed(bare_result, bare_reqs, lambda r, e=bare: e.enforce(*args_of(r)))   # bound now: `bare` is deleted below
    split = {e: sorted(us for us, r in zip(bare_result.micros, bare_reqs) if r.expected is e) for e in (True, False)}
    bare_result.note = (f"{len(bare.get_policy()):,} p + {len(bare.get_grouping_policy()):,} g rules; p50 allowed "
                        f"{split[True][len(split[True]) // 2]:,.0f} µs (stops at the first match), denied "
                        f"{split[False][len(split[False]) // 2]:,.0f} µs (scans all)")
    results.append(bare_result)
    del bare
    gc.collect()

    # (d) FastEnforcer: policies indexed by (domain, object)
    t = time.perf_counter()
    fast_result = Result("d", "`casbin.FastEnforcer`, `cache_key_order=[1, 2]`, all scenes loaded")
    try:
        fast = casbin.FastEnforcer(str(SCENE_MODEL), adapter, cache_key_order=[1, 2])
        fast_result.setup_s = time.perf_counter() - t
        timed(fast_result, reqs, lambda r: fast.enforce(*args_of(r)))
        fast_result.note = "not thread-safe: the filter is state on the shared policy"
    except Exception as e:  # noqa: BLE001 - reported in the table
        fast_result.note = f"failed: {type(e).__name__}: {e}"
    results.append(fast_result)
    engine.dispose()
    info["work"] = str(work)
    return results, info


def ratio(x: float, base: float) -> str:
    if x == base:
        return "1"
    return f"{x / base:.2g} (1/{base / x:,.0f})" if x < base else f"{x / base:,.2f}"


def table(results: list[Result], info: dict, args: argparse.Namespace) -> str:
    base = next(r for r in results if r.name == "c")
    b50, b99 = base.pct(50), base.pct(99)
    lines = [
        "| method | requests | p50 µs | p99 µs | p50 ÷ (c) | p99 ÷ (c) | setup s | decisions as expected | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.name):
        if not r.micros:
            lines.append(f"| ({r.name}) {r.label} | 0 | – | – | – | – | – | – | {r.note} |")
            continue
        p50, p99 = r.pct(50), r.pct(99)
        setup = f"{r.setup_s:.1f}" if r.setup_s is not None else "–"
        ok = f"{r.agree}/{r.agree + r.disagree}"
        lines.append(f"| ({r.name}) {r.label} | {len(r.micros):,} | {p50:,.1f} | {p99:,.1f} | "
                     f"{ratio(p50, b50)} | {ratio(p99, b99)} | {setup} | {ok} | {r.note} |")
    return "\n".join(lines)


def append_results(block: str) -> None:
    """Append ``block`` under ``## casbin decisions`` (added at the end if the file's last heading
    is another one). Nothing above is rewritten."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n"
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    addition = "" if headings and headings[-1].strip() == HEADING else f"\n{HEADING}\n"
    with RESULTS.open("a", encoding="utf-8") as f:
        if not text.endswith("\n"):
            f.write("\n")
        f.write(addition + "\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=10_000)
    ap.add_argument("--datasets", type=int, default=100)
    ap.add_argument("--requests", type=int, default=2_000, help="requests for (a), (b), (d), on distinct scenes")
    ap.add_argument("--bare-requests", type=int, default=200, help="the first of them, timed on (c)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)
    if args.requests > args.scenes:
        ap.error("--requests must not exceed --scenes (each request touches a different scene)")
    args.bare_requests = min(args.bare_requests, args.requests)
    from importlib.metadata import version

    import casbin  # noqa: F401

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results, info = run(args)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    print(table(results, info, args))
    bad = [r for r in results if r.disagree]
    for r in bad:
        print(f"!! ({r.name}) {r.disagree} decision(s) differ from the expected ones", file=sys.stderr)
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/casbin_bench.py", *(sys.argv[1:] if argv is None else argv)])
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join([
        f"### {now}",
        "",
        f"Command: `{cmd}`. Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, casbin {version('casbin')}, casbin-sqlalchemy-adapter "
        f"{version('casbin_sqlalchemy_adapter')}, SQLAlchemy {version('sqlalchemy')}; SQLite metadata database.",
        f"{args.scenes:,} active scenes of {info['orgs']} tenants, {args.datasets} datasets × {len(FIELDS)} fields × "
        f"{len(USAGES)} usages, {info['p_rows']:,} `p` + {info['g_rows']:,} `g` rows in `casbin_rule` "
        f"(built and inserted in {info['build_s']:.1f} s). Requests each on a different scene, alternately allowed and "
        "denied; each decision timed alone (`perf_counter_ns`). (c) is timed on the first "
        f"{args.bare_requests} of the requests only (it scans every rule). Ratios: each method's p50 (p99) over (c)'s. "
        f"'setup' is loading every scene into one enforcer. The cold pass left {info['cache_mb']:.0f} MB more resident "
        f"for {args.requests:,} cached scene enforcers (~{info['cache_mb'] * 1024 / args.requests:.0f} KB each; "
        f"`SceneEnforcers` keeps at most 4,096). Load average (1 min) {load_before:.1f} before, {load_after:.1f} after; "
        f"whole run {wall:.0f} s.",
        "",
        table(results, info, args),
        "",
    ])
    if not args.no_append:
        append_results(block)
        print(f"\nappended to {os.path.relpath(RESULTS, Path.cwd())}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
