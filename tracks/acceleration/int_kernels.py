"""Weight-only low-bit linears on torch's own kernels, for the native torch deploy backend.

int8: `aten._weight_int8pack_mm` (per-output-channel symmetric int8 weights, CPU and CUDA).
int4: `aten._weight_int4pack_mm_for_cpu` on CPU and `aten._weight_int4pack_mm` (tinygemm) on
CUDA: asymmetric 4-bit codes per group of input channels, w = (q - 8) * scale + zero.

Why torch's kernels and not torchao: torchao wraps these same kernels, but its 0.18 int4
path on CPU needs an extra native library (mslk) that has no CPU wheel, and the GPU machines
this runs on have no package index. The kernels are torch's; only the packing (a few tensor
ops) is here, and a test checks each layer against the dequantized weights it replaces.

The kernels compute in bfloat16 where the model is fp32 (CPU): their fp32 paths are slow
reference loops (measured on this project's 2-core AVX-512 CPU, batch 1: int8 5x and int4
10x slower than fp32 dense, while in bf16 both are 2x faster at 576x1536 and 7x at
4096x4096), and tinygemm on CUDA takes bf16 only. The activations are cast at the call and
the output cast back, so the rest of the model keeps its dtype.

A compressed artifact stores dequantized weights on its low-bit grid (the accuracy tracks
load it as a plain HF model); the int4 kernel recovers codes, scales and zeros from it per
artifact group (grid_recovery.py: exact for weights on a 4-bit grid), the int8 kernels a
symmetric step per output channel (the artifact's own where its codes fit [-128, 127], the
same grid the vLLM export writes); each layer reports its largest deviation (`max_abs_err`).
"""

from __future__ import annotations

import torch
from torch import nn

from .grid_recovery import expand, kernel_group, recover, symmetric_step


def kernel_dtype(weight: torch.Tensor, bits: int) -> torch.dtype:
    """What a weight-only kernel computes in: bf16 for an fp32 model (fp32's kernels are the
    slow path) and for int4 on CUDA (tinygemm's only dtype); otherwise the model's dtype."""
    if weight.dtype == torch.float32 or (bits == 4 and weight.is_cuda):
        return torch.bfloat16
    return weight.dtype


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and one float32 scale per output channel (grid_recovery.symmetric_step,
    the vLLM export's grid too): the artifact's own step wherever it holds the weights in
    [-128, 127] codes (max|w| / 127 on an absmax grid), else the smallest step that fits them
    (never coarser than max|w| / 127)."""
    scale = symmetric_step(w, 8, None, None)[:, 0]
    return (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None):
        super().__init__()
        w = linear.weight.detach()
        self.compute_dtype = compute_dtype or kernel_dtype(w, 8)
        q, scale = int8_per_channel(w)
        scale = scale.to(self.compute_dtype)  # the kernel takes its scales in the activations' dtype
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # the deviation from the artifact's weights with the scales as stored
        self.max_abs_err = float((q.float() * scale[:, None].float() - w.float()).abs().max())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.compute_dtype), self.weight_int8,
                                               self.scales).to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int8DynamicActivationLinear(nn.Module):
    """W8A8 on integer arithmetic: int8 weights per output channel, the input quantized to
    int8 at each call exactly as tracks/fakequant.py scores the artifact (symmetric absmax,
    per token or per sequence of the call), an int8 x int8 -> int32 GEMM (`aten._int_mm`),
    then both scales in fp32. The accuracy tracks' fake-quantized linear and this kernel agree
    to float rounding (tested). On this project's CPU, batch 1 (benchmarks/deploy_kernels.py):
    at 4096x4096 240 us a call against 504 for int8 weight-only and 3355 for fp32 dense; at
    576x1536 60 us, of which the GEMM is 10: eager, the input's quantization is a dozen small
    ops, which torch.compile fuses (`llmcbench deploy --compile`)."""

    def __init__(self, linear: nn.Linear, granularity: str = "per_token"):
        super().__init__()
        if granularity not in ("per_token", "per_tensor"):
            raise ValueError(f"int8 activations {granularity!r}: per_token or per_tensor")
        w = linear.weight.detach().float()
        q, scale = int8_per_channel(w)
        self.register_buffer("weight_int8", q.contiguous())  # (out, in): its transpose is the column-major B _int_mm is fast with
        self.register_buffer("scales", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.max_abs_err = float((q.float() * scale[:, None] - w).abs().max())
        self.granularity, self.in_features, self.out_features = granularity, linear.in_features, linear.out_features
        self.cuda_kernel = linear.weight.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..fakequant import activation_absmax, quantize_codes

        shape = x.shape
        # quantized as rows: a [1, 1, k] decode step quantized whole and reshaped after came out
        # of torch.compile's CPU GEMM as garbage (torch 2.13), rows first do not
        xf = x.float()
        x2 = xf.reshape(-1, shape[-1])
        if self.granularity == "per_token":
            absmax = activation_absmax(x2, "per_token")
        else:  # one max|x| per sequence of the call, broadcast to its rows
            absmax = activation_absmax(xf, "per_tensor").expand(*shape[:-1], 1).reshape(-1, 1)
        codes, sx = quantize_codes(x2, absmax, 8)
        xq = codes.to(torch.int8)
        rows = xq.shape[0]
        if self.cuda_kernel and rows <= 16:  # cuBLASLt's int8 GEMM takes more than 16 rows: a decode step is padded
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 32 - rows))
        acc = torch._int_mm(xq, self.weight_int8.t())[:rows]
        y = (acc.float() * sx * self.scales).to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear, artifact_group: int | None = 128, compute_dtype: torch.dtype | None = None):
        """`artifact_group`: the artifact's group size (None, or GPTQ's and OmniQuant's -1: one
        group per output channel)."""
        super().__init__()
        artifact_group = artifact_group if artifact_group and artifact_group > 0 else None
        w = linear.weight.detach().float()
        n, k = w.shape
        # the artifact's groups (the last one shorter where the width is no multiple of group_size:
        # SmolLM2's 576 with 128) on the largest kernel group that tiles them, each artifact group's
        # grid repeated over its kernel groups
        group_size = kernel_group(k, artifact_group, sizes=tuple(g for g in (256, 128, 64, 32) if g <= (artifact_group or 256)))
        if not group_size:
            raise ValueError(f"in_features {k} in groups of {artifact_group}: no int4 kernel group (32 to 256) tiles them")
        lo, step = (expand(t, k, artifact_group, group_size)[..., None] for t in recover(w, 4, artifact_group))
        wg = w.view(n, k // group_size, group_size)
        scale = step
        q = ((wg - lo) / scale).round().clamp(0, 15)
        self.group_size, self.in_features, self.out_features = group_size, k, n
        self.cuda_kernel = linear.weight.is_cuda
        # tinygemm on CUDA takes bfloat16 activations, scales and zeros only (an fp16 model failed
        # there on a lent H200); its activations are cast at the call, its scales stored so here
        dtype = self.compute_dtype = compute_dtype or kernel_dtype(linear.weight, 4)
        scale, zero = scale.to(dtype), (lo + 8 * scale).to(dtype)  # tinygemm's convention: w = (q - 8) * scale + zero
        # the deviation from the artifact's weights with the scales and zeros as stored
        self.max_abs_err = float(((q - 8) * scale.float() + zero.float() - wg).abs().max())
        codes = q.view(n, k).to(torch.int32)
        if self.cuda_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scale.view(n, -1), zero.view(n, -1)], -1)
                             .transpose(0, 1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda_kernel else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2.to(self.compute_dtype), self.weight_int4, self.group_size, self.scales_and_zeros).to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear in the decoder blocks (not the LM head)."""
    out = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.Linear) and ".layers." in f"{name}.{attr}".replace("model.layers", ".layers"):
                out.append((module, attr, child))
    return out


def quantize_weights(model: nn.Module, bits: int, group_size: int | None, int8_activations: set[nn.Module] = frozenset(),
                     granularity: str = "per_token") -> float:
    """Swap the decoder's linears for int8/int4 kernels in place: those in `int8_activations`
    (a W8A8 artifact's declared linears) for the integer GEMM, the others weight-only; the
    largest deviation from the artifact's weights."""
    worst = 0.0
    for parent, attr, linear in decoder_linears(model):
        if linear in int8_activations:
            layer = Int8DynamicActivationLinear(linear, granularity)
        elif bits == 8:
            layer = Int8WeightOnlyLinear(linear)
        else:
            layer = Int4WeightOnlyLinear(linear, group_size)
        setattr(parent, attr, layer)
        worst = max(worst, layer.max_abs_err)
    return worst
