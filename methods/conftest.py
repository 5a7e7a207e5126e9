"""Fixtures shared by the reference engines' tests (helpers: `methods/_engine/testing.py`);
the tiny LLaMA, the embedded model and the data slices come from the root conftest.py."""

from __future__ import annotations

import pytest
import torch

from llmcbench.methods._engine.blockwise import find_linears
from llmcbench.methods._engine.testing import c4_ids, load


@pytest.fixture(scope="module")
def tiny_calibration(tiny_llama_dir, data_dir) -> torch.Tensor:
    """8 x 128 C4 calibration tokens (seed 0) for the tiny LLaMA; a test module that needs
    other windows defines its own `tiny_calibration`."""
    return c4_ids(tiny_llama_dir, data_dir, nsamples=8, seqlen=128, seed=0)


@pytest.fixture(scope="module")
def layer0_inputs(tiny_llama_dir, tiny_calibration):
    """The dense tiny model and the calibration inputs [tokens, in] of block 0's linears
    (what the engine sees for block 0)."""
    model = load(tiny_llama_dir)
    captured: dict[str, list[torch.Tensor]] = {}
    linears = find_linears(model.model.layers[0])
    handles = [linear.register_forward_hook(lambda _m, args, _o, name=name: captured.setdefault(name, []).append(args[0]))
               for name, linear in linears.items()]
    with torch.no_grad():
        model(input_ids=tiny_calibration, use_cache=False)
    for h in handles:
        h.remove()
    return model, {name: torch.cat(x).reshape(-1, linears[name].in_features) for name, x in captured.items()}
