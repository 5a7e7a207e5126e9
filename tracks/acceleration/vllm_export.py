"""The checkpoint vLLM runs a quantized artifact from when the artifact has no packed export
vLLM reads: a compressed-tensors checkpoint, written with the `compressed-tensors` library (the
format of llm-compressor, and one of vLLM's own dependencies) in vLLM's environment, next to
vllm_measure.py. Imports torch, transformers and compressed_tensors, nothing from llmcbench.

Schemes (the vllm backend's plan picks one from the artifact's compression.json):
- `w8a8-int8`: int8 weights per output channel (symmetric: the artifact's per-channel step,
  max|w| / 127 on SmoothQuant's grid) and int8
  activations quantized dynamically per token, symmetric: exactly a SmoothQuant / OmniQuant
  W8A8 artifact with per-token activations as the accuracy tracks score it. vLLM runs it on its
  int8 GEMM (CPU: oneDNN, or AMX where present; CUDA: CUTLASS).
- `w4a16-g<A>-k<K>` (asymmetric) or `...-sym`: 4-bit weights, the artifact's groups of A input
  channels stored as groups of K (vLLM takes one group size that divides every width:
  SmolLM2's 576 in groups of 128 is stored in groups of 64, each repeating its artifact
  group's grid), codes in [-8, 7] with an integer zero point (asymmetric) or none
  (symmetric), activations in floating point; -1: one group per output channel. vLLM runs
  it on its WNA16 kernels (CPU: CPUWNA16; CUDA: Marlin / Machete).

A compressed artifact stores dequantized weights on its grid; grid_recovery.py (next to this
file, shared with the torch_native kernels) recovers it per artifact group, exactly for
weights on the declared grid. The largest deviation from the artifact's weights is returned
and recorded next to the figures (`requantization_max_abs_err`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

if __package__:
    from .grid_recovery import expand, recover, symmetric_step
else:  # a script in vLLM's environment: grid_recovery.py is next to it
    from grid_recovery import expand, recover, symmetric_step

SCHEME = re.compile(r"^(w8a8-int8|w4a16-g(-1|\d+)-k(-1|\d+)(-sym)?)$")


def parse(scheme: str) -> dict:
    """`w8a8-int8`, or `w4a16-g<A>-k<K>[-sym]`: the artifact's groups of A input channels
    exported as groups of K (K tiles every A group; -1: one group per output channel)."""
    m = SCHEME.match(scheme)
    if not m:
        raise ValueError(f"unknown export scheme {scheme!r}: w8a8-int8 or w4a16-g<A>-k<K>[-sym]")
    if scheme == "w8a8-int8":
        return {"bits": 8, "artifact_group": None, "group_size": None, "symmetric": True, "activations": True}
    to_group = lambda v: None if int(v) < 0 else int(v)  # noqa: E731
    return {"bits": 4, "artifact_group": to_group(m.group(2)), "group_size": to_group(m.group(3)),
            "symmetric": bool(m.group(4)), "activations": False}


def compressed_tensors_grid(w: torch.Tensor, spec: dict) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """compressed-tensors' scale and integer zero point (None when symmetric) per output channel
    and export group of w [out, in] ([out, in / K], or [out, 1]), for codes in [-2^(b-1),
    2^(b-1) - 1], and the largest deviation of that grid from w."""
    w = w.detach().float()
    n, k = w.shape
    bits, group = spec["bits"], spec["group_size"]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    width = k if group is None else group
    wg = w.view(n, k // width, width)
    if spec["symmetric"]:
        step, zero = symmetric_step(w, bits, spec["artifact_group"], group), None
        codes = (wg / step[..., None]).round().clamp(qmin, qmax)
        deq = codes * step[..., None]
    else:
        lo, step = (expand(t, k, spec["artifact_group"], width) for t in recover(w, bits, spec["artifact_group"]))
        zero = (qmin - (lo / step).round()).clamp(qmin, qmax)
        codes = ((wg / step[..., None]).round() + zero[..., None]).clamp(qmin, qmax)
        deq = (codes - zero[..., None]) * step[..., None]
    return step, zero, float((deq - wg).abs().max())


@torch.no_grad()
def export(model_dir: str | Path, out_dir: str | Path, scheme: str) -> float:
    """Write the compressed-tensors checkpoint of the artifact in `model_dir` into `out_dir`;
    the largest deviation of its weights from the artifact's."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import AutoModelForCausalLM

    spec = parse(scheme)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    group = spec["group_size"]
    weights = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=spec["symmetric"],
                               strategy="channel" if group is None else "group", group_size=group)
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True) \
        if spec["activations"] else None
    fmt = "int-quantized" if spec["bits"] == 8 else "pack-quantized"
    # the decoder's linears; the LM head (and anything outside the blocks) stays as it is
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights,
                                                                            input_activations=inputs)},
                                ignore=["lm_head"], format=fmt)
    apply_quantization_config(model, config)
    worst, done = 0.0, 0
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        scale, zero, err = compressed_tensors_grid(module.weight, spec)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            zp = torch.zeros_like(scale) if zero is None else zero
            module.weight_zero_point.data = zp.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype)
        worst, done = max(worst, err), done + 1
    if not done:
        raise ValueError(f"{model_dir}: no linear layer to quantize")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(str(out_dir))
    compressor.update_config(str(out_dir))
    return worst


def main(argv: list[str] | None = None) -> int:
    """python vllm_export.py MODEL_DIR OUT_DIR SCHEME: a process of its own, so that the
    measurement's peak memory does not include this one's copy of the model."""
    import json
    import sys
    import time

    model_dir, out_dir, scheme = argv or sys.argv[1:4]
    t0 = time.perf_counter()
    err = export(model_dir, out_dir, scheme)
    record = {"export_scheme": scheme, "export_s": time.perf_counter() - t0, "requantization_max_abs_err": err}
    (Path(out_dir) / "llmcbench-export.json").write_text(json.dumps(record))
    print(f"exported {model_dir} as compressed-tensors {scheme}: max abs deviation {err:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
