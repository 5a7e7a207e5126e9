"""Folding a per-channel scale into a norm (SmoothQuant's smoothing, AWQ's activation-aware
scales): the norm's weight may absorb 1/s only if the norm's output scales with its weight."""

from __future__ import annotations

import torch
from torch import nn


def norm_scales_with_weight(norm: nn.Module, *, allow_bias: bool) -> bool:
    """True if norm(x) is linear in norm.weight, so dividing the weight divides the output
    (false for Gemma's (1 + w) norms), found by probing the norm with its weight doubled.
    `allow_bias`: a norm with a bias (LayerNorm) passes when norm(x) - bias scales with the
    weight; otherwise a norm with a bias is turned away."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return False
    bias = getattr(norm, "bias", None)
    if not allow_bias and bias is not None:
        return False
    probe = torch.linspace(-2, 3, 2 * weight.numel(), device=weight.device, dtype=weight.dtype).reshape(2, -1)
    original = weight.detach().clone()
    try:
        reference = norm(probe).float()
        weight.data.mul_(2)
        doubled = norm(probe).float()
    finally:
        weight.data.copy_(original)
    if isinstance(bias, torch.Tensor):  # a LayerNorm: norm(x) - bias scales with the weight
        reference, doubled = reference - bias.float(), doubled - 2 * bias.float()
    return torch.allclose(doubled, 2 * reference, rtol=1e-3, atol=1e-5)
