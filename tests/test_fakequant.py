"""Activation fake-quantization at evaluation (tracks/fakequant.py): the quantizer's levels,
idempotence and error bound, which linears a declaration wraps, and a W8A8 artifact
evaluated through the job process really running with its linears wrapped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llmcbench.driver import jobrun
from llmcbench.driver.contract import Compression, EvalSettings, Job, LayerCompression, ModelRef, Result, read_record
from llmcbench.driver.fsio import write_record
from llmcbench.tracks import fakequant
from llmcbench.tracks.fakequant import (
    activation_quantizer_of,
    apply_activation_quant,
    apply_declared_activation_quant,
    declared_linears,
    quantize_per_tensor_absmax,
    quantize_per_token_absmax,
)


def outlier_activations(seed: int = 0) -> torch.Tensor:
    """[batch 2, tokens 6, features 64] with two outlier channels 50x the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 64, generator=g)
    x[..., 3] *= 50
    x[..., 40] *= -30
    return x


def load(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def block_linear_names(model) -> list[str]:
    return [name for name, m in model.model.layers.named_modules(prefix="model.layers") if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_has_at_most_2_to_the_bits_levels_per_token(bits):
    q = quantize_per_token_absmax(outlier_activations(), bits)
    for row in q.reshape(-1, q.shape[-1]):
        levels = torch.unique(row).numel()
        assert levels <= 2 ** bits - 1, levels  # symmetric: -(2^(b-1)-1) .. 2^(b-1)-1
        scale = row.abs().max() / (2 ** (bits - 1) - 1)
        integers = row / scale
        assert torch.allclose(integers, integers.round(), atol=1e-4)


@pytest.mark.parametrize("quantize", [quantize_per_token_absmax, quantize_per_tensor_absmax])
def test_quantization_is_idempotent(quantize):
    once = quantize(outlier_activations(), 8)
    assert torch.allclose(quantize(once, 8), once, rtol=1e-6, atol=0)


def test_error_is_at_most_half_a_step():
    x = outlier_activations()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    error = (quantize_per_token_absmax(x, 8) - x).abs()
    assert torch.all(error <= scale / 2 * (1 + 1e-5))
    assert error.max() > 0


def test_per_tensor_uses_one_scale_per_sequence_independent_of_the_batch():
    x = outlier_activations()
    q = quantize_per_tensor_absmax(x, 8)
    for b in range(x.shape[0]):
        scale = x[b].abs().max() / 127
        integers = q[b] / scale
        assert torch.allclose(integers, integers.round(), atol=1e-4)
        assert torch.equal(quantize_per_tensor_absmax(x[b:b + 1], 8), q[b:b + 1])
    # one outlier channel costs per-tensor quantization the small channels, per-token much less
    small = [c for c in range(x.shape[-1]) if c not in (3, 40)]
    per_token_error = (quantize_per_token_absmax(x, 8) - x)[..., small].abs().mean()
    assert per_token_error <= (q - x)[..., small].abs().mean()


def test_keeps_dtype_and_device():
    x = outlier_activations().to(torch.bfloat16)
    assert quantize_per_token_absmax(x, 8).dtype == torch.bfloat16


def test_applied_model_differs_but_stays_close_at_8_bits(tiny_llama_dir):
    model = load(tiny_llama_dir)
    ids = torch.arange(5, 69).reshape(2, 32)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        declaration = Compression(method="test", act_bits=8, act_granularity="per_token")
        applied = apply_declared_activation_quant(model, declaration)
        quantized = model(input_ids=ids).logits
        assert len(applied.linears) == 14 and activation_quantizer_of(model.lm_head) is None
        assert not torch.equal(quantized, dense)
        assert (quantized - dense).norm() / dense.norm() < 0.02
        applied.remove()
        assert torch.equal(model(input_ids=ids).logits, dense)
        assert all(activation_quantizer_of(m) is None for m in model.modules())
        applied4 = apply_declared_activation_quant(model, declaration.model_copy(update={"act_bits": 4}))
        error4 = (model(input_ids=ids).logits - dense).norm()
        assert error4 > (quantized - dense).norm()
        applied4.remove()


def test_declared_linears_follow_the_declaration(tiny_llama_dir):
    model = load(tiny_llama_dir)
    names = block_linear_names(model)
    everything = declared_linears(model, Compression(method="test", act_bits=8, act_granularity="per_token"))
    assert list(everything) == names  # no per-layer entries: every block linear, never lm_head
    two = {name: LayerCompression(weight_bits=8) for name in names[:2]}
    assert list(declared_linears(model, Compression(method="test", layers=two))) == names[:2]
    with_head = {**two, "lm_head": LayerCompression(weight_bits=8)}
    assert "lm_head" in declared_linears(model, Compression(method="test", layers=with_head))

    assert apply_declared_activation_quant(model, Compression(method="test")) is None  # A16
    assert apply_declared_activation_quant(model, None) is None
    with pytest.raises(ValueError, match="act_granularity 'none'"):
        apply_declared_activation_quant(model, Compression(method="test", act_bits=8))
    with pytest.raises(ValueError, match="no such module"):
        declared_linears(model, Compression(method="test", layers={"model.layers.9.mlp.up_proj": LayerCompression()}))
    with pytest.raises(ValueError, match="not a linear"):
        declared_linears(model, Compression(method="test", layers={"model.norm": LayerCompression()}))
    applied = apply_activation_quant(model, everything, 8, "per_token")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_activation_quant(model, everything, 8, "per_token")
    applied.remove()
    with pytest.raises(ValueError, match="bits"):
        apply_activation_quant(model, everything, 1, "per_token")


def test_w8a8_artifact_is_evaluated_with_its_linears_wrapped(tiny_llama_dir, tmp_path, monkeypatch):
    """A SmoothQuant W8A8 artifact through the job process's eval path (track 4 only, to be
    quick): every declared linear carries the quantizer, the quantizer runs during the
    evaluation's forwards, and the result records it."""
    from llmcbench.methods.smoothquant.reference import compress

    model = load(tiny_llama_dir)
    declaration = compress(model, torch.zeros(1, 8, dtype=torch.long), {"smooth": False}, torch.device("cpu"))
    models = tmp_path / "models"
    artifact = models / "artifact"
    model.save_pretrained(artifact)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, artifact / f.name)
    write_record(artifact / jobrun.COMPRESSION_FILE, declaration)
    job = Job(kind="eval", method="smoothquant", preset="w8a8",
              model=ModelRef(name="artifact", source="local", identity="sha256:test"),
              evaluation=EvalSettings(tracks=[4], macs_seqlen=16))
    (tmp_path / "job.json").write_text(job.model_dump_json())

    loaded, calls = [], []
    original_load = jobrun.load_model
    monkeypatch.setattr(jobrun, "load_model", lambda *a, **k: loaded.append(original_load(*a, **k)) or loaded[-1])
    original_call = fakequant.ActivationQuantizer.__call__

    def counting_call(self, x):
        calls.append(self)
        return original_call(self, x)

    monkeypatch.setattr(fakequant.ActivationQuantizer, "__call__", counting_call)
    paths = jobrun.Paths(tmp_path / "job.json", models, tmp_path / "data", tmp_path / "out")
    assert jobrun.execute(paths) == 0, (tmp_path / "out" / "result.json").read_text()

    result = read_record(tmp_path / "out" / "result.json", Result)
    assert result.metrics["activation_quantization"] == {
        "applied": True, "act_bits": 8, "act_granularity": "per_token", "linears": 14,
        "scheme": "dynamic symmetric absmax quantize-dequantize of linear inputs (SmoothQuant fake_quant.py)"}
    (evaluated, _tokenizer), = loaded
    for name in block_linear_names(evaluated):
        quantizer = activation_quantizer_of(evaluated.get_submodule(name))
        assert quantizer is not None and (quantizer.bits, quantizer.granularity) == (8, "per_token"), name
    assert activation_quantizer_of(evaluated.lm_head) is None
    assert len(calls) >= 14  # at least one forward went through every wrapped linear
    assert json.loads((artifact / jobrun.COMPRESSION_FILE).read_text())["act_bits"] == 8
