"""Make a job's float results independent of thread timing: resolve MKL VML's kernels up front.

PyTorch's CPU build sends contiguous float unary ops (`cos`, `sin`, `exp`, `log`, `sqrt`, ...)
to MKL's VML, each intra-op thread on its chunk, at high accuracy (`VML_HA`). oneMKL 2024.2, the
one torch's wheels bundle (2.13 included), picks each VML function's kernel lazily on its first
call, and when that first call runs on several threads at once one thread can compute its whole
chunk with the low-accuracy kernel instead (pytorch/pytorch#188792; fixed in oneMKL 2025.0). The
next calls are right, so the damage is one tensor, once per process, and whether it happens
depends on how the threads were scheduled.

That one tensor is enough to change a compressed model. A LLaMA's rotary table is the first
`cos` of a compress job (one 128 x 64 table per forward, two 4096-value chunks on two threads),
and the block-wise engines keep the first calibration batch's table for every batch: with
positions 64-127 of `cos` from the low-accuracy kernel (errors up to 1.5e-4), SparseGPT's
reference engine on the embedded SmolLM2 gave other weights (WikiText-2 ppl 74.76 against
76.30). It happened in two full-suite CI runs, to the same job rerun through Slurm while other
work loaded the machine; replaying exactly that chunk from VML's low-accuracy kernel
reproduces those weights bit for bit. That takes a CPU on which VML's accuracy modes differ: on an
AMD EPYC (AVX-512) MKL computes the same floats at every mode, under each MKL_ENABLE_INSTRUCTIONS
level, so there the race has nothing else to give.

`warm_up_vml()` calls every such op once on a tensor far below torch's parallel grain (2048
values), so each VML function's dispatch is resolved on one thread before any op runs on
several: the fix of pytorch/pytorch#188791, done from outside. It costs about a millisecond.
"""

from __future__ import annotations

# The unary ops ATen sends to VML (aten/src/ATen/cpu/vml.h) and some it may send; a name this
# torch lacks is skipped, and one it does not send to VML costs nothing but the call.
VML_OPS = ("abs", "acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "log",
           "log10", "log1p", "log2", "lgamma", "reciprocal", "rsqrt", "sigmoid", "sin", "sinh", "sqrt", "tan",
           "tanh", "trunc")
WARM_UP_VALUES = 64  # one chunk: below the parallel grain, so one thread calls VML
RESOLVED = "MKL VML kernels resolved on one thread (pytorch#188792)"  # what a job's log and the shim's event say


def warm_up_vml() -> list[str]:
    """Resolve MKL VML's kernel dispatch of every op in VML_OPS, for float32 and float64
    (VML's `vms*` and `vmd*`; bf16 and fp16 go through float32), on this thread. Returns the
    ops called; an empty list without MKL (nothing to resolve)."""
    import torch

    if not torch.backends.mkl.is_available():
        return []
    called = []
    for name in VML_OPS:
        op = getattr(torch, name, None)
        if op is None:
            continue
        for dtype in (torch.float32, torch.float64):
            op(torch.full((WARM_UP_VALUES,), 0.5, dtype=dtype))
        called.append(name)
    return called
