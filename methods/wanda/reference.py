"""Wanda, the reference engine: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models" (2023, arXiv:2306.11695, ICLR 2024). Follows `prune_wanda` in locuslab/wanda
`lib/prune.py` and its `WrappedGPT` in `lib/layerwrapper.py` (commit 8e8fc87); the model
plumbing (capture block inputs, walk blocks, hook linears, propagate pruned outputs) is the
shared runner in `methods/_engine/blockwise.py`.

The algorithm, per linear layer W (out x in) of every decoder block, with X the layer's
calibration inputs (tokens x in):

    S_ij = |W_ij| * ||X_j||_2                       (paper eq. 1)
    for each output row i:
        unstructured: zero the int(in * sparsity) weights of row i with the lowest S_ij
        N:M:          in every M consecutive inputs of row i, zero the N with the lowest S_ij

Pruning only zeroes weights; the kept ones are not updated. All linears of a block are
pruned from the dense block's inputs, then the block's outputs are recomputed with the
pruned weights and feed the next block (upstream's order). Embeddings, norms and the LM head
are never pruned.

`||X_j||_2` is kept as upstream's `scaler_row`: the running mean over calibration sequences
of the squared input norm per channel, square-rooted when scoring. The mean's constant factor
does not change any row's ranking, so this equals the paper's plain norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmcbench.driver.contract import Compression

from .._engine.blockwise import BlockStep, run_blockwise
from .._engine.params import calibration_batch_size, check_n_m, reject_unknown, sparsity_pattern, sparsity_value
from .._engine.sparsity import check_n_m_shapes, sparsity_declaration

PARAMS = {"pattern", "sparsity", "n", "m", "calibration_batch_size"}


@dataclass(frozen=True)
class WandaSettings:
    pattern: str  # "unstructured" or "n:m"
    sparsity: float
    n: int | None = None
    m: int | None = None
    calibration_batch_size: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "WandaSettings":
        """Validate a preset's params merged with the job's overrides."""
        reject_unknown("wanda", params, PARAMS)
        pattern, n, m = sparsity_pattern("wanda", params)  # also upstream's --sparsity_type spelling, e.g. "2:4"
        sparsity = sparsity_value("wanda", params.get("sparsity", 0.5 if pattern == "n:m" else None))

        if pattern == "n:m":
            check_n_m("wanda", n, m)
            if sparsity != 0.5 or n * 2 != m:
                # upstream main.py: assert args.sparsity_ratio == 0.5 for N:M sparsity types
                raise ValueError(f"wanda: N:M pruning is defined at 50% sparsity (2:4, 4:8), got {n}:{m} at sparsity {sparsity}")
        elif n is not None or m is not None:
            raise ValueError("wanda: n and m apply to the N:M pattern only; use pattern = 'n:m'")

        batch = calibration_batch_size("wanda", params)
        return cls(pattern, sparsity, n, m, batch)


class InputChannelNorms:
    """Running mean, over calibration sequences, of each input channel's squared L2 norm
    (upstream `WrappedGPT.scaler_row`)."""

    def __init__(self, linear: nn.Linear):
        self.squared_norms = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        sequences = inputs.shape[0] if inputs.ndim == 3 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.squared_norms *= self.nsamples / (self.nsamples + sequences)
        self.nsamples += sequences
        self.squared_norms += x.pow(2).sum(dim=0) / self.nsamples


def wanda_scores(weight: torch.Tensor, squared_input_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X||_2, broadcasting each input channel's norm down its column."""
    return weight.abs().float() * squared_input_norms.sqrt().reshape(1, -1)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the int(in * sparsity) lowest scores of each row
    (stable sort, so ties go to the lower input index, as upstream)."""
    pruned_per_row = int(scores.shape[1] * sparsity)
    lowest = torch.sort(scores, dim=1, stable=True).indices[:, :pruned_per_row]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: the n lowest scores of every m consecutive inputs of each row."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"wanda: {n}:{m} pruning needs in_features divisible by {m}, got {columns}")
    groups = scores.reshape(rows, columns // m, m)
    lowest = torch.topk(groups, n, dim=2, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(rows, columns)


def prune_mask(scores: torch.Tensor, settings: WandaSettings) -> torch.Tensor:
    if settings.pattern == "n:m":
        return n_m_mask(scores, settings.n, settings.m)
    return unstructured_mask(scores, settings.sparsity)


def prune_block(step: BlockStep, settings: WandaSettings) -> None:
    """Score each linear of the block from its calibration inputs and zero its lowest-scoring weights."""
    for name, linear in step.linears.items():
        scores = wanda_scores(linear.weight.data, step.statistics[name].squared_norms)
        linear.weight.data.masked_fill_(prune_mask(scores, settings), 0)


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    WandaSettings.from_params(params)


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device) -> Compression:
    """Prune every linear of every decoder block of `model` in place; declare the result.

    `params`: the preset's table merged with the job's overrides (`pattern`, `sparsity`,
    `n`, `m`; `calibration_batch_size` only sets how many windows go through a block per
    forward, by default about 8k tokens' worth). At sparsity 0 nothing is pruned (as
    upstream `main.py`). The caller fills in `preset` on the returned declaration.
    """
    settings = WandaSettings.from_params(params)
    if settings.pattern == "n:m":  # checked up front, so a bad shape never leaves a half-pruned model
        check_n_m_shapes("wanda", model, settings.n, settings.m)
    if settings.sparsity > 0:
        run_blockwise(model, calibration_ids, device,
                      statistics=lambda _name, linear: InputChannelNorms(linear),
                      update=lambda step: prune_block(step, settings),
                      batch_size=settings.calibration_batch_size)
    nsamples, seqlen = calibration_ids.shape
    return sparsity_declaration(model, "wanda", settings.pattern, settings.n, settings.m, settings.sparsity,
                                notes=[f"calibration: {nsamples} x {seqlen} tokens"])

