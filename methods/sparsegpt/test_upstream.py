"""SparseGPT's upstream adapter: the command line per preset (against method.toml's recorded
commands), upstream's log lines, and the conversion of the model the shim saves after
`llama_sequential`. The whole job through the shim is exercised with Wanda's stand-in
(tests/test_upstream_engine.py); SparseGPT's own code needs GitHub (it ran in its image with a
mirror in GitHub's place: docs/upstream.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.registry import get_method
from llmcbench.methods._upstream.convert import ConversionError
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.sparsegpt.upstream import ADAPTER


@pytest.mark.parametrize("preset", list(get_method("sparsegpt").presets))
def test_every_preset_builds_the_recorded_command(tmp_path, preset):
    assert built_commands(context_for(job_for("sparsegpt", preset), tmp_path)) == recorded_commands("sparsegpt", preset)


def test_job_settings_and_hooks(tmp_path):
    ctx = context_for(job_for("sparsegpt", "2:4", nsamples=32, seed=5, true_sequential=True), tmp_path)
    [step] = ADAPTER.steps(ctx)
    assert step.argv[step.argv.index("--nsamples") + 1] == "32" and step.argv[step.argv.index("--seed") + 1] == "5"
    assert "--true-sequential" in step.argv and "--sparsity" not in step.argv  # upstream ignores it with --prunen
    assert step.time == ["__main__:llama_sequential"]
    assert step.save == [{"after": "__main__:llama_sequential", "arg": 0, "dir": str(ctx.work / "model")}]
    with pytest.raises(ValueError, match="sparsity"):
        ADAPTER.steps(context_for(job_for("sparsegpt", "unstructured-50", sparsity=1.5), tmp_path))


def test_sentencepiece_tokenizer_is_required_where_upstream_picks_it_by_path(tmp_path, tiny_llama_dir):
    """llama.py picks LlamaTokenizer by the model path: one containing "llama" needs tokenizer.model
    (this test's own tmp_path must not contain it, hence its name)."""
    from llmcbench.methods._engine.blockwise import UnsupportedModelError

    for name in ("tiny-llama", "tiny-model"):
        (tmp_path / name).mkdir()
        for f in tiny_llama_dir.iterdir():
            (tmp_path / name / f.name).symlink_to(f)
    with pytest.raises(UnsupportedModelError, match="LlamaTokenizer .* no tokenizer.model"):
        ADAPTER.steps(context_for(job_for("sparsegpt", "2:4"), tmp_path / "a", model_dir=tmp_path / "tiny-llama"))
    assert ADAPTER.steps(context_for(job_for("sparsegpt", "2:4"), tmp_path / "b", model_dir=tmp_path / "tiny-model"))
    (tmp_path / "tiny-llama" / "tokenizer.model").write_bytes(b"")  # present: upstream's LlamaTokenizer reads it
    assert ADAPTER.steps(context_for(job_for("sparsegpt", "2:4"), tmp_path / "c", model_dir=tmp_path / "tiny-llama"))


def test_parse_metrics_reads_upstream_print():
    # llama.py: print("Dataset:", dataset) ... llama_eval: print(f"Perplexity: {ppl.item():3f}")
    log = "Dataset: wikitext2\nEvaluating ...\n0\n1\nPerplexity: 6.512300\n[llmcbench-shim] model saved; stopping\n"
    assert ADAPTER.parse_metrics(log) == {"wikitext2_ppl": pytest.approx(6.5123)}


def test_convert_the_saved_model(tmp_path, tiny_llama_dir, data_dir):
    """The shim's save hook writes `model.save_pretrained(dir)` of upstream's fp16 model (no
    tokenizer, as upstream's own `--save`): mirrored with a 2:4-pruned tiny LLaMA."""
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("sparsegpt", "2:4"), tmp_path, model_dir=tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            w = linear.weight.data.view(linear.weight.shape[0], -1, 4)
            w[..., :2] = 0
    model.save_pretrained(ctx.work / "model")
    declaration = ADAPTER.convert(ctx)
    assert declaration.sparsity_pattern == "n:m" and tuple(declaration.n_m) == (2, 4)
    assert declaration.measured_sparsity == pytest.approx(0.5)
    assert (ctx.model_out / "tokenizer_config.json").is_file()  # the input model's tokenizer, copied
    loaded = AutoModelForCausalLM.from_pretrained(ctx.model_out, dtype=torch.float32)
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_convert_without_output_fails_clearly(tmp_path):
    with pytest.raises(ConversionError, match="upstream left no HF model directory"):
        ADAPTER.convert(context_for(job_for("sparsegpt", "2:4"), tmp_path))
