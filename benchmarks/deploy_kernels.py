"""torch_native's linear kernels one at a time: batch-1 latency per decoder linear shape.

What a decode step costs per linear, for each kernel the deploy backend can put a linear on
(tracks/acceleration/int_kernels.py), against the dense linear in the model's dtype, measured in
one run on whatever device is given:

    dense          nn.Linear in the model's dtype (fp32 on CPU, fp16 on CUDA)
    dense bf16     nn.Linear in bfloat16 (the input cast in, the output back, as the kernels do)
    int8 w/o       Int8WeightOnlyLinear (aten._weight_int8pack_mm), in the dtype it computes in
    int4 w/o       Int4WeightOnlyLinear (aten._weight_int4pack_mm[_for_cpu]), likewise
    int8 w/o exact / int4 w/o exact   the same kernels in fp32 (the CPU's exact, slow paths)
    int8 dyn       Int8DynamicActivationLinear: the input quantized per token, then aten._int_mm

This is why the int8/int4 kernels compute in bf16 for an fp32 model: on this project's
2-core CPU their fp32 paths were 5-10x slower than the fp32 dense linear (the first
`llmcbench deploy` on the embedded model measured INT8 0.36x and INT4 0.18x of dense).

    python benchmarks/deploy_kernels.py                       # SmolLM2-135M and LLaMA-2-7B shapes, CPU
    python benchmarks/deploy_kernels.py --device cuda --shapes 4096x4096,4096x11008
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


DEFAULT_SHAPES = "576x1536,1536x576,4096x4096,4096x11008"  # in x out: SmolLM2-135M's MLP, LLaMA-2-7B's


def time_call(f, x, sync, min_s: float = 0.3) -> float:
    """Median-free but steady: warm up, then as many calls as fit in `min_s`; microseconds a call."""
    for _ in range(10):
        f(x)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10):
            f(x)
        n += 10
        sync()
        if time.perf_counter() - t0 > min_s:
            return (time.perf_counter() - t0) / n * 1e6


def kernels(linear, dtype):
    import torch

    from llmcbench.tracks.acceleration.int_kernels import Int4WeightOnlyLinear, Int8DynamicActivationLinear, Int8WeightOnlyLinear

    k = linear.in_features
    group = next(g for g in (128, 64, 32) if k % g == 0)
    bf16 = torch.nn.Linear(k, linear.out_features, bias=False, device=linear.weight.device, dtype=torch.bfloat16)
    bf16.weight.data = linear.weight.data.to(torch.bfloat16)
    out = {"dense": linear, "dense bf16": lambda x: bf16(x.to(torch.bfloat16)).to(x.dtype)}  # cast in and out, as the kernels
    out["int8 w/o"] = Int8WeightOnlyLinear(linear)
    out["int4 w/o"] = Int4WeightOnlyLinear(linear, group)
    if dtype == torch.float32:
        out["int8 w/o exact"] = Int8WeightOnlyLinear(linear, compute_dtype=torch.float32)
        if not linear.weight.is_cuda:
            out["int4 w/o exact"] = Int4WeightOnlyLinear(linear, group, compute_dtype=torch.float32)
    out["int8 dyn"] = Int8DynamicActivationLinear(linear)
    return out


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="in x out, comma-separated")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        linear = torch.nn.Linear(k, n, bias=False).to(device, dtype)
        x = torch.randn(1, 1, k, device=device, dtype=dtype)
        with torch.no_grad():
            us = {name: time_call(layer, x, sync) for name, layer in kernels(linear, dtype).items()}
        rows.append({"in": k, "out": n, "us": us})
        dense = us["dense"]
        print(f"{k}x{n} ({str(dtype).removeprefix('torch.')} model, {device.type}): "
              + ", ".join(f"{name} {v:.1f} us ({dense / v:.2f}x)" for name, v in us.items()), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
                                           "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
