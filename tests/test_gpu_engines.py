"""The seven reference engines on CUDA, at the LLaMA-2-7B layer shape.

Each method's paper preset runs on a randomly initialised 2-layer LLaMA with LLaMA-2-7B's
layer shape (hidden 4096, intermediate 11008, 32 heads, vocab 32000) in fp16 on the GPU,
with 8 x 512 random calibration tokens (OmniQuant with 1 epoch, LLM-Pruner with 2 LoRA
steps, to keep each test to seconds). The model must stay on the GPU and finite, the engine
must declare the method, and the peak CUDA memory of `compress` must stay within the model
plus a fixed margin: block-wise processing needs the weights plus one block's working set,
not a second copy of the model in fp32 or the activations of every layer.

Marked `gpu`: the root conftest.py skips them, with the reason, where CUDA is absent.
The CPU engines are tested on the embedded model elsewhere.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

METHODS = ("wanda", "sparsegpt", "gptq", "smoothquant", "awq", "omniquant", "llm_pruner")
# params on top of each paper preset, to keep the run short (the quick profile's spirit)
SHORTER = {"omniquant": {"epochs": 1}, "llm_pruner": {"lora_steps": 2}}
NSAMPLES, SEQLEN = 8, 512
MARGIN_BYTES = 8 * 2**30  # one 7B-shape block's working set fits easily; a second model copy would not at 32 layers


def _llama_7b_shape(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         use_cache=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):  # allocated and initialised on the GPU, once
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("method", METHODS)
def test_engine_paper_preset_on_cuda(method, tmp_path):
    import torch

    from llmcbench.driver.registry import get_method
    from llmcbench.methods._engine.output import EngineOutput

    assert torch.cuda.is_available()
    if method == "llm_pruner":
        pytest.importorskip("peft", reason="LLM-Pruner's LoRA recovery needs peft")
    spec = get_method(method)
    preset, params = spec.preset(spec.paper_preset)
    params.update(SHORTER.get(method, {}))
    engine = spec.engine_module("reference")
    engine.validate_params(params)

    device = torch.device("cuda", torch.cuda.current_device())
    model = _llama_7b_shape(layers=2)
    assert model.dtype == torch.float16 and next(model.parameters()).device.type == "cuda"
    dense_bytes = _model_bytes(model)
    calibration_ids = torch.randint(3, model.config.vocab_size, (NSAMPLES, SEQLEN),
                                    generator=torch.Generator().manual_seed(0))

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    output = engine.compress(model, calibration_ids, dict(params), device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)

    declaration = output.declaration if isinstance(output, EngineOutput) else output
    assert declaration.method == method, f"{method}/{preset}: declared {declaration.method!r}"

    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    assert devices == {"cuda"}, f"{method}/{preset}: model left on {devices}"
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{method}/{preset}: {name} has non-finite values"

    with torch.no_grad():
        logits = model(input_ids=calibration_ids[:1, :16].to(device)).logits
    assert logits.shape == (1, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all(), f"{method}/{preset}: non-finite logits after compression"

    bound = dense_bytes + MARGIN_BYTES
    assert peak < bound, (f"{method}/{preset}: peak CUDA memory {peak / 2**30:.2f} GiB exceeds the model "
                          f"({dense_bytes / 2**30:.2f} GiB) + {MARGIN_BYTES / 2**30:.0f} GiB: not block-wise?")

    if isinstance(output, EngineOutput) and output.export_packed is not None:
        # the packed export of the fp16 CUDA weights (GPTQ, AWQ, OmniQuant): the GPTQ writer re-derives
        # every linear's codes and refuses weights they do not decode to exactly
        assert output.export_packed(tmp_path), f"{method}/{preset}: no packed format returned"
        assert (tmp_path / "model.safetensors").stat().st_size < dense_bytes, f"{method}/{preset}: export not smaller"


# ---------------------------------------------------------------- track 5 kernels on CUDA


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_int4_and_int8_kernels_match_the_weights_they_replace(dtype):
    """tinygemm int4 (packing differs from the CPU kernel's) and int8 weight-only on CUDA, for
    bfloat16 and fp16 models (tinygemm itself takes bfloat16 only: an fp16 model failed there)."""
    from llmcbench.tracks.acceleration.int_kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    torch.manual_seed(0)
    n, k, g = 256, 512, 128
    codes = torch.randint(0, 16, (n, k // g, g)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * (torch.rand(n, k // g, 1) * 0.01 + 0.001) + torch.randn(n, k // g, 1) * 0.05).view(n, k)
    lin = torch.nn.Linear(k, n, bias=False).cuda().to(dtype)
    lin.weight.data = w.cuda().to(dtype)
    x = torch.randn(4, k, device="cuda", dtype=dtype)
    ref = x.float() @ lin.weight.float().T
    for layer in (Int4WeightOnlyLinear(lin, g), Int8WeightOnlyLinear(lin)):
        y = layer(x)
        assert y.dtype == dtype, type(layer).__name__
        assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max(), type(layer).__name__


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_cuda_int8_activation_kernel_is_the_fake_quantized_linear(granularity):
    """W8A8 on cuBLASLt's int8 GEMM (`aten._int_mm`, more than 16 rows: a decode step is padded)
    against the accuracy tracks' fake-quantized linear, in fp16, for a decode step and a prefill."""
    from llmcbench.tracks.acceleration.int_kernels import Int8DynamicActivationLinear
    from llmcbench.tracks.fakequant import ActivationQuantizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256, bias=False)
    scale = lin.weight.data.abs().amax(1, keepdim=True) / 127
    lin.weight.data = (lin.weight.data / scale).round() * scale
    lin = lin.cuda().half()
    q = Int8DynamicActivationLinear(lin, granularity)
    fake = ActivationQuantizer(8, granularity)
    for shape in ((1, 1, 512), (2, 40, 512)):
        x = torch.randn(*shape, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            y, ref = q(x), (fake(x).float() @ lin.weight.float().T)
        assert y.dtype == torch.float16 and y.shape == (*shape[:-1], 256)
        assert (y.float() - ref).abs().max() <= 0.01 * ref.abs().max(), shape


def test_cuda_2_4_semi_structured_backend():
    from llmcbench.driver.contract import Compression
    from llmcbench.tracks.acceleration.backends import prepare_native
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1000)
    model = LlamaForCausalLM(config).cuda().half().eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.data.view(-1, 4)
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(2, dim=1).indices, True)
            mod.weight.data = (w * mask).view_as(mod.weight)
    ids = torch.randint(0, 1000, (1, 32), device="cuda")
    dense = model(ids).logits.float()
    prepared = prepare_native(model, Compression(method="t", sparsity_pattern="n:m", n_m=(2, 4)), torch.device("cuda"))
    assert prepared.accelerated and "semi-structured" in prepared.kernel
    assert torch.allclose(prepared.model(ids).logits.float(), dense, atol=0.05, rtol=0.05)
