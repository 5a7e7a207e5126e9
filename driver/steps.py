"""`llmcbench compress` and `llmcbench eval`: a bench's steps, one at a time (SPEC.md section 8).

They plan exactly the jobs `bench` plans and run only their own, so they share bench's cache
both ways: a `compress` followed by `bench` compresses once, and `eval --method` evaluates the
artifact a `compress` or `bench` left in the store. `eval` without --method evaluates the model
as given: a dense model (its job is bench's dense evaluation, shared with every bench on it),
or a compressed model dir from elsewhere, run as its `compression.json` declares and recorded
under the declared method's name, never as a dense baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .bench import DEFAULT_TRACKS, BenchPlan, JobRun, parse_tracks, plan_bench, plan_model, planned_jobs, require_track, run_bench
from .errors import StoreError, UserError
from .fsio import dir_size_bytes
from .store import Store

COMPRESS_KEY = "compress"


@dataclass
class StepOutcome:
    """What a step ran or found cached: the plan (its `runs`) and the rows to print."""

    plan: BenchPlan
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (track, metric, value)
    notes: list[str] = field(default_factory=list)


def run_compress(method: str, preset: str | None = None, model: str | None = None, *, profile: str = "quick",
                 engine: str = "reference", runner: str = "local", runs_dir: str | Path = "runs",
                 data_dir: str | None = None, device: str = "auto", sparsity=None, gpus: str | None = None,
                 slurm=None, force: bool = False, trust_remote_code: bool = False,
                 on_job: Callable | None = None) -> StepOutcome:
    """The compress job alone, as `bench` would run it (same hash, same run dir)."""
    plan = plan_bench(method, preset, model, [3], profile, engine, runner, runs_dir, data_dir, device, sparsity,
                      gpus=gpus, slurm=slurm, trust_remote_code=trust_remote_code)
    run_bench(plan, force=force, on_job=on_job, only=lambda key: key == COMPRESS_KEY)
    out = StepOutcome(plan, rows=compress_rows(plan.runs[COMPRESS_KEY]))
    out.notes.append(f"model: {plan.runs[COMPRESS_KEY].run_dir / 'model'}")
    return out


def compress_rows(run: JobRun) -> list[tuple[str, str, str]]:
    """Track 3's figures and the artifact's declared compression, from the compress result."""
    t3 = run.result.metrics["track3"]
    comp = run.result.metrics.get("compression") or {}
    rows = [("3", "compression step (s)", f"{t3['compress_s']:.1f}"),
            ("3", "peak host RSS (GB)", f"{t3['compress_peak_rss_bytes'] / 1e9:.2f}")]
    if t3.get("compress_peak_gpu_bytes"):
        rows.append(("3", "peak GPU memory (GB)", f"{t3['compress_peak_gpu_bytes'] / 1e9:.2f}"))
    if t3.get("compress_gpu_used_nvml_bytes"):  # the cross-check: the device's use, context and other processes included
        rows.append(("3", "GPU memory used, NVML sample (GB)", f"{t3['compress_gpu_used_nvml_bytes'] / 1e9:.2f}"))
    if comp.get("measured_sparsity") is not None:
        rows.append(("", "measured sparsity", f"{comp['measured_sparsity']:.4f}"))
    rows.append(("", "weight / activation bits", f"{comp.get('weight_bits', 16)} / {comp.get('act_bits', 16)}"))
    packed = run.run_dir / "packed"
    if packed.is_dir():
        rows.append(("", "packed export (GB)", f"{dir_size_bytes(packed) / 1e9:.4f}"))
    return rows


def run_eval(method: str | None = None, preset: str | None = None, model: str | None = None, *, tracks=None,
             profile: str = "quick", engine: str = "reference", runner: str = "local", runs_dir: str | Path = "runs",
             data_dir: str | None = None, device: str = "auto", sparsity=None, gpus: str | None = None, slurm=None,
             backends: list[str] | None = None, force: bool = False, trust_remote_code: bool = False,
             on_job: Callable | None = None) -> StepOutcome:
    """Evaluate the compressed model of (method, preset, model) from the store, or, without a
    method, the model itself. Tracks default to bench's evaluated ones (1 and 4)."""
    track_list = parse_tracks(tracks) if tracks else [t for t in DEFAULT_TRACKS if t != 3]
    if backends is not None:
        require_track("--backend", 5, track_list)
    if method is None:
        if 3 in track_list:
            raise UserError("track 3 measures a compression step: pass --method (its compress result is read) "
                            "or run `llmcbench compress`")
        if preset or sparsity is not None or engine != "reference":
            raise UserError("--preset, --sparsity and --engine name a compression: pass --method too")
        plan = plan_model(model, track_list, profile, runner, runs_dir, data_dir, device, gpus=gpus, slurm=slurm,
                          trust_remote_code=trust_remote_code, backends=backends)
        run_bench(plan, force=force, on_job=on_job)
        out = StepOutcome(plan)
        if plan.label[0] != "dense":
            out.notes.append(f"{plan.model.path} has a compression.json: evaluated as it declares "
                             f"({' '.join(filter(None, plan.label))}), recorded under that name")
    else:
        plan = plan_bench(method, preset, model, track_list, profile, engine, runner, runs_dir, data_dir, device,
                          sparsity, gpus=gpus, slurm=slurm, trust_remote_code=trust_remote_code, backends=backends)
        comp = planned_jobs(plan)[0]
        what = f"{plan.method.name} {plan.setting} on {plan.model.name} (profile {plan.profile.name}, {plan.engine} engine)"
        how = f"llmcbench compress --method {plan.method.name} --preset {plan.preset}" + (f" --model {model}" if model else "")
        try:
            compressed = Store(plan.runs_dir).cached(comp.run_dir)
        except StoreError as e:  # eval never runs the compress job, so its own --force cannot repair it
            raise e.with_fix(f"recompute it with `{how} --force`") from None
        if compressed is None:
            if (comp.run_dir / "result.json").is_file():
                raise UserError(f"{what}: its compression failed (log kept in {comp.run_dir / 'log.txt'}): rerun `{how}`")
            raise UserError(f"{what} is not compressed in {runs_dir} yet: run `{how}` (same options) first, or `llmcbench bench`")
        # the compress job is a cache hit (checked above): never run here, its result read for track 3
        plan.runs[COMPRESS_KEY] = JobRun(comp.job, comp.job_hash, comp.run_dir, compressed, True)
        if on_job:
            on_job(COMPRESS_KEY, comp.job, plan.runs[COMPRESS_KEY])
        run_bench(plan, force=force, on_job=on_job, only=lambda key: key.startswith("compressed "))
        out = StepOutcome(plan, rows=compress_rows(plan.runs[COMPRESS_KEY]) if 3 in track_list else [])
    out.rows += eval_rows(plan)
    out.notes += memory_notes(plan)
    return out


def eval_rows(plan: BenchPlan) -> list[tuple[str, str, str]]:
    """Each evaluated metric of the plan's evaluation and deploy jobs, labelled as the bench report labels them."""
    from ..tracks.records import eval_records
    from .report import LABELS

    rows = []
    for key, run in plan.runs.items():
        if key == COMPRESS_KEY:
            continue
        for r in eval_records(run.result.metrics, plan.model.name, "-", "-"):
            digits = 4 if r.track == 4 else 2
            rows.append((str(r.track), LABELS.get(r.metric, r.metric), f"{r.value:.{digits}f}"))
    return sorted(rows, key=lambda row: int(row[0]))


def memory_notes(plan: BenchPlan) -> list[str]:
    """How track 4's inference memory was measured, where the figure alone would mislead."""
    from ..tracks.records import track4_memory_note

    return [n for run in plan.runs.values() if (n := track4_memory_note(run.result.metrics))]
