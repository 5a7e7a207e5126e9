"""GPTQ, the reference engine: post-training weight quantization by approximate
second-order reconstruction.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023, arXiv:2210.17323), Algorithm 1. Follows
`GPTQ.add_batch` and `GPTQ.fasterquant` in IST-DASLab/gptq `gptq.py`, `Quantizer.find_params`
and `quantize` in its `quant.py`, and the layer walk of its `llama.py` (commit 2d65066); the
Hessian and its inverse Cholesky factor are shared with SparseGPT
(`methods/_engine/hessian.py`), the model plumbing (capture block inputs, walk blocks, hook
linears, propagate the quantized outputs, `--true-sequential` groups) is the shared runner in
`methods/_engine/blockwise.py`. The packed export is `export.py` beside this file (the GPTQ
checkpoint of `methods/_engine/gptq_format.py`).

The algorithm, per linear layer W (rows x columns) of every decoder block, with H = 2 X X^T
from the layer's calibration inputs:

    act_order: permute the columns by descending diag(H)       ("--act-order")
    U = Cholesky((H + lambda I)^-1), upper       lambda = percdamp * mean(diag H)
    for each block of B columns [i1, i2):                       (B = 128, lazy batch)
        for each column j of the block:
            at the start of each group of `group_size` columns, choose the group's grid
            (min/max of each row over the group's columns, see `grid_for`)
            q_j  = scale * (clamp(round(w_j / scale) + zero, 0, 2^bits - 1) - zero)
            e    = (w_j - q_j) / U_jj
            w_k -= e * U_jk for k in (j, i2)          (OBS update of the block's columns)
        W[:, i2:] -= E U[i1:i2, i2:]               (E: the block's e vectors)

The grid is upstream's min/max quantizer: asymmetric by default (scale = (max - min) /
(2^bits - 1), zero = round(-min / scale), min <= 0 <= max), or symmetric (`sym`: scale =
2 max|w| / (2^bits - 1), zero = 2^(bits-1)). Per output channel when `group_size` is -1
(one grid per row, chosen from the whole row before any update), else per group of
`group_size` consecutive columns in processing order, chosen when the walk reaches the
group from the weights as updated up to the current block's start (upstream's
`find_params(W[:, j:j + groupsize])`, for any `group_size` / `blocksize` combination).
With `static_groups` every group's grid is chosen from the original weights up front, in
the original column order, so act-order keeps contiguous groups ("--static-groups").

One departure, so the packed export is exact: the export stores scales in fp16 (the GPTQ
checkpoint format), so each scale is rounded to fp16 when it is chosen and the zero point is
derived from the rounded scale. The weights left in the model, scale * (q - zero) in the
model's dtype, are then exactly what the packed checkpoint decodes to (in float32; a
float16 model gets the correctly rounded products, as the fp16 kernels compute them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmcbench.driver.contract import Compression, LayerCompression

from .._engine import params as check
from .._engine.blockwise import BlockStep, decoder_blocks, find_linears, llama_sequential_groups, run_blockwise
from .._engine.gptq_format import QuantizationGrid, unpacked_shapes
from .._engine.hessian import LayerHessian, inverse_hessian_cholesky, prepare_hessian
from .._engine.output import EngineOutput
from .._engine.packing import pack_multiple
from .export import write_gptq_checkpoint

SUPPORTED_BITS = (2, 3, 4, 8)
PARAMS = {"weight_bits", "group_size", "sym", "act_order", "static_groups", "true_sequential", "percdamp", "blocksize",
          "calibration_batch_size"}


@dataclass(frozen=True)
class GPTQSettings:
    weight_bits: int
    group_size: int = -1  # -1: one grid per output channel
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    calibration_batch_size: int | None = None

    @property
    def maxq(self) -> int:
        return 2 ** self.weight_bits - 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "GPTQSettings":
        """Validate a preset's params merged with the job's overrides (upstream defaults:
        per-channel, asymmetric, no act-order, no true-sequential, percdamp 0.01, blocksize 128)."""
        check.reject_unknown("gptq", params, PARAMS)
        bits = params.get("weight_bits")
        if bits is None:
            raise ValueError(f"gptq: weight quantization needs weight_bits, one of {', '.join(map(str, SUPPORTED_BITS))}")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise ValueError(f"gptq: weight_bits={bits!r} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        group_size = params.get("group_size", -1)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size >= 1):
            raise ValueError(f"gptq: group_size must be -1 (per channel) or a positive integer, got {group_size!r}")
        flags = {}
        for key in ("sym", "act_order", "static_groups", "true_sequential"):
            value = params.get(key, False)
            if not isinstance(value, bool):
                raise ValueError(f"gptq: {key} must be true or false, got {value!r}")
            flags[key] = value
        if flags["static_groups"] and group_size == -1:
            raise ValueError("gptq: static_groups needs a group_size (per-channel grids are static already)")
        percdamp = check.percdamp("gptq", params)
        blocksize = check.blocksize("gptq", params)
        batch = check.calibration_batch_size("gptq", params)
        return cls(bits, group_size, flags["sym"], flags["act_order"], flags["static_groups"], flags["true_sequential"],
                   percdamp, blocksize, batch)


def grid_for(weights: torch.Tensor, settings: GPTQSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for `weights` [rows, k] (upstream `Quantizer.find_params`
    with perchannel=True, mse=False), the scale rounded to fp16 (see the module docstring)."""
    zero_ = torch.zeros(weights.shape[0], device=weights.device)
    xmin = torch.minimum(weights.min(dim=1).values, zero_)
    xmax = torch.maximum(weights.max(dim=1).values, zero_)
    if settings.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1, 1
    scale = ((xmax - xmin) / settings.maxq).to(torch.float16).float()
    scale = scale.clamp_(min=torch.finfo(torch.float16).smallest_normal * 2 ** -10)  # fp16's smallest subnormal
    if settings.sym:
        zero = torch.full_like(scale, (settings.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp_(0, settings.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round `w` to the nearest point of the grid scale * ({0..maxq} - zero) (upstream `quantize`)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings,
                  layer: str = "layer") -> tuple[torch.Tensor, QuantizationGrid]:
    """The quantized weights (float32, on the grid) of one linear and their grid (upstream
    `fasterquant`, paper Algorithm 1). Consumes `hessian` (dampened in place)."""
    W = weight.detach().clone().float()
    rows, columns = W.shape
    per_channel = settings.group_size == -1
    group_size = columns if per_channel else settings.group_size
    grids: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scale, zero) of each group, [rows] each
    if per_channel:  # one grid per row, from the whole row before anything changes (upstream order)
        grids.append(grid_for(W, settings))
    dead = prepare_hessian(hessian)
    W[:, dead] = 0
    if settings.static_groups:  # every group's grid up front, in the original column order
        grids = [grid_for(W[:, c:c + group_size], settings) for c in range(0, columns, group_size)]

    order = torch.arange(columns, device=W.device)
    if settings.act_order:
        order = torch.argsort(torch.diag(hessian), descending=True)
        W = W[:, order]
        hessian = hessian[order][:, order]
    Hinv = inverse_hessian_cholesky(hessian, settings.percdamp, layer)

    Q = torch.zeros_like(W)
    original_column = order.tolist()
    group_at = torch.zeros(columns, dtype=torch.int32)  # the group of each processed position
    for i1 in range(0, columns, settings.blocksize):
        i2 = min(i1 + settings.blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            position = i1 + i
            if settings.static_groups:
                group = original_column[position] // group_size
            else:
                if not per_channel and position % group_size == 0:
                    # a new group: its grid from the weights as updated up to this block's start
                    grids.append(grid_for(W[:, position:position + group_size], settings))
                group = len(grids) - 1
            group_at[position] = group
            scale, zero = grids[group]
            w = W1[:, i]
            q = quantize(w, scale, zero, settings.maxq)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
            Err1[:, i] = err

        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    group_index = torch.empty_like(group_at)
    group_index[order.cpu()] = group_at
    Q_original_order = torch.empty_like(Q)
    Q_original_order[:, order] = Q
    grid = QuantizationGrid(
        bits=settings.weight_bits,
        scales=torch.stack([scale for scale, _ in grids]),
        zeros=torch.stack([zero for _, zero in grids]).to(torch.int16),
        group_index=group_index,
    )
    return Q_original_order, grid


class _QuantizeStep:
    """The `update` callback: quantize each linear of the block (or true-sequential group)
    from its Hessian and keep its grid for the packed export."""

    def __init__(self, settings: GPTQSettings):
        self.settings = settings
        self.grids: dict[str, QuantizationGrid] = {}

    def __call__(self, step: BlockStep) -> None:
        for name, linear in step.linears.items():
            full_name = step.full_name(name)
            quantized, grid = gptq_quantize(linear.weight.data, step.statistics[name].hessian, self.settings, full_name)
            linear.weight.data.copy_(quantized.to(linear.weight.dtype))
            self.grids[full_name] = QuantizationGrid(grid.bits, grid.scales.cpu(), grid.zeros.cpu(), grid.group_index)


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    GPTQSettings.from_params(params)


def _check_model(model: nn.Module, settings: GPTQSettings) -> tuple[tuple[str, ...], ...] | None:
    """Everything that could fail half-way is checked before the first weight changes:
    the packed export's shapes and the true-sequential groups (returned; None: all linears
    of a block at once)."""
    _, blocks = decoder_blocks(model)
    odd = unpacked_shapes(settings.weight_bits, [linear for block in blocks for linear in find_linears(block).values()])
    if odd:
        multiple = pack_multiple(settings.weight_bits)
        raise ValueError(f"gptq: the {settings.weight_bits}-bit GPTQ checkpoint packs {multiple} values per int32 group, so it needs "
                         f"in and out features divisible by {multiple}; the model has linears of {', '.join(odd)}")
    if not settings.true_sequential:
        return None
    return llama_sequential_groups("gptq", blocks)


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device) -> EngineOutput:
    """Quantize every linear of every decoder block of `model` in place (weights left
    dequantized, exactly on their grids) and offer the packed GPTQ checkpoint.

    `params`: the preset's table merged with the job's overrides (`weight_bits`, `group_size`,
    `sym`, `act_order`, `static_groups`, `true_sequential`, `percdamp`, `blocksize`;
    `calibration_batch_size` only sets how many windows go through a block per forward).
    Embeddings, norms and the LM head stay in full precision, as upstream. The caller fills
    in `preset` on the returned declaration and calls `export_packed` with `out/packed/`.
    """
    settings = GPTQSettings.from_params(params)
    sequential = _check_model(model, settings)
    step = _QuantizeStep(settings)
    run_blockwise(model, calibration_ids, device,
                  statistics=lambda _name, linear: LayerHessian(linear),
                  update=step,
                  sequential=sequential,
                  batch_size=settings.calibration_batch_size)
    nsamples, seqlen = calibration_ids.shape
    notes = [f"calibration: {nsamples} x {seqlen} tokens",
             f"{settings.weight_bits}-bit, group_size {settings.group_size} (-1: per output channel), "
             f"{'symmetric' if settings.sym else 'asymmetric'} min/max grid, act_order {settings.act_order}, "
             f"static_groups {settings.static_groups}, true_sequential {settings.true_sequential}, "
             f"percdamp {settings.percdamp}, blocksize {settings.blocksize}",
             "weights are stored dequantized (scale * (q - zero), scales fp16-representable); "
             "packed/ holds the GPTQ checkpoint (qweight/qzeros/scales/g_idx)"]
    declaration = _declaration(model, settings, step.grids, notes)
    return EngineOutput(declaration, export_packed=lambda folder: write_gptq_checkpoint(model, step.grids, settings, folder))


def _declaration(model: nn.Module, settings: GPTQSettings, grids: dict[str, QuantizationGrid],
                 notes: list[str]) -> Compression:
    prefix, blocks = decoder_blocks(model)
    layers: dict[str, LayerCompression] = {}
    for index, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            full_name = f"{prefix}.{index}.{name}"
            bits = grids[full_name].bits if full_name in grids else 16
            layers[full_name] = LayerCompression(weight_bits=bits, shape=list(linear.weight.shape))
    return Compression(
        method="gptq",
        engine="reference",
        weight_bits=settings.weight_bits,
        act_bits=16,
        group_size=settings.group_size,
        symmetric=settings.sym,
        act_granularity="none",
        layers=layers,
        notes=notes,
    )
