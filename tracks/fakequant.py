"""Activation fake-quantization at evaluation, driven only by `compression.json`.

SPEC.md section 4: the evaluation side applies activation quantization from the artifact's
declaration, because a checkpoint can only hold weights: a W8A8 model evaluated without its
activation quantization would be scored as W8A16. The scheme is SmoothQuant's evaluation
convention (mit-han-lab/smoothquant `smoothquant/fake_quant.py`,
`quantize_activation_per_token_absmax` / `quantize_activation_per_tensor_absmax`, used by its
`W8A8Linear`): dynamic, symmetric, absmax-scaled quantize-dequantize of every quantized
linear's input,

    scale = max|x| / (2^(bits-1) - 1)          over the token's features (per_token)
                                                or over the whole sequence (per_tensor)
    x_q   = round(x / scale) * scale

with `max|x|` clamped at 1e-5 as upstream. The rounded integers are also clamped to
[-(2^(bits-1)-1), 2^(bits-1)-1], which upstream's formula reaches anyway (|x| <= max|x|);
the clamp only makes the 2^bits - 1 levels hold under float rounding. Arithmetic is float32
whatever the model's dtype, then cast back.

Which linears: those the declaration lists in `layers` (the engines list every decoder-block
linear they quantized; the LM head only if they quantized it). A declaration without
per-layer entries means every decoder-block linear, never the LM head.

`per_tensor` takes one scale per sequence (per row of the batch), which is upstream's
per-tensor scale at its evaluation batch size of 1; a scale over the whole batch would make a
sequence's score depend on the others batched with it.

Upstream's `quantize_bmm_input` (also quantizing the q/k/v projections' outputs, on by
default in SmoothQuant's `ppl_eval.py`) has no field in the declaration and is not applied.

The quantizer is a forward pre-hook on each `nn.Linear`: the module types, names and
state-dict keys stay as they are (so MAC counting and saving see the plain model), and the
hook runs on any device. Each wrapped linear carries its quantizer as the attribute
`activation_fake_quant`, which is how tests and `activation_quantizer_of` tell it is wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from llmcbench.driver.contract import Compression

QUANTIZER_ATTRIBUTE = "activation_fake_quant"
SCALE_FLOOR = 1e-5  # upstream's clamp on max|x|

Granularity = Literal["per_token", "per_tensor"]


def _max_level(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be an integer in [2, 16], got {bits!r}")
    return 2 ** (bits - 1) - 1


def activation_absmax(xf: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """max|x| per token (last-dimension row), or per sequence: per batch row for a
    [batch, tokens, features] input, the whole tensor for a 1-D or 2-D one."""
    if granularity == "per_token":
        return xf.abs().amax(dim=-1, keepdim=True)
    if xf.ndim >= 3:
        return xf.abs().amax(dim=tuple(range(1, xf.ndim)), keepdim=True)
    return xf.abs().amax()


def quantize_codes(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer levels (as floats) and the scale: x ~ codes * scale. The deploy backend's
    int8 kernel (tracks/acceleration/int_kernels.py) feeds these codes to an integer GEMM."""
    q_max = _max_level(bits)
    scale = absmax.clamp(min=SCALE_FLOOR) / q_max
    return (x / scale).round().clamp(-q_max, q_max), scale


def _quantize_with_absmax(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = quantize_codes(x, absmax, bits)
    return codes * scale


def quantize_per_token_absmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize each token (last-dimension row) with its own absmax scale."""
    xf = x.float()
    return _quantize_with_absmax(xf, activation_absmax(xf, "per_token"), bits).to(x.dtype)


def quantize_per_tensor_absmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize with one absmax scale per sequence: per batch row for a
    [batch, tokens, features] input, the whole tensor for a 1-D or 2-D one."""
    xf = x.float()
    return _quantize_with_absmax(xf, activation_absmax(xf, "per_tensor"), bits).to(x.dtype)


@dataclass(frozen=True)
class ActivationQuantizer:
    """Dynamic symmetric fake-quantization of a linear's input."""

    bits: int
    granularity: Granularity

    def __post_init__(self):
        _max_level(self.bits)
        if self.granularity not in ("per_token", "per_tensor"):
            raise ValueError(f"activation granularity must be per_token or per_tensor, got {self.granularity!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "per_token":
            return quantize_per_token_absmax(x, self.bits)
        return quantize_per_tensor_absmax(x, self.bits)


def _pre_hook(quantizer: ActivationQuantizer):
    def hook(_module, args):
        return (quantizer(args[0]), *args[1:])
    return hook


@dataclass
class AppliedActivationQuant:
    """What `apply_activation_quant` did; `remove()` undoes it."""

    quantizer: ActivationQuantizer
    linears: list[str]
    _handles: list = field(default_factory=list, repr=False)
    _modules: list = field(default_factory=list, repr=False)

    def record(self) -> dict:
        """What the evaluation's metrics record about it."""
        return {
            "applied": True,
            "act_bits": self.quantizer.bits,
            "act_granularity": self.quantizer.granularity,
            "scheme": "dynamic symmetric absmax quantize-dequantize of linear inputs (SmoothQuant fake_quant.py)",
            "linears": len(self.linears),
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._modules:
            if hasattr(module, QUANTIZER_ATTRIBUTE):
                delattr(module, QUANTIZER_ATTRIBUTE)
        self._handles.clear()
        self._modules.clear()


def declared_linears(model: nn.Module, declaration: Compression) -> dict[str, nn.Linear]:
    """The linears whose inputs the declaration quantizes (see the module docstring)."""
    if declaration.layers:
        linears = {}
        for name in declaration.layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"compression.json names layer '{name}' but the model has no such module: "
                                 "the declaration does not belong to this model") from None
            if not isinstance(module, nn.Linear):
                raise ValueError(f"compression.json names layer '{name}', which is a {type(module).__name__}, not a linear")
            linears[name] = module
        return linears
    from llmcbench.methods._engine.blockwise import decoder_blocks, find_linears

    prefix, blocks = decoder_blocks(model)
    return {f"{prefix}.{i}.{name}": linear for i, block in enumerate(blocks) for name, linear in find_linears(block).items()}


def apply_activation_quant(model: nn.Module, linears: dict[str, nn.Linear], bits: int,
                           granularity: Granularity) -> AppliedActivationQuant:
    """Fake-quantize the inputs of `linears` (name -> module of `model`) from now on."""
    quantizer = ActivationQuantizer(bits, granularity)
    applied = AppliedActivationQuant(quantizer, list(linears))
    for module in linears.values():
        if hasattr(module, QUANTIZER_ATTRIBUTE):
            applied.remove()
            raise RuntimeError("activation fake-quantization is already applied to this model")
        applied._handles.append(module.register_forward_pre_hook(_pre_hook(quantizer)))
        setattr(module, QUANTIZER_ATTRIBUTE, quantizer)
        applied._modules.append(module)
    return applied


def apply_declared_activation_quant(model: nn.Module, declaration: Compression | None) -> AppliedActivationQuant | None:
    """Apply what `declaration` says about activations; None when it declares none
    (no declaration, or `act_bits` 16)."""
    if declaration is None or declaration.act_bits >= 16:
        return None
    if declaration.act_granularity == "none":
        raise ValueError(f"compression.json declares {declaration.act_bits}-bit activations but act_granularity 'none': "
                         "the artifact must say per_token or per_tensor")
    return apply_activation_quant(model, declared_linears(model, declaration), declaration.act_bits,
                                  declaration.act_granularity)


def activation_quantizer_of(module: nn.Module) -> ActivationQuantizer | None:
    """The quantizer applied to this linear's input, or None."""
    return getattr(module, QUANTIZER_ATTRIBUTE, None)
