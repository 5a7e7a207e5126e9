"""The GPTQ checkpoint, written from quantization grids: the packed export of every engine whose
weights lie on per-row (or per-group) asymmetric or symmetric integer grids, in the format of
Hugging Face's `quantization_config` (quant_method "gptq"), as AutoGPTQ / GPTQModel write it
and vLLM, transformers (+ optimum / gptqmodel), TGI and other GPTQ loaders read it. The GPTQ
reference engine (`methods/gptq/export.py`) and OmniQuant's (as upstream's `--real_quant`
packs its weights with AutoGPTQ's `QuantLinear.pack`) write it.

The folder (`out/packed/`) holds:

- `model.safetensors`: for every quantized linear `<name>` (the decoder blocks' linears),
  - `<name>.qweight`  int32 [in * bits / 32, out]: the integer codes q (0 .. 2^bits - 1) of
    W^T packed along the input dimension, least significant bits first: code i of a column
    occupies bits [i * bits, (i + 1) * bits) of the column's words read as one little-endian
    bit string (for 2, 4 and 8 bits: 32 / bits codes per word; for 3 bits 32 codes span 3
    words, AutoGPTQ's layout);
  - `<name>.qzeros`   int32 [groups, out * bits / 32]: the zero points, packed the same way
    along the output dimension; stored as zero - 1 in the default "gptq" (v1) checkpoint
    format, as zero in "gptq_v2";
  - `<name>.scales`   float16 [groups, out];
  - `<name>.g_idx`    int32 [in]: the group of each input column (c // group_size without
    act-order or with static groups; the act-order permutation's groups otherwise);
  - `<name>.bias`     float16, when the linear has one;
  and every other tensor of the model (embeddings, norms, LM head) in float16; a tied LM head
  is stored once, under the embedding's name, as `save_pretrained` does.
  W[r, c] = scales[g, r] * (q[c, r] - zeros[g, r]) with g = g_idx[c].
- `config.json`: the model's config with dtype float16 and `quantization_config`
  {quant_method: gptq, bits, group_size (-1: per channel), desc_act, sym, the engine's own
  settings (GPTQ's static_groups, true_sequential, damp_percent), checkpoint_format,
  lm_head: false, meta.quantizer: the engine};
- `quantize_config.json`: the same settings as AutoGPTQ's own loader expects them.

`desc_act` is true only when the act-order groups are not contiguous (act-order without
static groups); then loaders must honour g_idx.

Zero points: the v1 format ("gptq", the one every loader reads) stores zero - 1, so an
asymmetric zero point of 0 cannot be represented (it would wrap to 2^bits - 1). When a grid
has one (a group with no weight below -scale/2, rare outside synthetic weights) the whole
checkpoint is written as "gptq_v2" (zeros stored as they are; GPTQModel, transformers and
vLLM >= 0.11.1 read it by `checkpoint_format`), and the returned format name says so.

Before packing, every linear's codes are re-derived from its dequantized weights and checked
to reproduce them exactly, so the checkpoint decodes to the very weights of `out/model/`.
The tokenizer is not copied: serve the checkpoint with the tokenizer of `out/model/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .packing import group_index, pack_int32, pack_multiple

GPTQ_FORMAT = "gptq"
GPTQ_V2_FORMAT = "gptq_v2"
PACKABLE_BITS = (2, 3, 4, 8)


@dataclass
class QuantizationGrid:
    """Where one linear's weights lie: W[r, c] = scales[g, r] * (q[r, c] - zeros[g, r]) with
    g = group_index[c] and 0 <= q <= 2^bits - 1 (the GPTQ checkpoint's scales / qzeros / g_idx)."""

    bits: int
    scales: torch.Tensor  # float32 [groups, rows], every value an fp16 number
    zeros: torch.Tensor  # int16 [groups, rows], in [0, 2^bits - 1]
    group_index: torch.Tensor  # int32 [columns], the group of each input column

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """scale * (q - zero) for integer codes [rows, columns], in float32."""
        g = self.group_index.long()
        return self.scales[g].t() * (codes.float() - self.zeros[g].t().float())

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of weights that lie on this grid (the inverse of `dequantize`)."""
        g = self.group_index.long()
        codes = torch.round(weight.float() / self.scales[g].t()) + self.zeros[g].t().float()
        return codes.clamp_(0, 2 ** self.bits - 1).to(torch.int32)


def unpacked_shapes(bits: int, linears) -> list[str]:
    """The shapes ("out x in") of `linears` whose widths do not fill whole int32 words of
    `bits`-bit codes, sorted; empty when every one packs."""
    multiple = pack_multiple(bits)
    return sorted({f"{linear.out_features}x{linear.in_features}" for linear in linears
                   if linear.in_features % multiple or linear.out_features % multiple})


def unpackable_reason(model: nn.Module, grids: dict[str, QuantizationGrid]) -> str | None:
    """Why these grids cannot be written as a GPTQ checkpoint (None: they can): bits outside
    2, 3, 4, 8; a linear whose widths do not fill whole int32 words; a zero point outside
    0 .. 2^bits - 1 (a group whose weights are all of one sign, clipped past zero)."""
    modules = dict(model.named_modules())
    for name, grid in grids.items():
        if grid.bits not in PACKABLE_BITS:
            return f"the GPTQ checkpoint packs {', '.join(map(str, PACKABLE_BITS))}-bit codes, not {grid.bits}-bit"
        linear = modules.get(name)
        if isinstance(linear, nn.Linear) and unpacked_shapes(grid.bits, [linear]):
            return (f"the {grid.bits}-bit GPTQ checkpoint packs {pack_multiple(grid.bits)} codes per int32 group and {name} "
                    f"is {linear.out_features}x{linear.in_features}")
        if int(grid.zeros.min()) < 0 or int(grid.zeros.max()) > 2 ** grid.bits - 1:
            return f"{name} has zero points outside 0..{2 ** grid.bits - 1}, which {grid.bits} bits cannot store"
    return None


def write_gptq_checkpoint(model: nn.Module, grids: dict[str, QuantizationGrid], folder: Path, *, group_size: int,
                          sym: bool, settings: dict[str, Any], quantizer: str) -> str:
    """Write the packed checkpoint of `model`, whose linears named in `grids` lie on them, into
    `folder`; returns the checkpoint format's name ("gptq" or "gptq_v2"). `settings`: the
    further `quantization_config` entries of the engine (static_groups, damp_percent, ...);
    `quantizer`: the engine, recorded in the config's meta."""
    folder = Path(folder)
    modules = dict(model.named_modules())
    missing = sorted(name for name in grids if not isinstance(modules.get(name), nn.Linear))
    if missing:
        raise ValueError(f"gptq export: no linear named {', '.join(missing)} in the model")
    why = unpackable_reason(model, grids)
    if why:
        raise ValueError(f"gptq export: {why}")
    bits = {grid.bits for grid in grids.values()}
    if len(bits) != 1:
        raise ValueError(f"gptq export: one bit width per checkpoint, got {sorted(bits)}")
    v1 = sym or all(int(grid.zeros.min()) > 0 for grid in grids.values())
    checkpoint_format = GPTQ_FORMAT if v1 else GPTQ_V2_FORMAT

    tensors: dict[str, torch.Tensor] = {}
    quantized_weights = {f"{name}.weight" for name in grids}
    seen_storage = set()
    for key, tensor in model.state_dict().items():
        if key in quantized_weights:
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storage:  # a tied weight (LM head = embeddings): stored once
            continue
        seen_storage.add(storage)
        tensors[key] = tensor.detach().to("cpu", torch.float16 if tensor.is_floating_point() else tensor.dtype).contiguous()

    desc_act = False
    for name, grid in grids.items():
        weight = modules[name].weight.detach().cpu()
        codes = grid.encode(weight)
        if not torch.equal(grid.dequantize(codes).to(weight.dtype), weight):
            raise ValueError(f"gptq export: {name}'s weights are not on its quantization grid (changed after quantization?)")
        contiguous = group_index(weight.shape[1], group_size).to(torch.int32)
        desc_act = desc_act or not torch.equal(grid.group_index, contiguous)
        zeros = grid.zeros.to(torch.int64) - (1 if checkpoint_format == GPTQ_FORMAT else 0)
        tensors[f"{name}.qweight"] = pack_int32(codes, grid.bits).t().contiguous()
        tensors[f"{name}.qzeros"] = pack_int32(zeros, grid.bits)
        tensors[f"{name}.scales"] = grid.scales.to(torch.float16).contiguous()
        tensors[f"{name}.g_idx"] = grid.group_index.to(torch.int32).contiguous()

    quantization = {
        "quant_method": "gptq",
        "bits": bits.pop(),
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        **settings,
        "checkpoint_format": checkpoint_format,
        "lm_head": False,
        "model_file_base_name": "model",
        "meta": {"quantizer": [quantizer]},
    }
    config = model.config.to_dict()
    config.update(dtype="float16", torch_dtype="float16", quantization_config=quantization)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "quantize_config.json").write_text(json.dumps(quantization, indent=2, sort_keys=True) + "\n")
    return checkpoint_format
