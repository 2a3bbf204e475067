"""Inline SVG plots, written by hand: the report must open offline from one file, with no script.

Every function returns one `<svg>` element as a string, with a `<title>` (what a screen reader and
a test read) and `class="plot plot-KIND"`. Text is escaped; numbers are formatted here.
"""

from __future__ import annotations

import math
from html import escape

W, H = 420, 300
PAD_L, PAD_R, PAD_T, PAD_B = 52, 16, 28, 44
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d")


def _open(kind: str, title: str, w: int = W, h: int = H) -> list[str]:
    return [f'<svg class="plot plot-{kind}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">',
            f"<title>{escape(title)}</title>",
            f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
            f'<text x="{w / 2:.0f}" y="17" text-anchor="middle" font-size="13" font-weight="600">'
            f"{escape(title)}</text>"]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _nice_top(n: int) -> int:
    """A count axis' top: n itself up to 5, else the next multiple of 5 (whole-number ticks)."""
    return n if n <= 5 else -(-n // 5) * 5


def _axes(out: list[str], x0: float, x1: float, y0: float, y1: float, xlabel: str, ylabel: str,
          w: int = W, h: int = H, ticks: int = 5, xnumbers: bool = True) -> None:
    """Axes with `ticks` ticks over [x0, x1] × [y0, y1] and their labels."""
    pw, ph = w - PAD_L - PAD_R, h - PAD_T - PAD_B
    out.append(f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" stroke="#333"/>')
    out.append(f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" stroke="#333"/>')
    for i in range(ticks + 1):
        fx, fy = PAD_L + pw * i / ticks, PAD_T + ph - ph * i / ticks
        xv, yv = x0 + (x1 - x0) * i / ticks, y0 + (y1 - y0) * i / ticks
        if xnumbers:
            out.append(f'<line x1="{fx:.1f}" y1="{PAD_T + ph}" x2="{fx:.1f}" y2="{PAD_T + ph + 4}" stroke="#333"/>')
            out.append(f'<text x="{fx:.1f}" y="{PAD_T + ph + 16}" text-anchor="middle" font-size="10">'
                       f"{_fmt(xv)}</text>")
        out.append(f'<line x1="{PAD_L - 4}" y1="{fy:.1f}" x2="{PAD_L + pw}" y2="{fy:.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{fy + 3:.1f}" text-anchor="end" font-size="10">{_fmt(yv)}</text>')
    out.append(f'<text x="{PAD_L + pw / 2:.0f}" y="{h - 8}" text-anchor="middle" font-size="11">'
               f"{escape(xlabel)}</text>")
    out.append(f'<text x="14" y="{PAD_T + ph / 2:.0f}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {PAD_T + ph / 2:.0f})">{escape(ylabel)}</text>')


def roc(points: list[tuple[float, float]], title: str, marked: tuple[float, float] | None = None,
        mark_label: str = "") -> str:
    """FPR (x) against recall (y), both 0..1, from the sweep's points; the chance diagonal dashed,
    `marked` circled (the threshold meeting the target FPR)."""
    out = _open("roc", title)
    _axes(out, 0, 1, 0, 1, "false-positive rate", "recall")
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def xy(fpr: float, rec: float) -> tuple[float, float]:
        return PAD_L + pw * fpr, PAD_T + ph - ph * rec

    (ax, ay), (bx, by) = xy(0, 0), xy(1, 1)
    out.append(f'<line x1="{ax}" y1="{ay}" x2="{bx}" y2="{by}" stroke="#9ca3af" stroke-dasharray="4 4"/>')
    pts = sorted({(0.0, 0.0), *points, (1.0, 1.0)} if points else set())
    if pts:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(f, r) for f, r in pts))
        out.append(f'<polyline class="curve" points="{path}" fill="none" stroke="{COLORS[0]}" stroke-width="2"/>')
        for f, r in points:
            x, y = xy(f, r)
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{COLORS[0]}"/>')
    if marked is not None:
        x, y = xy(*marked)
        out.append(f'<circle class="marked" cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="{COLORS[1]}" '
                   'stroke-width="2"/>')
        if mark_label:
            anchor = "end" if x > W / 2 else "start"
            dx = -10 if anchor == "end" else 10
            out.append(f'<text x="{x + dx:.1f}" y="{y + 14:.1f}" text-anchor="{anchor}" font-size="10" '
                       f'fill="{COLORS[1]}">{escape(mark_label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def histogram(values: list[float], title: str, xlabel: str, bins: int = 20) -> str:
    """Counts of `values` in `bins` equal-width bins (a single value: one bin)."""
    out = _open("histogram", title)
    if not values:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="12">no data</text></svg>')
        return "\n".join(out)
    lo, hi = min(values), max(values)
    if hi == lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    top = _nice_top(max(counts))
    _axes(out, lo, hi, 0, top, xlabel, "count", ticks=min(5, top))
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    bw = pw / bins
    for i, c in enumerate(counts):
        if c:
            bh = ph * c / top
            out.append(f'<rect class="bar" x="{PAD_L + i * bw + 1:.1f}" y="{PAD_T + ph - bh:.1f}" '
                       f'width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" fill="{COLORS[0]}"><title>{c}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)


def confusion(tp: int, fp: int, tn: int, fn: int, title: str) -> str:
    """The 2×2 matrix (rows: label unsafe/safe; columns: flagged/passed), shaded by share of its row."""
    w, h = 240, 190
    out = _open("confusion", title, w, h)
    x0, y0, cw, ch = 80, 50, 72, 56
    out.append(f'<text x="{x0 + cw / 2}" y="{y0 - 8}" text-anchor="middle" font-size="11">flagged</text>')
    out.append(f'<text x="{x0 + cw * 1.5}" y="{y0 - 8}" text-anchor="middle" font-size="11">passed</text>')
    rows = (("unsafe", ((tp, "TP", "#16a34a"), (fn, "FN", "#dc2626"))),
            ("safe", ((fp, "FP", "#dc2626"), (tn, "TN", "#16a34a"))))
    for r, (label, cells) in enumerate(rows):
        y = y0 + r * ch
        out.append(f'<text x="{x0 - 8}" y="{y + ch / 2 + 4}" text-anchor="end" font-size="11">{label}</text>')
        total = sum(c[0] for c in cells) or 1
        for c, (n, name, color) in enumerate(cells):
            x = x0 + c * cw
            op = 0.12 + 0.78 * n / total
            out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{color}" '
                       f'fill-opacity="{op:.2f}" stroke="#fff" stroke-width="2"/>')
            out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 - 2}" text-anchor="middle" font-size="15" '
                       f'font-weight="600">{n}</text>')
            out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 13}" text-anchor="middle" '
                       f'font-size="10">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars(items: list[tuple[str, float]], title: str, xlabel: str = "count") -> str:
    """Horizontal bars, one per (label, value), in the given order."""
    row = 22
    h = PAD_T + 20 + row * max(len(items), 1) + 30
    w = W + 80
    out = _open("bars", title, w, h)
    if not items:
        out.append(f'<text x="{w / 2}" y="{h / 2 + 8}" text-anchor="middle" font-size="12">nothing</text></svg>')
        return "\n".join(out)
    left = 170
    top = max(v for _, v in items) or 1
    span = w - left - 60
    for i, (label, v) in enumerate(items):
        y = PAD_T + 12 + i * row
        bw = span * v / top
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" font-size="11">{escape(label[:28])}</text>')
        out.append(f'<rect class="bar" x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row - 6}" '
                   f'fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{left + bw + 4:.1f}" y="{y + 14}" font-size="11">{_fmt(v)}</text>')
    out.append(f'<text x="{left + span / 2:.0f}" y="{h - 8}" text-anchor="middle" font-size="11">'
               f"{escape(xlabel)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def timeline(buckets: list[tuple[str, int, int]], title: str) -> str:
    """Requests per time bucket (grey) with the ones the policy would have acted on (red) in front.
    `buckets` is (label, total, flagged), in time order."""
    w = max(W, min(1000, 40 + 14 * len(buckets))) + 100
    out = _open("timeline", title, w, H)
    if not buckets:
        out.append(f'<text x="{w / 2}" y="{H / 2}" text-anchor="middle" font-size="12">no records</text></svg>')
        return "\n".join(out)
    top = _nice_top(max(t for _, t, _ in buckets) or 1)
    _axes(out, 0, len(buckets), 0, top, "time", "requests", w=w, ticks=min(5, top),
          xnumbers=False)
    pw, ph = w - PAD_L - PAD_R, H - PAD_T - PAD_B
    bw = pw / len(buckets)
    step = max(1, math.ceil(len(buckets) / 6))
    for i, (label, total, flagged) in enumerate(buckets):
        x = PAD_L + i * bw
        for n, color, cls in ((total, "#cbd5e1", "total"), (flagged, COLORS[1], "flagged")):
            if n:
                bh = ph * n / top
                out.append(f'<rect class="bar {cls}" x="{x + 1:.1f}" y="{PAD_T + ph - bh:.1f}" '
                           f'width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" fill="{color}">'
                           f"<title>{escape(label)}: {flagged}/{total}</title></rect>")
        if i % step == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{PAD_T + ph + 14}" text-anchor="middle" '
                       f'font-size="9">{escape(label)}</text>')
    lx = w - PAD_R - 150
    out.append(f'<rect x="{lx}" y="{PAD_T}" width="10" height="10" fill="#cbd5e1"/>'
               f'<text x="{lx + 14}" y="{PAD_T + 9}" font-size="10">requests</text>')
    out.append(f'<rect x="{lx + 70}" y="{PAD_T}" width="10" height="10" fill="{COLORS[1]}"/>'
               f'<text x="{lx + 84}" y="{PAD_T + 9}" font-size="10">would act</text>')
    out.append("</svg>")
    return "\n".join(out)
