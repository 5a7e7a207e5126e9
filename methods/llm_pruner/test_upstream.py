"""LLM-Pruner's upstream adapter: the command lines per preset (against method.toml's recorded
commands), the export of the pickled model (our helper script, run here with this interpreter),
the LoRA merge, and the conversion into an artifact with per-layer shapes that
`load_structured_pruned` loads and our evaluation scores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.contract import Compression
from llmcbench.driver.fsio import write_record
from llmcbench.driver.registry import get_method
from llmcbench.methods._engine.blockwise import UnsupportedModelError
from llmcbench.methods._engine.structured import load_structured_pruned
from llmcbench.methods._upstream.convert import ConversionError
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.llm_pruner.reference import examples_digest
from llmcbench.methods.llm_pruner.upstream import ADAPTER, EXPORT, check_model, merge_lora


@pytest.fixture
def llama2_shaped_dir(tmp_path, tiny_llama_dir):
    """The tiny LLaMA's config as LLaMA-2 has it (multi-head attention, rope_theta 10000) next to a
    `tokenizer.model` (an empty stand-in: only hf_prune.py's LlamaTokenizer would read it)."""
    d = tmp_path / "llama2-shaped"
    d.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(num_key_value_heads=config["num_attention_heads"], rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer.model").write_bytes(b"")
    return d


@pytest.mark.parametrize("preset", list(get_method("llm_pruner").presets))
def test_every_preset_builds_the_recorded_commands(tmp_path, preset):
    assert built_commands(context_for(job_for("llm_pruner", preset), tmp_path)) == recorded_commands("llm_pruner", preset)


def test_layer_range_scales_with_depth_and_lora_needs_hub_data(tmp_path, llama2_shaped_dir):
    ctx = context_for(job_for("llm_pruner", "block-50"), tmp_path, model_dir=llama2_shaped_dir)
    prune = ADAPTER.steps(ctx)[0].argv
    assert prune[prune.index("--block_mlp_layer_start") + 1] == "0" and prune[prune.index("--block_mlp_layer_end") + 1] == "2"
    assert [s.name for s in ADAPTER.steps(ctx)] == ["prune", "export"]  # offline: no alpaca, no LoRA step
    # the Taylor examples upstream drew are kept, for parity with the reference engine's
    assert ADAPTER.steps(ctx)[0].save == [{"after": "LLMPruner.datasets.example_samples:get_examples", "model": "return",
                                           "torch_save": str(ctx.work / "taylor_examples.pt")}]
    ctx.staged.offline = False
    lora = ADAPTER.steps(ctx)[-1]
    assert lora.name == "lora" and "--data_path" in lora.argv and lora.time == ["transformers.trainer:Trainer.train"]
    # a ratio that removes less than one of the 4 heads: upstream fails on an empty torch.cat, so refused up front
    with pytest.raises(UnsupportedModelError, match=r"--pruning_ratio 0.2 removes \d+ of the 64 query channels .* at least 0.25 "):
        ADAPTER.steps(context_for(job_for("llm_pruner", "block-50", pruning_ratio=0.2), tmp_path, model_dir=llama2_shaped_dir))
    assert ADAPTER.steps(context_for(job_for("llm_pruner", "block-20"), tmp_path, model_dir=llama2_shaped_dir))  # 0.25: one head
    with pytest.raises(ValueError, match="64 tokens"):
        ADAPTER.steps(context_for(job_for("llm_pruner", "block-50", example_seqlen=128), tmp_path))


def test_models_upstream_cannot_run_as_they_are_are_refused_up_front(tmp_path, llama2_shaped_dir, embedded_model_dir):
    """hf_prune.py's LLaMA copy has no GQA and a fixed rotary base, and it loads LlamaTokenizer:
    the embedded SmolLM2 is refused before upstream starts, naming each reason, and so is each
    single deviation from the LLaMA-2 shape, which itself passes."""
    check_model(llama2_shaped_dir)
    with pytest.raises(UnsupportedModelError) as refused:
        ADAPTER.steps(context_for(job_for("llm_pruner", "block-50"), tmp_path, model_dir=embedded_model_dir))
    message = str(refused.value)
    assert "\n" not in message and message.endswith("use --engine reference")
    for reason in ("grouped-query attention (9 query heads, 3 KV heads)", "rope_theta 100000", "no sentencepiece tokenizer.model"):
        assert reason in message
    config = json.loads((llama2_shaped_dir / "config.json").read_text())
    for change, reason in ((dict(num_key_value_heads=1), "grouped-query"), (dict(rope_parameters={"rope_theta": 5e5}), "rope_theta 500000"),
                           (dict(model_type="mistral"), "model_type mistral"), (dict(vocab_size=4000), "a vocabulary of 4000")):
        (llama2_shaped_dir / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedModelError, match=reason):
            check_model(llama2_shaped_dir)


def _prune_layer(model, i: int) -> None:
    """Remove one KV group (2 query heads + 1 KV head of 16 dims) and half the MLP channels of layer i,
    as LLM-Pruner's coupled pruning does (rows of q/k/v/gate/up, columns of o/down)."""
    attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp

    def keep(linear, rows=None, cols=None):
        w = linear.weight.data
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight.data = w.clone()
        return new

    q, kv = torch.arange(32), torch.arange(16)
    attn.q_proj, attn.k_proj, attn.v_proj = keep(attn.q_proj, q), keep(attn.k_proj, kv), keep(attn.v_proj, kv)
    attn.o_proj = keep(attn.o_proj, cols=q)
    ch = torch.arange(64)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = keep(mlp.gate_proj, ch), keep(mlp.up_proj, ch), keep(mlp.down_proj, cols=ch)
    attn.num_heads = 2


def test_export_merge_and_convert(tmp_path, tiny_llama_dir, data_dir):
    """`--save_model` pickles {'model': <module>, 'tokenizer': ...} (hf_prune.py). Upstream's
    vendored classes cannot be imported here, so the pickle holds a transformers LlamaForCausalLM
    pruned the same way (layer 1: one KV group, half the MLP channels), with the per-layer
    `rotary_emb.inv_freq` buffers the vendored class saves (seen on a real upstream run), which
    exercises the same unpickling, state-dict and shape export. The LoRA adapter is in the vendored peft's key layout."""
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("llm_pruner", "block-50"), tmp_path, model_dir=tiny_llama_dir, data_dir=data_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    _prune_layer(model, 1)
    for layer in model.model.layers:  # the vendored LLaMA keeps rotary frequencies as a persistent buffer per layer
        layer.self_attn.rotary_emb = torch.nn.Module()
        layer.self_attn.rotary_emb.register_buffer("inv_freq", torch.rand(8), persistent=True)
    checkpoint = ADAPTER.checkpoint(ctx)
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": model.half(), "tokenizer": None}, checkpoint)
    proc = subprocess.run([sys.executable, str(EXPORT), "--checkpoint", str(checkpoint), "--out", str(ctx.work / "pruned")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shapes = json.loads((ctx.work / "pruned" / "shapes.json").read_text())
    assert shapes["linears"]["model.layers.1.mlp.up_proj"] == [64, 64] and shapes["linears"]["model.layers.0.mlp.up_proj"] == [128, 64]

    (ctx.work / "tune_log").mkdir()
    a, b = torch.randn(8, 64) * 0.01, torch.randn(32, 8) * 0.01
    torch.save({"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": a,
                "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": b}, ctx.work / "tune_log" / "adapter_model.bin")
    (ctx.work / "tune_log" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    examples = torch.randint(0, 100, (10, 64))  # what the shim's torch_save hook keeps of get_examples' return
    torch.save(examples, ADAPTER.examples_file(ctx))
    declaration = ADAPTER.convert(ctx)
    assert any(n.startswith("taylor: 10 x 64 tokens from upstream's get_examples") and n.endswith(examples_digest(examples))
               for n in declaration.notes), declaration.notes
    assert declaration.sparsity_pattern == "structured" and declaration.layers["model.layers.1.mlp.down_proj"].shape == [64, 64]
    assert declaration.layers["model.layers.1.mlp.down_proj"].sparsity == pytest.approx(0.5)
    assert 0 < declaration.measured_sparsity < 0.5 and any("merged into 1 linears" in n for n in declaration.notes)

    write_record(ctx.model_out / "compression.json", declaration.model_copy(update={"preset": "block-50"}))
    loaded = load_structured_pruned(ctx.model_out, dtype=torch.float32)
    expected = model.model.layers[1].self_attn.q_proj.weight.float() + b @ a * 2
    assert torch.allclose(loaded.model.layers[1].self_attn.q_proj.weight, expected.half().float(), atol=1e-3)
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_merge_refuses_an_adapter_for_a_missing_linear():
    with pytest.raises(ConversionError, match="does not have"):
        merge_lora({}, {"base_model.model.x.lora_A.weight": torch.zeros(1, 1), "base_model.model.x.lora_B.weight": torch.zeros(1, 1)},
                   {"r": 1, "lora_alpha": 1})


def test_convert_without_export_fails_clearly(tmp_path, tiny_llama_dir):
    with pytest.raises(ConversionError, match="upstream_export.py"):
        ADAPTER.convert(context_for(job_for("llm_pruner", "block-50"), tmp_path, model_dir=tiny_llama_dir))
