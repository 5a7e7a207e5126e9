"""The `llmcbench` command line: verbs for the workflow, one sub-app per noun (STYLE.md).

Errors are one red line with the fix and a non-zero exit; `--verbose` shows the traceback.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .consoles import console, err_console, print_error
from .errors import JobFailed, UserError
from .fsio import not_there

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark harness for LLM compression methods (LLMCBench).")
methods_app = typer.Typer(no_args_is_help=True, help="The compression methods this harness knows.")
app.add_typer(methods_app, name="methods")
_state = {"verbose": False}

# The options every verb that runs jobs takes, worded once (bench, deploy and parity said
# different things of the same --data-dir and --model)
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="registry name (`llmcbench models list`), HF model dir or hub id (default: embedded SmolLM2-135M)")]
RunsDirOption = Annotated[Path, typer.Option("--runs-dir", help="the result store")]
DataDirOption = Annotated[Optional[str], typer.Option(
    "--data-dir", help="local data dir (hf/<hub id, / as __>/<config>/<split>.jsonl); default: hub when online, else the shipped slices")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")]
TrustRemoteCodeOption = Annotated[bool, typer.Option(
    "--trust-remote-code", help="allow a model that runs its own modelling code from the hub (ChatGLM); off by default")]
# bench and its steps (compress, eval) take the same cell options: the same jobs, the same cache
PresetOption = Annotated[Optional[str], typer.Option("--preset", "-p", help="preset (default: the paper's preset)")]
ProfileOption = Annotated[str, typer.Option("--profile", help="quick (minutes on CPU) or paper (the paper's settings)")]
EngineOption = Annotated[str, typer.Option("--engine", help="reference or upstream")]
GpusOption = Annotated[Optional[str], typer.Option(
    "--gpus", help="docker runner: GPUs for CUDA jobs, all or ids like 0,1 (default all)")]
PartitionOption = Annotated[Optional[str], typer.Option(
    "--partition", help="slurm runner: the partition (default: the cluster's default)")]
AccountOption = Annotated[Optional[str], typer.Option("--account", help="slurm runner: the account to charge")]
QosOption = Annotated[Optional[str], typer.Option("--qos", help="slurm runner: the quality of service")]
SparsityOption = Annotated[Optional[str], typer.Option("--sparsity", help="override the preset's sparsity, e.g. 0.6 or 60%")]
ForceOption = Annotated[bool, typer.Option("--force", help="recompute even if cached (also replaces corrupted results)")]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show tracebacks on errors")):
    _state["verbose"] = verbose


def _fail(exc: Exception, code: int) -> None:
    if _state["verbose"]:
        err_console.print_exception()
    print_error(str(exc))
    raise typer.Exit(code)


@contextmanager
def _job_progress():
    """A live list of a bench's jobs; yields the `on_job` callback that `run_bench` reports to."""
    import threading

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        TextColumn("[dim]{task.fields[status]}"), console=console, transient=False)
    report, lock, started = _progress_callback(progress), threading.Lock(), []

    def on_job(key, job, run):  # the display starts with the first job: bad input at planning is its line alone
        with lock:
            if not started:
                progress.start()
                started.append(True)
        return report(key, job, run)

    interrupted = False
    try:
        yield on_job
    except KeyboardInterrupt:  # the jobs are stopped by now (run_bench); the display ends before the line
        interrupted = True
    finally:
        if started:
            progress.stop()
    if interrupted:
        _interrupted()


def _interrupted() -> None:
    """Ctrl-C, or SIGTERM (made one in `main`), while jobs run. Typer turns a KeyboardInterrupt
    that leaves a command into a silent exit 130, so the command says what is kept itself."""
    err_console.print("[red]interrupted[/red]: finished jobs are kept in the store; run the same command to resume", soft_wrap=True)
    raise typer.Exit(130)


def _progress_callback(progress):
    """One spinner line per job, showing the job's last log line while it runs."""
    tasks: dict[str, int] = {}

    def on_job(key, job, run):
        if run is None:
            tasks[key] = progress.add_task(f"{key}: {job.method} {job.preset or ''}", total=None, status="starting")
            return lambda line: progress.update(tasks[key], status=line[-90:])
        status = "[green]cached[/green]" if run.cached else (
            "[green]done[/green]" if run.result.status == "ok" else "[red]failed[/red]")
        if key in tasks:  # ran here, or waited for another process that ran it
            took = f"({run.job_hash[:12]})" if run.cached else f"in {run.result.wall_s:.0f} s"
            progress.update(tasks[key], status=f"{status} {took}", total=1, completed=1)
        else:
            task = progress.add_task(f"{key}: {job.method} {job.preset or ''}", total=1, status=f"{status} ({run.job_hash[:12]})")
            progress.update(task, completed=1)
        return None

    return on_job


def _slurm_flags(runner: str | None, base: dict | None, **flags) -> dict | None:
    """The `slurm:` settings with the --partition/--account/--qos flags over them (slurm runner only)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given and runner != "slurm":
        raise UserError(f"--{next(iter(given))} applies to the slurm runner (got --runner {runner or 'local'})")
    return {**(base or {}), **given} if (given or base) else None


@app.command()
def bench(
    method: str = typer.Option(..., "--method", "-m", help="method name (see `llmcbench methods list`)"),
    preset: PresetOption = None,
    model: ModelOption = None,
    tracks: Optional[str] = typer.Option(None, "--tracks", "-t", help="comma-separated tracks, e.g. 1,3,4 (the default), or all (1-7)"),
    profile: ProfileOption = "quick",
    engine: EngineOption = "reference",
    runner: str = typer.Option("local", "--runner", help="where jobs run: local, docker (a container per job) or slurm (a Slurm job per job)"),
    gpus: GpusOption = None,
    partition: PartitionOption = None,
    account: AccountOption = None,
    qos: QosOption = None,
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="track 7: OpenAI-compatible API root of an LLM judge, e.g. http://127.0.0.1:8000/v1"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="track 7: the judge's model name"),
    judge_key_env: Optional[str] = typer.Option(None, "--judge-key-env", help="track 7: environment variable holding the judge's API key"),
    runs_dir: RunsDirOption = Path("runs"),
    data_dir: DataDirOption = None,
    device: DeviceOption = "auto",
    sparsity: SparsityOption = None,
    force: ForceOption = False,
    trust_remote_code: TrustRemoteCodeOption = False,
):
    """Compress a model with METHOD, evaluate dense and compressed on the tracks, print the table."""
    from .bench import parse_tracks, plan_bench, require_track, run_bench
    from .report import build_report, render_rich, write_report

    t0 = time.perf_counter()
    try:
        slurm = _slurm_config(runner, partition=partition, account=account, qos=qos)
        from .judging import judge_config

        if judge_url or judge_model or judge_key_env:  # before the plan resolves (maybe downloads) the model
            require_track("--judge-url/--judge-model/--judge-key-env", 7, parse_tracks(tracks))
        plan = plan_bench(method, preset, model, tracks, profile, engine, runner, runs_dir, data_dir, device, sparsity,
                          gpus=gpus, slurm=slurm, judge=judge_config(judge_url, judge_model, judge_key_env),
                          trust_remote_code=trust_remote_code)
        console.print(f"[bold]llmcbench bench[/bold] {plan.method.name} {plan.setting} on {plan.model.name} "
                      f"(profile {plan.profile.name}, tracks {','.join(map(str, plan.tracks))}, {plan.device}, data {plan.data_source})")
        with _job_progress() as on_job:
            run_bench(plan, force=force, on_job=on_job)
        rep = build_report(plan)
    except UserError as e:
        _fail(e, e.exit_code)
    except JobFailed as e:
        _fail(e, e.exit_code)
    except KeyboardInterrupt:  # while planning (a model download): the jobs' display has not started
        _interrupted()
    render_rich(rep, console)
    path = write_report(rep, plan.runs["compress"].run_dir)
    console.print(f"report: {path}  ({time.perf_counter() - t0:.1f} s)")


@app.command()
def compress(
    method: str = typer.Option(..., "--method", "-m", help="method name (see `llmcbench methods list`)"),
    preset: PresetOption = None,
    model: ModelOption = None,
    profile: ProfileOption = "quick",
    engine: EngineOption = "reference",
    runner: str = typer.Option("local", "--runner", help="local, docker (the method's image) or slurm"),
    gpus: GpusOption = None,
    partition: PartitionOption = None,
    account: AccountOption = None,
    qos: QosOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    data_dir: DataDirOption = None,
    device: DeviceOption = "auto",
    sparsity: SparsityOption = None,
    force: ForceOption = False,
    trust_remote_code: TrustRemoteCodeOption = False,
):
    """Compress a model with METHOD into the store (bench's compress job: a later bench or eval reuses it)."""
    from .steps import run_compress

    t0 = time.perf_counter()
    out = _run_step(run_compress, method, preset, model, profile=profile, engine=engine, runner=runner, runs_dir=runs_dir,
                    data_dir=data_dir, device=device, sparsity=sparsity, gpus=gpus, force=force,
                    trust_remote_code=trust_remote_code, slurm_flags=dict(partition=partition, account=account, qos=qos))
    plan = out.plan
    _print_step(f"{plan.method.name} {plan.setting} on {plan.model.name} ({plan.engine} engine, profile {plan.profile.name}, "
                f"{plan.device})", out)
    console.print(f"compress: {time.perf_counter() - t0:.1f} s; next: `llmcbench eval --method {plan.method.name} "
                  f"--preset {plan.preset}` or `llmcbench bench` with the same options (both reuse it)")


@app.command("eval")
def eval_(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="evaluate this method's compressed model from the store "
                                                                     "(`llmcbench compress` first); without it, the model itself"),
    preset: PresetOption = None,
    model: ModelOption = None,
    tracks: Optional[str] = typer.Option(None, "--tracks", "-t", help="comma-separated: 1, 2, 4, 5, 6, 7 (default 1,4); "
                                                                     "3 with --method reads its compress result"),
    profile: ProfileOption = "quick",
    engine: EngineOption = "reference",
    backend: Optional[str] = typer.Option(None, "--backend", help="track 5's deploy backend(s), comma-separated (default torch_native)"),
    runner: str = typer.Option("local", "--runner", help="local, docker (the eval image) or slurm"),
    gpus: GpusOption = None,
    partition: PartitionOption = None,
    account: AccountOption = None,
    qos: QosOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    data_dir: DataDirOption = None,
    device: DeviceOption = "auto",
    sparsity: SparsityOption = None,
    force: ForceOption = False,
    trust_remote_code: TrustRemoteCodeOption = False,
):
    """Evaluate one model on the tracks: a compressed one from the store (--method), or the model as given."""
    from .steps import run_eval

    t0 = time.perf_counter()
    out = _run_step(run_eval, method, preset, model, tracks=tracks, profile=profile, engine=engine, runner=runner,
                    runs_dir=runs_dir, data_dir=data_dir, device=device, sparsity=sparsity, gpus=gpus,
                    backends=None if backend is None else [b.strip() for b in backend.split(",") if b.strip()], force=force,
                    trust_remote_code=trust_remote_code, slurm_flags=dict(partition=partition, account=account, qos=qos))
    plan = out.plan
    what = f"{plan.method.name} {plan.setting}" if plan.method else " ".join(filter(None, plan.label))
    _print_step(f"{what} on {plan.model.name} (profile {plan.profile.name}, {plan.device})", out)
    console.print(f"eval: {time.perf_counter() - t0:.1f} s; `llmcbench bench` scores a compressed model against its dense one")


def _run_step(step, *args, runner: str, slurm_flags: dict, **kwargs):
    """Run a bench step (steps.run_compress, steps.run_eval) under the job progress display;
    bad input and a failed job end in one red line."""
    try:
        slurm = _slurm_config(runner, **slurm_flags)
        with _job_progress() as on_job:
            return step(*args, runner=runner, slurm=slurm, on_job=on_job, **kwargs)
    except (UserError, JobFailed) as e:
        _fail(e, e.exit_code)


def _slurm_config(runner: str, **flags):
    from .runners.slurm_script import SlurmConfig

    slurm = _slurm_flags(runner, None, **flags)
    return SlurmConfig(**slurm) if slurm else None


def _print_step(title: str, out) -> None:
    """A compress or eval step's figures, then each job's run dir (where its result.json is)."""
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("track", "right"), ("metric", "left"), ("value", "right")):
        t.add_column(col, justify=just)
    for row in out.rows:
        t.add_row(*row)
    console.print(t)
    for note in out.notes:
        console.print(f"[dim]note: {note}[/dim]", soft_wrap=True)
    for key, run in out.plan.runs.items():  # whole lines: a run dir is copied from here
        console.print(f"{key}: {'cached' if run.cached else 'ran'} ({run.job_hash[:12]}) {run.run_dir}", soft_wrap=True, highlight=False)


@app.command()
def deploy(
    cells: str = typer.Option("wanda,gptq:w8a16,gptq:w4a16-g128", "--cells", help="method[:preset] list (default: unstructured, INT8 and INT4)"),
    backend: str = typer.Option("torch_native", "--backend", help="deploy backend(s), comma-separated: torch_native, vllm, tensorrt_llm, mlc_llm (the last two on CUDA, in their images)"),
    model: ModelOption = None,
    profile: str = typer.Option("quick", "--profile", help="quick (32 new tokens, 3 runs) or paper (256 new tokens, 5 runs)"),
    runner: str = typer.Option("local", "--runner", help="local, docker (the eval image, or the backend's deploy image) or slurm"),
    device: DeviceOption = "auto",
    runs_dir: RunsDirOption = Path("runs"),
    data_dir: DataDirOption = None,
    compile: bool = typer.Option(False, "--compile", help="torch_native: decode steps under torch.compile over a static KV cache (dense and compressed alike); vllm: its own compilation on CPU too (on CUDA it always compiles)"),
    trust_remote_code: TrustRemoteCodeOption = False,
):
    """Track 5: decode tokens/s of dense and compressed models on a deploy backend, measured in this run."""
    from .deploying import deploy_table, run_deploy

    t0 = time.perf_counter()
    try:
        rows = run_deploy([c.strip() for c in cells.split(",") if c.strip()], [b.strip() for b in backend.split(",") if b.strip()],
                          model, profile, runner, device,
                          runs_dir, data_dir, on_start=lambda what: console.print(f"[dim]{what}[/dim]"), compile=compile,
                          trust_remote_code=trust_remote_code)
    except (UserError, JobFailed) as e:
        _fail(e, e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    console.print(deploy_table(rows))
    console.print(f"deploy: {len(rows)} models measured in {time.perf_counter() - t0:.1f} s; store {runs_dir}")


@app.command()
def parity(
    method: str = typer.Argument(..., help="method with both engines (see `llmcbench methods list`)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="preset (default: the paper's preset)"),
    model: ModelOption = None,
    profile: str = typer.Option("quick", "--profile", help="quick or paper"),
    runner: str = typer.Option("local", "--runner", help="local, docker or slurm"),
    device: DeviceOption = "auto",
    runs_dir: RunsDirOption = Path("runs"),
    data_dir: DataDirOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
):
    """Reference vs upstream engine on the same model: WikiText-2 ppl and mask/weight agreement."""
    from rich.table import Table

    from .parity import parity_plans, run_planned_parity

    t0 = time.perf_counter()
    try:
        plans = parity_plans(method, preset, model, profile, runner, runs_dir, data_dir, device, trust_remote_code)
        with _job_progress() as on_job:
            rec = run_planned_parity(plans, on_job=on_job)
    except (UserError, JobFailed) as e:
        _fail(e, e.exit_code)
    t = Table(title=f"Parity: {rec.method} {rec.preset} on {rec.model} (dense WikiText-2 ppl {_fmt(rec.dense_wikitext2_ppl)})")
    for col in ("engine", "WikiText-2 ppl (ours)", "upstream's own figures", "sparsity", "bits", "compress s", "peak GPU GB"):
        t.add_column(col)
    for engine, side in rec.engines.items():
        own = ", ".join(f"{k} {v:.2f}" for k, v in side.upstream_reported.items()) or "-"
        gpu_gb = side.compress_peak_gpu_bytes and side.compress_peak_gpu_bytes / 1e9
        t.add_row(engine, _fmt(side.wikitext2_ppl), own, _fmt(side.measured_sparsity, ".3f"), str(side.weight_bits), _fmt(side.compress_s, ".1f"),
                  _fmt(gpu_gb, ".2f"))
    console.print(t)
    console.print(f"mask agreement {_fmt(rec.mask_agreement, '.4f')}; channel agreement {_fmt(rec.channel_agreement, '.4f')}; weight rel. diff {_fmt(rec.weight_rel_diff, '.4f')}; "
                  f"identical weights {_fmt(rec.identical_fraction, '.4f')}; linears compared {rec.linears_compared} "
                  f"(shapes agree {rec.shapes_agree:.0%})")
    if rec.weight_rel_err:
        console.print("each engine's weight rel. error vs dense: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.weight_rel_err.items()))
    if rec.block_rel_err:
        console.print(f"each engine's block output error vs dense ({rec.block_tokens} WikiText-2 tokens): "
                      + ", ".join(f"{k} {v:.4f}" for k, v in rec.block_rel_err.items()))
    for note in rec.notes:
        console.print(f"[dim]note: {note}[/dim]")
    console.print(f"parity: {time.perf_counter() - t0:.1f} s; record in {runs_dir / 'parity'}")


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


@app.command()
def cancel(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="the result store whose Slurm jobs to cancel")):
    """Cancel every Slurm job still queued or running for this store (a driver that was killed leaves them)."""
    from .bench import check_runs_dir
    from .runners.slurm import cancel_store

    missing = UserError(f"store {runs_dir} does not exist and no Slurm job names it: pass the --runs-dir of your benches "
                        "(default runs/)")
    try:
        check_runs_dir(runs_dir)  # a file names no store: said before asking Slurm
        try:  # a deleted store's jobs are still its jobs (their comment names its path): asked first
            ids = cancel_store(runs_dir)
        except UserError:
            if runs_dir.exists():
                raise
            raise missing from None  # a typo'd store: that, not Slurm's own complaint
        if not ids and not runs_dir.exists():
            raise missing
    except UserError as e:
        _fail(e, e.exit_code)
    console.print(f"cancelled {len(ids)} Slurm job(s) of {runs_dir}" + (f": {', '.join(ids)}" if ids else ""))


@app.command()
def score(
    csv_file: Path = typer.Argument(..., help="long-format CSV (track,model,method,setting,metric,value) or a wide table like the paper's (method,model,setting,<metrics>,om_*)"),
    track: Optional[int] = typer.Option(None, "--track", help="a wide table's track, where its metric columns fit several"),
):
    """Score published or external figures with the same OM code (formats: tracks/paper/long_format.md, tracks/paper/*.csv).

    A wide table's printed OMs (om_* columns) are shown beside the recomputed ones."""
    from rich.table import Table

    from ..tracks.scoring import ScoringError, read_results_csv
    from ..tracks.scoring import score as score_records

    if why := not_there(csv_file, "file"):
        _fail(UserError(f"{csv_file} {why}"), 2)
    try:
        records, printed = read_results_csv(csv_file, track)
        rows = score_records(records)
    except ScoringError as e:
        _fail(UserError(str(e)), 2)
    if not rows:
        _fail(UserError(f"{csv_file}: no method has all the cells of any OM (dense rows are the baseline)"), 2)
    t = Table(title=f"Overall metrics of {csv_file.name}")
    columns = ("method", "setting", "track", "OM", "value", "cells") + (("printed",) if printed else ())
    for col in columns:
        t.add_column(col, justify="right" if col in {"track", "value", "cells", "printed"} else "left")
    for r in rows:
        cells = [r.method, r.setting, str(r.track), r.om, f"{r.value:.2f}", str(r.n_cells)]
        if printed:
            shown = printed.get((r.method, r.setting), {}).get(r.om)
            cells.append("-" if shown is None else f"{shown:.2f}")
        t.add_row(*cells)
    console.print(t)


@app.command()
def matrix(
    file: Optional[Path] = typer.Argument(None, help="matrix YAML (keys: methods, presets, models, tracks, profile, engine, runner, device, data_dir, trust_remote_code, jobs, backends, slurm, judge)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated methods (overrides the file)"),
    presets: Optional[str] = typer.Option(None, "--presets", help="paper, track2, all, or preset names (default paper)"),
    models: Optional[str] = typer.Option(None, "--models", help="comma-separated registry names, hub ids or dirs (default: embedded)"),
    tracks: Optional[str] = typer.Option(None, "--tracks", "-t", help="e.g. 1,3,4 (default) or all"),
    profile: Optional[str] = typer.Option(None, "--profile", help="quick or paper"),
    engine: Optional[str] = typer.Option(None, "--engine", help="reference or upstream"),
    runner: Optional[str] = typer.Option(None, "--runner", help="local, docker or slurm"),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm runner: the partition (overrides the file's slurm.partition)"),
    account: Optional[str] = typer.Option(None, "--account", help="slurm runner: the account to charge"),
    qos: Optional[str] = typer.Option(None, "--qos", help="slurm runner: the quality of service"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="track 7: OpenAI-compatible API root of an LLM judge (overrides the file's judge.base_url)"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="track 7: the judge's model name"),
    judge_key_env: Optional[str] = typer.Option(None, "--judge-key-env", help="track 7: environment variable holding the judge's API key"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    data_dir: DataDirOption = None,
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="cells in parallel (default: one per visible GPU, 1 on CPU; every cell with --runner slurm)"),
    trust_remote_code: TrustRemoteCodeOption = False,
    runs_dir: RunsDirOption = Path("runs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="plan and show what is cached, run nothing"),
    force: bool = typer.Option(False, "--force", help="recompute every cell"),
):
    """Run methods x presets x models x tracks into one store, isolating failures; ends with the leaderboard."""
    import signal

    from rich.live import Live

    from .matrix import (MatrixSpec, leaderboard, load_matrix_file, parse_spec, plan_matrix, refresh_cached, run_matrix,
                         write_summary)

    t0 = time.perf_counter()
    flags = {"methods": methods, "presets": presets, "models": models, "tracks": tracks, "profile": profile, "engine": engine,
             "runner": runner, "device": device, "data_dir": data_dir, "jobs": jobs}
    try:
        data = load_matrix_file(file) if file else {}
        data.update({k: v for k, v in flags.items() if v is not None})
        if trust_remote_code:
            data["trust_remote_code"] = True
        if "methods" not in data and not set(data) - set(MatrixSpec.model_fields):  # a misspelt key: parse_spec names it
            raise UserError("no methods: pass --methods wanda,sparsegpt or a matrix file with a methods list")
        slurm = data.get("slurm") if isinstance(data.get("slurm"), dict) else None
        slurm = _slurm_flags(data.get("runner"), slurm, partition=partition, account=account, qos=qos)
        if slurm is not None:
            data["slurm"] = slurm
        if judge_url or judge_model or judge_key_env:
            from .judging import judge_config

            base = data.get("judge") if isinstance(data.get("judge"), dict) else None
            data["judge"] = judge_config(judge_url, judge_model, judge_key_env, base).model_dump()
        spec = parse_spec(data, str(file) if file else "matrix")
        if judge_url or judge_model or judge_key_env:  # a file's judge: may serve other runs of it
            from .bench import parse_tracks, require_track

            require_track("--judge-url/--judge-model/--judge-key-env", 7, parse_tracks(spec.tracks))
        plan = plan_matrix(spec, runs_dir)
        refresh_cached(plan, force=force)
    except UserError as e:
        _fail(e, e.exit_code)
    n_cached = sum(c.status == "cached" for c in plan.cells)
    console.print(f"[bold]llmcbench matrix[/bold]: {len(plan.cells)} cells ({n_cached} cached), "
                  f"{plan.workers} in parallel, profile {spec.profile}, store {runs_dir}")
    if dry_run:
        console.print(_matrix_table(plan))
        return
    # SIGTERM (a scheduler, `kill`) ends the matrix like Ctrl-C: job processes are killed (Slurm
    # jobs cancelled), results kept
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Live(_matrix_table(plan), console=console, refresh_per_second=2, transient=False) as live:
            run_matrix(plan, on_update=lambda cell: live.update(_matrix_table(plan)), force=force)
            live.update(_matrix_table(plan))
    except KeyboardInterrupt:
        for c in plan.cells:
            if c.status == "running":
                c.status, c.error_type, c.message = "failed", "interrupted", "the matrix was interrupted"
        write_summary(plan, [])
        err_console.print("[red]interrupted[/red]: finished cells are kept in the store; run the same command to resume", soft_wrap=True)
        raise typer.Exit(130)
    except UserError as e:  # cells isolate their own errors; anything else is one line, with what ran kept
        write_summary(plan, [])
        _fail(e, e.exit_code)

    rows, notes, problem = leaderboard(plan)
    path = write_summary(plan, rows, notes)
    _print_leaderboard(rows, problem)
    for n in notes:
        console.print(f"[dim]note: {n}[/dim]")
    failed = [c for c in plan.cells if c.status in ("failed", "unsupported")]
    console.print(f"matrix: {len(plan.cells) - len(failed)} ok, {len(failed)} failed or unsupported; summary {path} "
                  f"({time.perf_counter() - t0:.1f} s)")
    if failed:
        raise typer.Exit(1)


def _matrix_table(plan):
    from rich.table import Table

    style = {"done": "green", "cached": "green", "running": "yellow", "failed": "red", "unsupported": "red", "planned": "dim"}
    t = Table(title="matrix cells")
    for col in ("method", "preset", "model", "tracks", "status", "time", "error / log"):
        t.add_column(col)
    for c in plan.cells:
        if c.error_type:
            info = f"{c.error_type}: " + (f"log {c.log}" if c.log else (c.message or ""))
        else:
            info = f"{c.cached_jobs}/{c.n_jobs} jobs cached" if c.status == "planned" else ""
        t.add_row(c.method, c.preset, c.model, ",".join(map(str, c.tracks)), f"[{style[c.status]}]{c.status}[/]",
                  f"{c.wall_s:.0f} s" if c.wall_s is not None else "", info)
    return t


def _print_leaderboard(rows, problem) -> None:
    from rich.table import Table

    from ..tracks.scoring import OMS

    if problem:
        err_console.print(f"[red]leaderboard not scored:[/red] {problem}")
        return
    order = [o.name for o in OMS if any(r.om == o.name for r in rows)]
    by = {}
    for r in rows:
        by.setdefault((r.method, r.setting), {})[r.om] = r.value
    t = Table(title="Leaderboard (overall metrics, SPEC.md section 5)")
    t.add_column("method")
    t.add_column("setting")
    for o in order:
        t.add_column(o.replace("om_", "OM_"), justify="right")
    for (m, s), v in by.items():
        t.add_row(m, s, *[f"{v[o]:.2f}" if o in v else "-" for o in order])
    console.print(t)


models_app = typer.Typer(no_args_is_help=True, help="The model registry (driver/model_registry.toml).")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list():
    """List the registry's models: hub id, pinned revision, family, size, gated, remote code, methods."""
    from rich.table import Table

    from .model_registry import load_registry
    from .registry import discover

    try:
        reg, methods = load_registry(), set(discover())
    except UserError as e:
        _fail(e, e.exit_code)
    t = Table(title="Models")
    for col in ("name", "hub id", "revision", "family", "params", "gated", "remote code", "tracks", "methods"):
        t.add_column(col)
    for m in reg.values():
        t.add_row(m.name + (" (embedded)" if m.embedded else ""), m.hub_id, m.revision[:10] or "-", m.family, f"{m.params_b:g}B",
                  "yes" if m.gated else "no", "yes (opt-in)" if m.trust_remote_code else "no", ",".join(map(str, m.tracks)),
                  "all" if set(m.methods) == methods else ", ".join(m.methods))
    console.print(t)


@methods_app.command("list")
def methods_list():
    """List the methods, their presets, engines and upstream pins."""
    from rich.table import Table

    from .registry import discover

    try:
        specs = discover()
    except UserError as e:
        _fail(e, e.exit_code)
    t = Table(title="Methods")
    for col in ("method", "kind", "presets (paper first)", "engines", "upstream"):
        t.add_column(col)
    for s in specs.values():
        presets = [s.paper_preset] + [p for p in s.presets if p != s.paper_preset] if s.paper_preset else list(s.presets)
        t.add_row(s.name, s.kind, ", ".join(presets), ", ".join(s.engines),
                  f"{s.upstream.repo.removeprefix('https://github.com/')}\n{s.upstream.commit}")
    console.print(t)


from .reporting.commands import register; register(app)  # noqa: E402,E702  report, bundle, verify (driver/reporting/)
from .docker_commands import register as _register_docker; _register_docker(app)  # noqa: E402,E702  images, doctor


def main() -> None:
    import signal

    # SIGTERM (`kill`, a scheduler) ends any command like Ctrl-C: job processes killed, Slurm jobs cancelled
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)  # usage errors come back here, to be one line like the others
    except KeyboardInterrupt:  # before or after a command runs (Typer turns one inside it into exit 130)
        sys.exit(130)
    except _CLICK_ERROR as e:  # a missing or unknown option, an unknown command, a value click rejects
        if type(e).__name__ != "NoArgsIsHelpError":  # no arguments: the help is printed already (as Typer does)
            _usage_error(e)
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except UserError as e:  # bad input met outside a command's own handler (`methods list` with a bad LLMCBENCH_METHODS_PATH)
        if _state["verbose"]:
            raise
        print_error(str(e))
        sys.exit(e.exit_code)
    except OSError as e:  # the driver's own writes (the store, a report) on a full disk: one line, not a traceback
        from .errors import is_out_of_disk, out_of_disk_hint

        if not is_out_of_disk(e) or _state["verbose"]:
            raise
        print_error(f"{e}; {out_of_disk_hint(e.filename)}")
        sys.exit(1)
    # a command's typer.Exit(n) comes back as n; commands return None (a returned int would be the exit code)
    sys.exit(code if isinstance(code, int) else 0)


# click's base exception, from whichever click the Typer in use has (Typer 0.29 vendors it privately)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(e) -> None:
    """click's usage error as this CLI's one line: the problem, then where the options are listed
    (Typer's own handler prints the usage line, a hint and a boxed panel)."""
    ctx = getattr(e, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    print_error(e.format_message().rstrip(".") + hint)


if __name__ == "__main__":
    main()
