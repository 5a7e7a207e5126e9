"""Track 4, inference consumption: MACs, size on disk, inference memory (SPEC.md section 5).

MACs are counted by torch's own `FlopCounterMode` on a (1, seqlen) input, 128 tokens by
default, and halved (one multiply-accumulate = two FLOPs). Two figures:

- raw MACs: what the dense kernels execute;
- effective MACs: each linear's MACs, read from the counter's per-module breakdown, scaled by
  its density measured from the weights (a pruned weight contributes nothing) and by
  (weight_bits / 16)^2 for a weight the compression declaration says is quantized (this
  reproduces the paper's Table 3). Everything outside the linears (attention score and value
  products) is counted as is.

torch's counter has no formula for the CPU fused attention kernel
(`_scaled_dot_product_flash_attention_for_cpu`), so one is registered here with torch's own
`sdpa_flop_count`; on CUDA the flash / efficient / cuDNN kernels are counted by torch. As
torch does, the full seqlen x seqlen score matrix is counted (no causal discount).
"""

from __future__ import annotations

import json
import os
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from llmcbench.driver.contract import Compression
from llmcbench.tracks.acceleration.measure_common import reset_peak_rss, status_kib

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _weight_bits(name: str, linear: nn.Linear, model: nn.Module, compression: Compression | None) -> int:
    """A linear's weight bits as the declaration states them.

    A linear named in `compression.layers` has its own `weight_bits`, or the model-wide
    `weight_bits` when that is unset; one not named is 16-bit. A declaration without
    per-layer entries applies its `weight_bits` to every linear but the output head (the
    quantization methods here all leave lm_head in 16 bits).
    """
    if compression is None:
        return 16
    if compression.layers:
        layer = compression.layers.get(name)
        if layer is None:
            return 16
        return layer.weight_bits if layer.weight_bits is not None else compression.weight_bits
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return 16 if linear is head else compression.weight_bits


def _density(weight: torch.Tensor, compression: Compression | None) -> float:
    """The share of a linear's weights that count: its nonzeros where the artifact declares
    sparsity (or declares nothing), all of them for a quantized-only artifact. Its stored
    weights are dequantized, so every weight on the zero level reads 0: counting those as
    pruned took a GPTQ W4 g128 layer to density 0.86 and understated its MACs by 14% on top
    of the (bits/16)^2 scaling, where SPEC 5 discounts only pruned weights."""
    if compression is not None and compression.sparsity_pattern == "none":
        return 1.0
    return 1.0 - int((weight == 0).sum().item()) / weight.numel()


@torch.no_grad()
def count_macs(model: nn.Module, seqlen: int = 128, compression: Compression | None = None) -> dict:
    """Raw and effective MACs of one forward over a (1, seqlen) input.

    Returns `raw_macs`, `effective_macs`, `linear_raw_macs`, `linear_effective_macs`,
    `seqlen`, and `linears`: per linear module name its `raw_macs`, measured `density`,
    declared `weight_bits` and `effective_macs`.
    """
    input_ids = torch.zeros((1, seqlen), dtype=torch.long, device=_device_of(model))
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        model(input_ids=input_ids, use_cache=False)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    total_macs = counter.get_total_flops() // 2

    linears = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        raw = sum(per_module.get(f"{root}.{name}", {}).values()) // 2
        bits = _weight_bits(name, module, model, compression)
        density = _density(module.weight.data, compression)
        linears[name] = {
            "raw_macs": raw,
            "density": density,
            "weight_bits": bits,
            "effective_macs": raw * density * (bits / 16) ** 2,
        }
    linear_raw = sum(v["raw_macs"] for v in linears.values())
    if linears and linear_raw == 0 and total_macs > 0:
        raise RuntimeError(f"the FLOP counter's per-module breakdown names no linear of {root}: cannot split linear MACs")
    linear_effective = sum(v["effective_macs"] for v in linears.values())
    return {
        "seqlen": seqlen,
        "raw_macs": total_macs,
        "effective_macs": total_macs - linear_raw + linear_effective,
        "linear_raw_macs": linear_raw,
        "linear_effective_macs": linear_effective,
        "linears": linears,
    }


def _weight_files_bytes(folder: Path) -> int:
    """The weight files a loader reads: the safetensors where there are any (transformers then
    ignores the rest; a git clone of a hub repo often ships both formats, which counted twice),
    else the pickled ones."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    return sum(p.stat().st_size for p in (safetensors or files))


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _packed_dir(model_dir: Path) -> Path | None:
    """The real low-bit export: `packed/` inside the model dir, beside it in a compress job's
    output (`out/model` and `out/packed`, SPEC.md section 4), or staged beside the input model
    of an evaluation (`/models/<name>` and `/models/<name>.packed`, driver/runners)."""
    candidates = [model_dir / "packed", model_dir.parent / f"{model_dir.name}.packed"]
    if model_dir.name == "model":
        candidates.append(model_dir.parent / "packed")
    for candidate in candidates:
        if candidate.is_dir() and any(p.is_file() for p in candidate.rglob("*")):
            return candidate
    return None


def model_size(model_dir: str | Path) -> dict:
    """`checkpoint_bytes`: the shipped checkpoint's weight files (*.safetensors, *.bin, *.pt,
    *.pth at the top of the model dir; config and tokenizer files excluded);
    `packed_bytes`: every file of the real low-bit export in `packed/` if there is one, else
    None; `size_bytes`: what a user must store, the packed export when present, else the
    checkpoint (SPEC.md track 4)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model dir {model_dir} not found")
    checkpoint = _weight_files_bytes(model_dir)
    packed = _packed_dir(model_dir)
    packed_bytes = _tree_bytes(packed) if packed is not None else None
    return {
        "checkpoint_bytes": checkpoint,
        "packed_bytes": packed_bytes,
        "size_bytes": packed_bytes if packed_bytes is not None else checkpoint,
    }


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The floating dtype a checkpoint is stored in, as its config.json says ("dtype", or
    "torch_dtype" before transformers 5); None where it says nothing."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def state_bytes(model: nn.Module) -> int:
    """The bytes of a model's state as loaded (a tensor shared by two names, tied embeddings,
    counted once): its checkpoint's size in the dtype it was loaded in, headers apart."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def eval_model_size(model_dir: str | Path, model: nn.Module, job_dtype: str, compressed: bool) -> dict:
    """Track 4's model size for an evaluation: the bytes a user must store (`model_size`).
    A dense checkpoint stored in another dtype than the job runs in (the embedded model is
    cached in fp32; a CUDA job runs and saves its artifacts in fp16) is sized in the job's
    dtype, the one its compressed artifacts are saved in: on disk, Wanda 50% on a GPU read
    half the dense size, a 2x size ratio for a method that stores as much."""
    sizes = model_size(model_dir)
    stored = checkpoint_dtype(model_dir)
    out = {"model_size_bytes": sizes["size_bytes"], "checkpoint_dtype": stored}
    if not compressed and stored is not None and stored != job_dtype:
        out["model_size_bytes"] = state_bytes(model)
        out["model_size_note"] = (f"dense checkpoint stored in {stored} ({sizes['size_bytes']} bytes): sized in the job's "
                                  f"{job_dtype}, the dtype its compressed artifacts are saved in")
    return out


def size_on_disk_bytes(model_dir: str | Path) -> int:
    """Bytes a user must store for the model: `model_size(model_dir)["size_bytes"]`."""
    return model_size(model_dir)["size_bytes"]


@dataclass(frozen=True)
class InferenceMemory:
    total_bytes: int
    weights_bytes: int  # parameters + buffers
    activation_bytes: int  # growth during the forward beyond the weights
    method: str


@torch.no_grad()
def measure_inference_memory(model: nn.Module, seqlen: int = 128, device: torch.device | str | None = None) -> InferenceMemory:
    """Memory to run one forward over a (1, seqlen) input with the model on `device`: the bytes
    of the model's parameters and buffers plus what the forward allocates beyond them.

    CUDA: the growth is `torch.cuda.max_memory_allocated` over the forward (peak statistics
    reset first) minus what was allocated before it (tensors of the caching allocator, not the
    reserved pool and not the CUDA context). Counting this model's own weights, not everything
    allocated on the device, lets a caller hold other tensors there (eval_inference_memory keeps
    the checkpoint's linears aside while the packed form is measured); with the model alone on
    the device the figure is the forward's peak allocation.
    CPU: the growth of the process's resident set during the forward (peak RSS during minus
    RSS before; Linux /proc/self/status VmHWM after a clear_refs reset). Where the peak cannot
    be reset, the growth is that of the lifetime peak (getrusage ru_maxrss), a lower bound.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    weights += sum(t.numel() * t.element_size() for t in model.buffers())
    input_ids = torch.zeros((1, seqlen), dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(input_ids=input_ids, use_cache=False)
        torch.cuda.synchronize(device)
        growth = max(0, torch.cuda.max_memory_allocated(device) - before)
        return InferenceMemory(weights + growth, weights, growth, "cuda_weights_plus_peak_allocated_growth")
    if reset_peak_rss([os.getpid()]) and status_kib("VmHWM") is not None:
        before = status_kib("VmRSS") * 1024
        model(input_ids=input_ids, use_cache=False)
        growth = max(0, status_kib("VmHWM") * 1024 - before)
        method = "cpu_weights_plus_peak_rss_growth"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model(input_ids=input_ids, use_cache=False)
        growth = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
        method = "cpu_weights_plus_maxrss_growth_lower_bound"
    return InferenceMemory(weights + growth, weights, growth, method)


@contextmanager
def _on_integer_kernels(model: nn.Module, declaration: Compression, device: torch.device):
    """The model with its decoder linears on the torch_native deploy backend's integer kernels
    (track 5's `prepare_native`), the checkpoint's linears put back on exit."""
    from llmcbench.tracks.acceleration.backends import prepare_native
    from llmcbench.tracks.acceleration.int_kernels import decoder_linears

    originals = decoder_linears(model)
    try:
        yield prepare_native(model, declaration, device)
    finally:
        for parent, attr, linear in originals:
            setattr(parent, attr, linear)


def eval_inference_memory(model: nn.Module, model_dir: str | Path, declaration: Compression | None, seqlen: int = 128,
                          device: torch.device | str | None = None) -> dict:
    """Track 4's inference memory of an evaluated model, by the rule SPEC 5 gives its size: the
    real packed export if the method provides one, else the shipped checkpoint.

    A quantized artifact with a packed export (GPTQ's, AWQ's, OmniQuant's) is deployed as
    int8/int4 codes and their scales, not as the dequantized floats the accuracy tracks load:
    it is measured with its decoder linears on torch's integer kernels (the torch_native deploy
    backend's, int_kernels.py), which hold exactly that, and the checkpoint's figure is
    recorded beside it. Table 3 measured the same way: GPTQ, AWQ and OmniQuant INT8 at about
    two thirds of dense memory, SmoothQuant, shipped in floating point, above it. Every other
    model (dense, sparse, a quantized artifact shipped only as floats, as SmoothQuant's
    reference engine and OmniQuant's upstream one ship theirs) is its checkpoint as loaded.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    checkpoint = measure_inference_memory(model, seqlen, device)
    out = {"inference_memory_bytes": checkpoint.total_bytes, "inference_memory_form": "checkpoint"}
    if declaration is None or declaration.weight_bits > 8 or _packed_dir(Path(model_dir)) is None:
        return out
    try:
        with _on_integer_kernels(model, declaration, device) as prepared:
            packed = measure_inference_memory(model, seqlen, device)
    except ValueError as e:  # shapes no integer kernel tiles: the checkpoint's figure stands, and says why
        out["inference_memory_note"] = f"packed export not measured on an integer kernel ({e}): the checkpoint's memory"
        return out
    out.update(inference_memory_bytes=packed.total_bytes, inference_memory_checkpoint_bytes=checkpoint.total_bytes,
               inference_memory_form=f"packed export on {prepared.kernel}")
    return out


def inference_memory_bytes(model: nn.Module, seqlen: int = 128, device: torch.device | str | None = None) -> int:
    """`measure_inference_memory(...).total_bytes`."""
    return measure_inference_memory(model, seqlen, device).total_bytes
