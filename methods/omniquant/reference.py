"""OmniQuant, the reference engine: block-wise learned weight clipping (LWC) and learnable
equivalent transformation (LET), then fake-quantized weights folded into the plain model.

Shao, Chen, Zhang, Xu, Zhao, Li, Zhang, Gao, Qiao, Luo, "OmniQuant: Omnidirectionally
Calibrated Quantization for Large Language Models" (ICLR 2024, arXiv:2308.13137), section 3.
Follows OpenGVLab/OmniQuant (commit 95fae1b): `quantize/omniquant.py` (the block walk and the
training loop), `quantize/quantizer.py` (`UniformAffineQuantizer` with `lwc`, `round_ste`),
`models/int_llama_layer.py` and `quantize/utils.py` (`smooth_and_quant_temporary`,
`smooth_and_quant_inplace`), `models/transformation.py` (the LET folds) and `main.py` (the
defaults). The block inputs are captured by the shared runner's `capture_block_inputs`
(`methods/_engine/blockwise.py`); the blocks are the model's own decoder layers, run with
`torch.func.functional_call` on the transformed, fake-quantized parameters.

The algorithm, for each decoder block in turn (paper eq. 1):

    X_fp   the full-precision model's input to the block;  Y = block(X_fp)   (the targets)
    X_q    the input the quantized model gives it (the outputs of the blocks quantized so far)
    minimise  || Y - block_q(X_q) ||^2  (MSE)  over the LWC and LET parameters,
              AdamW (weight decay `wd`), `epochs` passes over the calibration batches
    fold: every weight left in the block is Q(W') and every norm weight is w / s;
          X_fp <- Y, X_q <- block_q(X_q) for the next block

LWC (paper eq. 2, upstream `per_token_dynamic_calibration` with `lwc`): per output channel
(or per group of `group_size` input columns) two learnable factors, initialised to 4.0:

    xmax = sigmoid(gamma) * max(W_group),  xmin = sigmoid(beta) * min(W_group)
    scale = (xmax - xmin) / (2^bits - 1)  (clamped to [1e-5, 1e4]),  zero = round(-xmin / scale)
    Q(W) = scale * (clamp(round_ste(W / scale) + zero, 0, 2^bits - 1) - zero)

round_ste rounds forward and passes the gradient straight through; the zero point is
rounded without one (upstream). At initialisation this is round-to-nearest with the range
clipped to sigmoid(4) = 98.2% of the min/max, the "RTN" the tests compare against.

LET (paper eq. 3-5, upstream for LLaMA, where the shifts are off: `use_shift = False`):
learnable per-channel scales s, initialised as SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha)
from the full-precision block's activation maxima (upstream reads them from
`act_scales/<net>.pt`, made from the same calibration), truncated away from zero (|s| >= 1e-2,
upstream `truncate_number`) before each step, and folded as

    qkv:  input_layernorm.weight / s,            q/k/v_proj columns * s
    fc1:  post_attention_layernorm.weight / s,   gate/up_proj columns * s
    out:  v_proj rows (and bias) / s,            o_proj columns * s

down_proj gets none (upstream). With grouped-query attention the out scale has one value per
v_proj output channel and o_proj's columns take the scale of the kv head their query head
reads (the fold is exact because attention mixes each head's values convexly); its
initialisation takes the maxima over the query heads sharing a kv head.

Activations (act_bits < 16): during training every quantized linear's input is fake-quantized
per token, as the evaluation will do it (tracks/fakequant.py: dynamic symmetric absmax,
declared in the returned `Compression`), with a straight-through rounding.

Packed export: the folded weights lie on their LWC grids, scale * (q - zero), so the engine
offers them as a GPTQ checkpoint (`methods/_engine/gptq_format.py`), the format upstream's
`--real_quant` writes through AutoGPTQ's `QuantLinear.pack` (upstream: W2/3/4 weight-only;
here every width the format packs, 2, 3, 4 and 8 bits, so W8A8 and W4A4 too, whose
activation quantization stays in the declaration). Track 4 sizes and measures that export,
as the paper's Table 3 did OmniQuant INT8 (6.53 GB on disk, 15.13 GB of memory against
dense 12.55 / 22.96, where SmoothQuant's fake-quantized INT8 stays at 12.55 / 23.62). Grids
that do not pack (6 bits, widths that do not fill int32 words, a zero point outside the
code range) get no export, and a note says why.

Differences from upstream, recorded in the declaration's notes:
- each weight scale is rounded to a float16 number at the fold (upstream keeps the float32
  scale in its fake-quantized weights; its real-quant QuantLinear stores float16), so the
  model's weights are exactly what the packed export decodes to;
- the activation quantizer is the harness's symmetric per-token absmax one (the evaluation
  convention) instead of upstream's asymmetric per-token min/max one, so training sees
  exactly what evaluation applies;
- upstream also quantizes the q/k/v outputs (`qkt_matmul`, `pv_matmul`) and trains a q/k
  scale (`qkt_smooth_scale`) to ease that; the declaration has no field for matmul-input
  quantization and the q/k scale does not commute with RoPE, so neither is done here;
- training is float32 on every device (upstream: fp16 AMP for bits < 8);
- calibration comes from the job (C4 windows) instead of WikiText-2.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from llmcbench.driver.contract import Compression, LayerCompression

from .._engine import params as check
from .._engine.blockwise import BlockInput, _block_output, capture_block_inputs, decoder_blocks, find_linears, module_device
from .._engine.gptq_format import QuantizationGrid, unpackable_reason, write_gptq_checkpoint
from .._engine.output import EngineOutput
from .._engine.packing import group_index

log = logging.getLogger(__name__)

PARAMS = {"weight_bits", "act_bits", "group_size", "lwc", "let", "epochs", "lwc_lr", "let_lr", "alpha", "wd", "batch_size"}
WEIGHT_BITS = (2, 3, 4, 6, 8)
ACT_BITS = (4, 6, 8, 16)
LWC_INIT = 4.0  # upstream UniformAffineQuantizer: init_value of the bound factors
CLIPMIN, CLIPMAX = 1e-5, 1e4  # upstream's clamp on the weight scales
SCALE_FLOOR = 1e-5  # upstream's clamp on the LET initialisation
LET_TRUNCATE = 1e-2  # upstream truncate_number threshold
ACT_SCALE_FLOOR = 1e-5  # tracks/fakequant.py's clamp on max|x|

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
FC1 = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_LINEARS = set(QKV) | set(FC1) | {"self_attn.o_proj", "mlp.down_proj"}
NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class OmniQuantSettings:
    weight_bits: int = 4
    act_bits: int = 16
    group_size: int = -1  # -1: one grid per output channel
    lwc: bool = True
    let: bool = False
    epochs: int = 20
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    alpha: float = 0.5
    wd: float = 0.0
    batch_size: int = 1

    @property
    def act_quant(self) -> bool:
        return self.act_bits < 16

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "OmniQuantSettings":
        """Validate a preset's params merged with the job's overrides (upstream main.py
        defaults: per-channel, lwc/let off, epochs 10, lwc_lr 1e-2, let_lr 5e-3, alpha 0.5,
        wd 0, batch_size 1)."""
        check.reject_unknown("omniquant", params, PARAMS)
        if "weight_bits" not in params:
            raise ValueError(f"omniquant: weight_bits is required, one of {', '.join(map(str, WEIGHT_BITS))}")
        values: dict[str, Any] = {}
        for key, allowed in (("weight_bits", WEIGHT_BITS), ("act_bits", ACT_BITS)):
            value = params.get(key, 16 if key == "act_bits" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
                raise ValueError(f"omniquant: {key}={value!r} is not supported: choose one of {', '.join(map(str, allowed))}")
            values[key] = value
        group_size = params.get("group_size", -1)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size >= 2):
            raise ValueError(f"omniquant: group_size must be -1 (per output channel) or an integer >= 2, got {group_size!r}")
        for key in ("lwc", "let"):
            value = params.get(key, False)
            if not isinstance(value, bool):
                raise ValueError(f"omniquant: {key} must be true or false, got {value!r}")
            values[key] = value
        epochs = params.get("epochs", 10)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"omniquant: epochs must be a non-negative integer, got {epochs!r}")
        if epochs > 0 and not (values["lwc"] or values["let"]):
            raise ValueError("omniquant: epochs > 0 trains nothing without lwc or let: set lwc and/or let true, or epochs = 0")
        for key, default in (("lwc_lr", 1e-2), ("let_lr", 5e-3)):
            value = params.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"omniquant: {key} must be a positive number, got {value!r}")
            values[key] = float(value)
        alpha = params.get("alpha", 0.5)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"omniquant: alpha (LET initial migration strength) must be a number in [0, 1], got {alpha!r}")
        wd = params.get("wd", 0.0)
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (wd >= 0 and math.isfinite(wd)):
            raise ValueError(f"omniquant: wd (AdamW weight decay) must be a non-negative number, got {wd!r}")
        batch = params.get("batch_size", 1)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"omniquant: batch_size must be a positive integer, got {batch!r}")
        return cls(values["weight_bits"], values["act_bits"], group_size, values["lwc"], values["let"], epochs,
                   values["lwc_lr"], values["let_lr"], float(alpha), float(wd), batch)


# -- quantizers ---------------------------------------------------------------------------

def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (upstream `round_ste`)."""
    return (x.round() - x).detach() + x


def groups_of(columns: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(columns / group_size)


def _grouped(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight` [rows, columns] as [rows * groups, size] (a shorter last group zero-padded) and
    each row-group's min and max over its real columns [rows * groups, 1]."""
    rows, columns = weight.shape
    size = columns if group_size == -1 else group_size
    ngroups = groups_of(columns, group_size)
    pad = ngroups * size - columns
    w = F.pad(weight, (0, pad)).reshape(rows * ngroups, size)
    if pad:
        valid = (torch.arange(ngroups * size, device=weight.device) < columns).reshape(1, ngroups, size)
        valid = valid.expand(rows, ngroups, size).reshape(rows * ngroups, size)
        xmin = torch.where(valid, w, torch.full_like(w, math.inf)).amin(dim=-1, keepdim=True)
        xmax = torch.where(valid, w, torch.full_like(w, -math.inf)).amax(dim=-1, keepdim=True)
    else:
        xmin = w.amin(dim=-1, keepdim=True)
        xmax = w.amax(dim=-1, keepdim=True)
    return w, xmin, xmax


def lwc_scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, up: torch.Tensor | None = None,
                   low: torch.Tensor | None = None, fp16_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row-group: scale = (sigmoid(up) xmax - sigmoid(low) xmin) / (2^bits - 1)
    (clamped), zero = round(-sigmoid(low) xmin / scale). `fp16_scales`: the scale rounded to a
    float16 number first (the fold, so the GPTQ export, which stores fp16 scales, is exact)."""
    if up is not None:
        xmax = torch.sigmoid(up) * xmax
        xmin = torch.sigmoid(low) * xmin
    scale = ((xmax - xmin) / (2 ** bits - 1)).clamp(min=CLIPMIN, max=CLIPMAX)
    if fp16_scales:
        scale = scale.to(torch.float16).to(scale.dtype)
    zero = (-xmin / scale).clamp(min=-CLIPMAX, max=CLIPMAX).round()
    return scale, zero


def lwc_fake_quant(weight: torch.Tensor, bits: int, group_size: int,
                   up: torch.Tensor | None = None, low: torch.Tensor | None = None, fp16_scales: bool = False) -> torch.Tensor:
    """Asymmetric min/max quantize-dequantize of `weight` [rows, columns] per row and group
    of `group_size` columns (-1: the whole row; a last group may be shorter), the range
    scaled by sigmoid(up) / sigmoid(low) [rows * groups, 1] when given (LWC). Differentiable
    in `weight`, `up` and `low` (straight-through rounding)."""
    rows, columns = weight.shape
    w, xmin, xmax = _grouped(weight, group_size)
    scale, zero = lwc_scale_zero(xmin, xmax, bits, up, low, fp16_scales)
    q = (round_ste(w / scale) + zero).clamp(0, 2 ** bits - 1)
    return ((q - zero) * scale).reshape(rows, -1)[:, :columns]


def lwc_grid(weight: torch.Tensor, bits: int, group_size: int, up: torch.Tensor | None = None,
             low: torch.Tensor | None = None) -> QuantizationGrid:
    """The grid `lwc_fake_quant(..., fp16_scales=True)` puts `weight` on, for the packed export:
    scales and zero points [groups, rows], each input column's group."""
    rows, columns = weight.shape
    _, xmin, xmax = _grouped(weight.detach(), group_size)
    scale, zero = lwc_scale_zero(xmin, xmax, bits, None if up is None else up.detach(),
                                 None if low is None else low.detach(), fp16_scales=True)
    ngroups = groups_of(columns, group_size)
    return QuantizationGrid(bits, scale.reshape(rows, ngroups).t().float().cpu().contiguous(),
                            zero.reshape(rows, ngroups).t().to(torch.int16).cpu().contiguous(),
                            group_index(columns, group_size).to(torch.int32))


def act_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """tracks/fakequant.py's dynamic symmetric per-token absmax quantize-dequantize, with a
    straight-through rounding so the LET scales get gradients through it."""
    q_max = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_SCALE_FLOOR) / q_max
    return (round_ste(xf / scale).clamp(-q_max, q_max) * scale).to(x.dtype)


# -- one block ----------------------------------------------------------------------------

def _to_float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_float32(o) for o in obj)
    if isinstance(obj, list):
        return [_to_float32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


class ChannelAbsMax:
    def __init__(self):
        self.absmax: torch.Tensor | None = None

    def hook(self, _module, args, _output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
        self.absmax = x if self.absmax is None else torch.maximum(self.absmax, x)


class OmniBlock:
    """A float32 working copy of one decoder block with its LWC and LET parameters."""

    def __init__(self, block: nn.Module, settings: OmniQuantSettings):
        self.settings = settings
        self.work = copy.deepcopy(block).float()
        for p in self.work.parameters():
            p.requires_grad_(False)
        self.linears = find_linears(self.work)
        device = module_device(self.work)
        self.up: dict[str, nn.Parameter] = {}
        self.low: dict[str, nn.Parameter] = {}
        if settings.lwc:
            for name, linear in self.linears.items():
                shape = (linear.out_features * groups_of(linear.in_features, settings.group_size), 1)
                self.up[name] = nn.Parameter(torch.full(shape, LWC_INIT, device=device))
                self.low[name] = nn.Parameter(torch.full(shape, LWC_INIT, device=device))
        self.scales: dict[str, nn.Parameter] = {}
        v, o = self.linears["self_attn.v_proj"], self.linears["self_attn.o_proj"]
        self.kv_channels = v.out_features
        self.head_groups = o.in_features // v.out_features  # query heads per kv head

    # LET
    def expand_out_scale(self, s: torch.Tensor) -> torch.Tensor:
        """The out scale [v_proj out] as o_proj's column scale [o_proj in] (GQA: each query
        head takes its kv head's scale; repeat_kv puts kv head j's copies at j*groups + r)."""
        if self.head_groups == 1:
            return s
        head_dim = self.head_dim
        return s.reshape(-1, 1, head_dim).expand(-1, self.head_groups, head_dim).reshape(-1)

    @property
    def head_dim(self) -> int:
        attn = self.work.get_submodule("self_attn")
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:
            raise ValueError("omniquant: the attention module has no head_dim")
        return head_dim

    def init_let(self, absmax: dict[str, torch.Tensor]) -> None:
        """SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha), upstream's LET initialisation
        (weights: q_proj's for qkv, up_proj's for fc1, o_proj's for out)."""
        alpha = self.settings.alpha

        def init(act: torch.Tensor, weight_absmax: torch.Tensor) -> nn.Parameter:
            s = act.clamp(min=SCALE_FLOOR).pow(alpha) / weight_absmax.clamp(min=SCALE_FLOOR).pow(1 - alpha)
            return nn.Parameter(s.clamp(min=SCALE_FLOOR))

        w = lambda name: self.linears[name].weight.detach().abs().amax(dim=0)  # noqa: E731
        self.scales["qkv"] = init(absmax["self_attn.q_proj"], w("self_attn.q_proj"))
        self.scales["fc1"] = init(absmax["mlp.up_proj"], w("mlp.up_proj"))
        act_o, w_o = absmax["self_attn.o_proj"], w("self_attn.o_proj")
        if self.head_groups > 1:  # one value per kv channel: the maxima over the query heads sharing it
            hd = self.head_dim
            act_o = act_o.reshape(-1, self.head_groups, hd).amax(dim=1).reshape(-1)
            w_o = w_o.reshape(-1, self.head_groups, hd).amax(dim=1).reshape(-1)
        self.scales["out"] = init(act_o, w_o)

    @torch.no_grad()
    def truncate_scales(self) -> None:
        """|s| >= 1e-2, keeping the sign (upstream truncate_number, before every step)."""
        for s in self.scales.values():
            small = s.abs() < LET_TRUNCATE
            s.data = torch.where(small, torch.where(s < 0, -LET_TRUNCATE, LET_TRUNCATE), s.data)

    def transformed(self, quantize_weights: bool = True, fp16_scales: bool = False) -> dict[str, torch.Tensor]:
        """The block's parameters after the LET folds and (optionally) LWC fake-quantization,
        as functions of the learnable parameters (`fp16_scales`: the fold's grids, see
        `lwc_scale_zero`)."""
        params = {name: p for name, p in self.work.named_parameters()}
        out: dict[str, torch.Tensor] = {}
        weights = {name: params[f"{name}.weight"] for name in self.linears}
        biases = {name: params.get(f"{name}.bias") for name in self.linears}
        if self.scales:
            s_qkv, s_fc1, s_out = self.scales["qkv"], self.scales["fc1"], self.scales["out"]
            out["input_layernorm.weight"] = params["input_layernorm.weight"] / s_qkv
            out["post_attention_layernorm.weight"] = params["post_attention_layernorm.weight"] / s_fc1
            for name in QKV:
                weights[name] = weights[name] * s_qkv.reshape(1, -1)
            for name in FC1:
                weights[name] = weights[name] * s_fc1.reshape(1, -1)
            weights["self_attn.v_proj"] = weights["self_attn.v_proj"] / s_out.reshape(-1, 1)
            if biases["self_attn.v_proj"] is not None:
                biases["self_attn.v_proj"] = biases["self_attn.v_proj"] / s_out
            weights["self_attn.o_proj"] = weights["self_attn.o_proj"] * self.expand_out_scale(s_out).reshape(1, -1)
        for name, w in weights.items():
            if quantize_weights:
                w = lwc_fake_quant(w, self.settings.weight_bits, self.settings.group_size, self.up.get(name), self.low.get(name),
                                   fp16_scales)
            out[f"{name}.weight"] = w
            if biases[name] is not None:
                out[f"{name}.bias"] = biases[name]
        return out

    def trainable(self) -> list[dict[str, Any]]:
        groups = []
        if self.scales:
            groups.append({"params": list(self.scales.values()), "lr": self.settings.let_lr})
        if self.up:
            groups.append({"params": list(self.up.values()) + list(self.low.values()), "lr": self.settings.lwc_lr})
        return groups

    def act_quant_hooks(self) -> list:
        if not self.settings.act_quant:
            return []
        bits = self.settings.act_bits
        return [linear.register_forward_pre_hook(lambda _m, args: (act_fake_quant(args[0], bits), *args[1:]))
                for linear in self.linears.values()]

    def run(self, batch: BlockInput, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params is None:
            return _block_output(self.work(batch.hidden_states, *batch.args, **batch.kwargs))
        return _block_output(functional_call(self.work, params, (batch.hidden_states, *batch.args), batch.kwargs,
                                             strict=False))

    @torch.no_grad()
    def fold(self) -> dict[str, QuantizationGrid]:
        """Write the transformed, quantized parameters into the working copy (hard rounding,
        fp16 scales) and return each linear's grid (block-level names), on which its weights
        now lie."""
        raw = self.transformed(quantize_weights=False)
        grids = {name: lwc_grid(raw[f"{name}.weight"], self.settings.weight_bits, self.settings.group_size,
                                self.up.get(name), self.low.get(name)) for name in self.linears}
        final = self.transformed(quantize_weights=True, fp16_scales=True)
        for name, value in final.items():
            self.work.get_parameter(name).copy_(value)
        return grids


def block_error(omni: OmniBlock, quant_inputs: list[BlockInput], targets: list[torch.Tensor],
                params: dict[str, torch.Tensor] | None) -> float:
    """Mean MSE of the block (with activation fake-quant) against the targets."""
    hooks = omni.act_quant_hooks()
    try:
        with torch.no_grad():
            losses = [F.mse_loss(omni.run(b, params), t).item() for b, t in zip(quant_inputs, targets)]
    finally:
        for h in hooks:
            h.remove()
    return sum(losses) / len(losses)


def calibrate_block(block: nn.Module, fp_inputs: list[BlockInput], quant_inputs: list[BlockInput],
                    settings: OmniQuantSettings, index: int = 0,
                    grids: dict[str, QuantizationGrid] | None = None) -> tuple[list[BlockInput], list[BlockInput], dict[str, float]]:
    """Train one block's LWC/LET parameters, fold them into `block` in place, and return
    the next block's full-precision and quantized inputs and the block's errors
    (`init`: the MSE at initialisation, `final`: after training, both with the folded
    hard-quantized weights and the activation quantization). `grids`, when given, receives
    each linear's weight grid (block-level names) for the packed export."""
    omni = OmniBlock(block, settings)
    # targets: the full-precision block on the full-precision inputs; activation maxima for LET
    stats = {name: ChannelAbsMax() for name in ("self_attn.q_proj", "mlp.up_proj", "self_attn.o_proj")}
    handles = [omni.linears[name].register_forward_hook(stat.hook) for name, stat in stats.items()]
    try:
        with torch.no_grad():
            targets = [omni.run(b) for b in fp_inputs]
    finally:
        for h in handles:
            h.remove()
    if settings.let:
        omni.init_let({name: stat.absmax for name, stat in stats.items()})
        omni.truncate_scales()
    with torch.no_grad():
        init_error = block_error(omni, quant_inputs, targets, omni.transformed(fp16_scales=True))  # as the fold would leave it

    if settings.epochs > 0:
        optimizer = torch.optim.AdamW(omni.trainable(), weight_decay=settings.wd)
        hooks = omni.act_quant_hooks()
        try:
            for epoch in range(settings.epochs):
                total = 0.0
                for batch, target in zip(quant_inputs, targets):
                    omni.truncate_scales()
                    loss = F.mse_loss(omni.run(batch, omni.transformed()), target)
                    if not math.isfinite(loss.item()):
                        raise RuntimeError(f"omniquant: block {index} epoch {epoch}: the loss is not finite ({loss.item()}); "
                                           "try smaller lwc_lr / let_lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                log.debug("block %d epoch %d loss %.6g", index, epoch, total / len(quant_inputs))
        finally:
            for h in hooks:
                h.remove()
        omni.truncate_scales()
    folded = omni.fold()
    if grids is not None:
        grids.update(folded)
    final_error = block_error(omni, quant_inputs, targets, None)

    # the next block's inputs: fp from fp, quantized from quantized (with activation quantization)
    hooks = omni.act_quant_hooks()
    try:
        with torch.no_grad():
            next_quant = [BlockInput(omni.run(b), b.args, b.kwargs) for b in quant_inputs]
    finally:
        for h in hooks:
            h.remove()
    next_fp = [BlockInput(t, b.args, b.kwargs) for b, t in zip(fp_inputs, targets)]
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(omni.work.get_parameter(name).to(p.dtype))
    return next_fp, next_quant, {"init": init_error, "final": final_error}


# -- the model ----------------------------------------------------------------------------

def _scales_with_weight(norm: nn.Module) -> bool:
    """True if norm(x) is proportional to norm.weight (RMSNorm), so dividing the weight by s
    divides the output by s; refuses (1 + w) * x_hat norms (Gemma) and biased norms."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or getattr(norm, "bias", None) is not None:
        return False
    probe = torch.linspace(-2, 3, 2 * weight.numel(), device=weight.device, dtype=torch.float32).reshape(2, -1)
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            reference = norm(probe.to(weight.dtype)).float()
            weight.data.mul_(2)
            doubled = norm(probe.to(weight.dtype)).float()
    finally:
        weight.data.copy_(original)
    return torch.allclose(doubled, 2 * reference, rtol=1e-3, atol=1e-5)


def check_model(model: nn.Module, settings: OmniQuantSettings) -> None:
    """Everything that could fail half-way is checked before the first weight changes."""
    _, blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        linears = find_linears(block)
        if set(linears) != LLAMA_LINEARS:
            raise ValueError(f"omniquant: decoder block {index} has linears {', '.join(sorted(linears))}; the reference engine "
                             f"needs LLaMA's ({', '.join(sorted(LLAMA_LINEARS))})")
        if not settings.let:
            continue
        for norm_name in NORMS:
            try:
                norm = block.get_submodule(norm_name)
            except AttributeError:
                raise ValueError(f"omniquant: decoder block {index} has no {norm_name} to fold the LET scales into") from None
            if not _scales_with_weight(norm):
                raise ValueError(f"omniquant: block {index}'s {norm_name} ({type(norm).__name__}) does not scale with its "
                                 "weight, so the LET scales cannot be folded into it; set let = false")
        v, o = linears["self_attn.v_proj"], linears["self_attn.o_proj"]
        head_dim = getattr(block.get_submodule("self_attn"), "head_dim", None)
        if head_dim is None or o.in_features % v.out_features or v.out_features % head_dim:
            raise ValueError(f"omniquant: block {index}'s attention (v_proj {v.out_features}, o_proj in {o.in_features}, "
                             f"head_dim {head_dim}) is not one the v_proj -> o_proj LET fold knows")


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    OmniQuantSettings.from_params(params)


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device) -> EngineOutput:
    """Calibrate LWC (and LET) block by block, fold them and leave the fake-quantized
    weights in `model` (every decoder-block linear; norms changed by LET); declare the
    activation quantization the evaluation must apply, and offer the weights' packed GPTQ
    checkpoint (upstream's `--real_quant` format) where their grids pack.

    `params`: `weight_bits`, `act_bits`, `group_size`, `lwc`, `let`, `epochs`, `lwc_lr`,
    `let_lr`, `alpha`, `wd`, `batch_size` (calibration windows per training step,
    upstream 1). The mean block errors before and after training go into the declaration's
    notes; the per-block ones are logged.
    """
    settings = OmniQuantSettings.from_params(params)
    if calibration_ids.ndim != 2 or calibration_ids.shape[0] == 0:
        raise ValueError(f"calibration ids must be a non-empty [nsamples, seqlen] tensor, got shape {tuple(calibration_ids.shape)}")
    check_model(model, settings)
    device = torch.device(device)
    prefix, blocks = decoder_blocks(model)
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    model.config.use_cache = False
    model.eval()
    errors: list[dict[str, float]] = []
    grids: dict[str, QuantizationGrid] = {}
    try:
        with torch.no_grad():
            captured = capture_block_inputs(model, calibration_ids, device, settings.batch_size)
        fp_inputs = [BlockInput(b.hidden_states.float(), _to_float32(b.args), _to_float32(b.kwargs)) for b in captured]
        quant_inputs = list(fp_inputs)
        del captured
        for index, block in enumerate(blocks):
            started = time.perf_counter()
            home = module_device(block)
            block.to(device)
            block_grids: dict[str, QuantizationGrid] = {}
            fp_inputs, quant_inputs, err = calibrate_block(block, fp_inputs, quant_inputs, settings, index, block_grids)
            errors.append(err)
            grids.update({f"{prefix}.{index}.{name}": grid for name, grid in block_grids.items()})
            if home is not None:
                block.to(home)
            log.info("omniquant block %d/%d: mse %.4g (init) -> %.4g in %.1f s", index + 1, len(blocks), err["init"],
                     err["final"], time.perf_counter() - started)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    why = unpackable_reason(model, grids)
    packed_note = ("packed/ holds the weights' GPTQ checkpoint (qweight/qzeros/scales/g_idx, as upstream's --real_quant "
                   "packs W2/3/4 weight-only models; written here for every bit width it packs)"
                   + (f"; the INT{settings.act_bits} activations are this declaration's alone" if settings.act_quant else "")
                   if why is None else f"no packed export: {why}")
    output = EngineOutput(declaration(model, settings, calibration_ids.shape, errors, packed_note))
    if why is None:
        output.export_packed = lambda folder: write_gptq_checkpoint(
            model, grids, folder, group_size=settings.group_size, sym=False, settings={},
            quantizer="llmcbench:omniquant-reference")
    return output


def declaration(model: nn.Module, settings: OmniQuantSettings, calibration_shape, errors: list[dict[str, float]],
                packed_note: str = "") -> Compression:
    prefix, blocks = decoder_blocks(model)
    layers = {f"{prefix}.{i}.{name}": LayerCompression(weight_bits=settings.weight_bits, shape=list(linear.weight.shape))
              for i, block in enumerate(blocks) for name, linear in find_linears(block).items()}
    nsamples, seqlen = calibration_shape
    mean_init = sum(e["init"] for e in errors) / len(errors)
    mean_final = sum(e["final"] for e in errors) / len(errors)
    notes = [
        f"calibration: {nsamples} x {seqlen} tokens of C4 from the job (upstream: 128 x 2048 WikiText-2, seed 2)",
        f"W{settings.weight_bits}A{settings.act_bits}, group_size {settings.group_size} (-1: per output channel), asymmetric "
        f"min/max weight grids; lwc {settings.lwc}, let {settings.let}, epochs {settings.epochs}, lwc_lr {settings.lwc_lr}, "
        f"let_lr {settings.let_lr}, alpha {settings.alpha}, wd {settings.wd}, batch_size {settings.batch_size}, AdamW, MSE, float32",
        "LET (LLaMA, no shifts): input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, v_proj -> o_proj; "
        "folded into the norms and weights" if settings.let else "",
        "weights are stored dequantized (scale * (q - zero), scales rounded to fp16 at the fold); lm_head and embeddings kept",
        packed_note,
        (f"activations: dynamic symmetric INT{settings.act_bits} per token on every quantized linear's input, trained "
         "with and applied at evaluation from this declaration (upstream: asymmetric per-token min/max)") if settings.act_quant else "",
        "not applied: upstream's q/k/v output quantization (qkt_matmul, pv_matmul) and its q/k LET scale "
        "(qkt_smooth_scale); the declaration has no field for matmul inputs" if settings.act_quant else "",
        f"block output mse vs the full-precision blocks, mean over {len(errors)} blocks: "
        f"{mean_init:.4g} at initialisation (LWC init / RTN), {mean_final:.4g} after training",
    ]
    return Compression(
        method="omniquant",
        engine="reference",
        weight_bits=settings.weight_bits,
        act_bits=settings.act_bits,
        group_size=settings.group_size,
        symmetric=False,
        act_granularity="per_token" if settings.act_quant else "none",
        smoothing_folded=settings.let,
        layers=layers,
        notes=[n for n in notes if n],
    )
