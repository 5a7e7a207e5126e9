"""SmoothQuant, the reference engine: smoothing folded into the norms, then W8A8.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (ICML 2023, arXiv:2211.10438). Follows
mit-han-lab/smoothquant (commit c61476d): `smoothquant/calibration.py` (`get_act_scales`),
`smoothquant/smooth.py` (`smooth_lm`, `smooth_ln_fcs_llama_like`) and
`smoothquant/fake_quant.py` (`quantize_llama_like`, `W8A8Linear`). The model plumbing is the
shared runner in `methods/_engine/blockwise.py`.

The algorithm (paper section 4), for every decoder block:

    max|X_j|   per input channel j of the linears a norm feeds, over all calibration tokens
    max|W_j|   per input channel j, over the output rows of all those linears
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)            (paper eq. 4; clamped at 1e-5)
    norm.weight_j /= s_j ;  W_:,j *= s_j                     (X diag(s)^-1 . diag(s) W)

for the pairs input_layernorm -> q/k/v and post_attention_layernorm -> gate/up. As upstream
does for LLaMA, o_proj and down_proj are not smoothed (nothing folds into them without a
runtime scale). Then every decoder-block linear is quantized (upstream `quantize_llama_like`):

    weights:     symmetric per output channel, scale = max_i |W_i,:| / (2^(b-1) - 1),
                 W <- round(W / scale) * scale, in place
    activations: dynamic symmetric per token (or per tensor), applied at evaluation from the
                 declaration (tracks/fakequant.py); a checkpoint cannot hold them

The smoothing only moves scale between the norm and the linears, so the smoothed model
computes the same function; upstream collects the activation maxima on the unmodified model.
Here block i is smoothed as soon as its statistics are in, its outputs (unchanged up to
rounding) feed block i + 1, and the weights are quantized after the walk, so every statistic
is taken from the full-precision function as upstream takes it.

Whether a norm's weight can absorb the scale is checked by probing it (`norm(x)` must scale
with its weight), which turns away norms of the form `(1 + w) * x_hat` (Gemma).

Differences from upstream, recorded in the declaration's notes: calibration comes from the
job (C4 windows) instead of 512 pile-validation documents; upstream's `ppl_eval.py` also
quantizes the q/k/v outputs (`quantize_bmm_input=True`), which the declaration has no field
for, so evaluation quantizes the linears' inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmcbench.driver.contract import Compression, LayerCompression

from .._engine import params as check
from .._engine.blockwise import BlockStep, decoder_blocks, find_linears, run_blockwise
from .._engine.folding import norm_scales_with_weight

PARAMS = {"alpha", "alpha_by_arch", "weight_bits", "act_bits", "act_granularity", "smooth", "calibration_batch_size"}
SUPPORTED_BITS = (4, 8)
GRANULARITIES = ("per_token", "per_tensor")
SCALE_FLOOR = 1e-5  # upstream's clamp on the smoothing scales, the weight maxima and the quantization scales

# (norm that feeds the linears, the linears sharing its output), names relative to the block.
SMOOTHING_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


@dataclass(frozen=True)
class SmoothQuantSettings:
    alpha: float = 0.85
    weight_bits: int = 8
    act_bits: int = 8
    act_granularity: str = "per_token"
    smooth: bool = True
    calibration_batch_size: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any], arch: str | None = None) -> "SmoothQuantSettings":
        """Validate a preset's params merged with the job's overrides. `arch` (the model's
        model_type) picks its entry of `alpha_by_arch`: the migration strength is tuned per model
        family (the SmoothQuant paper: 0.5 for OPT; upstream's LLaMA example: 0.85)."""
        check.reject_unknown("smoothquant", params, PARAMS)
        by_arch = params.get("alpha_by_arch", {})
        if not isinstance(by_arch, dict):
            raise ValueError(f"smoothquant: alpha_by_arch must map model types to alphas, e.g. {{opt = 0.5}}, got {by_arch!r}")
        default = params.get("alpha", cls.alpha)
        for alpha in (default, *by_arch.values()):
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
                raise ValueError(f"smoothquant: alpha (migration strength) must be a number in [0, 1], got {alpha!r}")
        alpha = by_arch.get(arch, default)
        bits = {}
        for key in ("weight_bits", "act_bits"):
            value = params.get(key, 8)
            if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BITS:
                raise ValueError(f"smoothquant: {key} must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {value!r}")
            bits[key] = value
        granularity = params.get("act_granularity", "per_token")
        if granularity not in GRANULARITIES:
            raise ValueError(f"smoothquant: act_granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        smooth = params.get("smooth", True)
        if not isinstance(smooth, bool):
            raise ValueError(f"smoothquant: smooth must be true or false, got {smooth!r}")
        batch = check.calibration_batch_size("smoothquant", params)
        return cls(float(alpha), bits["weight_bits"], bits["act_bits"], granularity, smooth, batch)


class ChannelAbsMax:
    """max |X_j| per input channel over every calibration token (upstream `get_act_scales`)."""

    def __init__(self, linear: nn.Linear):
        self.absmax = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)

    def add_batch(self, inputs: torch.Tensor) -> None:
        tokens = inputs.reshape(-1, inputs.shape[-1])
        torch.maximum(self.absmax, tokens.abs().amax(dim=0).float(), out=self.absmax)


def smoothing_scales(act_absmax: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with max|W_j| over all the linears' rows."""
    weight_absmax = torch.stack([fc.weight.detach().abs().amax(dim=0).float() for fc in linears]).amax(dim=0)
    weight_absmax = weight_absmax.clamp(min=SCALE_FLOOR)
    return (act_absmax.float().pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


def _scales_with_weight(norm: nn.Module) -> bool:
    """True if norm(x) is linear in norm.weight, so dividing the weight divides the output."""
    return norm_scales_with_weight(norm, allow_bias=True)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """X diag(s)^-1 (folded into the norm) times diag(s) W (folded into the linears)."""
    norm.weight.div_(scales.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(scales.to(norm.bias.dtype))
    for fc in linears:
        fc.weight.mul_(scales.to(fc.weight.dtype).reshape(1, -1))


def smooth_block(step: BlockStep, alpha: float) -> None:
    """Smooth every (norm, linears) pair of the block from the linears' input maxima."""
    for norm_name, linear_names in SMOOTHING_PAIRS:
        norm = step.block.get_submodule(norm_name)
        linears = [step.linears[name] for name in linear_names]
        act_absmax = step.statistics[linear_names[0]].absmax  # the linears share one input
        fold_smoothing(norm, linears, smoothing_scales(act_absmax, linears, alpha))


@torch.no_grad()
def quantize_weight_per_channel_absmax(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel quantize-dequantize: at most 2^bits - 1 levels per row."""
    q_max = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=SCALE_FLOOR) / q_max
    return ((w / scale).round().clamp(-q_max, q_max) * scale).to(weight.dtype)


def check_model(model: nn.Module) -> None:
    """Every block must have the norms and linears smoothing pairs, with foldable norms."""
    _, blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        linears = find_linears(block)
        for norm_name, linear_names in SMOOTHING_PAIRS:
            missing = [name for name in linear_names if name not in linears]
            missing += [norm_name] if not _has_submodule(block, norm_name) else []
            if missing:
                raise ValueError(f"smoothquant: decoder block {index} has no {', '.join(missing)}: the reference engine "
                                 "smooths LLaMA-style blocks (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up)")
            if not _scales_with_weight(block.get_submodule(norm_name)):
                raise ValueError(f"smoothquant: block {index}'s {norm_name} ({type(block.get_submodule(norm_name)).__name__}) "
                                 "does not scale with its weight, so the smoothing cannot be folded into it")


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    SmoothQuantSettings.from_params(params)


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device) -> Compression:
    """Smooth (unless `smooth` is false) and quantize every decoder-block linear's weights
    in place; declare the activation quantization the evaluation must apply.

    `params`: `alpha`, `weight_bits`, `act_bits`, `act_granularity`, `smooth`, and
    `calibration_batch_size` (windows per block forward; speed only). With `smooth` false
    nothing is calibrated: that is plain W8A8 round-to-nearest, the paper's baseline.
    """
    settings = SmoothQuantSettings.from_params(params, getattr(model.config, "model_type", None))
    check_model(model)
    if settings.smooth:
        run_blockwise(model, calibration_ids, device,
                      statistics=lambda _name, linear: ChannelAbsMax(linear),
                      update=lambda step: smooth_block(step, settings.alpha),
                      batch_size=settings.calibration_batch_size)
    prefix, blocks = decoder_blocks(model)
    layers: dict[str, LayerCompression] = {}
    with torch.no_grad():
        for index, block in enumerate(blocks):
            for name, linear in find_linears(block).items():
                linear.weight.data = quantize_weight_per_channel_absmax(linear.weight.data, settings.weight_bits)
                layers[f"{prefix}.{index}.{name}"] = LayerCompression(weight_bits=settings.weight_bits, shape=list(linear.weight.shape))
    nsamples, seqlen = calibration_ids.shape
    notes = [
        (f"calibration: {nsamples} x {seqlen} tokens of C4 from the job (upstream: the first 512 pile-validation "
         "documents, shuffled with seed 42, truncated to 512 tokens)") if settings.smooth else
        "smooth = false: no smoothing, no calibration (plain round-to-nearest W8A8 baseline)",
        f"alpha {settings.alpha}: input_layernorm -> q/k/v and post_attention_layernorm -> gate/up smoothed; "
        "o_proj and down_proj not smoothed (upstream smooth_lm for LLaMA)" if settings.smooth else "",
        f"weights: INT{settings.weight_bits} symmetric per output channel, fake-quantized in place; lm_head and embeddings kept",
        f"activations: dynamic symmetric INT{settings.act_bits} {settings.act_granularity} on every quantized linear's input, "
        "applied at evaluation from this declaration",
        "not applied: upstream ppl_eval.py also quantizes q/k/v outputs (quantize_bmm_input=True); the declaration has no field for it",
    ]
    return Compression(
        method="smoothquant",
        engine="reference",
        weight_bits=settings.weight_bits,
        act_bits=settings.act_bits,
        group_size=None,
        symmetric=True,
        act_granularity=settings.act_granularity,
        smoothing_folded=settings.smooth,
        layers=layers,
        notes=[note for note in notes if note],
    )
