"""Wanda's upstream adapter: the command line per preset (against method.toml's recorded
commands), upstream's log line, and the conversion of its `--save_model` directory.

The full job through the shim on a stand-in checkout is tests/test_upstream_engine.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.registry import get_method
from llmcbench.methods._upstream.convert import ConversionError
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.wanda.upstream import ADAPTER


@pytest.mark.parametrize("preset", list(get_method("wanda").presets))
def test_every_preset_builds_the_recorded_command(tmp_path, preset):
    assert built_commands(context_for(job_for("wanda", preset), tmp_path)) == recorded_commands("wanda", preset)


def test_job_settings_reach_the_command(tmp_path):
    ctx = context_for(job_for("wanda", "unstructured-50", nsamples=16, seed=3, sparsity=0.7), tmp_path)
    argv = ADAPTER.steps(ctx)[0].argv
    assert argv[argv.index("--nsamples") + 1] == "16" and argv[argv.index("--seed") + 1] == "3"
    assert argv[argv.index("--sparsity_ratio") + 1] == "0.7"


def test_parse_metrics_reads_upstream_print():
    # main.py: print(f"wikitext perplexity {ppl_test}")
    log = "sparsity sanity check 0.5000\n******************************\nwikitext perplexity 6.4215\n"
    assert ADAPTER.parse_metrics(log) == {"wikitext_ppl": pytest.approx(6.4215)}


def test_convert_save_model_dir(tmp_path, tiny_llama_dir, data_dir):
    """`--save_model` is `model.save_pretrained(dir); tokenizer.save_pretrained(dir)` of the
    fp16 model (main.py): mirrored here with a 50%-pruned tiny LLaMA saved the same way."""
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("wanda", "unstructured-50"), tmp_path, model_dir=tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            w = linear.weight.data
            w[:, : w.shape[1] // 2] = 0
    model.save_pretrained(ctx.work / "model")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(ctx.work / "model")
    declaration = ADAPTER.convert(ctx)
    assert declaration.measured_sparsity == pytest.approx(0.5)
    loaded = AutoModelForCausalLM.from_pretrained(ctx.model_out, dtype=torch.float32)
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_convert_without_output_fails_clearly(tmp_path):
    ctx = context_for(job_for("wanda", "unstructured-50"), tmp_path)
    with pytest.raises(ConversionError, match="upstream left no HF model directory"):
        ADAPTER.convert(ctx)
