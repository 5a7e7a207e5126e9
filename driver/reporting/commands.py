"""The reporting verbs of the CLI: `report`, `bundle`, `verify`.

Added to the main app by `register(app)` (one line at the end of driver/cli.py), so this
module never imports the CLI module: the same errors as there, one red line with the fix,
a traceback with `--verbose`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..consoles import console, err_console, print_error
from ..fsio import file_in_the_way, not_there


def _fail(ctx: typer.Context, message: str, code: int = 2) -> None:
    if ctx.find_root().params.get("verbose"):
        err_console.print_exception()
    print_error(message)
    raise typer.Exit(code)


def _store(ctx: typer.Context, positional: Optional[Path], option: Optional[Path]) -> Path:
    """The store, as the other verbs take it (`--runs-dir`) or as an argument; runs/ by default."""
    if positional is not None and option is not None and positional != option:
        _fail(ctx, f"two stores given ({positional} and --runs-dir {option}): pass one")
    return positional or option or Path("runs")


RUNS_DIR_ARGUMENT = typer.Argument(None, metavar="RUNS_DIR", show_default=False,
                                   help="the result store: the --runs-dir of your benches (default runs/; also --runs-dir)")
RUNS_DIR_OPTION = typer.Option(None, "--runs-dir", show_default=False, help="the result store, as bench and matrix take it")


def report(
    ctx: typer.Context,
    runs_dir_arg: Optional[Path] = RUNS_DIR_ARGUMENT,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="where to write report.html, report.md, report.json (default: RUNS_DIR/report)"),
    screenshot: Optional[Path] = typer.Option(None, "--screenshot", help="also save a PNG of the page (needs chromium)"),
    runs_dir_opt: Optional[Path] = RUNS_DIR_OPTION,
):
    """Build the store's report: markdown + one self-contained HTML page, every number linked to its result.json.

    The paper's table layouts, OMs per track, plots, compare-with-paper and the fairness check,
    built from the store alone.
    """
    from rich.table import Table

    from .write import write_store_report

    runs_dir = _store(ctx, runs_dir_arg, runs_dir_opt)
    if why := not_there(runs_dir):
        _fail(ctx, f"store {runs_dir} {why}: pass the --runs-dir of your benches (default runs/)")
    out = out_dir or runs_dir / "report"
    if screenshot is not None:  # said before the report is written, not after
        if screenshot.is_dir():
            _fail(ctx, f"--screenshot {screenshot} is a folder: name the PNG file to write")
        if above := file_in_the_way(screenshot):
            _fail(ctx, f"--screenshot {screenshot} cannot be written: {above} is a file")
    try:
        rep = write_store_report(runs_dir, out)
    except (OSError, ValueError) as e:
        _fail(ctx, f"cannot build the report of {runs_dir}: {e}")
    if rep.n_runs == 0:
        console.print(f"[yellow]the store {runs_dir} holds no trusted result yet[/yellow]: the report says so")
    for g in rep.groups:
        t = Table(title=f"{g.model} — profile {g.profile}")
        oms = [o for o in ("om_ka", "om_ia", "om_perf", "om_train", "om_inf", "om_hard", "om_trust") if any(x.om == o for c in g.cells for x in c.oms)]
        for col in ["method", "setting", *oms]:
            t.add_column(col, justify="left" if col in ("method", "setting") else "right")
        for c in g.cells:
            values = {o.om: f"{o.value:.2f}" for o in c.oms}
            t.add_row(c.method, c.setting, *[values.get(o, "-") for o in oms])
        console.print(t)
        if g.fairness_flags:
            console.print(f"[yellow]fairness:[/yellow] differs between methods: {', '.join(g.fairness_flags)}")
    for p in rep.problems:
        console.print(f"[yellow]not scored[/yellow] {escape(f'{p.path}: {p.status}: {p.message}')}", soft_wrap=True)
    if screenshot:
        from .browser import screenshot as take

        try:
            take(out / "report.html", screenshot)
        except (FileNotFoundError, RuntimeError, OSError) as e:
            _fail(ctx, f"screenshot: {e}")
        console.print(f"screenshot: {screenshot}")
    console.print(f"report: {out / 'report.html'}  {out / 'report.md'}  (profiles: {', '.join(rep.profiles) or 'none'})", soft_wrap=True)


def bundle(
    ctx: typer.Context,
    runs_dir_arg: Optional[Path] = RUNS_DIR_ARGUMENT,
    out: Path = typer.Option(Path("bundle.tar.gz"), "--out", "-o", help="the bundle to write"),
    runs_dir_opt: Optional[Path] = RUNS_DIR_OPTION,
):
    """Pack results, provenance, the report, a sha256 manifest and reproduce.sh for a reviewer."""
    from .bundle import BundleError, make_bundle

    try:
        digest, warnings, n = make_bundle(_store(ctx, runs_dir_arg, runs_dir_opt), out)
    except BundleError as e:
        _fail(ctx, str(e))
    except OSError as e:  # the bundle cannot be written there (permissions, a full disk): nothing half-written
        _fail(ctx, f"cannot write the bundle {out}: {e.strerror or e}")
    for w in warnings:
        console.print(f"[yellow]{escape(w)}[/yellow]", soft_wrap=True)
    console.print(f"bundle: {out} ({n} runs)\ndigest: {digest}  (sha256 of its MANIFEST.sha256; check with "
                  f"`llmcbench verify {out} --expect-digest {digest}`: the whole digest, which verify compares exactly)", soft_wrap=True)


def verify(
    ctx: typer.Context,
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="a bundle written by `llmcbench bundle`"),
    expect_digest: Optional[str] = typer.Option(None, "--expect-digest", help="the digest the bundle's author published"),
):
    """Re-check a bundle's hashes and seals and re-score it from its raw results; one line per problem."""
    from .bundle import BundleError, verify_bundle

    if expect_digest is not None and not re.fullmatch(r"[0-9a-f]{64}", expect_digest.strip().lower()):
        _fail(ctx, f"--expect-digest {expect_digest!r} is not a sha256 digest: give the 64 hex digits `llmcbench bundle` printed")
    try:
        problems, summary = verify_bundle(bundle_path, expect_digest)
    except BundleError as e:
        _fail(ctx, str(e))
    for p in problems:
        err_console.print(f"[red]FAIL[/red] {escape(p)}", soft_wrap=True)
    if problems:
        err_console.print(f"[bold red]{len(problems)} problem(s)[/bold red] in {bundle_path}")
        raise typer.Exit(1)
    console.print(f"ok: {summary['files']} files match the manifest, {summary['results']} results sealed, "
                  f"{summary['oms']} OMs re-scored identical; digest {summary['digest']}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(report)
    app.command()(bundle)
    app.command()(verify)
