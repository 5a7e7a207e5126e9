"""GPTQ's upstream adapter: the command line per preset (against method.toml's recorded
commands), upstream's log lines, and the conversion of the model the shim saves after
`llama_sequential`, checked to be a real b-bit fake-quant. The whole job through the shim is
exercised with Wanda's stand-in (tests/test_upstream_engine.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.registry import get_method
from llmcbench.methods._upstream.convert import ConversionError, distinct_levels
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.gptq.upstream import ADAPTER


@pytest.mark.parametrize("preset", list(get_method("gptq").presets))
def test_every_preset_builds_the_recorded_command(tmp_path, preset):
    assert built_commands(context_for(job_for("gptq", preset), tmp_path)) == recorded_commands("gptq", preset)


def test_job_settings_reach_the_command(tmp_path):
    [step] = ADAPTER.steps(context_for(job_for("gptq", "w4a16-g128", nsamples=16, sym=True, group_size=64), tmp_path))
    argv = step.argv
    assert argv[argv.index("--groupsize") + 1] == "64" and "--sym" in argv and argv[argv.index("--nsamples") + 1] == "16"
    assert step.time == ["__main__:llama_sequential"] and step.save[0]["arg"] == 0
    with pytest.raises(ValueError, match="blocksize is fixed at 128"):
        ADAPTER.steps(context_for(job_for("gptq", "w8a16", blocksize=64), tmp_path))


def test_parse_metrics_reads_upstream_print():
    # llama.py: print(dataset); llama_eval: print('Evaluating ...'), print(i) per layer, print(ppl.item())
    log = "wikitext2\nEvaluating ...\n0\n1\n2\n5.6812744140625\n[llmcbench-shim] model saved; stopping at upstream's next step\n"
    assert ADAPTER.parse_metrics(log) == {"wikitext2_ppl": pytest.approx(5.68127, rel=1e-5)}


def _fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """upstream quant.py: per group, asymmetric min/max grid, q = clamp(round(x / scale) + zero, 0, maxq),
    x = scale * (q - zero)."""
    maxq = 2 ** bits - 1
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape_as(w)


def test_convert_the_saved_model(tmp_path, tiny_llama_dir, data_dir):
    """The shim's save hook writes `model.save_pretrained(dir)` of upstream's fp16 model whose
    linears GPTQ.fasterquant overwrote with dequantized values: mirrored with a tiny LLaMA whose
    block linears carry 4-bit asymmetric grids per 128... per group of 32 (its width is 64)."""
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("gptq", "w4a16-g128", group_size=32), tmp_path, model_dir=tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.data = _fake_quantize(linear.weight.data, 4, 32).half().float()
    model.half().save_pretrained(ctx.work / "model")
    declaration = ADAPTER.convert(ctx)
    assert (declaration.weight_bits, declaration.group_size, declaration.symmetric) == (4, 32, False)
    assert declaration.packed_format is None and any("no packed export" in n for n in declaration.notes)
    loaded = AutoModelForCausalLM.from_pretrained(ctx.model_out, dtype=torch.float32)
    linears = [m for layer in loaded.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert set(declaration.layers) and all(distinct_levels(m.weight, 32) <= 16 for m in linears)
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_unquantized_output_is_refused(tmp_path, tiny_llama_dir):
    """Weights that are not on a 4-bit grid are not what GPTQ writes: the conversion says so."""
    ctx = context_for(job_for("gptq", "w4a16-g128", group_size=32), tmp_path, model_dir=tiny_llama_dir)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(ctx.work / "model")
    with pytest.raises(ConversionError, match="distinct values in a group"):
        ADAPTER.convert(ctx)
