"""Pictures drawn on the server as inline SVG (no script, no external file): the resource map, the
audit timeline, a result's lineage graph and the budget gauge. Every text is escaped; only metadata
is ever drawn (names, codes, counts, ids), never a cell."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from markupsafe import Markup, escape

FONT = "font-family=\"Noto Sans CJK SC, WenQuanYi Micro Hei, sans-serif\""


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class Node:
    key: str
    label: str
    sub: str = ""
    href: str | None = None
    tone: str = "n"       # n (neutral) | ok | warn | bad | dim


@dataclass
class Graph:
    columns: list[tuple[str, list[Node]]] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


TONES = {"n": ("#eef3fb", "#4a6fa5"), "ok": ("#e8f6ec", "#2e7d4f"), "warn": ("#fff5e0", "#b7791f"),
         "bad": ("#fdecec", "#c0392b"), "dim": ("#f2f2f2", "#888888")}


def columns_graph(g: Graph, title: str, box_w: int = 190, box_h: int = 42, gap_x: int = 70, gap_y: int = 14) -> Markup:
    """Nodes in columns, left to right, edges as curves between them."""
    top = 34
    height = top + max((len(nodes) for _, nodes in g.columns), default=1) * (box_h + gap_y) + 10
    width = len(g.columns) * (box_w + gap_x) - gap_x + 20
    pos: dict[str, tuple[float, float]] = {}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart graph" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" {FONT} font-size="12">',
             f"<title>{escape(title)}</title>",
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#7a8aa0"/></marker></defs>']
    for ci, (heading, nodes) in enumerate(g.columns):
        x = 10 + ci * (box_w + gap_x)
        parts.append(f'<text x="{x}" y="18" font-weight="bold" fill="#333">{escape(heading)}</text>')
        for ni, n in enumerate(nodes):
            y = top + ni * (box_h + gap_y)
            pos[n.key] = (x, y)
    for a, b in g.edges:
        if a not in pos or b not in pos:
            continue
        (x1, y1), (x2, y2) = pos[a], pos[b]
        sx, sy, ex, ey = x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2
        mx = (sx + ex) / 2
        parts.append(f'<path d="M{sx:.0f},{sy:.0f} C{mx:.0f},{sy:.0f} {mx:.0f},{ey:.0f} {ex - 2:.0f},{ey:.0f}" '
                     'fill="none" stroke="#7a8aa0" stroke-width="1.3" marker-end="url(#arrow)"/>')
    for _, nodes in g.columns:
        for n in nodes:
            x, y = pos[n.key]
            fill, stroke = TONES.get(n.tone, TONES["n"])
            box = (f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{fill}" stroke="{stroke}"/>'
                   f'<text x="{x + 8}" y="{y + 17}" fill="#1d2733">{escape(_clip(n.label, 26))}</text>')
            if n.sub:
                box += f'<text x="{x + 8}" y="{y + 33}" fill="#555" font-size="11">{escape(_clip(n.sub, 30))}</text>'
            title = f"<title>{escape(n.label)}{' — ' + escape(n.sub) if n.sub else ''}</title>"
            if n.href:
                parts.append(f'<a href="{escape(n.href)}" class="node" data-node="{escape(n.key)}">{title}{box}</a>')
            else:
                parts.append(f'<g class="node" data-node="{escape(n.key)}">{title}{box}</g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def timeline(times_and_decisions: Sequence[tuple[datetime, str]], title: str, allow_label: str, deny_label: str,
             width: int = 900, height: int = 190) -> Markup:
    """Stacked bars of events per bucket (allowed below, denied/error on top); the bucket (minute,
    hour or day) follows the span of the events shown."""
    pad_l, pad_b, pad_t = 40, 34, 26
    if not times_and_decisions:
        return Markup(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart timeline" role="img" width="{width}" '
                      f'height="40" {FONT} font-size="12"><title>{escape(title)}</title>'
                      f'<text x="10" y="24" fill="#666">—</text></svg>')
    times = [t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC) for t, _ in times_and_decisions]
    lo, hi = min(times), max(times)
    span = hi - lo
    if span <= timedelta(hours=3):
        step, fmt = timedelta(minutes=1), "%H:%M"
    elif span <= timedelta(days=4):
        step, fmt = timedelta(hours=1), "%m-%d %H:00"
    else:
        step, fmt = timedelta(days=1), "%Y-%m-%d"

    def bucket(t: datetime) -> datetime:
        if step == timedelta(minutes=1):
            return t.replace(second=0, microsecond=0)
        if step == timedelta(hours=1):
            return t.replace(minute=0, second=0, microsecond=0)
        return t.replace(hour=0, minute=0, second=0, microsecond=0)

    allow: Counter = Counter()
    deny: Counter = Counter()
    for t, (_, decision) in zip(times, times_and_decisions, strict=True):
        (allow if decision == "allow" else deny)[bucket(t)] += 1
    start, end = bucket(lo), bucket(hi)
    start = min(start, end - step * 23)     # at least 24 bars: a lone burst is not one wall of colour
    buckets = []
    b = start
    while b <= end and len(buckets) < 400:
        buckets.append(b)
        b += step
    peak = max((allow[b] + deny[b] for b in buckets), default=1) or 1
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    bw = plot_w / len(buckets)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart timeline" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" {FONT} font-size="11">', f"<title>{escape(title)}</title>",
             f'<rect x="{pad_l}" y="8" width="10" height="10" fill="#4a8fd6"/>'
             f'<text x="{pad_l + 14}" y="17">{escape(allow_label)}</text>'
             f'<rect x="{pad_l + 110}" y="8" width="10" height="10" fill="#d64a4a"/>'
             f'<text x="{pad_l + 124}" y="17">{escape(deny_label)}</text>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#999"/>',
             f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{peak}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end">0</text>']
    for i, b in enumerate(buckets):
        x = pad_l + i * bw
        a, d = allow[b], deny[b]
        ha, hd = plot_h * a / peak, plot_h * d / peak
        label = f"{b.strftime(fmt)} UTC: {a} {allow_label}, {d} {deny_label}"
        parts.append(f'<g class="bucket"><title>{escape(label)}</title>')
        if a:
            parts.append(f'<rect class="allow" x="{x + 0.5:.1f}" y="{pad_t + plot_h - ha:.1f}" width="{max(bw - 1, 1):.1f}" '
                         f'height="{ha:.1f}" fill="#4a8fd6"/>')
        if d:
            parts.append(f'<rect class="deny" x="{x + 0.5:.1f}" y="{pad_t + plot_h - ha - hd:.1f}" '
                         f'width="{max(bw - 1, 1):.1f}" height="{hd:.1f}" fill="#d64a4a"/>')
        parts.append("</g>")
    ticks = min(len(buckets), 6)
    for k in range(ticks):
        i = round(k * (len(buckets) - 1) / max(ticks - 1, 1))
        x = pad_l + i * bw + bw / 2
        parts.append(f'<text x="{x:.0f}" y="{pad_t + plot_h + 16}" text-anchor="middle" fill="#444">'
                     f'{escape(buckets[i].strftime(fmt))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def gauge(spent: float, total: float, label_spent: str, label_left: str, width: int = 320) -> Markup:
    """A budget bar: spent (filled) and left, with both numbers written out."""
    frac = 0.0 if total <= 0 else min(max(spent / total, 0.0), 1.0)
    tone = "#2e7d4f" if frac < 0.7 else ("#b7791f" if frac < 0.9 else "#c0392b")
    w = width - 2
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart gauge" role="img" width="{width}" height="44" '
        f'viewBox="0 0 {width} 44" {FONT} font-size="12"><title>{escape(label_spent)} / {escape(label_left)}</title>'
        f'<rect x="1" y="4" width="{w}" height="16" rx="4" fill="#e9edf2" stroke="#b8c2cc"/>'
        f'<rect class="spent" x="1" y="4" width="{w * frac:.1f}" height="16" rx="4" fill="{tone}"/>'
        f'<text x="1" y="38" fill="#333">{escape(label_spent)}</text>'
        f'<text x="{width - 1}" y="38" text-anchor="end" fill="#333">{escape(label_left)}</text></svg>')
