"""Wanda reference engine: exact sparsity patterns, pruning only zeroes, scores use the
activations, determinism, parameter checks, and a run on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from llmcbench.methods._engine.blockwise import UnsupportedModelError, run_blockwise
from llmcbench.methods._engine.calibration import CalibrationError, sample_calibration
from llmcbench.methods._engine.testing import block_linears, c4_file, c4_loss, load, read_method_toml
from llmcbench.methods.wanda.reference import (
    InputChannelNorms,
    WandaSettings,
    compress,
    unstructured_mask,
    wanda_scores,
)

PROJECT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pruned(tiny_llama_dir, tiny_calibration):
    """preset params -> (dense state dict, pruned model, declaration), computed once per preset."""
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            model = load(tiny_llama_dir)
            dense = {k: v.clone() for k, v in model.state_dict().items()}
            cache[key] = dense, model, compress(model, tiny_calibration, params, CPU)
        return cache[key]

    return get


def test_unstructured_50_prunes_exactly_half_of_every_row(pruned):
    _, model, declaration = pruned(pattern="unstructured", sparsity=0.5)
    linears = block_linears(model)
    assert len(linears) == 2 * 7
    for name, linear in linears.items():
        zeros_per_row = (linear.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == int(linear.in_features * 0.5)), name
        assert declaration.layers[name].sparsity == 0.5
        assert declaration.layers[name].shape == [linear.out_features, linear.in_features]
    assert set(declaration.layers) == set(linears)
    assert declaration.measured_sparsity == 0.5
    assert (declaration.method, declaration.sparsity_pattern, declaration.n_m, declaration.target_sparsity) == (
        "wanda", "unstructured", None, 0.5)


def test_unstructured_60_rounds_down_per_row(pruned):
    _, model, declaration = pruned(pattern="unstructured", sparsity=0.6)
    zeros = total = 0
    for name, linear in block_linears(model).items():
        per_row = int(linear.in_features * 0.6)  # 64 -> 38, 128 -> 76
        assert torch.all((linear.weight == 0).sum(dim=1) == per_row), name
        zeros += per_row * linear.out_features
        total += linear.weight.numel()
    assert declaration.measured_sparsity == pytest.approx(zeros / total)
    assert declaration.measured_sparsity < 0.6


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_prunes_n_of_every_m_consecutive_inputs(pruned, n, m):
    _, model, declaration = pruned(pattern="n:m", n=n, m=m, sparsity=0.5)
    for name, linear in block_linears(model).items():
        groups = (linear.weight == 0).reshape(linear.out_features, linear.in_features // m, m)
        assert torch.all(groups.sum(dim=2) == n), name
    assert declaration.sparsity_pattern == "n:m"
    assert declaration.n_m == (n, m)
    assert declaration.measured_sparsity == 0.5


def test_upstream_spelling_of_n_m_is_accepted(pruned):
    _, model, declaration = pruned(pattern="2:4")
    assert declaration.n_m == (2, 4) and declaration.measured_sparsity == 0.5


def test_pruning_only_zeroes_block_linears(pruned):
    dense, model, _ = pruned(pattern="unstructured", sparsity=0.5)
    linear_weights = {f"{name}.weight" for name in block_linears(model)}
    after = model.state_dict()
    assert set(after) == set(dense)
    for key, original in dense.items():
        if key in linear_weights:
            kept = after[key] != 0
            assert torch.equal(after[key], original * kept), key
        else:  # embeddings, norms, lm_head
            assert torch.equal(after[key], original), key
    assert torch.equal(model.lm_head.weight, dense["model.embed_tokens.weight"])


def test_scores_multiply_weight_magnitude_by_input_norm():
    linear = nn.Linear(4, 2, bias=False)
    stats = InputChannelNorms(linear)
    x = torch.tensor([[[1.0, 2.0, 0.0, 3.0], [1.0, 2.0, 0.0, 4.0]]])  # one sequence of two tokens
    stats.add_batch(x)
    stats.add_batch(2 * x)  # running mean over sequences of the squared norms: (1 + 4) / 2
    assert torch.allclose(stats.squared_norms, 2.5 * (x ** 2).sum(dim=(0, 1)))
    weight = torch.tensor([[1.0, -1.0, 5.0, 1.0], [-2.0, 1.0, 1.0, 0.5]])
    assert torch.allclose(wanda_scores(weight, stats.squared_norms), weight.abs() * stats.squared_norms.sqrt())


def test_wanda_keeps_weak_weights_on_a_strong_input_channel(tiny_llama_dir, tiny_calibration):
    """Channel 5 of layer 0's q_proj input is scaled 1000x (through the input norm's gain)
    while its weights are the smallest of every row: plain magnitude pruning drops the whole
    column, Wanda keeps it."""
    model = load(tiny_llama_dir)
    block = model.model.layers[0]
    channel = 5
    with torch.no_grad():
        block.input_layernorm.weight[channel] = 1000.0
        block.self_attn.q_proj.weight[:, channel] = 1e-3
    magnitude_pruned = unstructured_mask(block.self_attn.q_proj.weight.abs(), 0.5)
    assert magnitude_pruned[:, channel].all()

    compress(model, tiny_calibration, {"pattern": "unstructured", "sparsity": 0.5}, CPU)
    q = block.self_attn.q_proj.weight
    assert torch.all(q[:, channel] == 1e-3)
    assert torch.all((q == 0).sum(dim=1) == q.shape[1] // 2)


def test_same_seed_same_masks(tiny_llama_dir, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    draws = [sample_calibration(tokenizer, nsamples=4, seqlen=64, seed=s, data_file=c4_file(data_dir)) for s in (0, 0, 1)]
    assert torch.equal(draws[0].input_ids, draws[1].input_ids)
    assert not torch.equal(draws[0].input_ids, draws[2].input_ids)
    assert draws[0].input_ids.dtype == torch.long and draws[0].input_ids.shape == (4, 64)
    assert draws[0].data_sha256 == draws[1].data_sha256 and len(draws[0].data_sha256) == 64

    masks = []
    for calibration in draws[:2]:
        model = load(tiny_llama_dir)
        compress(model, calibration.input_ids, {"pattern": "unstructured", "sparsity": 0.5}, CPU)
        masks.append({name: linear.weight == 0 for name, linear in block_linears(model).items()})
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])


def test_calibration_batch_size_does_not_change_the_masks(tiny_llama_dir, tiny_calibration):
    masks = []
    for batch in (1, 8):
        model = load(tiny_llama_dir)
        compress(model, tiny_calibration, {"pattern": "2:4", "calibration_batch_size": batch}, CPU)
        masks.append({name: linear.weight == 0 for name, linear in block_linears(model).items()})
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])


@pytest.mark.parametrize("params,message", [
    ({"pattern": "unstructured"}, "needs a sparsity"),
    ({"pattern": "unstructured", "sparsity": 1.0}, "out of range"),
    ({"pattern": "unstructured", "sparsity": -0.1}, "out of range"),
    ({"pattern": "unstructured", "sparsity": "half"}, "must be a number"),
    ({"pattern": "n:m", "n": 4, "m": 4}, "n < m"),
    ({"pattern": "n:m", "n": 2, "m": 4, "sparsity": 0.6}, "50% sparsity"),
    ({"pattern": "n:m", "n": 1, "m": 4}, "50% sparsity"),
    ({"pattern": "n:m", "m": 4}, "positive integers"),
    ({"pattern": "2:4", "n": 4}, "contradicts"),
    ({"pattern": "blocks", "sparsity": 0.5}, "is not 'unstructured'"),
    ({"pattern": "unstructured", "sparsity": 0.5, "n": 2}, "N:M pattern only"),
    ({"pattern": "unstructured", "sparsity_ratio": 0.5}, "unknown parameter"),
    ({"pattern": "unstructured", "sparsity": 0.5, "calibration_batch_size": 0}, "positive integer"),
])
def test_bad_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        WandaSettings.from_params(params)


def test_method_toml_declares_upstream_and_valid_presets():
    declaration = read_method_toml(Path(__file__).parent, name="wanda", kind="pruning",
                                   repo="https://github.com/locuslab/wanda",
                                   commit="8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6", license="MIT")
    assert declaration["calibration"] == {"dataset": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0}
    assert set(declaration["engines"]) == {"reference", "upstream"}
    presets = declaration["presets"]
    assert {"unstructured-50", "2:4", "4:8", "unstructured-60"} <= set(presets)
    assert declaration["paper_preset"] in presets
    for name, params in presets.items():
        WandaSettings.from_params(params)
        assert "sparsity" in params, name  # the driver's --sparsity override needs it


def test_sparsity_zero_prunes_nothing(tiny_llama_dir, tiny_calibration):
    model = load(tiny_llama_dir)
    declaration = compress(model, tiny_calibration, {"pattern": "unstructured", "sparsity": 0.0}, CPU)
    assert declaration.measured_sparsity == 0.0 and len(declaration.layers) == 14


def test_calibration_without_long_enough_documents_fails_clearly(tiny_llama_dir, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(CalibrationError, match="smaller|below"):
        sample_calibration(tokenizer, nsamples=1, seqlen=100_000, data_file=c4_file(data_dir))


def test_unsupported_architecture_is_named():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="model.model.layers"):
        run_blockwise(NotADecoder(), torch.zeros(1, 4, dtype=torch.long), CPU, statistics=None, update=None)


def test_embedded_model_half_of_every_row_and_sane_loss(embedded_model_dir, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    calibration = sample_calibration(tokenizer, nsamples=8, seqlen=128, seed=0, data_file=c4_file(data_dir))
    held_out = sample_calibration(tokenizer, nsamples=1, seqlen=256, seed=1234, data_file=c4_file(data_dir)).input_ids
    model = load(embedded_model_dir)
    dense_loss = c4_loss(model, held_out)

    declaration = compress(model, calibration.input_ids, {"pattern": "unstructured", "sparsity": 0.5}, CPU)
    linears = block_linears(model)
    assert len(linears) == 30 * 7 == len(declaration.layers)
    for name, linear in linears.items():
        assert torch.all((linear.weight == 0).sum(dim=1) == linear.in_features // 2), name
    assert declaration.measured_sparsity == 0.5

    pruned_loss = c4_loss(model, held_out)
    print(f"embedded model C4 loss: dense {dense_loss:.4f}, wanda 50% {pruned_loss:.4f}")
    assert torch.isfinite(torch.tensor(pruned_loss))
    assert dense_loss < pruned_loss < 2.0 * dense_loss
