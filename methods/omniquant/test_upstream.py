"""OmniQuant's upstream adapter: the command lines per preset (against method.toml's recorded
commands), the --net label, upstream's log lines, and the conversion of `--save_dir` with the
activation bits declared (upstream does not store them)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.registry import get_method
from llmcbench.methods._upstream.convert import ConversionError
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.omniquant.upstream import ADAPTER, net_label


@pytest.mark.parametrize("preset", list(get_method("omniquant").presets))
def test_every_preset_builds_the_recorded_commands(tmp_path, preset):
    assert built_commands(context_for(job_for("omniquant", preset), tmp_path)) == recorded_commands("omniquant", preset)


def test_quick_profile_and_hooks(tmp_path):
    steps = ADAPTER.steps(context_for(job_for("omniquant", "w4a4", profile="quick"), tmp_path))
    main = steps[-1]
    assert main.argv[main.argv.index("--epochs") + 1] == "2"  # [profiles.quick] reaches upstream
    assert main.time == ["quantize.omniquant:omniquant"] and main.outputs[0].endswith("model/config.json")
    assert steps[0].time == ["__main__:get_act_scales", "__main__:get_act_shifts"]
    assert len(ADAPTER.steps(context_for(job_for("omniquant", "w4a16-g128"), tmp_path))) == 1  # no LET: no act scales


def test_let_on_grouped_query_attention_is_refused_up_front(tmp_path, tiny_llama_dir, embedded_model_dir):
    """Upstream's LET folds v_proj into o_proj channel for channel and stops at the first block of
    a GQA model: a LET preset on one is refused in one line before upstream starts; the preset
    without LET, and LET on multi-head attention, are not."""
    from llmcbench.methods._engine.blockwise import UnsupportedModelError

    for model, heads in ((tiny_llama_dir, "4 query heads, 2 KV heads"), (embedded_model_dir, "9 query heads, 3 KV heads")):
        with pytest.raises(UnsupportedModelError) as refused:
            ADAPTER.steps(context_for(job_for("omniquant", "w8a8"), tmp_path, model_dir=model))
        assert f"grouped-query attention ({heads})" in str(refused.value) and "\n" not in str(refused.value)
    assert len(ADAPTER.steps(context_for(job_for("omniquant", "w4a16-g128"), tmp_path, model_dir=tiny_llama_dir))) == 1
    mha = tmp_path / "mha"
    mha.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (mha / "config.json").write_text(json.dumps({**config, "num_key_value_heads": config["num_attention_heads"]}))
    assert len(ADAPTER.steps(context_for(job_for("omniquant", "w8a8"), tmp_path, model_dir=mha))) == 2


def test_net_label_follows_the_model_family(tmp_path):
    model = tmp_path / "smollm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ctx = context_for(job_for("omniquant", "w8a8"), tmp_path, model_dir=model)
    assert net_label(ctx) == "Llama-2-7b"
    (model / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert net_label(ctx) == "opt-1.3b"
    (model / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(NotImplementedError, match="chatglm"):
        net_label(ctx)


def test_parse_metrics_reads_upstream_log():
    # main.py evaluate(): logger.info(f'{dataset} : {ppl.item()}')
    log = "[2026-11-23 10:00:00 root](main.py 144): INFO wikitext2 : 14.263900756835938\n"
    assert ADAPTER.parse_metrics(log) == {"wikitext2_ppl": pytest.approx(14.2639, rel=1e-5)}


def test_convert_save_dir_and_declare_activations(tmp_path, tiny_llama_dir, data_dir):
    """`--save_dir`: `lm.model.save_pretrained(dir)` and the tokenizer, after the LWC/LET
    parameters were deleted and the quantized weights written in place (per output channel,
    asymmetric, 2^bits - 1 steps between the clipped bounds). Mirrored with a tiny LLaMA; the
    artifact evaluates with the declared 4-bit per-token activations applied."""
    from llmcbench.tracks.fakequant import apply_declared_activation_quant
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("omniquant", "w4a4"), tmp_path, model_dir=tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            w = linear.weight.data
            lo, hi = w.amin(1, keepdim=True) * 0.9, w.amax(1, keepdim=True) * 0.9  # clipped bounds (LWC)
            scale = (hi - lo) / 15
            zero = torch.round(-lo / scale)
            linear.weight.data = (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale
    model.half().save_pretrained(ctx.work / "model")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(ctx.work / "model")
    declaration = ADAPTER.convert(ctx)
    assert (declaration.weight_bits, declaration.act_bits, declaration.act_granularity) == (4, 4, "per_token")
    loaded = AutoModelForCausalLM.from_pretrained(ctx.model_out, dtype=torch.float32)
    assert apply_declared_activation_quant(loaded, declaration) is not None
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_unquantized_output_is_refused(tmp_path, tiny_llama_dir):
    ctx = context_for(job_for("omniquant", "w4a4"), tmp_path, model_dir=tiny_llama_dir)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(ctx.work / "model")
    with pytest.raises(ConversionError, match="4-bit grid"):
        ADAPTER.convert(ctx)
