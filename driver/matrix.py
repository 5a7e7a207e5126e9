"""`llmcbench matrix`: methods x presets x models x tracks, one bench per cell, into one store.

Everything the user asked for is planned (and validated) before anything runs: unknown
methods, presets, models or matrix keys are one-line errors with nothing written. Each cell
is a `bench` (compress + dense and compressed evaluations per track group), so the caching,
the result store and the scoring are the bench's own. The matrix adds:

- cells the store already holds are reported as cached and cost nothing;
- failure isolation: a cell whose job fails is recorded with the failed job's error class
  (oom, unsupported, timeout, crash, ...) and its log, and the matrix goes on;
  a method the registry says cannot compress a model is recorded `unsupported` unrun;
- resume: an interrupted matrix (Ctrl-C, kill) is finished by running the same command,
  which re-runs only what has no ok result;
- one cell per GPU in parallel when several are visible (`--jobs`), one at a time on CPU;
- `matrix.json` in the store (atomic) and the leaderboard: every OM of every method/setting,
  scored over all the matrix's models (OM_gen is the mean over models, SPEC 5).
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..tracks.records import compress_records
from ..tracks.scoring import MetricRecord, OMRow, ScoringError, drop_undefined_ratios, score
from .bench import BenchPlan, cached_jobs, parse_tracks, plan_bench, planned_jobs, run_bench
from .errors import JobFailed, StoreError, UnsupportedSetting, UserError
from .fsio import write_atomic
from .report import plan_eval_records
from .store import Store
from .runners.slurm_script import SlurmConfig
from ..tracks.kick.judge import JudgeConfig

CellStatus = Literal["planned", "cached", "running", "done", "failed", "unsupported"]


class MatrixSpec(BaseModel):
    """A matrix file (YAML) or the equivalent flags. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(min_length=1)
    presets: list[str] = Field(default_factory=lambda: ["paper"],
                               description="per method: paper, track2, all, or preset names (unknown names are an error)")
    models: list[str] = Field(default_factory=lambda: ["embedded"])
    tracks: list[int] | str = Field(default_factory=lambda: [1, 3, 4])
    profile: Literal["quick", "paper"] = "quick"
    engine: Literal["reference", "upstream"] = "reference"
    runner: str = "local"
    device: str = "auto"
    data_dir: str | None = None
    trust_remote_code: bool = False
    jobs: int | None = Field(default=None, ge=1, description="cells in parallel; default one per visible GPU, 1 on CPU, "
                                                              "every cell with the slurm runner (Slurm queues them)")
    slurm: SlurmConfig | None = Field(default=None, description="the slurm runner's partition, account, runtime, ...")
    backends: list[str] = Field(default_factory=lambda: ["torch_native"], description="track 5's deploy backends")
    judge: JudgeConfig | None = Field(default=None, description="track 7's LLM judge: base_url, model, api_key_env, ...")

    @model_validator(mode="after")
    def _slurm_needs_runner(self) -> "MatrixSpec":
        if self.slurm is not None and self.runner != "slurm":
            raise ValueError(f"slurm settings apply to the slurm runner, not runner {self.runner}")
        return self

    @field_validator("methods", "presets", "models", "backends", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("tracks", mode="before")
    @classmethod
    def _no_booleans(cls, v: Any) -> Any:
        """YAML's `true` would be track 1 (a bool is an int to pydantic)."""
        if isinstance(v, list) and any(isinstance(x, bool) for x in v):
            raise ValueError("tracks are numbers 1-7, not true/false")
        return v

    @field_validator("methods", "presets", "models", "backends")
    @classmethod
    def _named(cls, v: list[str]) -> list[str]:
        """`--models=` or `models: [""]` named nothing: it planned the embedded model, or no cell."""
        if not v or not all(x.strip() for x in v):
            raise ValueError("give at least one name, and no empty ones")
        return [x.strip() for x in v]


def _unique_keys_loader():
    """YAML's SafeLoader, except that a key given twice is an error (PyYAML keeps the last one:
    a matrix file with two `methods:` lines ran only the second list)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:  # plain keys only: merge keys (<<) and the rest go to PyYAML
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key '{key_node.value}' appears twice",
                                                                key_node.start_mark)
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep)

    return Loader


def load_matrix_file(path: Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise UserError(f"matrix file {path} is a directory: pass the matrix YAML file itself")
    if not path.is_file():
        raise UserError(f"matrix file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"matrix file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8 YAML") from None
    except OSError as e:
        raise UserError(f"matrix file {path} cannot be read ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_unique_keys_loader()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = (getattr(e, "problem", None) or str(e).splitlines()[0]) + (f", line {mark.line + 1}" if mark else "")
        raise UserError(f"matrix file {path} is not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"matrix file {path} must be a mapping of keys (methods, presets, models, tracks, ...)")
    return data


UNION_TAGS = {"list[int]", "str"}


def parse_spec(data: dict[str, Any], where: str = "matrix") -> MatrixSpec:
    try:
        return MatrixSpec.model_validate(data)
    except ValidationError as e:
        errors = e.errors()  # a misspelt key first: it explains the "field required" that comes with it
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        # pydantic names the union's branch after the field (tracks.list[int].0): not a key the user wrote
        key = ".".join(str(x) for i, x in enumerate(err["loc"]) if i == 0 or x not in UNION_TAGS)
        if err["type"] == "extra_forbidden":
            nested = {"slurm": SlurmConfig, "judge": JudgeConfig}.get(err["loc"][0], MatrixSpec)
            known = ", ".join(nested.model_fields)
            raise UserError(f"{where}: unknown key '{key}' (known keys: {known})") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{where}: {key}: {msg}" if key else f"{where}: {msg}") from None


@dataclass
class MatrixCell:
    method: str
    preset: str
    model: str
    tracks: list[int]
    plan: BenchPlan | None = None  # None: not runnable (unsupported)
    status: CellStatus = "planned"
    error_type: str | None = None
    message: str | None = None
    log: str | None = None
    wall_s: float | None = None
    cached_jobs: int = 0
    n_jobs: int = 0


@dataclass
class Matrix:
    spec: MatrixSpec
    runs_dir: Path
    cells: list[MatrixCell] = field(default_factory=list)
    workers: int = 1


def plan_matrix(spec: MatrixSpec, runs_dir: Path) -> Matrix:
    """Every cell's bench plan. Bad input anywhere fails here, before any job runs."""
    from .model_registry import check_access, lookup
    from .registry import get_method

    from .bench import check_runs_dir

    check_runs_dir(runs_dir)
    tracks = parse_tracks(spec.tracks if isinstance(spec.tracks, str) else list(spec.tracks))
    matrix = Matrix(spec, Path(runs_dir))
    planned: set[tuple[str, str, str]] = set()  # (method, preset, model as resolved): a cell once
    for model in dict.fromkeys(spec.models):
        entry = lookup(model)
        if entry is not None:  # gated / remote code: refused up front, even where no cell could run
            check_access(entry, spec.trust_remote_code)
        for name in dict.fromkeys(spec.methods):
            method = get_method(name)
            seen: dict[str, list[int]] = {}
            for selector in spec.presets:
                for preset in method.presets_for(selector):
                    # a `track2` preset that differs from the paper's runs track 2 only (Table 2)
                    only2 = selector == "track2" and preset != method.presets_for("paper")[0]
                    want = [2] if only2 and 2 in tracks else ([] if only2 else tracks)
                    seen[preset] = sorted(set(seen.get(preset, [])) | set(want))
            for preset, cell_tracks in seen.items():
                if not cell_tracks:
                    continue
                cell = MatrixCell(method.name, preset, model, cell_tracks)
                reason = entry.supports(method.name, spec.engine) if entry is not None else None
                if reason:
                    cell.status, cell.error_type, cell.message = "unsupported", "unsupported", reason
                else:
                    try:
                        cell.plan = plan_bench(method.name, preset, model, cell_tracks, spec.profile, spec.engine, spec.runner,
                                               runs_dir, spec.data_dir, spec.device, trust_remote_code=spec.trust_remote_code,
                                               slurm=spec.slurm, judge=spec.judge, backends=spec.backends)
                        cell.model = cell.plan.model.name
                    except UnsupportedSetting as e:  # the engine cannot run this preset: this cell only
                        cell.status, cell.error_type, cell.message = "unsupported", "unsupported", str(e)
                # a model or method listed twice, or two names of one model (a registry name and
                # its dir): one cell, not two running the same jobs and two leaderboard rows
                if (cell.method, cell.preset, cell.model) not in planned:
                    planned.add((cell.method, cell.preset, cell.model))
                    matrix.cells.append(cell)
    if not matrix.cells:  # e.g. --presets track2 without track 2: it ran nothing and said "0 cells"
        hint = " (the track2 presets run track 2 only: add 2 to --tracks)" if "track2" in spec.presets and 2 not in tracks else ""
        raise UserError(f"no cells to run: presets {','.join(spec.presets)} on tracks {','.join(map(str, tracks))} select nothing{hint}")
    if spec.runner == "slurm":  # every cell waits in Slurm's queue at once; Slurm decides what runs
        matrix.workers = spec.jobs or max(1, sum(c.plan is not None for c in matrix.cells))
    else:
        matrix.workers = spec.jobs or _gpu_count(matrix)
        pinned = spec.device if spec.device and spec.device.startswith("cuda:") else None
        if pinned and matrix.workers > 1:  # each worker's jobs see one GPU, as their cuda:0
            raise UserError(f"--device {pinned} with {matrix.workers} parallel cells: each cell gets a GPU of its own; "
                            "use --device cuda (or --jobs 1 to run every cell on that one GPU)")
    return matrix


def _gpu_count(matrix: Matrix) -> int:
    plans = [c.plan for c in matrix.cells if c.plan]
    if not plans or not plans[0].device.startswith("cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def refresh_cached(matrix: Matrix, force: bool = False) -> None:
    """Mark the cells the store already holds. With `force` nothing is cached (and a corrupted
    result, which --force is there to repair, is not read). A corrupted result leaves its cell
    planned: running it records the store's error for that cell only."""
    if force:
        return
    for c in matrix.cells:
        if c.plan is not None and c.status == "planned":
            try:
                c.cached_jobs, c.n_jobs = cached_jobs(c.plan)
            except StoreError:
                continue
            if c.cached_jobs == c.n_jobs:
                c.status = "cached"


def run_matrix(matrix: Matrix, on_update: Callable[[MatrixCell], None] | None = None, force: bool = False) -> Matrix:
    """Run every runnable cell; a failed cell is recorded and the others go on."""
    from .runners import reset_stopping

    reset_stopping()
    todo = [c for c in matrix.cells if c.plan is not None]
    notify = on_update or (lambda cell: None)
    forced = _Forced() if force else None
    if matrix.workers <= 1:
        for c in todo:
            _run_cell(c, None, forced, notify)
        return matrix
    # one cell per GPU: worker i owns GPU i (CUDA_VISIBLE_DEVICES for local jobs, --gpus for docker);
    # with slurm a worker only waits for its cell's Slurm jobs, and Slurm allocates the GPUs
    free = list(range(matrix.workers))
    slurm = matrix.spec.runner == "slurm"
    with ThreadPoolExecutor(max_workers=matrix.workers, thread_name_prefix="cell") as pool:
        pending: dict = {}
        queue = list(todo)
        try:
            while queue or pending:
                while queue and free:
                    gpu = free.pop(0)
                    pending[pool.submit(_run_cell, queue.pop(0), None if slurm else gpu, forced, notify)] = gpu
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    free.append(pending.pop(f))
                    f.result()
        except BaseException:
            from .runners import terminate_all

            terminate_all()  # no worker starts another job; the killed ones end as interrupted
            raise
    return matrix


class _Forced:
    """`--force` applied once per job: the first cell to reach a job deletes its run dir, the
    cells sharing it (the dense evaluations) then find the recomputed result in the store.

    run_bench(force=True) would delete every job of every cell, so the shared dense evaluation
    ran once per cell; instead each cell deletes the run dirs nobody deleted yet and runs
    without force. Claim and deletion happen under one lock, so no cell can run a job before
    its single deletion; the store's job lock keeps another llmcbench process's run safe."""

    def __init__(self):
        self.done: set[Path] = set()
        self.lock = threading.Lock()

    def apply(self, plan: BenchPlan, runner) -> None:
        store = Store(plan.runs_dir)
        for p in planned_jobs(plan, runner):
            with self.lock:
                if p.run_dir in self.done:
                    continue
                with store.lock(p.run_dir):
                    if p.run_dir.exists():
                        shutil.rmtree(p.run_dir)
                self.done.add(p.run_dir)


def visible_gpus() -> list[str]:
    """The GPUs this driver may hand out, as the host names them: the user's CUDA_VISIBLE_DEVICES
    where it is set (with "2,3" worker 0 must get GPU 2, not 0), else every device torch sees."""
    import os

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _cell_runner(plan: BenchPlan, gpu: int | None):
    """The cell's runner (the bench's own), pinned to a parallel worker's GPU when it has one:
    worker i gets the i-th visible GPU (wrapping when --jobs exceeds them: two cells share one).

    Only a CUDA job gets a GPU: a CPU job in Docker must not demand the NVIDIA runtime."""
    from .runners import get_runner

    if gpu is None or not plan.device.startswith("cuda"):
        return get_runner(plan.runner_name, plan.gpus, slurm=plan.slurm, device=plan.device)
    visible = visible_gpus()
    device = visible[gpu % len(visible)] if visible else str(gpu)
    if plan.runner_name == "docker":
        plan.gpus = device
    return get_runner(plan.runner_name, plan.gpus, cuda_visible=device if plan.runner_name == "local" else None)


def _run_cell(cell: MatrixCell, gpu: int | None, forced: _Forced | None, notify: Callable[[MatrixCell], None]) -> None:
    from .runners import check_stopping

    check_stopping()  # an interrupted matrix starts no new cell
    plan = cell.plan
    cell.status = "running"
    notify(cell)
    t0 = time.perf_counter()
    try:
        runner = _cell_runner(plan, gpu)  # a runner that cannot start (no daemon, no GPU) fails this cell only
        if forced is not None:
            forced.apply(plan, runner)
        run_bench(plan, runner=runner)
        ran = [r for r in plan.runs.values() if not r.cached]
        cell.status = "done" if ran else "cached"
    except JobFailed as e:
        cell.status, cell.error_type, cell.message = "failed", e.error_type, str(e)
        cell.log = str(Path(e.run_dir) / "log.txt") if e.run_dir else None
    except UserError as e:  # e.g. a corrupted result in the store: this cell only
        cell.status, cell.error_type, cell.message = "failed", "bad_input", str(e)
    except KeyboardInterrupt:  # its job killed by terminate_all: no result kept, a resume reruns it
        cell.status, cell.error_type, cell.message = "failed", "interrupted", "the matrix was interrupted"
        raise
    finally:
        cell.wall_s = time.perf_counter() - t0
        notify(cell)


# ---------------------------------------------------------------- leaderboard


def matrix_records(matrix: Matrix) -> tuple[list[MetricRecord], list[str]]:
    """Scoring records of every ok cell: compressed and dense evaluations, and track 3; and a
    note for each dense figure two of the matrix's dense runs disagree on."""
    records: list[MetricRecord] = []
    seen_dense: dict[tuple, MetricRecord] = {}
    notes: list[str] = []
    for c in matrix.cells:
        plan = c.plan
        if plan is None or c.status not in ("done", "cached") or "compress" not in plan.runs:
            continue
        if 3 in plan.tracks:
            records += compress_records(plan.runs["compress"].result.metrics, plan.model.name, c.method, c.preset)
        dense, compressed = plan_eval_records(plan)
        records += compressed
        # one baseline per (track, model, metric): a track-2-only cell's dense evaluation
        # measures the same ppl as the tracks 1/2/4 one (same windows, same settings). Should two
        # ever disagree, the first is the baseline and the leaderboard says so, not silently.
        for r in dense:
            key = (r.track, r.model, r.metric)
            first = seen_dense.get(key)
            if first is None:
                seen_dense[key] = r
                records.append(r)
            elif not math.isclose(first.value, r.value, rel_tol=1e-6, abs_tol=1e-12):
                notes.append(f"dense {r.metric} on {r.model} (track {r.track}) differs between this matrix's dense runs: "
                             f"{first.value:.6g} (used) vs {r.value:.6g} ({c.method} {c.preset})")
    return records, notes


def leaderboard(matrix: Matrix) -> tuple[list[OMRow], list[str], str | None]:
    """(OM rows, cells left out with why and dense runs that disagree, the scoring error if none could be scored)."""
    records, conflicts = matrix_records(matrix)
    records, notes = drop_undefined_ratios(records)
    notes = conflicts + notes
    try:
        return score(records), notes, None
    except ScoringError as e:
        return [], notes, str(e)


def write_summary(matrix: Matrix, rows: list[OMRow], notes: list[str] | None = None, path: Path | None = None) -> Path:
    path = path or matrix.runs_dir / "matrix.json"
    body = {
        "spec": matrix.spec.model_dump(mode="json"),
        "cells": [{"method": c.method, "preset": c.preset, "model": c.model, "tracks": c.tracks, "status": c.status,
                   "error_type": c.error_type, "message": c.message, "log": c.log, "wall_s": c.wall_s,
                   "jobs": {k: {"hash": r.job_hash, "run_dir": str(r.run_dir), "cached": r.cached}
                            for k, r in (c.plan.runs.items() if c.plan else [])}}
                  for c in matrix.cells],
        "leaderboard": [r.model_dump() for r in rows],
        "leaderboard_notes": notes or [],
    }
    import json

    write_atomic(path, json.dumps(body, indent=2) + "\n")
    return path
