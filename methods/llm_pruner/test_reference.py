"""LLM-Pruner reference engine: group counts per layer, coupled shapes, the per-layer-shape
artifact round trip, uniform mode's standard config, LoRA recovery, Taylor vs random
importance, parameter checks and the presets."""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from llmcbench.driver.registry import discover
from llmcbench.methods._engine.blockwise import UnsupportedModelError
from llmcbench.methods._engine.calibration import sample_calibration
from llmcbench.methods._engine.structured import declared_shapes, load_structured_pruned
from llmcbench.methods.llm_pruner.reference import (
    PrunerSettings,
    compress,
    layer_layout,
    layer_ranges,
    lora_recover,
    pruned_count,
    validate_params,
)
from llmcbench.driver.contract import Compression

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def c4_file(data_dir: Path) -> Path:
    return data_dir / "hf" / "allenai__c4" / "en" / "train.jsonl"


def load(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def layouts(model):
    return [layer_layout(layer) for layer in model.model.layers]


@pytest.fixture(scope="module")
def tiny_calibration(tiny_llama_dir, data_dir) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return sample_calibration(tokenizer, nsamples=8, seqlen=128, seed=0, data_file=c4_file(data_dir)).input_ids


@pytest.fixture(scope="module")
def embedded_calibration(embedded_model_dir, data_dir) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    return sample_calibration(tokenizer, nsamples=16, seqlen=128, seed=0, data_file=c4_file(data_dir)).input_ids


@pytest.fixture(scope="module")
def heldout(embedded_model_dir, data_dir) -> torch.Tensor:
    """4 windows of 256 tokens of WikiText-2 test (never seen by calibration or LoRA)."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    lines = (data_dir / "hf" / "Salesforce__wikitext" / "wikitext-2-raw-v1" / "test.jsonl").read_text().splitlines()
    import json

    text = "".join(json.loads(line)["text"] for line in lines[:400])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= 4 * 256
    return ids[: 4 * 256].reshape(4, 256)


@torch.no_grad()
def perplexity(model, windows) -> float:
    return math.exp(float(model(input_ids=windows, labels=windows).loss))


@pytest.fixture(scope="module")
def embedded_dense(embedded_model_dir):
    model = load(embedded_model_dir)
    return sum(p.numel() for p in model.parameters()), layouts(model)


@pytest.fixture(scope="module")
def embedded_pruned(embedded_model_dir, embedded_calibration):
    """The embedded model pruned by the paper preset's ratio, no LoRA: (model, declaration)."""
    model = load(embedded_model_dir)
    declaration = compress(model, embedded_calibration, {"pruning_ratio": 0.5, "lora_steps": 0}, CPU)
    return model, declaration


def check_group_counts(model, dense_layouts, settings: PrunerSettings):
    attn_range, mlp_range = layer_ranges(settings, len(dense_layouts))
    for i, (dense, now) in enumerate(zip(dense_layouts, layouts(model))):
        assert (now.head_dim, now.heads_per_group) == (dense.head_dim, dense.heads_per_group), i
        width = dense.head_dim * dense.heads_per_group
        want_kv = dense.kv_heads - (pruned_count(dense.kv_heads, settings.pruning_ratio, width) if i in attn_range else 0)
        want_mlp = dense.intermediate - (pruned_count(dense.intermediate, settings.pruning_ratio) if i in mlp_range else 0)
        assert (now.kv_heads, now.intermediate) == (want_kv, want_mlp), i
        if i in attn_range:  # the share removed is the ratio within one group's granularity
            assert abs((dense.kv_heads - now.kv_heads) / dense.kv_heads - settings.pruning_ratio) < 1 / dense.kv_heads
        if i in mlp_range:
            assert abs((dense.intermediate - now.intermediate) / dense.intermediate - settings.pruning_ratio) < 1 / dense.intermediate


def check_coupled_shapes(model):
    for i, layer in enumerate(model.model.layers):
        a, m, lay = layer.self_attn, layer.mlp, layer_layout(layer)
        assert a.q_proj.weight.shape[0] == a.o_proj.weight.shape[1] == lay.kv_heads * lay.heads_per_group * lay.head_dim, i
        assert a.k_proj.weight.shape == a.v_proj.weight.shape, i
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape, i
        assert m.down_proj.weight.shape[1] == m.gate_proj.weight.shape[0], i
        assert a.q_proj.in_features == a.q_proj.weight.shape[1] and a.q_proj.out_features == a.q_proj.weight.shape[0]


def prunable_fraction_removed(declaration: Compression, ranges) -> float:
    """Share of the weights of the linears in the pruned layers that is gone."""
    attn_range, mlp_range = ranges
    removed = total = 0
    for name, layer in declaration.layers.items():
        index = int(name.split(".")[2])
        part = "attn" if ".self_attn." in name else "mlp"
        if index in (attn_range if part == "attn" else mlp_range):
            now = math.prod(layer.shape)
            before = now / (1 - layer.sparsity)
            removed += before - now
            total += before
    return removed / total


def test_tiny_llama_prunes_the_ratio_of_groups(tiny_llama_dir, tiny_calibration):
    model = load(tiny_llama_dir)
    dense = layouts(model)
    settings = PrunerSettings.from_params({"pruning_ratio": 0.5, "lora_steps": 0})
    declaration = compress(model, tiny_calibration, {"pruning_ratio": 0.5, "lora_steps": 0}, CPU)
    check_group_counts(model, dense, settings)
    check_coupled_shapes(model)
    # 2 layers: the scaled 4..30-of-32 rule prunes both; 2 KV groups -> 1, 128 channels -> 64
    assert [(x.kv_heads, x.intermediate) for x in layouts(model)] == [(1, 64), (1, 64)]
    assert declaration.sparsity_pattern == "structured" and declaration.target_sparsity == 0.5
    assert declaration.measured_sparsity == pytest.approx(0.5)
    assert model(tiny_calibration[:2]).logits.shape == (2, 128, model.config.vocab_size)


def test_embedded_model_prunes_the_ratio_in_the_middle_layers(embedded_pruned, embedded_dense):
    model, declaration = embedded_pruned
    dense_params, dense = embedded_dense
    settings = PrunerSettings.from_params({"pruning_ratio": 0.5})
    ranges = layer_ranges(settings, 30)
    assert (ranges[0], ranges[1]) == (range(4, 28), range(4, 28))
    check_group_counts(model, dense, settings)
    check_coupled_shapes(model)
    now = layouts(model)
    assert all(now[i] == dense[i] for i in (0, 1, 2, 3, 28, 29))  # first 4 and last 2 kept, as upstream
    # 3 KV groups of 3 query heads (192 of q_proj's 576 rows each): upstream's count removes
    # 576 - int(576 x 0.5) = 288 rows, one whole group; the MLP loses half its 1536 channels
    assert all((now[i].kv_heads, now[i].intermediate) == (2, 768) for i in range(4, 28))
    # parameter share removed in the pruned layers: between the attention's 1/3 and the MLP's 50%
    fraction = prunable_fraction_removed(declaration, ranges)
    assert 1 / 3 <= fraction <= 0.5
    after = sum(p.numel() for p in model.parameters())
    assert f"parameters {dense_params} -> {after}" in " ".join(declaration.notes)


def test_pruned_model_runs_and_round_trips_through_the_loader(embedded_pruned, embedded_model_dir, heldout, tmp_path):
    from llmcbench.driver import jobrun
    from llmcbench.driver.fsio import write_record

    model, declaration = embedded_pruned
    with torch.no_grad():
        logits = model(heldout[:2]).logits
    assert logits.shape == (2, 256, model.config.vocab_size) and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(tmp_path)
    write_record(tmp_path / "compression.json", declaration)
    assert declared_shapes(tmp_path)["model.layers.4.self_attn.q_proj"] == [384, 576]
    with pytest.raises(Exception):  # per-layer shapes: a plain from_pretrained cannot build it
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reloaded = load_structured_pruned(tmp_path)
    job = SimpleNamespace(dtype="float32", model=SimpleNamespace(trust_remote_code=False))
    via_job, _ = jobrun.load_model(tmp_path, job)
    with torch.no_grad():
        assert torch.equal(reloaded(heldout[:2]).logits, logits)
        assert torch.equal(via_job(heldout[:2]).logits, logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_uniform_gives_a_standard_config(tiny_llama_dir, tiny_calibration, tmp_path):
    model = load(tiny_llama_dir)
    declaration = compress(model, tiny_calibration, {"pruning_ratio": 0.5, "uniform": True, "lora_steps": 0}, CPU)
    shapes = {(x.kv_heads, x.heads_per_group, x.head_dim, x.intermediate) for x in layouts(model)}
    assert shapes == {(1, 2, 16, 64)}
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 1, 16, 64)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # no helper needed
    with torch.no_grad():
        assert torch.equal(plain(tiny_calibration[:2]).logits, model(tiny_calibration[:2]).logits)
    assert declaration.measured_sparsity == pytest.approx(0.5)


def test_uniform_prunes_first_and_last_layers_of_the_embedded_model_too():
    settings = PrunerSettings.from_params({"pruning_ratio": 0.2, "uniform": True})
    assert layer_ranges(settings, 30) == (range(30), range(30))
    default = PrunerSettings.from_params({"pruning_ratio": 0.2})
    assert layer_ranges(default, 32) == (range(4, 30), range(4, 30))  # upstream's LLaMA-7B flags


def test_lora_recovery_lowers_heldout_perplexity(embedded_pruned, embedded_calibration, heldout):
    model = copy.deepcopy(embedded_pruned[0])
    before = perplexity(model, heldout)
    settings = PrunerSettings.from_params({"pruning_ratio": 0.5, "lora_steps": 12, "lora_seqlen": 64, "lora_lr": 1e-4})
    first, last = lora_recover(model, embedded_calibration, settings)
    after = perplexity(model, heldout)
    print(f"held-out WikiText-2 ppl after pruning {before:.2f}, after LoRA {after:.2f} (train loss {first:.3f} -> {last:.3f})")
    assert after < before
    assert all(type(m) is nn.Linear for name, m in model.named_modules() if name.endswith(("_proj", "lm_head")))
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_taylor_importance_beats_random_groups(embedded_pruned, embedded_model_dir, embedded_calibration, heldout):
    taylor = embedded_pruned[0]
    random_model = load(embedded_model_dir)
    compress(random_model, embedded_calibration, {"pruning_ratio": 0.5, "pruner_type": "random", "lora_steps": 0}, CPU)
    assert [layer_layout(x) for x in random_model.model.layers] == layouts(taylor)  # same counts
    taylor_ppl, random_ppl = perplexity(taylor, heldout), perplexity(random_model, heldout)
    print(f"held-out WikiText-2 ppl at ratio 0.5: taylor {taylor_ppl:.1f}, random {random_ppl:.1f}")
    assert taylor_ppl < random_ppl


@pytest.mark.parametrize("params, message", [
    ({"pruning_ratio": 0.0}, "pruning_ratio must be a number in (0, 1)"),
    ({"pruning_ratio": 1.0}, "pruning_ratio must be a number in (0, 1)"),
    ({"pruning_ratio": -0.2}, "pruning_ratio must be a number in (0, 1)"),
    ({"pruning_ratio": True}, "pruning_ratio must be a number in (0, 1)"),
    ({}, "pruning_ratio is required"),
    ({"pruning_ratio": 0.5, "sparsity": 0.5}, "unknown parameter(s) sparsity"),
    ({"pruning_ratio": 0.5, "taylor": "vectorise"}, "taylor must be one of"),
    ({"pruning_ratio": 0.5, "pruner_type": "l3"}, "pruner_type must be one of"),
    ({"pruning_ratio": 0.5, "uniform": "yes"}, "uniform must be true or false"),
    ({"pruning_ratio": 0.5, "lora_steps": -1}, "lora_steps must be an integer >= 0"),
    ({"pruning_ratio": 0.5, "lora_r": 0}, "lora_r must be an integer >= 1"),
    ({"pruning_ratio": 0.5, "lora_lr": 2.0}, "lora_lr must be a number in"),
    ({"pruning_ratio": 0.5, "mlp_layer_start": 5, "mlp_layer_end": 5}, "mlp_layer_start 5 must be below"),
    ({"pruning_ratio": 0.5, "uniform": True, "attention_layer_start": 2}, "takes no layer range"),
])
def test_bad_params_are_one_line_errors(params, message):
    with pytest.raises(ValueError) as info:
        validate_params(params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_layer_range_past_the_model_is_refused(tiny_llama_dir, tiny_calibration):
    model = load(tiny_llama_dir)
    with pytest.raises(ValueError, match="past the model's 2 layers"):
        compress(model, tiny_calibration, {"pruning_ratio": 0.5, "mlp_layer_end": 3, "lora_steps": 0}, CPU)


def test_non_llama_model_is_unsupported(tiny_calibration):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=128)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        compress(gpt2, tiny_calibration % 64, {"pruning_ratio": 0.5}, CPU)
    assert "\n" not in str(info.value)


def test_presets_pass_validation_and_the_registry():
    spec = discover()["llm_pruner"]
    declared = tomllib.loads((HERE / "method.toml").read_text())
    assert spec.paper_preset == "block-50" and set(spec.presets) == {"block-50", "block-20"}
    for name in spec.presets:
        _, params = spec.preset(name)
        validate_params(params)
        validate_params({**params, "uniform": True})
        assert params["lora_r"] == 8 and params["lora_alpha"] == 16 and params["lora_lr"] == 1e-4
    assert spec.presets["block-50"]["pruning_ratio"] == 0.5 and spec.presets["block-20"]["pruning_ratio"] == 0.25
    assert set(declared["preset_notes"]) == set(spec.presets)
    assert spec.engine_module("reference").compress is compress
    pins = [r for r in declared["image"]["requirements"] if r.startswith("peft==")]
    assert len(pins) == 1


def test_block_50_gives_table_3s_macs_on_llama_2_7b():
    """The paper preset is the setting the paper measured: --pruning_ratio 0.5 in layers 4..29
    removes 39% of LLaMA-2-7B's parameters, not half, yet Table 3's 0.51 TMACs (1 x 128 tokens,
    dense 0.85) are exactly what it leaves. (Half the parameters, a ratio near 0.64, would leave
    0.42; Table 3's 6.75 GB size does not follow from its own MACs.)

    Measured with track 4's FLOP counter on real LLaMA-2-7B-shaped layers, pruned by the
    engine's own functions: a 1- and a 2-layer model give the embedding/head MACs and a dense
    layer's; pruning the second layer gives a pruned layer's; the 32-layer total follows."""
    import csv

    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcbench.methods.llm_pruner.reference import prune_attention, prune_mlp
    from llmcbench.tracks.inference.measure import count_macs

    table3 = {(r["method"], r["model"], r["setting"]): float(r["tmacs"])
              for r in csv.DictReader((HERE.parents[1] / "tracks" / "paper" / "table3_track4_inference.csv").open())}
    settings = PrunerSettings.from_params(discover()["llm_pruner"].preset("block-50")[1])
    attn_range, mlp_range = layer_ranges(settings, 32)
    assert attn_range == mlp_range == range(4, 30)

    def llama_2_7b(layers: int):
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
        return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()

    with torch.no_grad():
        one = count_macs(llama_2_7b(1), 128)["raw_macs"]
        model = llama_2_7b(2)
        two = count_macs(model, 128)["raw_macs"]
        layer = model.model.layers[1]
        layout = layer_layout(layer)
        prune_attention(layer.self_attn, layout, torch.arange(pruned_count(
            layout.kv_heads, settings.pruning_ratio, layout.head_dim * layout.heads_per_group)))
        prune_mlp(layer.mlp, layout, torch.arange(pruned_count(layout.intermediate, settings.pruning_ratio)))
        pruned_two = count_macs(model, 128)["raw_macs"]
    dense_layer = two - one
    ends = one - dense_layer  # embedding, final norm, lm_head
    pruned_layer = pruned_two - one
    assert pruned_layer < 0.55 * dense_layer
    dense = ends + 32 * dense_layer
    block_50 = ends + (32 - len(attn_range)) * dense_layer + len(attn_range) * pruned_layer
    assert round(dense / 1e12, 2) == table3[("dense", "LLaMA-2-7B", "0")] == 0.85
    assert round(block_50 / 1e12, 2) == table3[("LLM-Pruner", "LLaMA-2-7B", "50%")] == 0.51


def _upstream_get_examples(traindata, tokenizer, n_samples, seq_len):
    """horseee/LLM-Pruner `LLMPruner/datasets/example_samples.py` (`get_bookcorpus`, and
    `get_c4` alike) at 128a07d, transcribed as the specification of the draw: the global
    `random` that hf_prune.py seeds with `--seed` first thing."""
    import random

    tokenized_samples, history = [], []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            tokenized_sample = tokenizer(traindata[i]["text"], return_tensors="pt")
            if tokenized_sample.input_ids.shape[1] >= seq_len and i not in history:
                history.append(i)
                break
        i = random.randint(0, tokenized_sample.input_ids.shape[1] - seq_len)
        tokenized_samples.append(tokenized_sample.input_ids[:, i:i + seq_len])
    return torch.cat(tokenized_samples, dim=0)


def test_taylor_examples_are_drawn_as_upstream_draws_them(embedded_model_dir, data_dir):
    """`draw_examples` gives exactly the windows upstream's `get_examples` draws from the same
    documents with the same seed (so the parity of the two engines compares their algorithms on
    the same tokens), not the calibration windows cut to 64 tokens."""
    import random

    from llmcbench.methods._engine.calibration import CalibrationError, local_documents, sample_distinct_windows, sample_windows
    from llmcbench.methods.llm_pruner.reference import draw_examples

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    documents = local_documents(c4_file(data_dir))
    params = {"pruning_ratio": 0.5}  # the defaults: 10 examples of 64 tokens, seed 42, as hf_prune.py
    state = random.getstate()
    try:
        random.seed(42)
        expected = _upstream_get_examples([{"text": d} for d in documents], tokenizer, 10, 64)
    finally:
        random.setstate(state)
    drawn = draw_examples(tokenizer, documents, params)
    assert drawn.shape == (10, 64) and torch.equal(drawn, expected)
    # not what the engine took before: the quick profile's 128-token calibration windows, cut to 64
    assert not torch.equal(drawn, sample_windows(documents, tokenizer, nsamples=10, seqlen=128, seed=42)[:, :64])
    assert not torch.equal(drawn, draw_examples(tokenizer, documents, {**params, "seed": 43}))
    assert draw_examples(tokenizer, documents, {**params, "pruner_type": "l2"}) is None  # no gradients, no examples
    # where upstream would loop forever (too few distinct documents), one line instead
    with pytest.raises(CalibrationError, match="no more distinct documents of at least 64 tokens"):
        sample_distinct_windows(documents[:3], tokenizer, nsamples=4, seqlen=64, seed=42)


def test_the_compress_job_prunes_on_the_drawn_examples(tiny_llama_dir, data_dir, tmp_path, run_cli):
    """The job process hands the engine its drawn examples: the artifact's notes name the draw
    and the examples' sha256, which is what a parity run compares with upstream's."""
    import json

    from llmcbench.methods._engine.calibration import local_documents
    from llmcbench.methods.llm_pruner.reference import draw_examples, examples_digest

    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "llm_pruner", "--model", str(tiny_llama_dir), "--tracks", "3", "--device", "cpu",
                   "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_dir = next(p.parent for p in runs.glob("llm_pruner-*/*/job.json") if json.loads(p.read_text())["kind"] == "compress")
    params = json.loads((job_dir / "job.json").read_text())["params"]
    notes = json.loads((job_dir / "model" / "compression.json").read_text())["notes"]
    taylor = next(n for n in notes if n.startswith("taylor"))
    expected = draw_examples(AutoTokenizer.from_pretrained(tiny_llama_dir), local_documents(c4_file(data_dir)), params)
    assert "drawn as upstream's get_examples (seed 42)" in taylor and f"examples sha256 {examples_digest(expected)}" in taylor


def test_groups_pruned_are_counted_as_upstream():
    """Upstream's pruner (torch_pruning's prune_local) removes C - int(C x (1 - ratio)) of a
    layer's C channels, in whole groups: at LLaMA-7B's shapes (32 heads of 128, 11008 MLP
    channels) that is 9 heads and 3303 channels at 0.3, 19 heads at 0.62, and exactly half at 0.5."""
    for ratio, heads, channels in ((0.25, 8, 2752), (0.3, 9, 3303), (0.5, 16, 5504), (0.62, 19, 6825), (0.65, 20, 7156)):
        assert pruned_count(32, ratio, 128) == heads, ratio
        assert pruned_count(11008, ratio) == channels, ratio
    assert pruned_count(8, 0.5, 4 * 64) == 4  # GQA: 8 KV groups of 4 query heads of 64
    assert pruned_count(4, 0.99, 128) == 3 and pruned_count(4, 0.0, 128) == 0  # one group always kept
