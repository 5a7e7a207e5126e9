"""Track 4 measurement: the FLOP counter's reading, effective MACs after pruning and
quantization, size on disk, inference memory."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.contract import Compression, LayerCompression
from llmcbench.methods._engine.calibration import sample_calibration
from llmcbench.methods.wanda.reference import compress
from llmcbench.tracks.inference.measure import (
    _on_integer_kernels,
    count_macs,
    eval_inference_memory,
    inference_memory_bytes,
    measure_inference_memory,
    model_size,
    size_on_disk_bytes,
)

SEQLEN = 128


def load(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def block_linear_names(model) -> list[str]:
    return [name for name, m in model.model.layers.named_modules(prefix="model.layers") if isinstance(m, nn.Linear)]


@pytest.fixture(scope="module")
def dense_macs(tiny_llama_dir):
    model = load(tiny_llama_dir)
    return model, count_macs(model, seqlen=SEQLEN)


def test_raw_macs_match_the_analytic_count(dense_macs):
    """Linears: tokens * in * out each; attention: QK^T and AV per layer, the full
    seqlen x seqlen matrix as torch counts it (heads * seqlen^2 * head_dim each)."""
    model, macs = dense_macs
    config = model.config
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 2 * 7 + 1  # blocks + lm_head
    for name, linear in linears.items():
        assert macs["linears"][name]["raw_macs"] == SEQLEN * linear.in_features * linear.out_features, name
    linear_macs = sum(SEQLEN * m.in_features * m.out_features for m in linears.values())
    head_dim = config.hidden_size // config.num_attention_heads
    attention_macs = config.num_hidden_layers * 2 * config.num_attention_heads * SEQLEN * SEQLEN * head_dim
    assert macs["linear_raw_macs"] == linear_macs
    assert macs["raw_macs"] == linear_macs + attention_macs


def test_dense_model_effective_equals_raw(dense_macs):
    _, macs = dense_macs
    assert macs["effective_macs"] == macs["raw_macs"]
    assert macs["linear_effective_macs"] == macs["linear_raw_macs"]
    assert all(v["density"] == 1.0 and v["weight_bits"] == 16 for v in macs["linears"].values())


def test_wanda_50_halves_the_pruned_linears(tiny_llama_dir, data_dir, dense_macs):
    _, dense = dense_macs
    model = load(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    calibration = sample_calibration(tokenizer, nsamples=4, seqlen=64, seed=0,
                                     data_file=data_dir / "hf" / "allenai__c4" / "en" / "train.jsonl")
    declaration = compress(model, calibration.input_ids, {"pattern": "unstructured", "sparsity": 0.5}, torch.device("cpu"))
    macs = count_macs(model, seqlen=SEQLEN, compression=declaration)

    assert macs["raw_macs"] == dense["raw_macs"]
    pruned = block_linear_names(model)
    assert set(pruned) == set(declaration.layers)
    for name in pruned:
        assert macs["linears"][name]["effective_macs"] == dense["linears"][name]["raw_macs"] / 2, name
    head = macs["linears"]["lm_head"]
    assert head["effective_macs"] == head["raw_macs"]
    non_linear = dense["raw_macs"] - dense["linear_raw_macs"]
    half_blocks = sum(dense["linears"][n]["raw_macs"] for n in pruned) / 2
    assert macs["effective_macs"] == non_linear + head["raw_macs"] + half_blocks


def test_declared_8_bit_weights_quarter_the_linear_macs(dense_macs):
    model, dense = dense_macs
    names = block_linear_names(model)
    per_layer = Compression(method="gptq", weight_bits=8, layers={n: LayerCompression(weight_bits=8) for n in names})
    model_wide = Compression(method="gptq", weight_bits=8)  # no per-layer entries: all linears but lm_head
    for declaration in (per_layer, model_wide):
        macs = count_macs(model, seqlen=SEQLEN, compression=declaration)
        for name in names:
            assert macs["linears"][name]["effective_macs"] == dense["linears"][name]["raw_macs"] / 4, name
        assert macs["linears"]["lm_head"]["effective_macs"] == dense["linears"]["lm_head"]["raw_macs"]
        blocks_raw = sum(dense["linears"][n]["raw_macs"] for n in names)
        assert macs["effective_macs"] == dense["raw_macs"] - blocks_raw + blocks_raw / 4


def test_weights_on_a_quantized_grid_zero_level_are_not_counted_as_pruned(tiny_llama_dir, dense_macs):
    """A quantized artifact stores dequantized weights: those rounded to the zero level read 0.
    Its linears' MACs are scaled by (bits/16)^2 only; counted as pruned too, a 4-bit layer's
    MACs came out ~14% lower (GPTQ W4 g128 on a random LLaMA: density 0.86)."""
    _, dense = dense_macs
    model = load(tiny_llama_dir)
    names = block_linear_names(model)
    linears = dict(model.named_modules())
    with torch.no_grad():
        for name in names:  # symmetric 4-bit round to nearest per output channel: levels -7..7, 0 among them
            w = linears[name].weight
            step = w.abs().amax(1, keepdim=True) / 7
            w.copy_((w / step).round().clamp(-7, 7) * step)
    zeros = sum(int((linears[n].weight == 0).sum()) for n in names)
    assert zeros > 0.05 * sum(linears[n].weight.numel() for n in names)  # the zero level is populated
    macs = count_macs(model, seqlen=SEQLEN, compression=Compression(method="gptq", weight_bits=4))
    for name in names:
        assert macs["linears"][name]["density"] == 1.0
        assert macs["linears"][name]["effective_macs"] == dense["linears"][name]["raw_macs"] / 16, name
    # the same zeros declared as unstructured sparsity are pruned weights
    sparse = count_macs(model, seqlen=SEQLEN, compression=Compression(method="wanda", sparsity_pattern="unstructured"))
    assert all(sparse["linears"][n]["density"] < 0.95 for n in names)


def test_size_on_disk_is_the_safetensors_bytes(tiny_llama_dir):
    weights = sum(p.stat().st_size for p in tiny_llama_dir.glob("*.safetensors"))
    assert weights > 0
    assert size_on_disk_bytes(tiny_llama_dir) == weights
    assert model_size(tiny_llama_dir) == {"checkpoint_bytes": weights, "packed_bytes": None, "size_bytes": weights}


def test_a_checkpoint_in_two_formats_counts_once(tiny_llama_dir, tmp_path):
    """A hub repo cloned with git ships model.safetensors and pytorch_model.bin: the loader reads
    the safetensors, and the size is theirs alone, not both summed."""
    both = tmp_path / "both"
    shutil.copytree(tiny_llama_dir, both)
    weights = size_on_disk_bytes(tiny_llama_dir)
    (both / "pytorch_model.bin").write_bytes(b"\0" * (weights + 123))
    assert size_on_disk_bytes(both) == weights
    for p in both.glob("*.safetensors"):
        p.unlink()
    assert size_on_disk_bytes(both) == weights + 123  # pickled weights alone are counted


def test_size_on_disk_prefers_a_packed_export(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "out" / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    packed = model_dir.parent / "packed"
    packed.mkdir()
    (packed / "weights.int4").write_bytes(b"\0" * 1000)
    report = model_size(model_dir)
    assert report["packed_bytes"] == 1000 and report["size_bytes"] == 1000
    assert report["checkpoint_bytes"] == size_on_disk_bytes(tiny_llama_dir)


def test_a_dense_checkpoint_in_another_dtype_is_sized_in_the_jobs(tiny_llama_dir, tmp_path):
    """A CUDA job runs in fp16 and saves its artifacts in fp16; a dense checkpoint stored in
    fp32 (as the embedded model is cached) is sized in fp16 too, or a method that stores as
    much as dense (Wanda 50%) read a 2x size ratio. A compressed artifact keeps its files' size."""
    from llmcbench.tracks.inference.measure import checkpoint_dtype, eval_model_size

    fp32_dir = tmp_path / "fp32"
    load(tiny_llama_dir).save_pretrained(fp32_dir)
    assert checkpoint_dtype(fp32_dir) == "float32"
    on_disk = size_on_disk_bytes(fp32_dir)
    fp16 = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float16)
    fp16_dir = tmp_path / "fp16"
    fp16.save_pretrained(fp16_dir)  # what a fp16 job's artifact of the same weights stores
    sized = eval_model_size(fp32_dir, fp16, "float16", compressed=False)
    assert sized["model_size_bytes"] == pytest.approx(size_on_disk_bytes(fp16_dir), rel=0.01)
    assert sized["model_size_bytes"] == pytest.approx(on_disk / 2, rel=0.01) and "float32" in sized["model_size_note"]
    assert eval_model_size(fp32_dir, load(fp32_dir), "float32", compressed=False) == {"model_size_bytes": on_disk, "checkpoint_dtype": "float32"}
    assert eval_model_size(fp32_dir, fp16, "float16", compressed=True)["model_size_bytes"] == on_disk


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        size_on_disk_bytes(tmp_path / "nope")


def test_cpu_inference_memory_counts_weights_and_growth(dense_macs):
    model, _ = dense_macs
    memory = measure_inference_memory(model, seqlen=SEQLEN, device="cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.weights_bytes >= weights
    assert memory.total_bytes == memory.weights_bytes + memory.activation_bytes
    assert memory.method.startswith("cpu_")
    assert inference_memory_bytes(model, seqlen=SEQLEN, device="cpu") >= weights


def _on_a_grid(tmp_path, model_dir, bits: int, group_size: int | None, packed: bool):
    """An artifact dir whose decoder linears sit on a symmetric `bits` grid (per output channel,
    or per group of input channels), with its declaration and, if `packed`, a `packed/` export
    beside the weights (its bytes do not matter here: memory is measured from the model)."""
    model = load(model_dir)
    with torch.no_grad():
        for name in block_linear_names(model):
            w = model.get_submodule(name).weight
            wg = w.view(w.shape[0], -1, group_size or w.shape[1])
            step = wg.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
            w.copy_(((wg / step).round() * step).view_as(w))
    out = tmp_path / f"w{bits}"
    model.save_pretrained(out)
    declaration = Compression(method="test", preset=f"w{bits}", weight_bits=bits, group_size=group_size, symmetric=True)
    (out / "compression.json").write_text(declaration.model_dump_json())
    if packed:
        (out / "packed").mkdir()
        (out / "packed" / "model.safetensors").write_bytes(b"codes")
    return load(out), out, declaration


def test_a_packed_int8_artifact_is_measured_as_its_integer_codes(tiny_llama_dir, tmp_path):
    """Track 4's memory of an artifact with a packed export is that of its int8 codes and scales
    on torch's kernel, exactly counted: the checkpoint's fp32 bytes of every decoder linear
    become one byte per weight and one bf16 scale per output channel. The checkpoint's linears
    are back afterwards (the accuracy tracks run them), giving the same logits."""
    model, out, declaration = _on_a_grid(tmp_path, tiny_llama_dir, 8, None, packed=True)
    linears = [model.get_submodule(n) for n in block_linear_names(model)]
    ids = torch.arange(1, 17)[None]
    logits = model(ids).logits
    checkpoint = measure_inference_memory(model, seqlen=SEQLEN, device="cpu")
    with _on_integer_kernels(model, declaration, torch.device("cpu")) as prepared:
        assert prepared.kernel == "aten._weight_int8pack_mm"
        packed = measure_inference_memory(model, seqlen=SEQLEN, device="cpu")
    expected = checkpoint.weights_bytes - sum(lin.weight.numel() * (4 - 1) - lin.out_features * 2 for lin in linears)
    assert packed.weights_bytes == expected
    assert [model.get_submodule(n) for n in block_linear_names(model)] == linears
    assert torch.equal(model(ids).logits, logits)

    figures = eval_inference_memory(model, out, declaration, seqlen=SEQLEN, device="cpu")
    assert figures["inference_memory_form"] == "packed export on aten._weight_int8pack_mm"
    assert figures["inference_memory_bytes"] < figures["inference_memory_checkpoint_bytes"]
    assert figures["inference_memory_checkpoint_bytes"] >= checkpoint.weights_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,kernel", [(8, None, "aten._weight_int8pack_mm"), (4, 32, "aten._weight_int4pack_mm")])
def test_cuda_memory_is_this_models_weights_and_forward_on_its_packed_kernels(tmp_path, bits, group_size, kernel):
    """On CUDA: the figure is the model's own weights plus what its forward allocates, whatever
    else the device holds (a 256 MiB tensor beside it changes nothing), and a packed fp16
    artifact is measured on torch's CUDA kernels, below its checkpoint. (A tiny LLaMA without a
    tokenizer: benchmarks/device_check.sh runs this where the embedded model is not staged.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    model, out, declaration = _on_a_grid(tmp_path, tmp_path / "dense", bits, group_size, packed=True)
    model = model.half().cuda()
    first = measure_inference_memory(model, seqlen=SEQLEN)
    ballast = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    again = measure_inference_memory(model, seqlen=SEQLEN)
    assert again.method == "cuda_weights_plus_peak_allocated_growth" and again.weights_bytes == first.weights_bytes
    assert abs(again.total_bytes - first.total_bytes) < 2**20 < ballast.numel()
    figures = eval_inference_memory(model, out, declaration, seqlen=SEQLEN)
    assert figures["inference_memory_form"] == f"packed export on {kernel}"
    assert figures["inference_memory_bytes"] < figures["inference_memory_checkpoint_bytes"]


def test_memory_is_the_checkpoints_without_a_packed_export_or_an_integer_kernel(tiny_llama_dir, tmp_path):
    """Shipped only as floats (SmoothQuant's and OmniQuant's artifacts, and every dense or
    sparse model), a model is measured as loaded; a packed grid that no integer kernel tiles
    keeps the checkpoint's figure and says why."""
    model, out, declaration = _on_a_grid(tmp_path, tiny_llama_dir, 8, None, packed=False)
    assert eval_inference_memory(model, out, declaration, seqlen=SEQLEN, device="cpu").keys() == {
        "inference_memory_bytes", "inference_memory_form"}
    assert eval_inference_memory(model, tiny_llama_dir, None, seqlen=SEQLEN, device="cpu")["inference_memory_form"] == "checkpoint"
    model, out, declaration = _on_a_grid(tmp_path, tiny_llama_dir, 4, 32, packed=True)
    assert eval_inference_memory(model, out, declaration, seqlen=SEQLEN, device="cpu")["inference_memory_form"] == (
        "packed export on aten._weight_int4pack_mm_for_cpu")
    untiled = declaration.model_copy(update={"group_size": 48})
    figures = eval_inference_memory(model, out, untiled, seqlen=SEQLEN, device="cpu")
    assert figures["inference_memory_form"] == "checkpoint"
    assert "no int4 kernel group" in figures["inference_memory_note"]
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


@pytest.mark.parametrize("method,preset,kernel", [
    ("gptq", "w8a16", "aten._weight_int8pack_mm"),
    # OmniQuant's GPTQ checkpoint (upstream --real_quant's format): Table 3 has OmniQuant INT8 at GPTQ's size
    ("omniquant", "w8a8", "aten._int_mm (W8A8, int8 activations per-token)"),
])
def test_bench_counts_the_packed_export_of_a_compressed_model(tiny_llama_dir, tmp_path, run_cli, method, preset, kernel):
    """Through the CLI and the local runner: the compressed evaluation sees the compress job's
    `packed/` (staged as /models/<name>.packed) and reports its bytes, not the fp32 checkpoint."""
    import json

    proc = run_cli("bench", "--method", method, "--preset", preset, "--model", str(tiny_llama_dir), "--tracks", "4",
                   "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    compress_dir = next((tmp_path / "runs").glob(f"{method}-*/*/packed")).parent
    packed_bytes = sum(p.stat().st_size for p in (compress_dir / "packed").rglob("*") if p.is_file())
    track4 = {}
    for result_path in (tmp_path / "runs").glob("*/*/result.json"):
        job = json.loads((result_path.parent / "job.json").read_text())
        if job["kind"] == "eval":
            track4[job["model"]["source"]] = json.loads(result_path.read_text())["metrics"]["track4"]
    sizes = {source: t4["model_size_bytes"] for source, t4 in track4.items()}
    dense = size_on_disk_bytes(tiny_llama_dir)
    assert sizes["artifact"] == packed_bytes
    assert packed_bytes < 0.5 * dense  # int8 codes + fp16 rest vs the fp32 checkpoint
    assert sizes[next(k for k in sizes if k != "artifact")] == dense
    # and its inference memory is the packed form's on the int8 kernel, the checkpoint's beside it
    assert track4["artifact"]["inference_memory_form"] == f"packed export on {kernel}"
    assert track4["artifact"]["inference_memory_bytes"] < track4["artifact"]["inference_memory_checkpoint_bytes"]
    assert track4[next(k for k in track4 if k != "artifact")]["inference_memory_form"] == "checkpoint"
    assert "the inference memory is the packed export's" in " ".join(proc.stdout.split())
