"""AWQ, the reference engine: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration" (MLSys 2024, arXiv:2306.00978). Follows
mit-han-lab/llm-awq (commit d6e797a): `awq/quantize/pre_quant.py` (`run_awq`),
`awq/quantize/auto_scale.py` (`auto_scale_block`, `apply_scale`), `awq/quantize/auto_clip.py`
(`auto_clip_layer`, `apply_clip`) and `awq/quantize/quantizer.py` (`pseudo_quantize_tensor`).
The model plumbing is the shared runner in `methods/_engine/blockwise.py`.

The algorithm, for every decoder block, with X a group of linears' calibration input and
Q() group-wise asymmetric round-to-nearest (below):

    1. scale search (paper section 3.2, eq. 4-5), per scaling group, on the block's
       original weights:
           s_X = mean over tokens of |X_j|                       per input channel j
           for alpha in 0, 1/n_grid, ..., (n_grid-1)/n_grid:
               s = s_X^alpha (clamped at 1e-4);  s /= sqrt(max(s) * min(s))
               W' = Q(W diag(s)) diag(s)^-1  for every linear of the group
               loss(alpha) = mean (f(X; W') - f(X; W))^2
           keep the s of the lowest loss (alpha = 0 is plain round-to-nearest)
       where f is the module whose output upstream compares for that group:
           input_layernorm          -> q, k, v     compared on self_attn's output
           v_proj                   -> o_proj      compared on o_proj's output (only when
                                                   v_proj and o_proj have the same shape,
                                                   i.e. no grouped-query attention, as upstream)
           post_attention_layernorm -> gate, up    compared on the MLP's output
           up_proj                  -> down_proj   compared on down_proj's output
    2. fold each s: the previous op's output channels are divided by s (a norm's weight, or
       a linear's rows) and the group's input channels multiplied by s; the model computes
       the same function, and the kept calibration inputs are divided by s.
    3. clipping search (`auto_clip_layer`), for every linear but q_proj and k_proj ("due to
       qk bmm, it is hard to clip precisely"), per output channel and group, over the
       calibration inputs thinned to about 512 tokens:
           for i in 0 .. max_shrink * n_grid - 1:
               m = max|W_group| * (1 - i / n_grid)
               err(m) = mean over tokens of (X_g Q(clamp(W_g, -m, m))^T - X_g W_g^T)^2
           keep the m of the lowest error.
    4. after every block: clamp each weight group at its m, then W <- Q(W) in place.

Q() is `pseudo_quantize_tensor` with zero point: per group of `group_size` consecutive input
channels, scale = (max - min) / (2^b - 1), zero = clamp(-round(min / scale), 0, 2^b - 1),
q = clamp(round(w / scale) + zero, 0, 2^b - 1), w <- (q - zero) * scale. The scale is
rounded to float16 (upstream computes in float16; the packed export stores float16 scales),
so the in-place weights are exactly the packed export's values.

Order, as upstream: a block's scale searches all run on its original weights, then every
scale is folded, then the clipping is searched; the next block is calibrated on the outputs
of the full-precision function (upstream propagates the block output computed before any
change). Scaling preserves the function, so the shared runner propagates it unchanged; the
clipping and the quantization, which do not, are applied after the walk, as upstream's
`apply_awq` + `pseudo_quantize_model_weight` do.

Where `group_size` does not divide a linear's input width (the embedded model's hidden size
576 and 128), the last group of each row is shorter (`in % group_size` channels), the
GPTQ-format convention g_idx = i // group_size; upstream asserts divisibility instead. The
declaration's notes say so when it happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from llmcbench.driver.contract import Compression, LayerCompression

from .._engine import params as check
from .._engine.blockwise import BlockStep, decoder_blocks, find_linears, run_blockwise
from .._engine.folding import norm_scales_with_weight
from .._engine.output import EngineOutput

PARAMS = {"weight_bits", "group_size", "n_grid", "auto_scale", "auto_clip", "calibration_batch_size"}
SUPPORTED_BITS = (3, 4, 8)
CLIP_N_GRID = 20  # auto_clip_layer defaults
CLIP_MAX_SHRINK = 0.5
CLIP_SAMPLE_TOKENS = 512
CLIP_CHUNK_ELEMENTS = 1 << 25  # output rows per clip-search chunk: rows x groups x tokens under this
FP16_MIN_SUBNORMAL = 2.0 ** -24
FP16_MAX = 65504.0


@dataclass(frozen=True)
class AWQSettings:
    weight_bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    n_grid: int = 20
    auto_scale: bool = True
    auto_clip: bool = True
    calibration_batch_size: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "AWQSettings":
        """Validate a preset's params merged with the job's overrides."""
        check.reject_unknown("awq", params, PARAMS)
        bits = params.get("weight_bits", 4)
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise ValueError(f"awq: weight_bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
        group = params.get("group_size", 128)
        if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group >= 2):
            raise ValueError(f"awq: group_size must be an integer >= 2, or -1 for one group per output channel, got {group!r}")
        n_grid = params.get("n_grid", 20)
        if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
            raise ValueError(f"awq: n_grid must be a positive integer, got {n_grid!r}")
        flags = {}
        for key in ("auto_scale", "auto_clip"):
            flags[key] = params.get(key, True)
            if not isinstance(flags[key], bool):
                raise ValueError(f"awq: {key} must be true or false, got {flags[key]!r}")
        batch = check.calibration_batch_size("awq", params)
        return cls(bits, group, n_grid, flags["auto_scale"], flags["auto_clip"], batch)


# ---------------------------------------------------------------- the quantizer Q()

def group_segments(in_features: int, group_size: int) -> list[tuple[int, int, int]]:
    """(start, stop, group length) runs of equal-length groups along the input channels:
    the full groups, then the shorter last one if `group_size` does not divide."""
    length = in_features if group_size <= 0 else min(group_size, in_features)
    full = in_features // length * length
    segments = [(0, full, length)]
    if full < in_features:
        segments.append((full, in_features, in_features - full))
    return segments


def group_grid(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid of each group (last dimension): float16-representable scale and
    integer zero point, both keepdim."""
    max_int = 2 ** bits - 1
    low, high = torch.aminmax(groups.float(), dim=-1, keepdim=True)
    scales = ((high - low).clamp_(min=1e-5) / max_int).to(torch.float16).float().clamp_(FP16_MIN_SUBNORMAL, FP16_MAX)
    zeros = torch.round(low.div_(scales)).neg_().clamp_(0, max_int)
    return scales, zeros


def quantize_groups(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Q() on groups along the last dimension (float32 result)."""
    scales, zeros = group_grid(groups, bits)
    codes = torch.round(groups.float() / scales).add_(zeros).clamp_(0, 2 ** bits - 1)
    return codes.sub_(zeros).mul_(scales)


def pseudo_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Q() on a weight [out, in] in groups of `group_size` input channels (upstream
    `pseudo_quantize_tensor` with zero_point), in the weight's dtype."""
    rows, columns = weight.shape
    segments = group_segments(columns, group_size)
    if len(segments) == 1:
        return quantize_groups(weight.reshape(rows, -1, segments[0][2]), bits).reshape(rows, columns).to(weight.dtype)
    out = torch.empty((rows, columns), dtype=torch.float32, device=weight.device)
    for start, stop, length in segments:
        out[:, start:stop] = quantize_groups(weight[:, start:stop].reshape(rows, -1, length), bits).reshape(rows, -1)
    return out.to(weight.dtype)


def quantization_grid(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of every group of `weight`, each [out, n_groups] float32."""
    rows, columns = weight.shape
    scales, zeros = [], []
    for start, stop, length in group_segments(columns, group_size):
        s, z = group_grid(weight[:, start:stop].float().reshape(rows, -1, length), bits)
        scales.append(s.squeeze(-1))
        zeros.append(z.squeeze(-1))
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


# ---------------------------------------------------------------- calibration inputs

class InputFeatures:
    """A linear's calibration inputs, kept whole (AWQ searches on them; upstream `input_feat`)."""

    def __init__(self, linear: nn.Linear):
        self.batches: list[torch.Tensor] = []

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.batches.append(inputs.detach().reshape(-1, inputs.shape[-1]))


def block_input_features(step: BlockStep) -> dict[str, torch.Tensor]:
    """Each linear's inputs as one [tokens, in] tensor; linears fed the same tensors (q/k/v,
    gate/up) share one copy."""
    joined: dict[tuple, torch.Tensor] = {}
    features = {}
    for name, stats in step.statistics.items():
        key = tuple(t.data_ptr() for t in stats.batches)
        if key not in joined:
            joined[key] = torch.cat(stats.batches, dim=0)
        features[name] = joined[key]
    return features


@dataclass
class ModuleCalls:
    """Every call one module of the block received in a pass over the calibration batches."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)


def capture_module_calls(step: BlockStep, names: list[str]) -> dict[str, ModuleCalls]:
    """Run the block over the calibration batches and record the arguments each named
    module was called with, so the search can re-run that module alone (upstream's
    `module2inspect` with the layer kwargs)."""
    captured = {name: ModuleCalls() for name in names}

    def recorder(name):
        def hook(_module, args, kwargs):
            captured[name].calls.append((args, kwargs))
        return hook

    handles = [step.block.get_submodule(name).register_forward_pre_hook(recorder(name), with_kwargs=True) for name in names]
    try:
        with torch.no_grad():
            for batch in step.inputs:
                step.run_block(batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------- 1-2: scale search and folding

@dataclass(frozen=True)
class ScalingGroup:
    previous: str  # the op whose output channels absorb 1/s: a norm or a linear
    linears: tuple[str, ...]  # the linears whose input channels take s
    inspect: str  # the module whose output the search compares


def llama_scaling_groups(block: nn.Module) -> list[ScalingGroup]:
    """Upstream `auto_scale_block`'s LLaMA groups."""
    groups = [ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    v_proj, o_proj = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
    if v_proj.weight.shape == o_proj.weight.shape:  # llm-awq PR #67: skipped under grouped-query attention
        groups.append(ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor  # [in_features] float32
    ratio: float  # the chosen alpha
    losses: list[float]  # loss per grid point; losses[0] is round-to-nearest


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _mean_squared_error(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    total = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outputs, references))
    return total / sum(r.numel() for r in references)


@torch.no_grad()
def search_scale(run_inspected: Callable[[], list[torch.Tensor]], linears: list[nn.Linear], x_mean_abs: torch.Tensor,
                 quantize: Callable[[torch.Tensor], torch.Tensor], n_grid: int = 20) -> ScaleSearch:
    """Upstream `_search_module_scale`: the per-input-channel scale s = mean|X|^alpha
    (normalised) minimising the inspected module's output error after W <- Q(W s) / s."""
    originals = [fc.weight.data.clone() for fc in linears]
    references = run_inspected()
    losses = []
    best_loss, best_ratio, best_scales = float("inf"), None, None
    try:
        for point in range(n_grid):
            ratio = point / n_grid
            scales = x_mean_abs.float().pow(ratio).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for fc, original in zip(linears, originals):
                s = scales.to(original.device).reshape(1, -1)
                fc.weight.data = (quantize(original.float() * s) / s).to(original.dtype)
            loss = _mean_squared_error(run_inspected(), references)
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_ratio, best_scales = loss, ratio, scales
    finally:
        for fc, original in zip(linears, originals):
            fc.weight.data = original
    if best_scales is None:
        raise FloatingPointError(f"awq: the scale search found no finite loss (losses {losses})")
    return ScaleSearch(best_scales, best_ratio, losses)


def _scales_with_weight(norm: nn.Module) -> bool:
    """True if norm(x) is proportional to norm.weight, so the weight can absorb 1/s
    (false for Gemma's (1 + w) norms, and for norms with a bias)."""
    return norm_scales_with_weight(norm, allow_bias=False)


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """Upstream `apply_scale`: divide the previous op's output channels by s, multiply the
    group's input channels by s."""
    previous = block.get_submodule(group.previous)
    if isinstance(previous, nn.Linear):  # scale_fc_fc: the last len(s) rows
        rows = previous.weight[-scales.numel():]
        rows.div_(scales.to(rows).reshape(-1, 1))
        if previous.bias is not None:
            previous.bias[-scales.numel():].div_(scales.to(previous.bias))
    else:  # scale_ln_fcs
        previous.weight.div_(scales.to(previous.weight))
    for name in group.linears:
        fc = block.get_submodule(name)
        fc.weight.mul_(scales.to(fc.weight).reshape(1, -1))


# ---------------------------------------------------------------- 3: clipping search

@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int, n_grid: int = CLIP_N_GRID,
                max_shrink: float = CLIP_MAX_SHRINK, sample_tokens: int = CLIP_SAMPLE_TOKENS) -> torch.Tensor:
    """Upstream `auto_clip_layer`: per output channel and group, the clipping threshold
    max|W| * (1 - i / n_grid), i < max_shrink * n_grid, minimising the group's output error.
    Returns the thresholds, [out, n_groups] float32."""
    rows, columns = weight.shape
    x = inputs.reshape(-1, columns)
    x = x[::max(1, x.shape[0] // sample_tokens)].float()  # upstream keeps every (n // 512)-th token
    thresholds = []
    for start, stop, length in group_segments(columns, group_size):
        x_groups = x[:, start:stop].reshape(x.shape[0], -1, length).transpose(0, 1)  # [groups, tokens, length]
        w_groups = weight[:, start:stop].float().reshape(rows, -1, length)  # [out, groups, length]
        groups = w_groups.shape[1]
        chunk = max(1, CLIP_CHUNK_ELEMENTS // (groups * x.shape[0]))
        best_segment = []
        for first in range(0, rows, chunk):
            w = w_groups[first:first + chunk]
            reference = torch.bmm(x_groups, w.permute(1, 2, 0))  # [groups, tokens, rows]
            original_max = w.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
            best = original_max.clone()
            lowest = torch.full_like(original_max, float("inf"))
            for step in range(int(max_shrink * n_grid)):
                max_val = original_max * (1 - step / n_grid)
                clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
                out = torch.bmm(x_groups, quantize_groups(clipped, bits).permute(1, 2, 0))
                error = (out - reference).pow(2).mean(dim=1).transpose(0, 1).unsqueeze(-1)  # [rows, groups, 1]
                better = error < lowest
                lowest[better] = error[better]
                best[better] = max_val[better]
            best_segment.append(best.squeeze(-1))
        thresholds.append(torch.cat(best_segment, dim=0))
    return torch.cat(thresholds, dim=1)


@torch.no_grad()
def apply_clip(weight: torch.Tensor, thresholds: torch.Tensor, group_size: int) -> None:
    """Upstream `apply_clip`: clamp each group to [-threshold, threshold], in place."""
    rows, columns = weight.shape
    index = 0
    for start, stop, length in group_segments(columns, group_size):
        segment = weight[:, start:stop].reshape(rows, -1, length)
        groups = segment.shape[1]
        limit = thresholds[:, index:index + groups].to(weight).unsqueeze(-1)
        weight[:, start:stop] = torch.maximum(torch.minimum(segment, limit), -limit).reshape(rows, -1)
        index += groups


# ---------------------------------------------------------------- the walk

def _skips_clipping(name: str) -> bool:
    """Upstream `auto_clip_block` skips q and k: "due to qk bmm, it is hard to clip precisely"."""
    return name.endswith(("q_proj", "k_proj"))


class AWQBlockUpdate:
    """The per-block `update` of the shared runner: steps 1-3; keeps the clipping thresholds
    for step 4 and a summary of every search."""

    def __init__(self, settings: AWQSettings):
        self.settings = settings
        self.thresholds: dict[str, torch.Tensor] = {}  # full linear name -> [out, n_groups]
        self.searches: list[tuple[int, ScalingGroup, ScaleSearch]] = []

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return pseudo_quantize(weight, self.settings.weight_bits, self.settings.group_size)

    def __call__(self, step: BlockStep) -> None:
        features = block_input_features(step)
        input_scales: dict[str, torch.Tensor] = {}
        if self.settings.auto_scale:
            groups = llama_scaling_groups(step.block)
            calls = capture_module_calls(step, [g.inspect for g in groups if g.inspect not in step.linears])
            found = [(group, self.search_group(step, group, features, calls)) for group in groups]
            for group, search in found:  # every search ran on the original weights
                fold_scales(step.block, group, search.scales)
                input_scales.update({name: search.scales for name in group.linears})
                self.searches.append((step.index, group, search))
        if self.settings.auto_clip:
            for name, linear in step.linears.items():
                if _skips_clipping(name):
                    continue
                x = features[name]
                if name in input_scales:
                    x = x / input_scales[name].to(x).reshape(1, -1)
                self.thresholds[step.full_name(name)] = search_clip(
                    linear.weight.data, x, self.settings.weight_bits, self.settings.group_size).cpu()

    def search_group(self, step: BlockStep, group: ScalingGroup, features: dict[str, torch.Tensor],
                     calls: dict[str, ModuleCalls]) -> ScaleSearch:
        module = step.block.get_submodule(group.inspect)
        if group.inspect in step.linears:
            x = features[group.inspect]
            run = lambda: [module(x)]  # noqa: E731
        else:
            recorded = calls[group.inspect].calls
            run = lambda: [_first_output(module(*args, **kwargs)) for args, kwargs in recorded]  # noqa: E731
        x_mean_abs = features[group.linears[0]].abs().float().mean(dim=0)  # upstream get_act_scale
        linears = [step.linears[name] for name in group.linears]
        return search_scale(run, linears, x_mean_abs, self.quantize, self.settings.n_grid)


def check_model(model: nn.Module) -> None:
    """Every block must have upstream's LLaMA scaling groups, with norms that absorb 1/s."""
    _, blocks = decoder_blocks(model)
    names = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for index, block in enumerate(blocks):
        missing = sorted(names - set(find_linears(block)))
        if missing:
            raise ValueError(f"awq: decoder block {index} has no {', '.join(missing)}: the reference engine "
                             "scales LLaMA-style blocks (upstream auto_scale_block's LlamaDecoderLayer groups)")
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(block, norm_name, None)
            if norm is None or not _scales_with_weight(norm):
                raise ValueError(f"awq: block {index}'s {norm_name} is missing or does not scale with its weight, "
                                 "so the activation-aware scales cannot be folded into it")


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    AWQSettings.from_params(params)


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device) -> EngineOutput:
    """Scale, clip and quantize every decoder-block linear of `model` in place (left
    dequantized, exactly on the grid); declare it, and offer the packed export.

    `params`: `weight_bits` (3, 4, 8), `group_size` (-1: per output channel), `n_grid` (scale
    search grid, 20), `auto_scale` / `auto_clip` (both on, as upstream; off gives the
    ablations, both off plain round-to-nearest), `calibration_batch_size` (speed only).
    """
    from .export import export_format, write_packed

    settings = AWQSettings.from_params(params)
    check_model(model)
    update = AWQBlockUpdate(settings)
    if settings.auto_scale or settings.auto_clip:
        run_blockwise(model, calibration_ids, device, statistics=lambda _name, linear: InputFeatures(linear),
                      update=update, batch_size=settings.calibration_batch_size)

    prefix, blocks = decoder_blocks(model)
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers: dict[str, LayerCompression] = {}
    ragged = set()
    with torch.no_grad():
        for index, block in enumerate(blocks):
            for name, linear in find_linears(block).items():
                full_name = f"{prefix}.{index}.{name}"
                if full_name in update.thresholds:
                    apply_clip(linear.weight.data, update.thresholds[full_name], settings.group_size)
                grids[full_name] = quantization_grid(linear.weight.data, settings.weight_bits, settings.group_size)
                linear.weight.data = pseudo_quantize(linear.weight.data, settings.weight_bits, settings.group_size)
                layers[full_name] = LayerCompression(weight_bits=settings.weight_bits, shape=list(linear.weight.shape))
                if settings.group_size > 0 and linear.in_features % settings.group_size:
                    ragged.add(linear.in_features)

    packed_format = export_format(model, grids, settings.weight_bits, settings.group_size)
    declaration = Compression(
        method="awq",
        engine="reference",
        weight_bits=settings.weight_bits,
        act_bits=16,
        group_size=settings.group_size if settings.group_size > 0 else None,
        symmetric=False,
        act_granularity="none",
        smoothing_folded=settings.auto_scale,
        layers=layers,
        notes=_notes(calibration_ids, settings, update, ragged, packed_format),
    )
    if packed_format is None:
        return EngineOutput(declaration)
    return EngineOutput(declaration, export_packed=lambda out: write_packed(out, model, grids, settings.weight_bits,
                                                                            settings.group_size, packed_format))


def _notes(calibration_ids, settings: AWQSettings, update: AWQBlockUpdate, ragged: set[int],
           packed_format: str | None) -> list[str]:
    nsamples, seqlen = calibration_ids.shape
    notes = [
        f"calibration: {nsamples} x {seqlen} tokens of C4 from the job (upstream: 128 pile-validation documents "
        "concatenated into 512-token blocks)",
        f"weights: INT{settings.weight_bits} asymmetric (zero point), "
        + (f"groups of {settings.group_size} input channels" if settings.group_size > 0 else "one group per output channel")
        + "; float16 scales; lm_head and embeddings kept",
        f"auto_scale {'on' if settings.auto_scale else 'off'} (n_grid {settings.n_grid}), "
        f"auto_clip {'on' if settings.auto_clip else 'off'} (n_grid {CLIP_N_GRID}, max_shrink {CLIP_MAX_SHRINK}, "
        f"{CLIP_SAMPLE_TOKENS} tokens; q_proj and k_proj not clipped)",
    ]
    if update.searches:
        by_group: dict[str, list[ScaleSearch]] = {}
        for _, group, search in update.searches:
            by_group.setdefault(f"{group.previous}->{'/'.join(n.split('.')[-1] for n in group.linears)}", []).append(search)
        summary = "; ".join(
            f"{key}: mean alpha {sum(s.ratio for s in found) / len(found):.2f}, "
            f"loss vs round-to-nearest {sum(min(s.losses) / s.losses[0] if s.losses[0] > 0 else 1.0 for s in found) / len(found):.3f}"
            for key, found in by_group.items())
        notes.append(f"scale search over {len({i for i, _, _ in update.searches})} blocks: {summary}")
    if ragged:
        notes.append(f"group_size {settings.group_size} does not divide input width(s) {', '.join(map(str, sorted(ragged)))}: "
                     "the last group of those rows is shorter (g_idx = i // group_size; upstream asserts divisibility)")
    notes.append(f"packed export: {packed_format}" if packed_format else
                 "no packed export: neither the AWQ GEMM layout nor an evenly packed GPTQ layout fits these bits/shapes")
    return notes
