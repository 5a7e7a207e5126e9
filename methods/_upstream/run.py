"""Run a compress job on the upstream engine: stage, run upstream's steps, convert, record.

Called by `driver/jobrun.py` when the job's engine module defines `ADAPTER`. The upstream
processes run under the upstream interpreter with `shim.py` around them, in the job
process's own process group (a runner's time limit or Ctrl-C kills them with the job).
Each step's output goes to the job log and to `out/upstream/<step>.log`, which stays with
the run whatever happens, so a failed cell always has upstream's own words.

Failures are exceptions with an `error_type` the job records:
- upstream exits non-zero: `crash` (`oom` when its log says CUDA/CPU out of memory, `out_of_disk`
  when it says the disk is full);
- upstream still runs at the job's time limit: `timeout` (killed first, log kept);
- upstream asks for data that was not staged before it saved anything: `bad_input`;
- upstream exits 0 but leaves no model where the adapter expects one: `crash`;
- no upstream checkout here, or one at another commit than method.toml pins: `bad_input`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

from llmcbench.driver.contract import Job
from llmcbench.driver.errors import is_out_of_disk
from llmcbench.driver.fsio import sha256_file, sha256_tree, write_record
from llmcbench.driver.jobrun import MODEL_PARTIAL, PACKED_PARTIAL, UPSTREAM_WORK

from .adapter import NUMERICS, SHIM, Step, UpstreamAdapter, UpstreamContext
from .shim import EXIT_NOT_STAGED, EXIT_PDB
from .staging import checkout_commit, cut_wikitext_test, dataset_rules, stage_data, stage_model, upstream_python, upstream_repo

DEADLINE_MARGIN_S = 10  # leave the job this long to write its failed result before the runner's own kill
LOG_TAIL_LINES = 20


class UpstreamError(RuntimeError):
    def __init__(self, message: str, error_type: str = "crash"):
        super().__init__(message)
        self.error_type = error_type


def _log(msg: str) -> None:
    print(f"[llmcbench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("[llmcbench-shim]")]
    return " | ".join(lines[-n:])[-400:] if lines else "(no output)"


def _classify_exit(rc: int, text: str) -> str:
    low = text.lower()
    if "out of memory" in low or "outofmemoryerror" in low or rc == -9:
        return "oom"
    if rc == EXIT_NOT_STAGED:
        return "bad_input"
    if is_out_of_disk(text):
        return "out_of_disk"
    return "crash"


def run_step(ctx: UpstreamContext, step: Step, logs_dir: Path, deadline: float) -> tuple[str, list[dict], float]:
    """One upstream process; returns its output, its shim events and its wall time."""
    from llmcbench.driver.runners.local import _lines

    events_path = logs_dir / f"{step.name}.events.jsonl"
    events_path.unlink(missing_ok=True)
    if step.helper:
        cmd = [ctx.python, step.script, *step.argv]
    else:
        hooks = {
            "script": str(ctx.repo / step.script), "argv": step.argv, "events": str(events_path),
            "datasets": dataset_rules(ctx.staged, unused_splits=step.unused_splits),
            "allow_hub": not ctx.staged.offline, "time": step.time, "save": step.save, "no_pdb": True, "outputs": step.outputs,
            "cuda_to_cpu": ctx.device == "cpu", "warm_up_vml": str(NUMERICS),
        }
        hooks_path = logs_dir / f"{step.name}.hooks.json"
        hooks_path.write_text(json.dumps(hooks, indent=2) + "\n")
        cmd = [ctx.python, str(SHIM), "--hooks", str(hooks_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ctx.repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1" if ctx.staged.offline else "0",
           "HF_DATASETS_OFFLINE": "1" if ctx.staged.offline else "0", **step.env}
    _log(f"upstream step {step.name}: {step.describe()}")
    t0 = time.perf_counter()
    out = bytearray()
    with open(logs_dir / f"{step.name}.log", "wb") as log:
        # the scratch dir is the working directory: upstream code that writes relative paths
        # (LLM-Pruner's prune_log/) never writes into the (read-only) checkout
        proc = subprocess.Popen(cmd, cwd=ctx.work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            for line in _lines(proc, deadline):
                log.write(line)
                log.flush()
                out += line
                print(line.decode(errors="replace"), end="", flush=True)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise UpstreamError(f"upstream step {step.name} still running at the job's time limit "
                                f"({ctx.job.limits.time_limit_s} s); killed", "timeout") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        rc = proc.wait()
    wall = time.perf_counter() - t0
    text = out.decode(errors="replace")
    if rc == EXIT_PDB:
        raise UpstreamError(f"upstream step {step.name} hit pdb.set_trace() (a NaN loss in OmniQuant): {_last_lines(text, 1)}")
    if rc != 0:
        raise UpstreamError(f"upstream step {step.name} exited with code {rc}: {_last_lines(text)}", _classify_exit(rc, text))
    events = [json.loads(ln) for ln in events_path.read_text().splitlines()] if events_path.is_file() else []
    return text, events, wall


def cut_own_eval_text(job: Job, ctx: UpstreamContext, adapter: UpstreamAdapter) -> dict | None:
    """On a profile whose own perplexity scores only the first windows (quick), serve upstream's own
    evaluation the same prefix of WikiText-2 test (staging.cut_wikitext_test), never less than one
    window of upstream's sequence length; on `paper` the whole split, as upstream reads it."""
    from llmcbench.driver.profiles import PROFILES

    profile = PROFILES.get(job.profile)
    source = ctx.staged.wikitext_test
    if source is None or not ctx.staged.offline:
        return None
    if profile is None or profile.ppl_max_windows is None:
        return {"cut": False, "why": f"{job.profile} profile: the whole test split, as upstream reads it"}
    window = adapter.own_eval_window(ctx)
    tokens = max(profile.ppl_max_windows * profile.ppl_seqlen, window)
    served = cut_wikitext_test(source, ctx.work / "data" / "wikitext-2-raw-v1-test.jsonl", ctx.input_model, tokens)
    if served["cut"]:
        ctx.staged.wikitext_test = ctx.work / "data" / "wikitext-2-raw-v1-test.jsonl"
        _log(f"{job.profile} profile: upstream's own WikiText-2 perplexity is served the first {served['rows']} of "
             f"{served['rows_total']} test rows ({served['tokens']} tokens; at least {tokens})")
    return {**served, "why": f"{job.profile} profile: our perplexity scores {profile.ppl_max_windows} windows of "
                             f"{profile.ppl_seqlen}; upstream's needs one window of {window}"}


def _interpreter(events_path: Path, result: dict) -> dict | None:
    """The interpreter upstream's code ran on, from the shim's first event (its Python, torch and CUDA
    build, transformers, accelerate, datasets: the method's pinned stack, not the harness's), put
    into `metrics.upstream.environment` at once, so that a failed job keeps it too."""
    try:
        with open(events_path) as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(first, dict) or first.get("event") != "environment":
        return None
    versions = {k: v for k, v in first.items() if k not in ("event", "t")}
    result["metrics"].setdefault("upstream", {})["environment"] = versions
    return versions


def run_upstream(job: Job, paths, result: dict, adapter: UpstreamAdapter, pinned_commit: str) -> None:
    """The upstream counterpart of jobrun.run_compress; fills `result` the same way."""
    t_start = time.monotonic()
    repo = upstream_repo(job.method)
    commit = checkout_commit(repo)
    result["upstream_commit"] = commit  # the provenance of what runs: None where the checkout cannot tell
    if commit is not None and commit != pinned_commit:
        raise UpstreamError(f"upstream checkout {repo} is at {commit[:12]} but method.toml pins {pinned_commit[:12]}", "bad_input")
    offline = job.calibration is None or job.calibration.source != "hub"
    logs_dir = paths.out / "upstream"
    work, model_out, packed_out = paths.out / UPSTREAM_WORK, paths.out / MODEL_PARTIAL, paths.out / PACKED_PARTIAL
    for d in (work, model_out, packed_out):
        shutil.rmtree(d, ignore_errors=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    model_dir = (paths.models / job.model.name).resolve()
    upstream_model, rewritten = stage_model(model_dir, work / "input")
    if rewritten:
        _log(f"input model staged for upstream's transformers 4.x stack: {'; '.join(rewritten)}")
    ctx = UpstreamContext(job=job, params=dict(job.params), repo=repo, python=upstream_python(),
                          model_dir=upstream_model, source_model_dir=model_dir, work=work, model_out=model_out,
                          staged=stage_data(paths.data, offline=offline), device=job.device)
    own_eval_text = cut_own_eval_text(job, ctx, adapter)
    steps = adapter.steps(ctx)
    deadline = t_start + max(1, job.limits.time_limit_s - DEADLINE_MARGIN_S)

    compress_s, timing, texts, walls, half_as_float, all_timed, versions = 0.0, [], [], {}, False, [], None
    t_run = time.perf_counter()
    for step in steps:
        try:
            text, events, wall = run_step(ctx, step, logs_dir, deadline)
        finally:  # a failed step's interpreter too: where the stack matters most
            versions = versions or _interpreter(logs_dir / f"{step.name}.events.jsonl", result)
        texts.append(text)
        walls[step.name] = wall
        half_as_float |= any(e.get("event") == "cuda_to_cpu" and e.get("half_to_float") for e in events)
        timed = [e for e in events if e.get("event") == "timed"]
        all_timed += timed
        if timed:
            compress_s += sum(e["seconds"] for e in timed if not e.get("nested"))
            timing += [f"{step.name}: {e['target']}" for e in timed]
        elif step.compress:
            compress_s += wall
            timing.append(f"{step.name}: whole step")
    upstream_s = time.perf_counter() - t_run
    if not timing:
        raise UpstreamError("no upstream step reported a compression time (adapter declares no timed step)")

    t0 = time.perf_counter()
    declaration = adapter.convert(ctx)
    if not (model_out / "config.json").is_file() or not any(model_out.glob("*.safetensors")) and not any(model_out.glob("*.bin")):
        raise UpstreamError(f"upstream finished but left no model to convert ({adapter.method}: nothing in {model_out.name})")
    declaration = declaration.model_copy(update={"method": job.method, "preset": job.preset, "engine": job.engine})
    write_record(model_out / "compression.json", declaration)
    final = paths.out / "model"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(model_out, final)
    if packed_out.is_dir():
        shutil.rmtree(paths.out / "packed", ignore_errors=True)
        os.replace(packed_out, paths.out / "packed")
    shutil.rmtree(work, ignore_errors=True)
    result["save_s"] = time.perf_counter() - t0
    result["compress_s"] = compress_s
    # the peaks of the timed functions (shim.timed_window): GPU reserved, and host RSS where every
    # timed call could reset it; else the largest child's lifetime peak, load and own evaluation included
    result["peak_gpu_bytes"] = max((e["peak_gpu_bytes"] for e in all_timed if e.get("peak_gpu_bytes")), default=None)
    step_rss = bool(all_timed) and all(e.get("peak_rss_bytes") for e in all_timed)
    peak_rss = (max(e["peak_rss_bytes"] for e in all_timed) if step_rss
                else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    result["load_s"] = max(0.0, upstream_s - compress_s)  # upstream's loading, data and own evaluation

    if offline and ctx.staged.calibration is not None:
        result["input_sha256"]["calibration"] = sha256_file(ctx.staged.calibration)
    result["output_sha256"] = {f"model/{k}": v for k, v in sha256_tree(final).items()}
    if (paths.out / "packed").is_dir():
        result["output_sha256"].update({f"packed/{k}": v for k, v in sha256_tree(paths.out / "packed").items()})
    result["metrics"] = {
        "track3": {"compress_s": compress_s, "compress_peak_rss_bytes": peak_rss,
                   "compress_peak_rss_scope": "compress_step" if step_rss else "upstream_process_lifetime",
                   "compress_peak_gpu_bytes": result["peak_gpu_bytes"],
                   # no NVML cross-check: upstream's torch (2.1-2.3) names no device uuid to find its GPU by (gpu_sampler.py)
                   "compress_gpu_used_nvml_bytes": None, "device": job.device, "timed": timing},
        "compression": {"measured_sparsity": declaration.measured_sparsity, "weight_bits": declaration.weight_bits,
                        "act_bits": declaration.act_bits},
        "upstream": {
            "reported": adapter.parse_metrics("\n".join(texts)),
            "commands": [s.describe() for s in steps],
            "step_wall_s": walls,
            "checkout": str(repo), "commit": commit or "unknown (not a git checkout)",
            "python": ctx.python, "environment": versions, "offline_data": offline,
            # what the copy of the input model given to upstream rewrote (staging.stage_model)
            "staged_model": rewritten,
            # the WikiText-2 test text upstream's own perplexity was served (a prefix on the quick profile)
            "own_eval_text": own_eval_text,
            # on a CPU job the shim ran upstream's hard-coded CUDA calls on the CPU
            "cuda_mapped_to_cpu": ctx.device == "cpu",
            # ... and its fp16 as fp32 (the stacks' CPU builds have no fp16 matmul, or a slow one)
            "fp16_as_fp32_on_cpu": half_as_float,
        },
    }
    _log(f"upstream {job.method}/{job.preset}: compression {compress_s:.1f} s of {upstream_s:.1f} s upstream "
         f"({'; '.join(timing)}); upstream reported {result['metrics']['upstream']['reported'] or 'no metrics'}")
