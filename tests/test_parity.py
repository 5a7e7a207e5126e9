"""`compare_artifacts`: which agreement figures a pair of artifacts supports.

Mask agreement compares zero patterns, which say which weights an engine pruned only when
both artifacts declare element sparsity (unstructured or N:M). A structured-pruned or
quantized artifact can hold a few zeros that nobody pruned: fp16 underflow of tiny weights
(seen in a real LLM-Pruner parity run) or a quantization level at zero. Here both artifacts
hold the same weights except one such zero.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcbench.driver.contract import Compression
from llmcbench.driver.fsio import write_record
from llmcbench.driver.parity import compare_artifacts

WEIGHT = "model.layers.0.mlp.up_proj.weight"


def _artifact(src: Path, dst: Path, pattern: str, zero: bool) -> Path:
    shutil.copytree(src, dst)
    if zero:
        [weights] = dst.glob("*.safetensors")
        state = load_file(str(weights))
        state[WEIGHT] = state[WEIGHT].clone()
        state[WEIGHT][0, 0] = 0.0
        save_file(state, str(weights), metadata={"format": "pt"})
    write_record(dst / "compression.json", Compression(method="t", sparsity_pattern=pattern))
    return dst


@pytest.mark.parametrize("pattern", ["structured", "none", "unstructured"])
def test_mask_agreement_only_for_element_sparsity(tmp_path, tiny_llama_dir, pattern):
    ref = _artifact(tiny_llama_dir, tmp_path / "ref", pattern, zero=False)
    up = _artifact(tiny_llama_dir, tmp_path / "up", pattern, zero=True)
    figures = compare_artifacts(ref, up, tiny_llama_dir)

    state = load_file(str(next(Path(tiny_llama_dir).glob("*.safetensors"))))
    total = sum(t.numel() for k, t in state.items() if k.startswith("model.layers.") and k.endswith("proj.weight"))
    assert figures["shapes_agree"] == 1.0 and figures["linears_compared"] == 14  # 2 layers x 7 linears
    assert figures["identical_fraction"] == pytest.approx(1 - 1 / total)
    assert 0 < figures["weight_rel_diff"] < 1e-2
    if pattern == "unstructured":
        assert figures["mask_agreement"] == pytest.approx(1 - 1 / total)
    else:
        assert figures["mask_agreement"] is None
    assert torch.count_nonzero(load_file(str(next(up.glob("*.safetensors"))))[WEIGHT] == 0) == 1
