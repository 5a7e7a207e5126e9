"""The packed export of an AWQ-quantized model: a Hugging Face checkpoint whose
`quantization_config` a deploy backend reads.

Two layouts, chosen by what the quantized linears allow:

- `awq-gemm`, 4-bit weights whose group size divides every quantized linear's input width
  and output widths divisible by 8: the AWQ GEMM layout of HF `quantization_config`
  {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true, "version": "gemm"}
  (AutoAWQ's `WQLinear_GEMM.from_linear`, the layout llm-awq's real-quant dump, vLLM and
  gptqmodel load). Per linear, with q the codes [out, in] and z the zero points [out, groups]:
      qweight int32 [in, out / 8]      row i packs q[:, i] of 8 consecutive outputs 8c..8c+7;
                                       the 4-bit field k (bits 4k..4k+3) holds output
                                       8c + AWQ_PACK_ORDER[k], AWQ_PACK_ORDER = 0 2 4 6 1 3 5 7
      qzeros  int32 [groups, out / 8]  z transposed, packed the same way
      scales  float16 [groups, out]    the group scales transposed
  dequantized: w[o, i] = (q[o, i] - z[o, i // g]) * scale[o, i // g].
  The GEMM layout exists for 4 bits only (AutoAWQ and gptqmodel reject other widths).

- `gptq-v2`, otherwise (8-bit weights, or a group size that leaves a shorter last group),
  for bits 2, 4 and 8 with input and output widths divisible by 32 / bits: the GPTQ layout of
  HF `quantization_config` {"quant_method": "gptq", "bits": b, "group_size": g,
  "desc_act": false, "sym": false, "format": "gptq_v2"}:
      qweight int32 [in * b / 32, out] field k of row r holds q[:, r * 32 / b + k]
      qzeros  int32 [groups, out * b / 32] field k of column c holds the zero point of output
                                       c * 32 / b + k, stored as it is (v2; the v1 format
                                       stores z - 1, which overflows at z = 0)
      scales  float16 [groups, out]
      g_idx   int32 [in]               i // g, which also describes a shorter last group
  gptq_v2 is what gptqmodel loads without the v1 zero-point offset; it is the GPTQ-style
  fallback the AWQ GEMM layout cannot cover, not an AWQ upstream format (llm-awq's real
  quantization is 4-bit only).

Everything else of the model (embeddings, norms, the LM head, biases) is stored in float16
beside the packed tensors in `model.safetensors`, with `config.json` carrying the model's
config plus `quantization_config`. The float32 model the job saves holds exactly
(q - z) * scale with the same float16-representable scales, so unpacking the export gives
its weights bit for bit; a float16 loader rounds that product once more.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .._engine.packing import group_index, pack_int32, to_int32

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def export_format(model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int,
                  group_size: int) -> str | None:
    """`awq-gemm`, `gptq-v2`, or None when neither layout fits (e.g. 3-bit weights)."""
    shapes = [model.get_submodule(name).weight.shape for name in grids]
    divides = all(group_size <= 0 or in_features % group_size == 0 for _, in_features in shapes)
    if bits == 4 and divides and all(out_features % 8 == 0 for out_features, _ in shapes):
        return "awq-gemm"
    if bits in (2, 4, 8):
        per_word = 32 // bits
        if all(out_features % per_word == 0 and in_features % per_word == 0 for out_features, in_features in shapes):
            return "gptq-v2"
    return None


def pack_awq_columns(values: torch.Tensor) -> torch.Tensor:
    """[rows, columns] 4-bit values -> int32 [rows, columns / 8] in AWQ's interleaved order."""
    rows, columns = values.shape
    fields = values.to(torch.int64).reshape(rows, columns // 8, 8)[:, :, list(AWQ_PACK_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    return to_int32((fields << shifts).sum(dim=-1))


def integer_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int) -> torch.Tensor:
    """q = round(w / scale) + z for weights already on the grid, [out, in] int64."""
    in_features = weight.shape[1]
    group_of = group_index(in_features, group_size)
    codes = torch.round(weight.float() / scales[:, group_of]) + zeros[:, group_of]
    return codes.clamp(0, 2 ** bits - 1).to(torch.int64)


def pack_linear(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                layout: str) -> dict[str, torch.Tensor]:
    """The packed tensors of one linear (names relative to it)."""
    codes = integer_codes(weight, scales, zeros, bits, group_size)
    zero_points = zeros.to(torch.int64)
    if layout == "awq-gemm":
        return {
            "qweight": pack_awq_columns(codes.t()),
            "qzeros": pack_awq_columns(zero_points.t()),
            "scales": scales.t().contiguous().to(torch.float16),
        }
    return {
        "qweight": pack_int32(codes.t(), bits, dim=0),
        "qzeros": pack_int32(zero_points.t(), bits, dim=1),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": group_index(weight.shape[1], group_size).to(torch.int32),
    }


def quantization_config(bits: int, group_size: int, layout: str) -> dict:
    if layout == "awq-gemm":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": False,
            "format": "gptq_v2", "checkpoint_format": "gptq_v2"}


@torch.no_grad()
def write_packed(out_dir: Path, model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int,
                 group_size: int, layout: str) -> str:
    """Write `model.safetensors` and `config.json` of the packed checkpoint into `out_dir`;
    return the layout's name (recorded as the declaration's `packed_format`)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    quantized = {f"{name}.weight" for name in grids}
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    for key, tensor in model.state_dict().items():
        if key in quantized:
            continue
        pointer = (tensor.data_ptr(), tuple(tensor.shape))
        if pointer in seen:  # tied weights (lm_head = embed_tokens) are stored once, as HF does
            continue
        seen.add(pointer)
        tensors[key] = tensor.detach().to("cpu", torch.float16).contiguous()
    for name, (scales, zeros) in grids.items():
        weight = model.get_submodule(name).weight.detach().cpu()
        packed = pack_linear(weight, scales.cpu(), zeros.cpu(), bits, group_size, layout)
        tensors.update({f"{name}.{part}": t.contiguous() for part, t in packed.items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(bits, group_size, layout)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return layout
