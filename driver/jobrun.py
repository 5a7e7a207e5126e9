"""The job process: what runs inside a container (or a local child process).

It reads only the volume contract: `/job/job.json`, the input model under `/models`,
data under `/data`, and writes `/out` (`model/` with `compression.json`, `log.txt` via
its stdout, and `result.json` last). The compression step is timed apart from model
loading and saving (SPEC.md track 3); peak memory is the process's host RSS and, on GPU,
torch's peak reserved memory.

    python -m llmcbench.driver.jobrun --job /job/job.json --models /models --data /data --out /out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from .contract import COMPRESSION_FILE, Compression, ErrorInfo, Job, Provenance, Result, read_compression, read_record
from .errors import classify_exception
from .fsio import sha256_file, sha256_tree, write_record
from .gpu_sampler import UsedMemorySampler

# written whole, then renamed to model/ and packed/; and the upstream engine's working copies
# (its staged input model, its own dumps), removed when it succeeds: a failed job keeps its logs
# (out/upstream/, log.txt), not gigabytes of weights that also hold the room result.json needs
MODEL_PARTIAL, PACKED_PARTIAL, UPSTREAM_WORK = ".model.partial", ".packed.partial", ".upstream-work"
PARTIAL_OUTPUTS = (MODEL_PARTIAL, PACKED_PARTIAL, UPSTREAM_WORK)


class Paths:
    def __init__(self, job: Path, models: Path, data: Path, out: Path):
        self.job, self.models, self.data, self.out = Path(job), Path(models), Path(data), Path(out)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _log(msg: str) -> None:
    print(f"[llmcbench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device(job: Job):
    import torch

    if job.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"job asks for device {job.device} but no CUDA GPU is visible")
    return torch.device(job.device)


def load_model(path: Path, job: Job):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..methods._engine.structured import load_structured_pruned

    dtype = getattr(torch, job.dtype)
    # a structured-pruned artifact with per-layer shapes (declared in its compression.json)
    model = load_structured_pruned(path, dtype=dtype, trust_remote_code=job.model.trust_remote_code)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=job.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=job.model.trust_remote_code)
    return model.eval(), tokenizer


def _gpu_uuid(torch, device) -> str | None:
    """The uuid of a CUDA `device` (what nvidia-smi names it by); None for a CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return str(props.uuid) if getattr(props, "uuid", None) else None


def run_compress(job: Job, paths: Paths, result: dict) -> None:
    import torch

    from ..methods._engine.calibration import calibration_documents, load_calibration
    from .registry import get_method

    spec = get_method(job.method)
    engine = spec.engine_module(job.engine)
    if getattr(engine, "ADAPTER", None) is not None:
        # the upstream engine: the original repository's own code, through its adapter
        from ..methods._upstream.run import run_upstream

        return run_upstream(job, paths, result, engine.ADAPTER, spec.upstream.commit)
    device = _device(job)
    model_dir = paths.models / job.model.name

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, job)
    cal = job.calibration
    calib_file = None if cal.source == "hub" else paths.data / "hf" / "allenai__c4" / "en" / "train.jsonl"
    calibration_ids, calib_sha = load_calibration(tokenizer, calib_file, nsamples=cal.nsamples, seqlen=cal.seqlen, seed=cal.seed)
    extra = {}
    draw_examples = getattr(engine, "draw_examples", None)
    if draw_examples is not None:  # an engine that draws more from the same documents its own way (LLM-Pruner's Taylor examples)
        examples = draw_examples(tokenizer, calibration_documents(calib_file)[0], dict(job.params))
        if examples is not None:
            extra["examples"] = examples
    result["load_s"] = time.perf_counter() - t0
    # the thread count changes float summation order on CPU: two runs of one job that produced
    # different weights are told apart here first (with the calibration hash)
    _log(f"loaded {job.model.name} and {cal.nsamples}x{cal.seqlen} calibration tokens (sha256 {(calib_sha or 'hub')[:12]}) "
         f"in {result['load_s']:.1f} s; {device.type}, torch {torch.get_num_threads()} threads")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # track 3 measures the compression step alone (SPEC 5): the host peak from here on, not the
    # load's (from_pretrained and the calibration set peak above the model they leave resident)
    from ..tracks.acceleration.measure_common import peak_rss, reset_peak_rss

    step_rss = reset_peak_rss([os.getpid()])
    with UsedMemorySampler(_gpu_uuid(torch, device)) as nvml:  # SPEC 5's cross-check, from outside torch
        t0 = time.perf_counter()
        output = engine.compress(model, calibration_ids, dict(job.params), device, **extra)
        declaration, export_packed = (output, None) if isinstance(output, Compression) else (output.declaration, output.export_packed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result["peak_gpu_bytes"] = torch.cuda.max_memory_reserved(device)
        result["compress_s"] = time.perf_counter() - t0
    compress_peak_rss = peak_rss([os.getpid()]) if step_rss else peak_rss_bytes()
    _log(f"compressed with {job.method}/{job.preset} ({job.engine}) in {result['compress_s']:.1f} s")

    t0 = time.perf_counter()
    declaration = declaration.model_copy(update={"method": job.method, "preset": job.preset, "engine": job.engine})
    tmp = paths.out / MODEL_PARTIAL
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_record(tmp / COMPRESSION_FILE, declaration)
    final = paths.out / "model"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if export_packed is not None:
        packed_tmp, packed = paths.out / PACKED_PARTIAL, paths.out / "packed"
        shutil.rmtree(packed_tmp, ignore_errors=True)
        packed_tmp.mkdir()
        declaration = declaration.model_copy(update={"packed_format": export_packed(packed_tmp)})
        write_record(final / COMPRESSION_FILE, declaration)
        shutil.rmtree(packed, ignore_errors=True)
        os.replace(packed_tmp, packed)
    result["save_s"] = time.perf_counter() - t0

    result["input_sha256"]["calibration"] = calib_sha or "hub:allenai/c4"
    result["output_sha256"] = {f"model/{k}": v for k, v in sha256_tree(final).items()}
    if export_packed is not None:
        result["output_sha256"].update({f"packed/{k}": v for k, v in sha256_tree(paths.out / "packed").items()})
    result["metrics"] = {
        "track3": {
            "compress_s": result["compress_s"],
            "compress_peak_rss_bytes": compress_peak_rss,
            "compress_peak_rss_scope": "compress_step" if step_rss else "process_lifetime",
            "compress_peak_gpu_bytes": result.get("peak_gpu_bytes"),
            "compress_gpu_used_nvml_bytes": nvml.peak_bytes,
            "device": str(device),
        },
        "compression": {"measured_sparsity": declaration.measured_sparsity, "weight_bits": declaration.weight_bits, "act_bits": declaration.act_bits},
    }


def run_deploy(job: Job, paths: Paths, result: dict) -> None:
    """Track 5: decode tokens/s of the model on the job's backend (tracks/acceleration)."""
    from ..tracks.acceleration import evaluate_deploy

    device = _device(job)
    model_dir = paths.models / job.model.name
    declaration = read_compression(model_dir)
    if job.deploy.backend != "torch_native":
        # vLLM, TensorRT-LLM, MLC-LLM load (and compile) the artifact themselves, in their own environments
        from ..tracks.acceleration.backends import check_backend
        from ..tracks.acceleration.compiled_backends import evaluate_compiled
        from ..tracks.acceleration.vllm_backend import evaluate_vllm

        check_backend(job.deploy.backend, str(device))
        if job.deploy.backend == "vllm":
            t5 = evaluate_vllm(model_dir, declaration, job.deploy, str(device), timeout_s=job.limits.time_limit_s)
        else:
            t5 = evaluate_compiled(job.deploy.backend, model_dir, declaration, job.deploy, str(device),
                                   timeout_s=job.limits.time_limit_s)
        result["load_s"] = t5.pop("load_s", None)
        result["metrics"] = {"track5": t5}
        _log(f"track 5: {t5['backend']} {t5['category']}: {t5['tokens_per_s']:.1f} tokens/s at batch 1 ({t5['kernel']})")
        return
    t0 = time.perf_counter()
    model, _ = load_model(model_dir, job)
    model.to(device)
    result["load_s"] = time.perf_counter() - t0
    t5 = evaluate_deploy(model, declaration, job.deploy, device)
    result["metrics"] = {"track5": t5}
    _log(f"track 5: {t5['backend']} {t5['category']}: {t5['tokens_per_s']:.1f} tokens/s at batch 1 ({t5['kernel']}), "
         f"peak memory {t5['peak_memory_bytes'] / 1e9:.2f} GB" + "".join(f"; {n}" for n in t5["notes"]))


def run_eval(job: Job, paths: Paths, result: dict) -> None:
    from ..tracks.inference.measure import count_macs, eval_inference_memory, eval_model_size
    from ..tracks.fakequant import apply_declared_activation_quant
    from ..tracks.performance import evaluate_tasks, wikitext2_ppl
    from ..tracks.records import track4_memory_note

    settings = job.evaluation
    device = _device(job)
    model_dir = paths.models / job.model.name
    declaration = read_compression(model_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, job)
    model.to(device)
    # A W8A8/W4A4 artifact is evaluated with the activation quantization it declares, on every track.
    activation_quant = apply_declared_activation_quant(model, declaration)
    result["load_s"] = time.perf_counter() - t0
    metrics: dict = {}
    if activation_quant is not None:
        metrics["activation_quantization"] = activation_quant.record()
        _log(f"activation fake-quantization applied: {declaration.act_bits}-bit {declaration.act_granularity} "
             f"on {len(activation_quant.linears)} linears")
    if 4 in settings.tracks:
        # Measured first, before the accuracy tasks grow the process's memory.
        macs = count_macs(model, seqlen=settings.macs_seqlen, compression=declaration)
        metrics["track4"] = {
            **eval_inference_memory(model, model_dir, declaration, seqlen=settings.macs_seqlen, device=device),
            **eval_model_size(model_dir, model, job.dtype, compressed=declaration is not None),
            "macs": macs,
            "macs_seqlen": settings.macs_seqlen,
        }
        t4, memory_note = metrics["track4"], track4_memory_note(metrics)
        _log(f"track 4: {t4['model_size_bytes'] / 1e6:.1f} MB on disk, {macs['effective_macs'] / 1e9:.2f} GMACs effective, "
             f"{t4['inference_memory_bytes'] / 1e6:.1f} MB at inference"
             + (f" ({memory_note.removeprefix('track 4: ')})" if memory_note else ""))
    data_dir = None if settings.data_source == "hub" else paths.data
    ppl = None
    if 1 in settings.tracks or 2 in settings.tracks:
        # Track 2 is WikiText-2 ppl alone (GPTQ-style windows); track 1 reuses the same figure.
        t0 = time.perf_counter()
        ppl = wikitext2_ppl(model, tokenizer, data_dir=data_dir, seqlen=settings.ppl_seqlen,
                            max_windows=settings.ppl_max_windows, device=device)
        ppl_s = time.perf_counter() - t0
        if 2 in settings.tracks:
            metrics["track2"] = {"wikitext2": ppl, "eval_s": ppl_s}
            _log(f"track 2: wikitext2 ppl {ppl['ppl']:.2f} in {ppl_s:.0f} s")
    if 1 in settings.tracks:
        t0 = time.perf_counter()
        tasks = evaluate_tasks(model, tokenizer, tasks=settings.tasks, data_dir=data_dir, limit=settings.limit,
                               batch_size=settings.batch_size, mmlu_shots=settings.mmlu_shots)
        metrics["track1"] = {"tasks": tasks, "wikitext2": ppl, "eval_s": time.perf_counter() - t0 + ppl_s}
        _log(f"track 1: {len(tasks)} tasks, wikitext2 ppl {ppl['ppl']:.2f} in {metrics['track1']['eval_s']:.0f} s")
    if 6 in settings.tracks:
        from ..tracks.trust import evaluate_trust

        t0 = time.perf_counter()
        metrics["track6"] = evaluate_trust(model, tokenizer, data_dir=data_dir, limit=settings.limit, batch_size=settings.batch_size)
        metrics["track6"]["eval_s"] = time.perf_counter() - t0
        _log(f"track 6: AdvGLUE + TruthfulQA in {metrics['track6']['eval_s']:.0f} s")
    if 7 in settings.tracks:
        from ..tracks.kick import evaluate_kick

        t0 = time.perf_counter()
        metrics["track7"] = evaluate_kick(model, tokenizer, data_dir=data_dir, limit=settings.limit, batch_size=settings.batch_size,
                                          device=device, max_new_tokens=settings.max_new_tokens,
                                          instruction=settings.kick_instruction)
        metrics["track7"]["eval_s"] = time.perf_counter() - t0
        _log(f"track 7: LLM-KICK in {metrics['track7']['eval_s']:.0f} s")
    bad = [k for k, v in _flatten(metrics) if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {', '.join(bad)}")
    if device.type == "cuda":
        import torch

        result["peak_gpu_bytes"] = torch.cuda.max_memory_reserved(device)
    result["metrics"] = metrics


def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def execute(paths: Paths) -> int:
    """Run one job; always leaves a sealed result.json (written last, atomically)."""
    started, t_start = _now(), time.perf_counter()
    result: dict = {"input_sha256": {}, "output_sha256": {}, "metrics": {}}
    job_hash = "unknown"
    status, error = "ok", None
    provenance = Provenance(runner=os.environ.get("LLMCBENCH_RUNNER", "local"),
                            image=os.environ.get("LLMCBENCH_IMAGE"), image_digest=os.environ.get("LLMCBENCH_IMAGE_DIGEST"))
    environment = None
    try:
        job_hash = os.environ.get("LLMCBENCH_JOB_HASH", "unknown")
        result["input_sha256"]["job.json"] = sha256_file(paths.job)
        job = read_record(paths.job, Job)
        from .environment import collect_environment

        environment = collect_environment()
        _log(f"{job.kind} job {job_hash[:12]}: {job.method}/{job.preset} on {job.model.name} ({job.device}, {job.dtype})")
        from .numerics import RESOLVED, warm_up_vml

        if warm_up_vml():  # before any op runs on several threads: see numerics.py
            _log(RESOLVED)
        if job.kind == "compress":
            from .registry import get_method

            upstream = get_method(job.method).upstream
            provenance.upstream_repo, provenance.upstream_commit = upstream.repo, upstream.commit
            try:
                run_compress(job, paths, result)
            finally:
                if job.engine == "upstream":  # what ran: the checkout's own commit (None where it cannot tell)
                    provenance.upstream_commit = result.get("upstream_commit")
        elif job.kind == "eval":
            run_eval(job, paths, result)
        elif job.kind == "deploy":
            run_deploy(job, paths, result)
        else:
            raise NotImplementedError(f"job kind {job.kind} is not implemented by this image")
    except BaseException as e:  # noqa: BLE001 - every failure becomes a failed result
        traceback.print_exc()
        status = "failed"
        # nothing half-written stays: on a full disk the partial weights also hold the room result.json needs
        for partial in PARTIAL_OUTPUTS:
            shutil.rmtree(paths.out / partial, ignore_errors=True)
        error = ErrorInfo(type="nan_metric" if isinstance(e, FloatingPointError) else classify_exception(e),
                          message=f"{type(e).__name__}: {e}".splitlines()[0][:500])
    record = Result(
        job_hash=job_hash, status=status, error=error, started_at=started, finished_at=_now(),
        wall_s=time.perf_counter() - t_start, load_s=result.get("load_s"), compress_s=result.get("compress_s"),
        save_s=result.get("save_s"), peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=result.get("peak_gpu_bytes"),
        environment=environment or {}, provenance=provenance, input_sha256=result["input_sha256"],
        output_sha256=result["output_sha256"], metrics=json.loads(json.dumps(result["metrics"], default=float)),
    ).sealed()
    sys.stdout.flush()
    sys.stderr.flush()
    write_record(paths.out / "result.json", record)
    _log(f"status {status}" + (f": {error.type}: {error.message}" if error else ""))
    return 0 if status == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="/job/job.json")
    ap.add_argument("--models", default="/models")
    ap.add_argument("--data", default="/data")
    ap.add_argument("--out", default="/out")
    a = ap.parse_args(argv)
    return execute(Paths(a.job, a.models, a.data, a.out))


if __name__ == "__main__":
    sys.exit(main())
