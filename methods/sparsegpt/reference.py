"""SparseGPT, the reference engine: one-shot pruning by approximate OBS reconstruction.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023, arXiv:2301.00774), Algorithm 1. Follows `SparseGPT.add_batch` and
`SparseGPT.fasterprune` in IST-DASLab/sparsegpt `sparsegpt.py` and the layer walk of its
`llama.py` (commit 147d215); the Hessian and its inverse Cholesky factor are shared with
GPTQ (`methods/_engine/hessian.py`), the model plumbing (capture block inputs, walk blocks,
hook linears, propagate the pruned outputs, `--true-sequential` groups) is the shared runner
in `methods/_engine/blockwise.py`.

The algorithm, per linear layer W (rows x columns) of every decoder block, with H = 2 X X^T
from the layer's calibration inputs:

    U = Cholesky((H + lambda I)^-1), upper       lambda = percdamp * mean(diag H)
    for each block of B columns [i1, i2):        (B = 128, "lazy batch" updates)
        unstructured: M1 = the int(rows * (i2-i1) * sparsity) smallest w^2 / U_jj^2
                      over the whole block (all rows together: adaptive mask selection)
        for each column j of the block:
            N:M:  at every M-th column, prune the N smallest w^2 / U_jj^2 of the next M
                  columns of each row, from the weights as updated so far
            q_j   = w_j with the masked weights set to 0
            e     = (w_j - q_j) / U_jj
            w_k  -= e * U_jk for k in (j, i2)         (OBS update of the block's columns)
        W[:, i2:] -= E U[i1:i2, i2:]               (E: the block's e vectors)

So every pruned weight is exactly 0 and the kept weights absorb its error through the
inverse Hessian; that update is what separates SparseGPT from masking alone.

One departure, for an exact pattern: upstream selects the unstructured mask as
`score <= sorted_scores[k]` with k = int(numel * sparsity), which prunes k + 1 weights per
block (more on ties); here exactly the k lowest scores are pruned (`torch.topk`), so a layer
is exactly `sparsity` sparse when each block's size allows it (50% of 128 columns x any rows
always does). With upstream's rule instead, the pruned weights match upstream's exactly
(checked against `sparsegpt.py` on random layers). Dead input channels (never active in the
calibration data) are zeroed as upstream does, and count as pruned in the measured sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmcbench.driver.contract import Compression

from .._engine import params as check
from .._engine.blockwise import BlockStep, decoder_blocks, llama_sequential_groups, run_blockwise
from .._engine.hessian import LayerHessian, inverse_hessian_cholesky, prepare_hessian
from .._engine.sparsity import check_n_m_shapes, sparsity_declaration

PARAMS = {"pattern", "sparsity", "n", "m", "blocksize", "percdamp", "true_sequential", "calibration_batch_size"}


@dataclass(frozen=True)
class SparseGPTSettings:
    pattern: str  # "unstructured" or "n:m"
    sparsity: float
    n: int | None = None
    m: int | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    true_sequential: bool = False
    calibration_batch_size: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "SparseGPTSettings":
        """Validate a preset's params merged with the job's overrides (upstream defaults:
        blocksize 128, percdamp 0.01, no true-sequential)."""
        check.reject_unknown("sparsegpt", params, PARAMS)
        pattern, n, m = check.sparsity_pattern("sparsegpt", params)  # "2:4", as upstream's --prunen 2 --prunem 4

        sparsity = params.get("sparsity")
        if pattern == "n:m":
            check.check_n_m("sparsegpt", n, m)
            if sparsity is None:
                sparsity = n / m
        elif n is not None or m is not None:
            raise ValueError("sparsegpt: n and m apply to the N:M pattern only; use pattern = 'n:m'")
        sparsity = check.sparsity_value("sparsegpt", sparsity)
        if pattern == "n:m" and sparsity != n / m:
            raise ValueError(f"sparsegpt: {n}:{m} pruning is {n / m:.0%} sparse, but sparsity {sparsity} was asked")

        blocksize = check.blocksize("sparsegpt", params)
        if pattern == "n:m" and blocksize % m:
            raise ValueError(f"sparsegpt: blocksize {blocksize} must be a multiple of m={m} so no N:M group spans two blocks")
        percdamp = check.percdamp("sparsegpt", params)
        true_sequential = params.get("true_sequential", False)
        if not isinstance(true_sequential, bool):
            raise ValueError(f"sparsegpt: true_sequential must be true or false, got {true_sequential!r}")
        batch = check.calibration_batch_size("sparsegpt", params)
        return cls(pattern, sparsity, n, m, blocksize, percdamp, true_sequential, batch)


def obs_scores(weights: torch.Tensor, hinv_diagonal: torch.Tensor) -> torch.Tensor:
    """The OBS saliency w^2 / U_jj^2 of each weight, U the inverse Hessian's Cholesky factor:
    U_jj^2 is [H^-1]_jj once the columns before j are eliminated, so this is the error of
    removing w_j given the columns still to come (upstream divides by diag(Hinv1)^2)."""
    return weights ** 2 / hinv_diagonal.reshape(1, -1) ** 2


def lowest_in_block(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the int(numel * sparsity) lowest scores of the whole block (all rows)."""
    pruned = int(scores.numel() * sparsity)
    lowest = torch.topk(scores.flatten(), pruned, largest=False, sorted=False).indices
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, lowest, True).reshape(scores.shape)


def lowest_n_of_m(scores: torch.Tensor, n: int) -> torch.Tensor:
    """True for the n lowest scores of each row of an [rows, m] slice."""
    lowest = torch.topk(scores, n, dim=1, largest=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, settings: SparseGPTSettings,
                    layer: str = "layer") -> torch.Tensor:
    """The pruned weights (float32, same shape) of one linear (upstream `fasterprune`,
    paper Algorithm 1). Consumes `hessian` (dampened in place)."""
    W = weight.detach().clone().float()
    rows, columns = W.shape
    dead = prepare_hessian(hessian)
    W[:, dead] = 0
    Hinv = inverse_hessian_cholesky(hessian, settings.percdamp, layer)

    for i1 in range(0, columns, settings.blocksize):
        i2 = min(i1 + settings.blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)

        if settings.pattern == "unstructured":
            mask1 = lowest_in_block(obs_scores(W1, d), settings.sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(i2 - i1):
            if settings.pattern == "n:m" and i % settings.m == 0:
                group = slice(i, i + settings.m)
                mask1[:, group] = lowest_n_of_m(obs_scores(W1[:, group], d[group]), settings.n)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def prune_step(step: BlockStep, settings: SparseGPTSettings) -> None:
    """Prune each linear of the block (or true-sequential group) from its Hessian."""
    for name, linear in step.linears.items():
        pruned = sparsegpt_prune(linear.weight.data, step.statistics[name].hessian, settings, step.full_name(name))
        linear.weight.data.copy_(pruned.to(linear.weight.dtype))


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    SparseGPTSettings.from_params(params)


def _check_shapes(model: nn.Module, settings: SparseGPTSettings) -> tuple[tuple[str, ...], ...] | None:
    """Everything that could fail half-way is checked before the first weight changes;
    returns the true-sequential groups (None: all linears of a block at once)."""
    _, blocks = decoder_blocks(model)
    if settings.pattern == "n:m":
        check_n_m_shapes("sparsegpt", model, settings.n, settings.m)
    if not settings.true_sequential:
        return None
    return llama_sequential_groups("sparsegpt", blocks)


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device) -> Compression:
    """Prune every linear of every decoder block of `model` in place; declare the result.

    `params`: the preset's table merged with the job's overrides (`pattern`, `sparsity`,
    `n`, `m`, `blocksize`, `percdamp`, `true_sequential`; `calibration_batch_size` only sets
    how many windows go through a block per forward). At sparsity 0 nothing is pruned (as
    upstream `llama.py`). The caller fills in `preset` on the returned declaration.
    """
    settings = SparseGPTSettings.from_params(params)
    sequential = _check_shapes(model, settings)
    if settings.sparsity > 0:
        run_blockwise(model, calibration_ids, device,
                      statistics=lambda _name, linear: LayerHessian(linear),
                      update=lambda step: prune_step(step, settings),
                      sequential=sequential,
                      batch_size=settings.calibration_batch_size)
    nsamples, seqlen = calibration_ids.shape
    notes = [f"calibration: {nsamples} x {seqlen} tokens",
             f"blocksize {settings.blocksize}, percdamp {settings.percdamp}, true_sequential {settings.true_sequential}"]
    return sparsity_declaration(model, "sparsegpt", settings.pattern, settings.n, settings.m, settings.sparsity, notes)

