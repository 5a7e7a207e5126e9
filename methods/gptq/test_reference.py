"""GPTQ reference engine: at most 2^bits levels per group, weights exactly on their
scale * (q - zero) grids, GPTQ beats round-to-nearest on a layer's calibration inputs, the
packed GPTQ checkpoint decodes (with an unpacker written here, independent of the packer) to
exactly the dequantized weights at about bits/16 of the fp16 size, act-order, determinism,
parameter checks, and a W4A16 g128 run on the embedded model."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmcbench.methods._engine.blockwise import find_linears
from llmcbench.methods._engine.hessian import LayerHessian
from llmcbench.methods._engine.testing import block_linears, c4_loss, calibration_and_held_out, decode_checkpoint, load, read_method_toml
from llmcbench.methods.gptq.reference import GPTQSettings, compress, gptq_quantize, grid_for, quantize
from llmcbench.tracks.inference.measure import eval_inference_memory

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, tiny_calibration, tmp_path_factory):
    """params -> (quantized model, declaration, packed dir, packed format), once per params."""
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            model = load(tiny_llama_dir)
            output = compress(model, tiny_calibration, params, CPU)
            packed = tmp_path_factory.mktemp("packed")
            cache[key] = model, output.declaration, packed, output.export_packed(packed)
        return cache[key]

    return get


def test_every_group_has_at_most_2_to_the_bits_levels(quantized):
    model, declaration, _, _ = quantized(weight_bits=4, group_size=32)
    for name, linear in block_linears(model).items():
        groups = linear.weight.reshape(linear.out_features, -1, 32)
        for row in range(linear.out_features):
            for group in range(groups.shape[1]):
                assert groups[row, group].unique().numel() <= 16, (name, row, group)
    assert (declaration.method, declaration.weight_bits, declaration.act_bits, declaration.group_size,
            declaration.symmetric, declaration.sparsity_pattern) == ("gptq", 4, 16, 32, False, "none")
    assert set(declaration.layers) == set(block_linears(model))
    assert all(layer.weight_bits == 4 for layer in declaration.layers.values())


def test_only_block_linears_change(quantized, tiny_llama_dir):
    model, _, _, _ = quantized(weight_bits=4, group_size=32)
    dense = load(tiny_llama_dir).state_dict()
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, dense[key])}
    assert changed == {f"{name}.weight" for name in block_linears(model)}


@pytest.mark.parametrize("params", [
    {"weight_bits": 4, "group_size": 32},
    {"weight_bits": 3, "group_size": -1, "act_order": True},
    {"weight_bits": 4, "group_size": 32, "sym": True, "act_order": True},
    {"weight_bits": 8, "group_size": 16, "blocksize": 24},
], ids=["4bit-g32", "3bit-channel-actorder", "4bit-g32-sym-actorder", "8bit-g16-blocks24"])
def test_weights_lie_exactly_on_their_grid(layer0_inputs, params):
    model, inputs = layer0_inputs
    settings = GPTQSettings.from_params(params)
    for name, linear in find_linears(model.model.layers[0]).items():
        stats = LayerHessian(linear)
        stats.add_batch(inputs[name])
        weight, grid = gptq_quantize(linear.weight.data, stats.hessian, settings, name)
        codes = grid.encode(weight)
        assert torch.equal(grid.dequantize(codes), weight), name
        assert int(codes.min()) >= 0 and int(codes.max()) <= settings.maxq
        assert int(grid.zeros.min()) >= 0 and int(grid.zeros.max()) <= settings.maxq
        assert torch.equal(grid.scales.half().float(), grid.scales)  # stored in fp16 without loss
        if settings.sym:
            assert torch.all(grid.zeros == 2 ** (settings.weight_bits - 1))
        columns = linear.in_features
        size = columns if settings.group_size == -1 else settings.group_size
        groups = -(-columns // size)
        assert grid.scales.shape == grid.zeros.shape == (groups, linear.out_features)
        counts = torch.bincount(grid.group_index.long(), minlength=groups)
        assert counts.numel() == groups and int(counts.sum()) == columns and bool((counts <= size).all())


def _output_error(x: torch.Tensor, dense: torch.Tensor, quantized: torch.Tensor) -> float:
    return torch.linalg.norm(x @ dense.t() - x @ quantized.t()).item()


def _round_to_nearest(weight: torch.Tensor, settings: GPTQSettings) -> torch.Tensor:
    """RTN with the same grid choice: each group's min/max grid from the original weights."""
    size = settings.group_size if settings.group_size != -1 else weight.shape[1]
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[1], size):
        group = weight[:, start:start + size]
        scale, zero = grid_for(group, settings)
        out[:, start:start + size] = quantize(group, scale.unsqueeze(1), zero.unsqueeze(1), settings.maxq)
    return out


@pytest.mark.parametrize("params", [
    {"weight_bits": 4, "group_size": 32},
    {"weight_bits": 3, "group_size": -1},
    {"weight_bits": 3, "group_size": -1, "act_order": True},
], ids=["4bit-g32", "3bit-channel", "3bit-channel-actorder"])
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(layer0_inputs, params):
    model, inputs = layer0_inputs
    settings = GPTQSettings.from_params(params)
    for name, linear in find_linears(model.model.layers[0]).items():
        x, weight = inputs[name], linear.weight.data
        stats = LayerHessian(linear)
        stats.add_batch(x)
        quantized, _ = gptq_quantize(weight, stats.hessian, settings, name)
        gptq, rtn = _output_error(x, weight, quantized), _output_error(x, weight, _round_to_nearest(weight, settings))
        assert gptq < 0.97 * rtn, (name, gptq, rtn)


@pytest.mark.parametrize("params,packed_format,desc_act", [
    ({"weight_bits": 4, "group_size": 32}, "gptq", False),
    ({"weight_bits": 3, "group_size": -1, "act_order": True, "true_sequential": True}, "gptq", False),
    ({"weight_bits": 4, "group_size": 32, "act_order": True}, "gptq", True),
    ({"weight_bits": 8, "group_size": 32, "sym": True, "act_order": True, "static_groups": True}, "gptq", False),
    ({"weight_bits": 2, "group_size": 64}, "gptq", False),
], ids=["4bit-g32", "3bit-channel-actorder-seq", "4bit-g32-actorder", "8bit-g32-sym-static", "2bit-g64"])
def test_packed_checkpoint_decodes_exactly_to_the_dequantized_weights(quantized, params, packed_format, desc_act):
    model, declaration, packed, fmt = quantized(**params)
    assert fmt == packed_format
    config, weights, codes = decode_checkpoint(packed)
    settings = GPTQSettings.from_params(params)
    assert {key: config[key] for key in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": settings.weight_bits, "group_size": settings.group_size, "sym": settings.sym,
        "desc_act": desc_act, "checkpoint_format": "gptq"}
    linears = block_linears(model)
    assert set(weights) == set(linears)
    for name, linear in linears.items():
        assert torch.equal(weights[name], linear.weight.data), name
        assert int(codes[name].max()) <= 2 ** settings.weight_bits - 1
    tensors = load_file(str(packed / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to the embeddings, stored once
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"].long()
    contiguous = torch.arange(g_idx.numel()) // (settings.group_size if settings.group_size != -1 else g_idx.numel())
    assert torch.equal(g_idx, contiguous) != desc_act
    assert json.loads((packed / "quantize_config.json").read_text())["bits"] == settings.weight_bits


def test_packed_linears_take_bits_over_16_of_fp16(quantized):
    model, _, packed, _ = quantized(weight_bits=4, group_size=32)
    tensors = load_file(str(packed / "model.safetensors"))
    fp16_bytes = sum(linear.weight.numel() * 2 for linear in block_linears(model).values())
    qweight_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(".qweight"))
    assert qweight_bytes == fp16_bytes * 4 // 16
    overhead = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".qzeros", ".scales", ".g_idx")))
    # per group and output channel an fp16 scale and a 4-bit zero; per input column an int32 g_idx
    expected = sum(linear.in_features // 32 * linear.out_features * (2 + 0.5) + linear.in_features * 4
                   for linear in block_linears(model).values())
    assert overhead == expected


def test_zero_point_zero_switches_to_the_v2_format(tiny_llama_dir, tiny_calibration, tmp_path):
    """An asymmetric row with no negative weight has zero point 0, which the v1 format
    (zero - 1) cannot hold: the export says gptq_v2 and stores zeros as they are."""
    model = load(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0].abs_()
    output = compress(model, tiny_calibration, {"weight_bits": 4, "group_size": -1}, CPU)
    assert output.export_packed(tmp_path) == "gptq_v2"
    config, weights, _ = decode_checkpoint(tmp_path)
    assert config["checkpoint_format"] == "gptq_v2"
    for name, linear in block_linears(model).items():
        assert torch.equal(weights[name], linear.weight.data), name


def test_same_calibration_same_weights(tiny_llama_dir, tiny_calibration, quantized):
    first, _, _, _ = quantized(weight_bits=4, group_size=32)
    again = load(tiny_llama_dir)
    compress(again, tiny_calibration, {"weight_bits": 4, "group_size": 32}, CPU)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_widths_that_do_not_fill_int32_words_are_refused_before_any_weight_changes():
    """3-bit codes pack 32 to three int32 words: a model of width 48 cannot be written as a GPTQ
    checkpoint, which the engine says before quantizing (every odd shape named) and the shared
    writer's check says of any one grid (OmniQuant's export asks it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcbench.methods._engine.gptq_format import QuantizationGrid, unpackable_reason

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^gptq: the 3-bit GPTQ checkpoint packs 32 values per int32 group, so it needs in "
                                         r"and out features divisible by 32; the model has linears of 48x48, 48x96, 96x48$"):
        compress(model, torch.randint(0, 64, (2, 16)), {"weight_bits": 3}, CPU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    grid = QuantizationGrid(3, torch.ones(1, 96), torch.zeros(1, 96, dtype=torch.int16), torch.zeros(48, dtype=torch.int32))
    assert unpackable_reason(model, {"model.layers.0.mlp.up_proj": grid}) == (
        "the 3-bit GPTQ checkpoint packs 32 codes per int32 group and model.layers.0.mlp.up_proj is 96x48")
    # 4-bit codes pack 8 to a word: the same linear packs
    assert unpackable_reason(model, {"model.layers.0.mlp.up_proj": QuantizationGrid(4, grid.scales, grid.zeros, grid.group_index)}) is None


@pytest.mark.parametrize("params,message", [
    ({}, "needs weight_bits"),
    ({"weight_bits": 5}, "not supported"),
    ({"weight_bits": 16}, "not supported"),
    ({"weight_bits": 4.0}, "not supported"),
    ({"weight_bits": 4, "group_size": 0}, "group_size"),
    ({"weight_bits": 4, "group_size": -2}, "group_size"),
    ({"weight_bits": 4, "sym": "yes"}, "true or false"),
    ({"weight_bits": 4, "static_groups": True}, "needs a group_size"),
    ({"weight_bits": 4, "percdamp": -1}, "percdamp"),
    ({"weight_bits": 4, "blocksize": 0}, "blocksize"),
    ({"bits": 4}, "unknown parameter"),
    ({"weight_bits": 4, "pattern": "2:4"}, "unknown parameter"),
])
def test_bad_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        GPTQSettings.from_params(params)


def test_method_toml_declares_upstream_and_valid_presets():
    declaration = read_method_toml(Path(__file__).parent, name="gptq", kind="weight-quantization",
                                   repo="https://github.com/IST-DASLab/gptq",
                                   commit="2d65066eeb06a5c9ff5184d8cebdf33662c67faf", license="Apache-2.0")
    assert declaration["calibration"] == {"dataset": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0}
    presets = declaration["presets"]
    assert {"w8a16", "w4a16-g128", "w3a16"} <= set(presets)
    assert declaration["paper_preset"] == "w8a16"
    expected = {"w8a16": (8, -1), "w4a16-g128": (4, 128), "w3a16": (3, -1)}
    for name, (bits, group_size) in expected.items():
        settings = GPTQSettings.from_params(presets[name])
        assert (settings.weight_bits, settings.group_size, settings.percdamp, settings.blocksize) == (
            bits, group_size, 0.01, 128)


def test_embedded_model_w4a16_g128(embedded_model_dir, data_dir, tmp_path):
    calibration, held_out = calibration_and_held_out(embedded_model_dir, data_dir, nsamples=8)
    model = load(embedded_model_dir)
    dense_loss = c4_loss(model, held_out)
    preset = tomllib.loads((Path(__file__).parent / "method.toml").read_text())["presets"]["w4a16-g128"]
    output = compress(model, calibration, preset, CPU)
    quantized_loss = c4_loss(model, held_out)

    packed = tmp_path / "packed"  # beside the weights, where track 4 finds an artifact's export
    packed.mkdir()
    assert output.export_packed(packed) == "gptq"
    _, weights, _ = decode_checkpoint(packed)
    linears = block_linears(model)
    assert len(linears) == 30 * 7 == len(weights)
    assert all(torch.equal(weights[name], linear.weight.data) for name, linear in linears.items())
    tensors = load_file(str(packed / "model.safetensors"))
    linear_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")))
    fp16_bytes = sum(linear.weight.numel() * 2 for linear in linears.values())
    packed_bytes = (packed / "model.safetensors").stat().st_size
    checkpoint_bytes = (Path(embedded_model_dir) / "model.safetensors").stat().st_size
    print(f"embedded model C4 loss: dense {dense_loss:.4f}, gptq w4a16-g128 {quantized_loss:.4f}; packed linears "
          f"{linear_bytes / fp16_bytes:.3f} of fp16, checkpoint {packed_bytes / 1e6:.1f} MB vs fp32 {checkpoint_bytes / 1e6:.1f} MB")
    assert 0.25 < linear_bytes / fp16_bytes < 0.28  # 4/16, plus fp16 scales and packed zeros per 128 weights
    assert torch.isfinite(torch.tensor(quantized_loss))
    assert dense_loss * 0.98 < quantized_loss < dense_loss * 1.25
    # track 4 measures the export as deployed: SmolLM2's 576 inputs in groups of 128 on torch's
    # int4 kernel (groups of 64), 4-bit codes where the checkpoint holds fp32 (its embeddings apart)
    memory = eval_inference_memory(model, tmp_path, output.declaration, seqlen=128, device=CPU)
    print(f"track 4 inference memory: {memory['inference_memory_bytes'] / 1e6:.1f} MB packed, "
          f"{memory['inference_memory_checkpoint_bytes'] / 1e6:.1f} MB as the checkpoint")
    assert memory["inference_memory_form"] == "packed export on aten._weight_int4pack_mm_for_cpu"
    assert memory["inference_memory_bytes"] < 0.5 * memory["inference_memory_checkpoint_bytes"]
