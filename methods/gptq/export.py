"""The packed export of the GPTQ reference engine: a GPTQ checkpoint (quant_method "gptq", the
format AutoGPTQ / GPTQModel write and vLLM, transformers, TGI read), written by the shared
writer `methods/_engine/gptq_format.py`, whose docstring describes the layout, with GPTQ's
own settings (static_groups, true_sequential, damp_percent) in its `quantization_config`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .._engine.gptq_format import QuantizationGrid, write_gptq_checkpoint as write_checkpoint

if TYPE_CHECKING:
    from .reference import GPTQSettings


def write_gptq_checkpoint(model: nn.Module, grids: dict[str, QuantizationGrid], settings: GPTQSettings,
                          folder: Path) -> str:
    """Write the packed checkpoint of a GPTQ-quantized `model` into `folder`; returns the
    checkpoint format's name ("gptq" or "gptq_v2"). `grids`: linear module name -> its grid."""
    return write_checkpoint(model, grids, folder, group_size=settings.group_size, sym=settings.sym,
                            settings={"static_groups": settings.static_groups, "true_sequential": settings.true_sequential,
                                      "damp_percent": settings.percdamp},
                            quantizer="llmcbench:gptq-reference")
