"""SmoothQuant's upstream adapter: the two command lines (against method.toml's recorded
commands), the refusal of what upstream cannot express (W4A4), upstream's log line, and the
conversion of the model the shim saves after `quantize_model`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.methods._upstream.convert import ConversionError
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.smoothquant.upstream import ADAPTER


def test_w8a8_builds_the_recorded_commands(tmp_path, data_dir):
    ctx = context_for(job_for("smoothquant", "w8a8"), tmp_path, data_dir=data_dir)
    assert built_commands(ctx) == recorded_commands("smoothquant", "w8a8")
    scales, quantize = ADAPTER.steps(ctx)
    assert scales.time == ["smoothquant.calibration:get_act_scales"]
    assert quantize.save == [{"after": "smoothquant.fake_quant:quantize_model", "model": "return", "dir": str(ctx.work / "model")}]
    other = ADAPTER.steps(context_for(job_for("smoothquant", "w8a8", alpha=0.5, nsamples=64), tmp_path, data_dir=data_dir))
    assert other[1].argv[1] == "0.5" and other[0].argv[other[0].argv.index("--num-samples") + 1] == "64"


def test_opt_gets_its_own_migration_strength(tmp_path, data_dir):
    """The presets carry alpha_by_arch = {opt = 0.5}: upstream ran OPT with LLaMA's 0.85."""
    model = tmp_path / "opt"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "opt"}')
    ctx = context_for(job_for("smoothquant", "w8a8"), tmp_path, model_dir=model, data_dir=data_dir)
    assert ADAPTER.steps(ctx)[1].argv[:2] == ["--alpha", "0.5"]
    (model / "config.json").write_text('{"model_type": "llama"}')
    assert ADAPTER.steps(ctx)[1].argv[:2] == ["--alpha", "0.85"]


def test_what_upstream_cannot_express_is_refused(tmp_path, data_dir):
    """fake_quant.py hard-codes n_bits=8 and per-token activations: W4A4 is not run as W8A8."""
    with pytest.raises(NotImplementedError, match="W4A4"):
        ADAPTER.steps(context_for(job_for("smoothquant", "w4a4"), tmp_path, data_dir=data_dir))
    with pytest.raises(NotImplementedError, match="per_tensor"):
        ADAPTER.steps(context_for(job_for("smoothquant", "w8a8", act_granularity="per_tensor"), tmp_path, data_dir=data_dir))


def test_parse_metrics_reads_upstream_print():
    # ppl_eval.py: print(f"Perplexity: {ppl}")
    assert ADAPTER.parse_metrics("Evaluating...: 100%\nPerplexity: 5.515625\n") == {"wikitext2_ppl": pytest.approx(5.515625)}


def test_convert_the_saved_model(tmp_path, tiny_llama_dir, data_dir):
    """The shim saves `quantize_model`'s return value with save_pretrained: a bfloat16 LLaMA
    whose linears are W8A8Linear modules holding `weight` (abs-max per output channel,
    q = round(w / (max|w| / 127))) under nn.Linear's key names. Mirrored with a tiny LLaMA;
    the artifact evaluates with the declared per-token INT8 activation quantization applied."""
    from llmcbench.tracks.fakequant import apply_declared_activation_quant
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("smoothquant", "w8a8"), tmp_path, model_dir=tiny_llama_dir, data_dir=data_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            scale = linear.weight.data.abs().amax(dim=1, keepdim=True) / 127
            linear.weight.data = torch.round(linear.weight.data / scale) * scale
    model.to(torch.bfloat16).save_pretrained(ctx.work / "model")
    declaration = ADAPTER.convert(ctx)
    assert (declaration.weight_bits, declaration.act_bits, declaration.act_granularity) == (8, 8, "per_token")
    assert declaration.smoothing_folded and declaration.symmetric
    loaded = AutoModelForCausalLM.from_pretrained(ctx.model_out, dtype=torch.float32)
    applied = apply_declared_activation_quant(loaded, declaration)
    assert applied is not None and len(applied.linears) == len(declaration.layers)
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_unquantized_output_is_refused(tmp_path, tiny_llama_dir, data_dir):
    """Rows wider than the 255 levels of an INT8 grid with more distinct values than that are
    not what upstream writes (a 1-layer LLaMA of width 320, random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ctx = context_for(job_for("smoothquant", "w8a8"), tmp_path, model_dir=tiny_llama_dir, data_dir=data_dir)
    config = LlamaConfig(vocab_size=64, hidden_size=320, intermediate_size=640, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(ctx.work / "model")
    with pytest.raises(ConversionError, match="INT8 grid"):
        ADAPTER.convert(ctx)
