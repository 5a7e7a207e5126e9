"""Markdown and one self-contained HTML page from a `StoreReport`.

Both come from the same list of sections (tables, figures, paragraphs), so they never
disagree. The HTML has its CSS inline, its figures inline as base64 PNG, no script and no
external URL; every number is a relative link to the `result.json` it was read from
(paper figures link to the paper table copied beside the page).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

from . import plots
from .schema import StoreReport
from .tables import (
    Table, fairness_table, om_table, paper_table, problems_table, runs_table, track1_table, track2_models_table, track2_table,
    track3_table, track4_table, track5_table, track6_table, track7_table,
)

PROFILE_NOTES = {
    "quick": "quick: smoke-test settings (16 x 128 calibration tokens, 20 examples per task, 8 WikiText-2 windows of 512); comparable only with other quick runs, never with the paper",
    "paper": "paper: the paper's settings (128 x 2048 calibration tokens of C4, full datasets, WikiText-2 windows of 2048)",
}


@dataclass
class Figure:
    png: bytes
    alt: str


@dataclass
class Paragraph:
    text: str
    muted: bool = False


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list
    level: int = 2


def sections(report: StoreReport, with_figures: bool = True) -> list[Section]:
    out: list[Section] = []
    intro = [Paragraph(f"Profile{'s' if len(report.profiles) > 1 else ''} of these results: "
                       + "; ".join(PROFILE_NOTES.get(p, p) for p in report.profiles) + "." if report.profiles else "The store holds no results.")]
    intro.append(Paragraph(f"{report.n_runs} trusted runs in {len(report.groups)} comparison group(s) (one model under one profile each); "
                           f"{len(report.problems)} run(s) not scored. Built by {report.generator} from the result store alone: "
                           "every number links to the result.json it was read from. Do not edit; rebuild with `llmcbench report`.", muted=True))
    out.append(Section("summary", "Summary", intro))

    for i, g in enumerate(report.groups):
        head = f"{g.model} — profile {g.profile}" + (f" (the paper's {g.paper_model})" if g.paper_model else "")
        blocks: list = [Paragraph(f"model identity {g.model_identity}", muted=True), om_table(g)]
        if with_figures and (radar := plots.fig_radar(g)):
            blocks.append(Figure(radar, f"radar of the OMs per method, {g.model}"))
        blocks += [t for t in (track1_table(g), track2_table(g)) if t]
        blocks.append(track3_table(g))
        if with_figures:
            blocks.append(Figure(plots.fig_train(g), f"compression time vs peak memory per method, {g.model} (paper Fig. 2)"))
        blocks += [t for t in (track4_table(g),) if t]
        t5 = track5_table(g)
        blocks += [t5] if t5 else [Paragraph("Track 5 (hardware acceleration, Table 5 layout, Fig. 3): no deploy results in this store.", muted=True)]
        if with_figures and (f3 := plots.fig_tokens_per_s(g)):
            blocks.append(Figure(f3, f"decode tokens/s per library, {g.model} (paper Fig. 3)"))
        if with_figures and (f4 := plots.fig_trust(g)):
            blocks.append(Figure(f4, f"trustworthiness per method, {g.model} (paper Fig. 4)"))
        elif not any(m.track == 6 for c in g.cells for m in c.metrics):
            blocks.append(Paragraph("Track 6 (trustworthiness, Fig. 4): no results in this store.", muted=True))
        blocks += [t for t in (track6_table(g), track7_table(g)) if t]
        out.append(Section(f"group-{i + 1}", head, blocks))

    across = [t for p in report.profiles if (t := track2_models_table(report, p))]
    if across:
        out.append(Section("track2-models", "Track 2 across models", across))

    paper_blocks: list = [Paragraph(n) for n in report.paper_notes]
    table = paper_table(report)
    if table:
        paper_blocks.append(table)
    elif not report.paper_notes:
        paper_blocks.append(Paragraph("No results to compare."))
    out.append(Section("paper", "Compare with paper", paper_blocks))

    fair: list = []
    for g in report.groups:
        t = fairness_table(g)
        t.title = f"{g.model} — profile {g.profile}"
        fair.append(t)
    out.append(Section("fairness", "Fairness check", fair or [Paragraph("No results.")]))
    runs: list = [runs_table(report)]
    if (p := problems_table(report)):
        runs.append(p)
    out.append(Section("runs", "Runs", runs))
    return out


# ---------------------------------------------------------------- markdown


def _md_cell(c) -> str:
    text = c.text.replace("|", "\\|")
    return f"**⚠ {text}**" if c.flag else text


def _md_table(t: Table, level: int) -> list[str]:
    lines = [f"{'#' * level} {t.title}", ""]
    if t.note:
        lines += [f"_{t.note}_", ""]
    head = [("⚠ " if i in t.flagged_columns else "") + c for i, c in enumerate(t.columns)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return lines + [""]


def render_markdown(report: StoreReport) -> str:
    lines = ["# llmcbench report", ""]
    for s in sections(report, with_figures=False):
        lines += [f"{'#' * s.level} {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                lines += _md_table(b, s.level + 1)
            elif isinstance(b, Paragraph):
                lines += [f"_{b.text}_" if b.muted else b.text, ""]
    lines += ["Figures (compression cost, OM radar) are in report.html.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2f4f;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:6px 0 0;color:#c9d4ea;font-size:13px}
nav{padding:8px 32px;background:#e8ecf3;font-size:13px}nav a{margin-right:14px;color:#1d2f4f}
main{padding:8px 32px 40px;max-width:1500px}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:10px 20px 16px;margin:16px 0}
h2{font-size:18px;margin:8px 0 6px}h3{font-size:15px;margin:18px 0 4px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 4px}
th,td{border:1px solid #dde2ea;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f0f3f8;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
td a{color:#1a4fa0;text-decoration:none}td a:hover{text-decoration:underline}
td.flag,th.flag{background:#fde8e6;color:#9b1c12;font-weight:600}
p.note{font-size:12px;color:#5b6473;margin:2px 0 8px}p.muted{color:#5b6473;font-size:13px}
.profile{display:inline-block;background:#ffe8a3;color:#5a4300;border-radius:4px;padding:2px 8px;font-weight:600}
figure{margin:10px 0;display:inline-block;vertical-align:top}figcaption{font-size:12px;color:#5b6473}
.scroll{overflow-x:auto}
"""


def _html_cell(c, link_prefix: str, tag: str = "td") -> str:
    classes = [k for k, on in (("n", c.number), ("flag", c.flag)) if on]
    cls = f' class="{" ".join(classes)}"' if classes else ""
    text = html.escape(c.text)
    title = f' title="{html.escape(c.title)}"' if c.title else ""
    if c.source:
        text = f'<a href="{html.escape(link_prefix + c.source)}"{title}>{text}</a>'
    elif c.paper:
        text = f'<a href="paper/{html.escape(c.paper)}"{title}>{text}</a>'
    return f"<{tag}{cls}>{text}</{tag}>"


def _html_table(t: Table, link_prefix: str, level: int) -> str:
    out = [f"<h{level}>{html.escape(t.title)}</h{level}>"]
    if t.note:
        out.append(f'<p class="note">{html.escape(t.note)}</p>')
    flag = ' class="flag"'
    head = "".join(f"<th{flag if i in t.flagged_columns else ''}>{html.escape(c)}</th>" for i, c in enumerate(t.columns))
    body = "".join("<tr>" + "".join(_html_cell(c, link_prefix) for c in row) + "</tr>" for row in t.rows)
    out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    return "\n".join(out)


def render_html(report: StoreReport, link_prefix: str) -> str:
    """`link_prefix`: the store root relative to the page's folder, ending in '/' (or '')."""
    secs = sections(report, with_figures=True)
    profiles = " ".join(f'<span class="profile">profile {html.escape(p)}</span>' for p in report.profiles)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>llmcbench report</title>", f"<style>{CSS}</style></head><body>",
        f"<header><h1>llmcbench report</h1><p>{profiles} &nbsp; {len(report.groups)} comparison group(s), "
        f"{report.n_runs} runs &nbsp;·&nbsp; {html.escape(report.generator)}</p></header>",
        "<nav>" + "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in secs) + "</nav>", "<main>",
    ]
    for s in secs:
        parts.append(f'<section id="{s.anchor}"><h{s.level}>{html.escape(s.title)}</h{s.level}>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b, link_prefix, s.level + 1))
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode()
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">'
                             f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
            elif isinstance(b, Paragraph):
                parts.append(f'<p class="{"muted" if b.muted else ""}">{html.escape(b.text)}</p>')
        parts.append("</section>")
    parts += ["</main></body></html>", ""]
    return "\n".join(parts)
