"""The report files of a store: report.json, report.md, report.html and the paper tables they cite."""

from __future__ import annotations

import os
from pathlib import Path

from ...tracks.scoring import PAPER_TABLES
from ..fsio import write_atomic
from .build import build_store_report
from .render import render_html, render_markdown
from .schema import StoreReport

REPORT_FILES = ("report.html", "report.md", "report.json")


def link_prefix(runs_dir: Path, out_dir: Path) -> str:
    rel = Path(os.path.relpath(Path(runs_dir).resolve(), Path(out_dir).resolve())).as_posix()
    return "" if rel == "." else rel + "/"


def write_store_report(runs_dir: Path, out_dir: Path) -> StoreReport:
    """Build the report of `runs_dir` into `out_dir`: report.json, report.md, report.html and
    a copy of the paper tables its paper figures link to. Every file is written atomically."""
    report = build_store_report(runs_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for table in PAPER_TABLES.values():
        write_atomic(out_dir / "paper" / table.name, table.read_bytes())
    write_atomic(out_dir / "report.json", report.model_dump_json(indent=2) + "\n")
    write_atomic(out_dir / "report.md", render_markdown(report))
    write_atomic(out_dir / "report.html", render_html(report, link_prefix(runs_dir, out_dir)))
    for path in [out_dir / name for name in REPORT_FILES] + [out_dir / "paper" / t.name for t in PAPER_TABLES.values()]:
        path.chmod(0o644)  # pages to be read and served, not private temp files
    return report

