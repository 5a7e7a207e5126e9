"""`bench`: plan a cell's jobs, run what is not cached, and score it against the dense baseline.

One bench is three jobs: compress the model with the method, evaluate the dense model,
evaluate the compressed artifact. The dense evaluation does not depend on the method, so
its hash is shared by every method on the same model and settings: it runs once and is a
cache hit ever after. Everything the user typed is validated before anything is written.
"""

from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import Timeout

from .contract import (Calibration, Compression, ContractError, DeploySettings, EvalSettings, Job, Limits, ModelRef, Result,
                       artifact_digest, read_record,
                       read_compression, setting_label)
from .data import data_digest, resolve_data
from .errors import JobFailed, UnsupportedSetting, UserError, out_of_disk_hint
from .fsio import file_in_the_way
from .models import resolve_model
from .profiles import KNOWN_TRACKS, PROFILES, TRACK1_TASKS, Profile
from .registry import MethodSpec, get_method
from .runners import check_device_name, check_stopping, get_runner
from .store import Store, cell_name

ALL_TRACKS = set(range(1, 8))
# The tracks measured by evaluation jobs, one job per group: a group is cached on its own,
# so adding tracks 6 and 7 to a bench re-uses the tracks 1/2/4 evaluation already in the store.
EVAL_GROUPS: tuple[tuple[int, ...], ...] = ((1, 2, 4), (6,), (7,))
EVAL_TRACKS = {t for g in EVAL_GROUPS for t in g}


def eval_groups(tracks: list[int]) -> list[tuple[str, list[int]]]:
    """(job key suffix, tracks) per evaluation job a bench of `tracks` needs."""
    out = []
    for i, group in enumerate(EVAL_GROUPS):
        chosen = [t for t in tracks if t in group]
        if chosen:
            out.append(("" if i == 0 else f" t{group[0]}", chosen))
    return out


@dataclass
class JobRun:
    job: Job
    job_hash: str
    run_dir: Path
    result: Result
    cached: bool


@dataclass
class BenchPlan:
    method: MethodSpec | None  # None: a model evaluated alone (`llmcbench eval` without --method), no compress job
    preset: str | None
    params: dict
    model: ModelRef
    tracks: list[int]
    profile: Profile
    engine: str
    device: str
    data_source: str
    data_dir: Path
    runs_dir: Path
    runner_name: str
    gpus: str | None = None
    slurm: object | None = None  # the slurm runner's SlurmConfig
    judge: object | None = None  # track 7's JudgeConfig: instruction answers are judged against dense's
    backends: list[str] = field(default_factory=lambda: ["torch_native"])  # track 5's deploy backends
    overrides: dict | None = None  # the params set over the preset's (--sparsity): recorded in the compress job
    compile: bool = False  # track 5: torch_native decodes under torch.compile, vllm compiles on CPU too (deploy --compile)
    runs: dict[str, JobRun] = field(default_factory=dict)
    data_sha256: str | None = None  # content digest of data_dir when data_source is local: in the jobs' hashes
    # a model evaluated alone: what its jobs are called, dense or what its compression.json declares
    label: tuple[str, str | None] = ("dense", None)

    @property
    def setting(self) -> str:
        """The preset, with the params set over it: what the report calls this run (`Job.setting`)."""
        if self.method is None:
            return self.label[1] or self.label[0]
        return setting_label(self.preset, self.params, self.overrides or {})

    @property
    def cell(self) -> str:
        if self.method is None:
            return cell_name(*self.label, self.model.name)
        return cell_name(self.method.name, self.preset, self.model.name)


DEFAULT_TRACKS = [1, 3, 4]  # minutes on the embedded model; `all` adds 2, 6 and 7


def parse_tracks(text: str | list[int] | None) -> list[int]:
    if text is None or text == "":
        return list(DEFAULT_TRACKS)
    if isinstance(text, str) and text.strip().lower() == "all":
        return sorted(KNOWN_TRACKS)
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", "").split(",") if t]
    if not items:
        raise UserError(f"no track in '{text}': give tracks as numbers 1-7, e.g. TRACKS=1,3,4 (or all)")
    tracks = []
    for t in items:
        try:
            n = int(str(t).lower().removeprefix("track"))
        except ValueError:
            raise UserError(f"unknown track '{t}': tracks are numbers 1-7, e.g. TRACKS=1,3,4") from None
        if n not in ALL_TRACKS:
            raise UserError(f"unknown track {n}: tracks are 1-7 (SPEC.md section 5)")
        if n not in KNOWN_TRACKS:
            raise UserError(f"track {n} is not available in this version yet: choose from {', '.join(map(str, sorted(KNOWN_TRACKS)))}")
        tracks.append(n)
    return sorted(set(tracks))


def require_track(flags: str, track: int, tracks: list[int]) -> None:
    """A track's own options without the track would be read by nothing: said, not ignored."""
    if track not in tracks:
        raise UserError(f"{flags} is for track {track}, which is not among tracks {','.join(map(str, tracks))}: "
                        f"add {track} to --tracks, or drop {flags}")


def parse_sparsity(text: str | float | None) -> float | None:
    """Accepts 0.5, '50%' or 50; rejects negative and >100% values."""
    if text is None or text == "":
        return None
    s = str(text).strip()
    try:
        value = float(s.rstrip("%"))
    except ValueError:
        raise UserError(f"sparsity '{text}' is not a number: use e.g. 0.5 or 50%") from None
    if s.endswith("%") or value > 1:
        value /= 100
    if not 0 <= value < 1:
        raise UserError(f"sparsity {text} is out of range: it must be at least 0 and below 100%")
    return value


def resolve_device(device: str) -> str:
    if device != "auto":
        if check_device_name(device):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"device {device} requested but no CUDA GPU is visible: use --device cpu")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_bench(method: str, preset: str | None = None, model: str | None = None, tracks=None, profile: str = "quick",
               engine: str = "reference", runner: str = "local", runs_dir: str | Path = "runs",
               data_dir: str | None = None, device: str = "auto", sparsity=None, params: dict | None = None,
               gpus: str | None = None, trust_remote_code: bool = False, slurm=None, judge=None,
               backends: list[str] | None = None, compile: bool = False) -> BenchPlan:
    spec = get_method(method)
    preset_name, preset_params = spec.preset(preset)
    if engine not in spec.engines:
        raise UserError(f"{spec.name} has no '{engine}' engine here: choose from {', '.join(spec.engines)}")
    check_profile(profile)
    defaults = {**preset_params, **spec.profile_params(profile)}
    merged = {**defaults, **(params or {})}
    s = parse_sparsity(sparsity)
    if s is not None:
        if "sparsity" not in preset_params:
            raise UserError(f"{spec.name} preset {preset_name} has no sparsity to override")
        merged["sparsity"] = s
    elif "sparsity" in merged:
        parse_sparsity(merged["sparsity"])
    overrides = {k: v for k, v in merged.items() if k not in defaults or defaults[k] != v}
    engine_module = spec.engine_module(engine)
    if hasattr(engine_module, "validate_params"):
        try:
            engine_module.validate_params(merged)
        except ValueError as e:
            raise UserError(f"{spec.name} {preset_name}: {e}") from None
    if engine != "reference" and hasattr(engine_module, "settings_for"):
        # what the upstream code hard-codes (SmoothQuant's W8A8, GPTQ's bits and block size, ...):
        # refused here, where it failed in the job after its run dir was written
        try:
            engine_module.settings_for(merged)
        except (ValueError, NotImplementedError) as e:
            raise UnsupportedSetting(f"{spec.name} {preset_name} ({engine} engine): {e}") from None
    plan = plan_model(model, tracks, profile, runner, runs_dir, data_dir, device, gpus=gpus, trust_remote_code=trust_remote_code,
                      slurm=slurm, judge=judge, backends=backends, compile=compile, method_support=(spec.name, engine))
    plan.method, plan.preset, plan.params, plan.engine, plan.overrides = spec, preset_name, merged, engine, overrides or None
    return plan


def plan_model(model: str | None = None, tracks=None, profile: str = "quick", runner: str = "local",
               runs_dir: str | Path = "runs", data_dir: str | None = None, device: str = "auto", *, gpus: str | None = None,
               trust_remote_code: bool = False, slurm=None, judge=None, backends: list[str] | None = None,
               compile: bool = False, method_support: tuple[str, str] | None = None) -> BenchPlan:
    """What every plan checks besides the method: tracks, runner, device, backends, store, data
    and model. Alone (no method), it plans the model's own evaluation: `llmcbench eval` without
    --method. `method_support`: (method, engine) whose support of a registry model is checked
    before anything is downloaded."""
    check_profile(profile)
    track_list = parse_tracks(tracks)
    if runner == "slurm":  # the jobs run on the cluster's nodes: their GPUs count, not this host's
        dev = get_runner(runner, gpus, slurm=slurm).resolve_device(device)
        get_runner(runner, gpus, slurm=slurm, device=dev)  # a CUDA job needs a partition with GPUs
    else:
        get_runner(runner, gpus)
        dev = resolve_device(device)
    if backends is not None and not backends:  # `--backend ,` named none: not the default quietly
        raise UserError("--backend names no backend: pass e.g. torch_native or torch_native,vllm")
    backends = [b.strip().lower().replace("-", "_") for b in backends or ["torch_native"]]  # TensorRT-LLM, as pip spells it
    if compile and set(backends) - {"torch_native", "vllm"}:
        raise UserError("--compile is for the torch_native and vllm backends: TensorRT-LLM and MLC-LLM compile on their own")
    if 5 in track_list:
        from ..tracks.acceleration import check_backend

        for b in backends:
            try:
                check_backend(b, dev)
                if b != "torch_native" and runner == "local":  # its own environment must exist before anything runs
                    from ..tracks.acceleration.compiled_backends import backend_python

                    backend_python(b)
            except ValueError as e:
                raise UserError(str(e)) from None
            except FileNotFoundError as e:
                raise UserError(str(e)) from None
    check_runs_dir(runs_dir)
    if method_support:
        _check_model_support(*method_support, model)
    source, ddir = resolve_data(data_dir)
    model_ref = resolve_model(model, trust_remote_code=trust_remote_code)
    declared = None if method_support else declared_compression(Path(model_ref.path))
    return BenchPlan(None, None, {}, model_ref, track_list, PROFILES[profile], declared.engine if declared else "reference",
                     dev, source, ddir, Path(runs_dir), runner, gpus, slurm, judge, backends, compile=compile,
                     data_sha256=data_digest(ddir) if source == "local" else None,
                     label=(declared.method, declared.preset) if declared else ("dense", None))


def declared_compression(model_dir: Path) -> Compression | None:
    """The model dir's `compression.json` (a compressed model evaluated alone), None for a dense
    one. Its jobs carry the declared method's name, so that no report takes it for a dense baseline."""
    try:
        return read_compression(model_dir)
    except ContractError as e:
        raise UserError(f"{e}: fix or remove it (a dense model has none)") from None


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise UserError(f"unknown profile '{profile}': choose quick or paper")


def check_runs_dir(runs_dir: str | Path) -> None:
    """The store must be a directory (or not exist yet): a file there failed deep in the lock
    code with a traceback, after the plan was printed."""
    if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise UserError(f"--runs-dir {runs_dir} is a file: the result store is a directory")
    if above := file_in_the_way(Path(runs_dir)):
        raise UserError(f"--runs-dir {runs_dir} cannot be created: {above} is a file")


def _check_model_support(method: str, engine: str, model: str | None) -> None:
    """A registry model the method cannot compress (its architecture, or the reference engine's
    LLaMA-only runner) is refused before anything is downloaded or written, as the matrix marks
    such a cell unsupported; bench started the job and failed in it."""
    from .model_registry import lookup

    entry = lookup(model) if model else None
    reason = entry.supports(method, engine) if entry is not None and not entry.embedded else None
    if reason:
        raise UserError(f"{method} on {entry.name}: {reason}")


def _data_sha256(plan: BenchPlan) -> str | None:
    """What the plan's jobs read from the data dir, by content (None: they read the hub)."""
    if plan.data_source != "local":
        return None
    return plan.data_sha256 or data_digest(plan.data_dir)


def compress_job(plan: BenchPlan) -> Job:
    cal = plan.method.calibration
    p = plan.profile
    calibration = Calibration(
        dataset=cal.dataset if cal else "c4",
        nsamples=p.calib_nsamples or (cal.nsamples if cal else 128),
        seqlen=p.calib_seqlen or (cal.seqlen if cal else 2048),
        seed=cal.seed if cal else 0,
        source=plan.data_source,
        data_dir_sha256=_data_sha256(plan),
    )
    return Job(kind="compress", method=plan.method.name, preset=plan.preset, params=plan.params, overrides=plan.overrides,
               engine=plan.engine, model=plan.model, calibration=calibration, profile=p.name, device=plan.device, dtype=_dtype(plan.device),
               limits=Limits(time_limit_s=p.time_limit_s))


def eval_job(plan: BenchPlan, model: ModelRef, method: str, preset: str | None, tracks: list[int] | None = None) -> Job:
    p = plan.profile
    tracks = tracks if tracks is not None else eval_groups(plan.tracks)[0][1]
    generation = {"max_new_tokens": p.max_new_tokens} if 7 in tracks else {}  # only track 7 generates
    if 7 in tracks and plan.judge is not None:
        generation["kick_instruction"] = True
    settings = EvalSettings(tracks=tracks, tasks=list(TRACK1_TASKS) if 1 in tracks else [], limit=p.limit_for(tracks),
                            ppl_seqlen=p.ppl_seqlen, ppl_max_windows=p.ppl_max_windows, batch_size=p.batch_size,
                            data_source=plan.data_source, data_dir_sha256=_data_sha256(plan), **generation)
    return Job(kind="eval", method=method, preset=preset, engine=plan.engine if method != "dense" else "reference",
               model=model, evaluation=settings, profile=p.name, device=plan.device, dtype=_dtype(plan.device),
               limits=Limits(time_limit_s=p.time_limit_s))


def deploy_job(plan: BenchPlan, model: ModelRef, method: str, preset: str | None, backend: str) -> Job:
    p = plan.profile
    settings = DeploySettings(backend=backend, new_tokens=p.deploy_new_tokens, repeats=p.deploy_repeats,
                              batch_sizes=list(p.deploy_batch_sizes), compile=plan.compile)
    return Job(kind="deploy", method=method, preset=preset, engine=plan.engine if method != "dense" else "reference",
               model=model, deploy=settings, profile=p.name, device=plan.device, dtype=_dtype(plan.device),
               limits=Limits(time_limit_s=p.time_limit_s))


def _dtype(device: str) -> str:
    return "float16" if device.startswith("cuda") else "float32"


@dataclass
class PlannedJob:
    key: str
    job: Job
    cell: str
    job_hash: str
    run_dir: Path
    model_path: Path


def planned_jobs(plan: BenchPlan, runner=None) -> list[PlannedJob]:
    """Every job of the bench in run order, with its hash and run dir, before anything runs.

    A compressed evaluation's input is the compress job's artifact, identified by the compress
    job's hash, so the whole bench's hashes (and thus what is cached) are known up front.
    """
    runner = runner or get_runner(plan.runner_name, plan.gpus, slurm=plan.slurm, device=plan.device)
    store = Store(plan.runs_dir)
    out: list[PlannedJob] = []

    def add(key: str, job: Job, cell: str, model_path: Path) -> PlannedJob:
        h = job.job_hash(runner.environment_id(job))
        out.append(PlannedJob(key, job, cell, h, store.run_dir(cell, h), model_path))
        return out[-1]

    if plan.method is None:  # the model alone, under its own label: dense, or what its compression.json declares
        method, preset = plan.label
        for suffix, tracks in eval_groups(plan.tracks):
            add("eval" + suffix, eval_job(plan, plan.model, method, preset, tracks), plan.cell, Path(plan.model.path))
        if 5 in plan.tracks:
            for backend in plan.backends:
                add(f"deploy {backend}", deploy_job(plan, plan.model, method, preset, backend), plan.cell, Path(plan.model.path))
        return out
    comp = add("compress", compress_job(plan), plan.cell, Path(plan.model.path))
    artifact = ModelRef(name="model", source="artifact", identity=f"artifact:{comp.job_hash}", path=str(comp.run_dir / "model"))
    for suffix, tracks in eval_groups(plan.tracks):
        add("dense eval" + suffix, eval_job(plan, plan.model, "dense", None, tracks),
            cell_name("dense", None, plan.model.name), Path(plan.model.path))
        add("compressed eval" + suffix, eval_job(plan, artifact, plan.method.name, plan.preset, tracks),
            plan.cell, comp.run_dir / "model")
    if 5 in plan.tracks:
        for backend in plan.backends:
            add(f"dense deploy {backend}", deploy_job(plan, plan.model, "dense", None, backend),
                cell_name("dense", None, plan.model.name), Path(plan.model.path))
            add(f"compressed deploy {backend}", deploy_job(plan, artifact, plan.method.name, plan.preset, backend),
                plan.cell, comp.run_dir / "model")
    return out


def cached_jobs(plan: BenchPlan) -> tuple[int, int]:
    """(jobs already in the store, jobs planned): a bench with all its jobs cached runs nothing."""
    jobs = planned_jobs(plan)
    store = Store(plan.runs_dir)
    compressed = store.cached(jobs[0].run_dir) if jobs and jobs[0].key == "compress" else None
    return sum(_cached(store, p.run_dir, _reading(p.job, compressed)) is not None for p in jobs), len(jobs)


def _reading(job: Job, compressed: Result | None) -> Job:
    """The job as it runs: one that reads the compress job's artifact records that artifact's
    digest (`ModelRef.artifact_sha256`, outside the job hash)."""
    if job.model.source != "artifact" or compressed is None:
        return job
    return job.model_copy(update={"model": job.model.model_copy(update={"artifact_sha256": artifact_digest(compressed)})})


def _cached(store: Store, run_dir: Path, job: Job) -> Result | None:
    """The store's result of the job, or None. A job on an artifact is cached only for the
    artifact it read: `llmcbench compress --force` can recompute the artifact with other
    weights (another thread count or GPU rounds differently) under the same hash, and an
    evaluation of the old weights must not score the new ones. A run recorded before the
    digest existed (None) is kept."""
    result = store.cached(run_dir)
    wanted = job.model.artifact_sha256
    if result is None or wanted is None:
        return result
    try:
        ran_on = read_record(run_dir / "job.json", Job).model.artifact_sha256
    except ContractError:
        return None
    return None if ran_on is not None and ran_on != wanted else result


_RUN_DIR_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _run_dir_lock(run_dir: Path) -> threading.Lock:
    """Parallel benches of a matrix share the dense evaluations: one runs it, the others wait for the cache."""
    with _LOCKS_GUARD:
        return _RUN_DIR_LOCKS.setdefault(run_dir, threading.Lock())


@contextmanager
def _job_lock(store: Store, p: PlannedJob, on_job: Callable | None):
    """Hold the job's inter-process lock. When another process holds it (it runs this job, or judges its answers),
    say so on the job's progress line and wait; yields that line's callback if one was opened."""
    lock = store.lock(p.run_dir)
    on_line = None
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_job:
            on_line = on_job(p.key, p.job, None)
            on_line(f"waiting: another llmcbench process holds this job, running it or judging its answers ({lock.lock_file})")
        lock.acquire()
    try:
        yield on_line
    finally:
        lock.release()


def run_bench(plan: BenchPlan, force: bool = False, on_job: Callable | None = None, runner=None,
              only: Callable[[str], bool] | None = None) -> BenchPlan:
    """Run (or find cached) the compress job and the dense and compressed evaluations; fills `plan.runs`.
    `only`: which job keys to run (`llmcbench compress` and `eval` run one step of a bench)."""
    runner = runner or get_runner(plan.runner_name, plan.gpus, slurm=plan.slurm, device=plan.device)
    store = Store(plan.runs_dir)
    # The environment (what enters a job's hash) may differ per job kind (the docker runner's
    # method and eval images); planning asks for each, which checks the runner can run every job.
    for p in planned_jobs(plan, runner):
        if only is not None and not only(p.key):
            continue
        with _run_dir_lock(p.run_dir), _job_lock(store, p, on_job) as on_line:
            if force and p.run_dir.exists():
                shutil.rmtree(p.run_dir)
            comp = plan.runs.get("compress")
            job = _reading(p.job, comp.result if comp else None)
            cached = _cached(store, p.run_dir, job)
            if cached is not None:
                run = JobRun(job, p.job_hash, p.run_dir, cached, True)
            else:
                check_stopping()  # an interrupted matrix: the killed job's run dir (its log) is kept, not prepared afresh
                store.prepare(p.run_dir, job)
                if on_line is None and on_job:
                    on_line = on_job(p.key, job, None)
                result = runner.run(job, p.job_hash, p.run_dir, p.model_path, plan.data_dir, on_line=on_line)
                run = JobRun(job, p.job_hash, p.run_dir, result, False)
        if on_job:
            on_job(p.key, job, run)
        if run.result.status != "ok":
            err = run.result.error
            hint = f"; {out_of_disk_hint(plan.runs_dir)}" if err.type == "out_of_disk" else ""
            raise JobFailed(f"{p.key} job failed ({err.type}: {err.message}); log kept in {p.run_dir / 'log.txt'}{hint}",
                            p.run_dir, err.type)
        plan.runs[p.key] = run
    if plan.judge is not None and "compressed eval t7" in plan.runs:
        from .judging import judge_bench

        # under the compressed evaluation's locks: two benches of one cell ask the judge once, the
        # second reads the first's judge.json (an API's calls cost money)
        judged = plan.runs["compressed eval t7"].run_dir
        with _run_dir_lock(judged), store.lock(judged):
            judge_bench(plan)
    return plan
