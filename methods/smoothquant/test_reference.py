"""SmoothQuant reference engine: the folding preserves the function, the smoothed activations
are flatter, the weights sit on an INT8 per-channel grid, smoothing beats plain W8A8 where
activation outliers matter, the declaration, parameter checks, and a run on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from llmcbench.methods._engine.blockwise import decoder_blocks, find_linears, run_blockwise
from llmcbench.methods._engine.testing import c4_ids, c4_loss, calibration_and_held_out, load, read_method_toml
from llmcbench.methods.smoothquant.reference import (
    ChannelAbsMax,
    SmoothQuantSettings,
    compress,
    smooth_block,
    smoothing_scales,
)
from llmcbench.tracks.fakequant import apply_declared_activation_quant

CPU = torch.device("cpu")
OUTLIER_CHANNELS = (3, 17, 42)


@pytest.fixture(scope="module")
def calibration(tiny_llama_dir, data_dir) -> torch.Tensor:
    return c4_ids(tiny_llama_dir, data_dir, nsamples=4, seqlen=64, seed=0)


@pytest.fixture(scope="module")
def held_out(tiny_llama_dir, data_dir) -> torch.Tensor:
    return c4_ids(tiny_llama_dir, data_dir, nsamples=2, seqlen=64, seed=1234)


def with_outlier_channels(model: nn.Module, gain: float = 60.0) -> nn.Module:
    """The same function with LLM-like activation outliers, deterministically: a few hidden
    channels amplified `gain` times by both norms, and the weights reading them scaled down
    as much (the inverse of smoothing). Real LLMs' outlier channels look like this: huge
    activations, unremarkable contributions to the outputs."""
    channels = list(OUTLIER_CHANNELS)
    with torch.no_grad():
        for block in model.model.layers:
            for norm, readers in ((block.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (block.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[channels] *= gain
                for name in readers:
                    parent = block.self_attn if name in ("q_proj", "k_proj", "v_proj") else block.mlp
                    getattr(parent, name).weight[:, channels] /= gain
    return model


def input_absmax(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """max |X_j| of every block linear's input (nothing changed)."""
    stats = {}

    def keep(name, linear):
        stats[name] = ChannelAbsMax(linear)
        return stats[name]

    run_blockwise(model, ids, CPU, statistics=keep, update=lambda step: None)
    return {name: s.absmax for name, s in stats.items()}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_smoothing_alone_leaves_the_function_unchanged(tiny_llama_dir, calibration, held_out):
    model = with_outlier_channels(load(tiny_llama_dir))
    before = logits(model, held_out)
    norms_before = model.model.layers[0].input_layernorm.weight.clone()
    run_blockwise(model, calibration, CPU, statistics=lambda _n, linear: ChannelAbsMax(linear),
                  update=lambda step: smooth_block(step, 0.85))
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norms_before)  # something was folded
    after = logits(model, held_out)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (after - before).abs().max()


def test_smoothed_activations_are_flatter_across_channels(tiny_llama_dir, calibration):
    model = with_outlier_channels(load(tiny_llama_dir))
    before = input_absmax(model, calibration)
    run_blockwise(model, calibration, CPU, statistics=lambda _n, linear: ChannelAbsMax(linear),
                  update=lambda step: smooth_block(step, 0.85))
    after = input_absmax(model, calibration)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        ratio_before = before[name].max() / before[name].median()
        ratio_after = after[name].max() / after[name].median()
        assert ratio_after < ratio_before / 4, (name, ratio_before, ratio_after)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):  # not smoothed
        assert torch.allclose(after[name], before[name], rtol=1e-3, atol=1e-5), name


def test_smoothing_scale_formula():
    fcs = [nn.Linear(3, 2, bias=False), nn.Linear(3, 4, bias=False)]
    with torch.no_grad():
        fcs[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, 0.3]]))
        fcs[1].weight.fill_(0.25)
        fcs[1].weight[3, 2] = -4.0
    act = torch.tensor([8.0, 1.0, 27.0])
    weight_max = torch.tensor([1.0, 2.0, 4.0])
    expected = act.pow(0.75) / weight_max.pow(0.25)
    assert torch.allclose(smoothing_scales(act, fcs, 0.75), expected)


@pytest.fixture(scope="module")
def w8a8(tiny_llama_dir, calibration):
    model = load(tiny_llama_dir)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    return dense, model, compress(model, calibration, {"alpha": 0.85, "weight_bits": 8, "act_bits": 8,
                                                       "act_granularity": "per_token"}, CPU)


def test_weights_are_on_an_int8_per_channel_grid(w8a8):
    _, model, declaration = w8a8
    prefix, blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            w = linear.weight.data
            for row in w:
                assert torch.unique(row).numel() <= 2 ** 8
            steps = w / (w.abs().amax(dim=1, keepdim=True) / 127)
            assert torch.allclose(steps, steps.round(), atol=1e-3), name
            assert declaration.layers[f"{prefix}.{index}.{name}"].weight_bits == 8


def test_only_block_linears_and_norms_change(w8a8):
    dense, model, _ = w8a8
    after = model.state_dict()
    for key in dense:
        changed = not torch.equal(after[key], dense[key])
        expected = key.startswith("model.layers.") and key.endswith(
            ("proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"))
        assert changed == expected, key
    assert torch.equal(after["lm_head.weight"], dense["model.embed_tokens.weight"])


def test_declaration(w8a8):
    _, _, declaration = w8a8
    assert (declaration.method, declaration.weight_bits, declaration.act_bits, declaration.act_granularity,
            declaration.symmetric, declaration.group_size, declaration.smoothing_folded) == (
        "smoothquant", 8, 8, "per_token", True, None, True)
    assert len(declaration.layers) == 14 and "lm_head" not in declaration.layers
    assert any("C4" in note and "pile" in note for note in declaration.notes)
    assert any("alpha 0.85" in note for note in declaration.notes)


def test_w4a4_declares_four_bits(tiny_llama_dir):
    model = load(tiny_llama_dir)
    declaration = compress(model, torch.zeros(1, 8, dtype=torch.long), {"smooth": False, "weight_bits": 4, "act_bits": 4}, CPU)
    assert (declaration.weight_bits, declaration.act_bits, declaration.smoothing_folded) == (4, 4, False)
    for row in model.model.layers[0].mlp.up_proj.weight:
        assert torch.unique(row).numel() <= 2 ** 4


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_smoothing_beats_plain_w8a8_with_activation_outliers(tiny_llama_dir, calibration, held_out, granularity):
    """Both evaluated with the evaluation side's activation fake-quantization applied."""
    reference = logits(with_outlier_channels(load(tiny_llama_dir)), held_out)
    errors = {}
    for smooth in (True, False):
        model = with_outlier_channels(load(tiny_llama_dir))
        declaration = compress(model, calibration, {"smooth": smooth, "act_granularity": granularity}, CPU)
        applied = apply_declared_activation_quant(model, declaration)
        assert applied is not None and len(applied.linears) == 14
        errors[smooth] = ((logits(model, held_out) - reference).norm() / reference.norm()).item()
    print(f"{granularity}: relative logit error smoothquant {errors[True]:.4f}, plain W8A8 {errors[False]:.4f}")
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize("params,message", [
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": "high"}, "alpha"),
    ({"weight_bits": 16}, "weight_bits"),
    ({"act_bits": 6}, "act_bits"),
    ({"act_bits": True}, "act_bits"),
    ({"act_granularity": "per_channel"}, "act_granularity"),
    ({"smooth": "yes"}, "smooth"),
    ({"calibration_batch_size": 0}, "positive integer"),
    ({"migration_strength": 0.5}, "unknown parameter"),
    ({"alpha_by_arch": 0.5}, "alpha_by_arch must map model types"),
    ({"alpha_by_arch": {"opt": 2}}, "alpha"),
])
def test_bad_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        SmoothQuantSettings.from_params(params)


def test_non_foldable_norm_is_refused(tiny_llama_dir):
    class GemmaStyleNorm(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width))

        def forward(self, x):
            return x * (1 + self.weight)

    model = load(tiny_llama_dir)
    model.model.layers[1].post_attention_layernorm = GemmaStyleNorm(64)
    with pytest.raises(ValueError, match="does not scale with its weight"):
        compress(model, torch.zeros(1, 8, dtype=torch.long), {}, CPU)


def test_method_toml_declares_upstream_and_valid_presets():
    declaration = read_method_toml(Path(__file__).parent, name="smoothquant", kind="weight-activation-quantization",
                                   repo="https://github.com/mit-han-lab/smoothquant",
                                   commit="c61476d728e42ae0d8a35e7e78494edcac3237b5", license="MIT")
    assert declaration["calibration"] == {"dataset": "c4", "nsamples": 512, "seqlen": 512, "seed": 0}
    presets = declaration["presets"]
    assert set(presets) == {"w8a8", "w4a4"} and declaration["paper_preset"] == "w8a8"
    assert presets["w8a8"]["alpha"] == 0.85
    for params in presets.values():  # LLaMA's 0.85 (upstream's example), OPT's 0.5 (the paper's)
        assert SmoothQuantSettings.from_params(params, "llama").alpha == 0.85
        assert SmoothQuantSettings.from_params(params, "opt").alpha == 0.5


def test_embedded_model_w8a8_loss_stays_close_to_dense(embedded_model_dir, data_dir):
    calibration, held = calibration_and_held_out(embedded_model_dir, data_dir, nsamples=8)
    model = load(embedded_model_dir)
    dense_loss = c4_loss(model, held)
    declaration = compress(model, calibration, {"alpha": 0.85}, CPU)
    assert len(declaration.layers) == 30 * 7
    applied = apply_declared_activation_quant(model, declaration)
    assert len(applied.linears) == 30 * 7
    loss = c4_loss(model, held)
    print(f"embedded model C4 loss: dense {dense_loss:.4f}, smoothquant W8A8 (activations fake-quantized) {loss:.4f}")
    assert torch.isfinite(torch.tensor(loss))
    assert dense_loss * 0.98 < loss < 1.1 * dense_loss
