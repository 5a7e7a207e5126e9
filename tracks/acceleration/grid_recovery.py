"""The quantization grid of an artifact's dequantized weights, recovered for the deploy kernels.

A compressed artifact stores its weights dequantized (the accuracy tracks load it as a plain
HF model): every weight of a group is lo + c * step for integer codes c, with at most 2^bits
levels. The kernels need the step and the lowest level back. Taking them from the group's
min and max, (max - min) / (2^bits - 1), is exact only when the group uses both extreme
codes; after GPTQ's error compensation many groups do not (on the embedded SmolLM2 a
GPTQ W4 g128 layer deviated by 0.21 that way). Here the step is the smallest gap between
the group's distinct values (any two adjacent codes give it), the code span is (max - min) /
step rounded, and the step is then refined as (max - min) / span: exact for every group
whose values are on a grid of at most 2^bits levels. A group that would need more levels
(weights that were never quantized) falls back to min/max; either way the caller records the
largest deviation from the artifact's weights.

Groups are those of the artifact (`group_size` input channels, the last one shorter when
the width is no multiple of it, as the engines make them); a kernel whose groups are smaller
repeats each group's step and lowest level over its sub-groups (`expand`), which loses
nothing.

A symmetric kernel grid (levels c * step, no zero point: every backend's int8 kernels) keeps
the artifact's step wherever that step holds the weights inside its code range
(`symmetric_step`), so the torch_native kernels and the vLLM export run the same weights,
exact on every channel the grid allows: a symmetric artifact, and the channels of an
asymmetric one whose integer zero point leaves the used codes inside [-2^(b-1), 2^(b-1) - 1].
Imports only torch: vllm_export.py uses it in vLLM's environment, int_kernels.py here.
"""

from __future__ import annotations

import torch


def group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    """[start, end) of the artifact's groups along the input channels (None or <= 0: one group)."""
    g = in_features if not group_size or group_size <= 0 else group_size
    return [(s, min(s + g, in_features)) for s in range(0, in_features, g)]


def _step(wg: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest level, step) of each row of wg [..., g] on a grid of at most `levels` + 1 levels."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    span_value = hi - lo
    values = wg.sort(-1).values
    gaps = values[..., 1:] - values[..., :-1]
    gaps = torch.where(gaps > span_value[..., None] * 1e-3, gaps, torch.inf)  # equal values, float noise
    smallest = gaps.amin(-1) if gaps.shape[-1] else torch.full_like(lo, torch.inf)
    span = (span_value / smallest).round()
    on_grid = torch.isfinite(smallest) & (span >= 1) & (span <= levels)
    step = torch.where(on_grid, span_value / span.clamp(min=1), span_value / levels)
    # a constant group: any step represents it; one that makes its value a whole code
    step = torch.where(span_value > 0, step, lo.abs().clamp(min=1e-8) / (levels // 2))
    return lo, step.clamp(min=1e-12)


def recover(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest level, step) per output channel and artifact group of w [out, in], each
    [out, groups], in float32."""
    w = w.detach().float()
    los, steps = [], []
    for start, end in group_bounds(w.shape[1], group_size):
        lo, step = _step(w[:, start:end], 2 ** bits - 1)
        los.append(lo)
        steps.append(step)
    return torch.stack(los, 1), torch.stack(steps, 1)


def expand(t: torch.Tensor, in_features: int, group_size: int | None, kernel_group: int) -> torch.Tensor:
    """Per-artifact-group values [out, groups] -> per kernel group [out, in / kernel_group];
    each kernel group must lie inside one artifact group."""
    for s, e in group_bounds(in_features, group_size):
        if (s % kernel_group) or ((e - s) % kernel_group):
            raise ValueError(f"kernel groups of {kernel_group} do not tile the artifact's group [{s}, {e})")
    width = in_features if not group_size or group_size <= 0 else group_size
    return t[:, torch.arange(0, in_features, kernel_group) // width]


def kernel_group(in_features: int, group_size: int | None, sizes: tuple[int, ...] = (256, 128, 64, 32)) -> int:
    """The largest kernel group size in `sizes` that tiles every artifact group; 0 if none."""
    groups = group_bounds(in_features, group_size)
    return next((g for g in sizes if all(s % g == 0 and (e - s) % g == 0 for s, e in groups)), 0)


def symmetric_step(w: torch.Tensor, bits: int, artifact_group: int | None, group: int | None) -> torch.Tensor:
    """The step of a symmetric grid (levels c * step, c in [-2^(b-1), 2^(b-1) - 1]) per output
    channel and kernel group of `group` input channels of w [out, in] ([out, in / group]; None:
    one per output channel), in float32. The first that holds the group's weights exactly:
    max|w| / (2^(b-1) - 1) (a symmetric absmax grid, SmoothQuant's: bit for bit, also where its
    levels are too sparse for `recover`), then the artifact's own step (`recover`: a symmetric
    grid that uses level -2^(b-1), an asymmetric one whose integer zero point, GPTQ's, AWQ's or
    OmniQuant's, leaves its used codes inside the range); else the smallest step that fits the
    weights (max(max / 127, min / -128) at 8 bits, never coarser than max|w| / 127)."""
    eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else 0.0  # the artifact's own float rounding
    w = w.detach().float()
    n, k = w.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    width = k if group is None else group
    wg = w.view(n, k // width, width)
    low, high = wg.amin(-1), wg.amax(-1)
    step = torch.maximum(high / qmax, low / qmin).clamp(min=1e-12)
    absmax = (torch.maximum(high, -low) / qmax).clamp(min=1e-12)
    own = expand(recover(w, bits, artifact_group)[1], k, artifact_group, width)
    for candidate in (own, absmax):  # the later one wins where both hold the weights
        codes = wg / candidate[..., None]
        whole = codes.round()
        exact = (((codes - whole).abs() <= 1e-3 + codes.abs() * eps) & (whole >= qmin) & (whole <= qmax)).all(-1)
        step = torch.where(exact, candidate, step)
    return step
