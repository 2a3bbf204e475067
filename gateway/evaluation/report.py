"""One self-contained HTML page: inline CSS, inline SVG, no script, no external reference, so the
report opens from a CI artifact or an e-mail attachment with no network.

`Page` collects sections (a heading, then tables and plots); `eval_report` and
`audit_report.audit_page` fill one from a summary. Tables carry `data-table="NAME"` and plots
`class="plot plot-KIND"`, which the tests read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any

from gateway.evaluation import svg

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;color:#111;
background:#f8fafc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #cbd5e1;
padding-bottom:4px}h3{font-size:14px;margin:16px 0 6px}
.meta{color:#475569;font-size:13px;margin-bottom:12px}
table{border-collapse:collapse;font-size:12px;background:#fff;margin:6px 0 12px}
th,td{border:1px solid #cbd5e1;padding:3px 8px;text-align:right}th{background:#e2e8f0}
td.l,th.l{text-align:left}tr.total td{font-weight:600;background:#f1f5f9}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots svg{border:1px solid #cbd5e1;background:#fff}
.fail{color:#b91c1c;font-weight:600}.ok{color:#15803d;font-weight:600}
.note{color:#475569;font-size:12px;max-width:900px}
"""


def fmt(v: Any, digits: int = 3) -> str:
    """A cell: rates as 0.xxx, latencies with 2 decimals, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(name: str, headers: list[str], rows: list[list[Any]], left: int = 1,
          total_rows: frozenset[int] = frozenset()) -> str:
    """An HTML table; the first `left` columns are text (left-aligned), the rest figures."""
    cls = [' class="l"' if i < left else "" for i in range(len(headers))]
    out = [f'<table data-table="{escape(name)}">', "<thead><tr>"]
    out += [f"<th{cls[i]}>{escape(h)}</th>" for i, h in enumerate(headers)]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        out.append('<tr class="total">' if k in total_rows else "<tr>")
        out += [f"<td{cls[i]}>{escape(fmt(c))}</td>" for i, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


@dataclass
class Page:
    title: str
    meta: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    def section(self, heading: str, note: str = "") -> None:
        self.parts.append(f"<h2>{escape(heading)}</h2>")
        if note:
            self.parts.append(f'<p class="note">{escape(note)}</p>')

    def sub(self, heading: str) -> None:
        self.parts.append(f"<h3>{escape(heading)}</h3>")

    def add(self, html: str) -> None:
        self.parts.append(html)

    def plots(self, svgs: list[str]) -> None:
        self.parts.append('<div class="plots">' + "".join(svgs) + "</div>")

    def html(self) -> str:
        meta = "".join(f"<div>{escape(m)}</div>" for m in self.meta)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{escape(self.title)}</title><style>{CSS}</style></head><body>"
                f"<h1>{escape(self.title)}</h1><div class=\"meta\">{meta}</div>"
                + "\n".join(self.parts) + "</body></html>\n")


METRIC_HEADERS = ["n", "TP", "FP", "TN", "FN", "errors", "recall", "FPR", "precision", "p50 ms", "p99 ms"]


def metric_cells(d: dict[str, Any]) -> list[Any]:
    return [d["n"], d["tp"], d["fp"], d["tn"], d["fn"], d["errors"], d["recall"], d["fpr"], d["precision"],
            d["p50_ms"], d["p99_ms"]]


def eval_report(s: dict[str, Any], gates: list[dict[str, Any]] | None = None) -> str:
    """The `guardgate eval` report from its summary (and gate results)."""
    p = Page(f"Guardgate evaluation: policy {s['policy']}")
    p.meta += run_meta(s)
    if gates:
        p.section("Gates")
        p.add(table("gates", ["gate", "value", "result"],
                    [[g["gate"], g["value"], "FAIL" if g["failed"] else "ok"] for g in gates]))
    eval_sections(p, s)
    return p.html()


def run_meta(s: dict[str, Any]) -> list[str]:
    return [f"dataset {s['dataset']}: {s['records']} records ({s['unsafe']} unsafe, {s['safe']} safe)",
            f"responses {'replayed as a stream' if s['stream'] else 'checked one-shot'}; a record counts as "
            f"caught when the policy would {' or '.join(s['positive_actions'])} it"
            + (f"; sent through {s['via']}" if s.get("via") else "")]


def eval_sections(p: Page, s: dict[str, Any], prefix: str = "", title: str = "") -> None:
    """One run's sections (policy, steps, categories, confusion, sweep, latency). `prefix` keeps table
    names unique when several runs share a page; `title` leads each heading."""
    lead = f"{title}: " if title else ""
    p.section(f"{lead}Policy", "Every record; TP = unsafe and caught, FP = safe and caught. Latency is the whole "
                               "policy run of one record" + (" (the request's round trip)." if s.get("via") else "."))
    p.add(table(f"{prefix}policy", ["policy", *METRIC_HEADERS], [[s["policy"], *metric_cells(s["overall"])]]))
    if s["steps"]:
        p.section(f"{lead}Steps", "Each step over the records it judged: safe ones, and unsafe ones that expect "
                                  "this step or name none. Latency is the step's total per record (all its checks).")
        p.add(table(f"{prefix}steps", ["step", "stage", "guard", "not run", *METRIC_HEADERS],
                    [[st["step"], st["stage"], st["guard"], st["not_run"], *metric_cells(st)] for st in s["steps"]],
                    left=3))
    p.section(f"{lead}Categories", "The policy's figures per category of the dataset; below, each step's.")
    p.add(table(f"{prefix}categories", ["category", *METRIC_HEADERS],
                [[c, *metric_cells(d)] for c, d in s["categories"].items()]))
    rows = [[st["step"], c, *metric_cells(d)] for st in s["steps"] for c, d in st["categories"].items()]
    if rows or not prefix:
        p.add(table(f"{prefix}step-categories", ["step", "category", *METRIC_HEADERS], rows, left=2))
    p.section(f"{lead}Confusion per category")
    p.plots([svg.confusion(s["overall"]["tp"], s["overall"]["fp"], s["overall"]["tn"], s["overall"]["fn"],
                           "all records")]
            + [svg.confusion(d["tp"], d["fp"], d["tn"], d["fn"], c) for c, d in s["categories"].items()])
    p.section(f"{lead}Threshold sweep", f"Scored steps: recall and false-positive rate when flagging at score >= "
                                        f"threshold. Circled: the lowest threshold with FPR <= {s['target_fpr']}.")
    if not s["sweeps"]:
        p.add('<p class="note">No scored step (Prompt Guard, Llama Guard) in this policy'
              + (" (a --via run sees no scores)" if s.get("via") else "") + ".</p>")
    for sw in s["sweeps"]:
        at = sw["at_target"]
        p.sub(f"{sw['step']} ({sw['guard']}), configured threshold {fmt(sw['threshold'])}")
        pts = [(pt["fpr"], pt["recall"]) for pt in sw["points"] if pt["fpr"] is not None and pt["recall"] is not None]
        marked = None if at is None or at["fpr"] is None or at["recall"] is None else (at["fpr"], at["recall"])
        label = "" if at is None else f"t={fmt(at['threshold'])}"
        p.plots([svg.roc(pts, f"ROC: {sw['step']}", marked, label)])
        judged = next((st for st in s["steps"] if st["step"] == sw["step"]), {"n": 1, "errors": 0})
        if judged["n"] == 0:
            p.add(f'<p class="note">{escape(sw["step"])} judged no record ({judged["errors"]} errors): '
                  "nothing to sweep.</p>")
        elif at is None:
            p.add(f'<p class="note">No false-positive rate to meet: no safe records for {escape(sw["step"])}.</p>')
        else:
            p.add(f'<p class="note">At FPR <= {sw["target_fpr"]}: threshold {fmt(at["threshold"])} '
                  f'(none: flag nothing), recall {fmt(at["recall"])}, FPR {fmt(at["fpr"])}.</p>')
        p.add(table(f"{prefix}sweep-{sw['step']}", ["threshold", "TP", "FP", "TN", "FN", "recall", "FPR", "precision"],
                    [[pt["threshold"] if pt["threshold"] is not None else "above all", pt["tp"], pt["fp"], pt["tn"],
                      pt["fn"], pt["recall"], pt["fpr"], pt["precision"]] for pt in sw["points"]]))
    p.section(f"{lead}Latency")
    lat = s["latencies_ms"]
    p.plots([svg.histogram(lat["policy"], "policy run per record", "ms")]
            + [svg.histogram(v, f"step {k}", "ms") for k, v in lat.items() if k != "policy"])
