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
from llmcbench.driver.parity import compare_artifacts, folded_scales_note

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
    assert figures["weight_rel_err"]["reference"] == 0.0  # the dense weights themselves
    assert figures["weight_rel_err"]["upstream"] == pytest.approx(figures["weight_rel_diff"])  # one weight zeroed
    if pattern == "unstructured":
        assert figures["mask_agreement"] == pytest.approx(1 - 1 / total)
    else:
        assert figures["mask_agreement"] is None
    assert torch.count_nonzero(load_file(str(next(up.glob("*.safetensors"))))[WEIGHT] == 0) == 1


def _structured(src: Path, dst: Path, channels: torch.Tensor, noise: float) -> Path:
    """Layer 1 of the tiny LLaMA with only `channels` of its MLP kept (rows of gate/up, columns
    of down), plus `noise` relative to each weight's scale (LoRA merged after pruning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcbench.driver.contract import LayerCompression

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mlp = model.model.layers[1].mlp
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
        w = getattr(mlp, name).weight.data
        w = w[channels] if rows else w[:, channels]
        w = w + noise * w.std() * torch.randn(w.shape, generator=g)
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight.data = w.contiguous()
        setattr(mlp, name, new)
        layers[f"model.layers.1.mlp.{name}"] = LayerCompression(sparsity=0.5, shape=list(w.shape))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    write_record(dst / "compression.json", Compression(method="t", sparsity_pattern="structured", layers=layers))
    return dst


def test_channel_agreement_of_structured_pruning(tmp_path, tiny_llama_dir):
    """Both engines keep 64 of layer 1's 128 MLP channels, 48 of them the same; the reference
    side also carries a merged-LoRA-sized perturbation, which must not move any match."""
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    ref_channels = perm[:64].sort().values
    up_channels = torch.cat([perm[:48], perm[64:80]]).sort().values
    ref = _structured(tiny_llama_dir, tmp_path / "ref", ref_channels, noise=0.05)
    up = _structured(tiny_llama_dir, tmp_path / "up", up_channels, noise=0.0)
    figures = compare_artifacts(ref, up, tiny_llama_dir)
    assert figures["channel_agreement"] == pytest.approx(48 / 64)
    assert figures["mask_agreement"] is None and figures["shapes_agree"] == 1.0
    # identical choices agree fully; unpruned artifacts have no channel figure
    same = _structured(tiny_llama_dir, tmp_path / "same", ref_channels, noise=0.0)
    assert compare_artifacts(ref, same, tiny_llama_dir)["channel_agreement"] == 1.0
    assert compare_artifacts(tiny_llama_dir, tiny_llama_dir, tiny_llama_dir)["channel_agreement"] is None


def test_the_examples_digest_is_read_from_either_engines_notes(tmp_path):
    """LLM-Pruner's two engines note the sha256 of the Taylor examples in their own words; parity
    reads it from both (the last one an artifact notes), and nothing from an artifact without one."""
    from llmcbench.driver.parity import _examples_digest

    digest, other = "ab" * 32, "cd" * 32
    notes = {"ref": [f"taylor (param_first): loss 9.1 on 10 x 64 tokens drawn as upstream's get_examples (seed 42); examples sha256 {digest}"],
             "up": ["upstream hf_prune.py ...", f"taylor: 10 x 64 tokens from upstream's get_examples; examples sha256 {other}",
                    f"taylor: again; examples sha256 {digest}"],
             "none": ["calibration: 16 x 128 tokens", "examples sha256 deadbeef"]}
    for name, lines in notes.items():
        (tmp_path / name).mkdir()
        write_record(tmp_path / name / "compression.json", Compression(method="llm_pruner", notes=lines))
    assert _examples_digest(tmp_path / "ref") == _examples_digest(tmp_path / "up") == digest
    assert _examples_digest(tmp_path / "none") is None and _examples_digest(tmp_path / "missing") is None


def test_parity_sets_the_methods_parity_params_on_both_engines(tmp_path, tiny_llama_dir):
    """LLM-Pruner's `[parity]` turns off the LoRA recovery on both engines (their recoveries train
    on different data by design), so the two perplexities compare one pruning; a method without
    `[parity]` runs its preset as is."""
    from llmcbench.driver.parity import parity_plans
    from llmcbench.driver.registry import get_method

    assert get_method("llm_pruner").parity.params == {"lora_steps": 0}
    plans = parity_plans("llm_pruner", None, str(tiny_llama_dir), "quick", "local", tmp_path / "runs", None, "cpu")
    assert set(plans) == {"reference", "upstream"}
    for engine, plan in plans.items():
        assert plan.params["lora_steps"] == 0 and plan.overrides == {"lora_steps": 0}, engine
        assert plan.tracks == [2]
    wanda = parity_plans("wanda", None, str(tiny_llama_dir), "quick", "local", tmp_path / "runs", None, "cpu")
    assert get_method("wanda").parity.params == {} and all(not p.overrides for p in wanda.values())


def test_folded_scales_are_named_where_the_weight_errors_include_them(tmp_path):
    """SmoothQuant, AWQ and OmniQuant's LET store W*s (compression.json smoothing_folded): the
    record's weight errors against dense then include the scales, and a note must say so."""
    dirs = {engine: tmp_path / engine for engine in ("reference", "upstream")}

    def declare(**folded):
        for engine, d in dirs.items():
            d.mkdir(exist_ok=True)
            write_record(d / "compression.json", Compression(method="t", smoothing_folded=folded.get(engine, False)))
        return folded_scales_note(dirs["reference"], dirs["upstream"])

    assert declare() is None
    assert declare(upstream=True).startswith("upstream folded per-channel scales into the stored weights")
    note = declare(reference=True, upstream=True)
    assert note.startswith("reference and upstream folded") and "not the quantization error alone" in note
    (dirs["upstream"] / "compression.json").unlink()  # an artifact without a declaration folds nothing we know of
    assert folded_scales_note(dirs["reference"], dirs["upstream"]).startswith("reference folded")


def _folded_and_rounded(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two artifacts of `src`: random per-channel scales folded as the smoothing methods fold
    them (1/s into each RMSNorm and up_proj's rows, s into the columns of what reads them), the
    function unchanged; and plain 8-bit rounding (per output row) of every block linear."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = torch.Generator().manual_seed(0)
    out = {}
    for kind in ("folded", "rounded"):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with torch.no_grad():
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                if kind == "rounded":
                    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                        step = lin.weight.abs().amax(dim=1, keepdim=True) / 127
                        lin.weight.copy_(torch.round(lin.weight / step) * step)
                    continue
                for norm, readers in ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                                      (layer.post_attention_layernorm, (m.gate_proj, m.up_proj))):
                    scale = torch.exp(torch.empty(norm.weight.shape).uniform_(-0.7, 0.7, generator=g))
                    norm.weight.div_(scale)
                    for lin in readers:
                        lin.weight.mul_(scale)
                scale = torch.exp(torch.empty(m.up_proj.weight.shape[0]).uniform_(-0.7, 0.7, generator=g))
                m.up_proj.weight.div_(scale[:, None])
                m.down_proj.weight.mul_(scale)
        out[kind] = tmp_path / kind
        model.save_pretrained(out[kind])
        AutoTokenizer.from_pretrained(src).save_pretrained(out[kind])
        write_record(out[kind] / "compression.json", Compression(method="t", smoothing_folded=kind == "folded"))
    return out["folded"], out["rounded"]


def test_the_block_output_error_sees_through_folded_scales(tmp_path, embedded_model_dir, data_dir):
    """On the embedded SmolLM2 and WikiText-2 tokens (as `llmcbench parity` takes them): scales
    folded in (the smoothing methods' W*s) move the stored weights far from dense and leave every
    block's output as it was; plain 8-bit rounding moves the weights a little and the outputs too.
    The weight error ranks them the wrong way round, the block output error the right way."""
    from types import SimpleNamespace

    from llmcbench.driver.contract import ModelRef
    from llmcbench.driver.parity import BLOCK_SEQLEN, BLOCK_WINDOWS, block_ids

    folded, rounded = _folded_and_rounded(embedded_model_dir, tmp_path)
    plan = SimpleNamespace(data_dir=data_dir, data_source="local",
                           model=ModelRef(name="m", source="local", identity="x", path=str(embedded_model_dir)))
    ids = block_ids(plan)
    assert ids.shape == (BLOCK_WINDOWS, BLOCK_SEQLEN)
    figures = compare_artifacts(folded, rounded, embedded_model_dir, ids=ids)
    weights, blocks = figures["weight_rel_err"], figures["block_rel_err"]
    assert figures["block_tokens"] == BLOCK_WINDOWS * BLOCK_SEQLEN
    assert weights["reference"] > 0.2 and weights["upstream"] < 0.02, weights  # folded far, rounded near
    assert blocks["reference"] < 1e-4, blocks  # the folds cancel inside each block
    assert blocks["upstream"] > 1e-3 and blocks["upstream"] > 30 * blocks["reference"], blocks
    # the dense model against itself: no error at all
    assert compare_artifacts(embedded_model_dir, embedded_model_dir, embedded_model_dir, ids=ids)["block_rel_err"] == {
        "reference": 0.0, "upstream": 0.0}


def test_no_block_output_error_where_the_blocks_do_not_pair_up(tmp_path, tiny_llama_dir, data_dir):
    """An artifact with fewer decoder blocks than dense has no block-by-block comparison: None,
    and the weight figures are still taken."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(tmp_path / "short")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "short")
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    figures = compare_artifacts(tiny_llama_dir, tmp_path / "short", tiny_llama_dir, ids=ids)
    assert figures["block_rel_err"] is None and figures["block_tokens"] is None
    assert figures["linears_compared"] == 7  # layer 0's linears, in both
