"""benchmarks/deploy_roofline.py's byte count, checked on CPU.

Its roofline fraction is bytes read per decoded token x tokens/s / peak HBM bandwidth, so a
category's figure is only as true as the bytes counted from its prepared tensors: int8 codes
plus one scale per output channel, int4 codes two to a byte plus a scale and a zero per group,
the fp16 LM head, one embedding row. The speeds themselves need the GPU (device_check.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

HIDDEN, INTER, LAYERS, VOCAB = 256, 512, 2, 512
LINEARS = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]  # (out, in) per layer


@pytest.fixture
def roofline():
    import deploy_roofline

    return deploy_roofline


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("category", ["fp16", "int8", "int4", "w8a8"])
def test_bytes_per_token_are_the_prepared_tensors(roofline, category):
    import torch

    model = _model()
    esize = next(model.parameters()).element_size()
    outside = (VOCAB * HIDDEN + HIDDEN + (2 * LAYERS + 1) * HIDDEN) * esize  # LM head, one embedding row, norms
    if category in ("int8", "int4"):  # scales and zeros in the dtype the kernel computes in (bf16 for this fp32 model)
        from llmcbench.tracks.acceleration.int_kernels import kernel_dtype

        ssize = torch.empty(0, dtype=kernel_dtype(model.model.layers[0].mlp.up_proj.weight, int(category[3:]))).element_size()
    prepared = roofline.prepare(model, category, torch.device("cpu"))
    decoder = roofline.bytes_per_token(prepared.model) - outside

    if category == "fp16":
        expected = sum(o * i for o, i in LINEARS) * esize
    elif category == "int8":
        expected = sum(o * i + o * ssize for o, i in LINEARS)
    elif category == "w8a8":  # int8 codes and an fp32 scale per output channel (the activations' come per call)
        expected = sum(o * i + o * 4 for o, i in LINEARS)
    else:  # group 128: codes two to a byte, a scale and a zero per group of 128 input channels
        expected = sum(o * i // 2 + o * (i // 128) * 2 * ssize for o, i in LINEARS)
    assert decoder == LAYERS * expected, (category, decoder, LAYERS * expected)

    with torch.no_grad():  # and the prepared model still decodes: the counted tensors are the ones it reads
        logits = prepared.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("category", ["fp16", "int8", "int4", "w8a8"])
def test_compiled_decode_compiles_the_decode_step_and_keeps_the_tokens(roofline, category):
    """--compile's recipe (protocol.compiled_decode) on each prepared category, on CPU through
    transformers' switch for testing: generate compiles its one-token step over a static cache
    (the prefill stays eager), the weight-only kernels trace, and greedy decoding gives the
    eager tokens. The speed needs the GPU."""
    import torch

    from llmcbench.tracks.acceleration.protocol import compiled_decode

    model = roofline.prepare(_model(), category, torch.device("cpu")).model
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    with torch.inference_mode():
        eager = model.generate(ids, **kwargs)
    assert not hasattr(model, "_compiled_call")
    compiled_decode(model, mode="default", all_devices=True)
    with torch.inference_mode():
        compiled = model.generate(ids, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate did not take the compiled decode step"
    assert model.generation_config.cache_implementation == "static"
    assert torch.equal(eager, compiled), (eager, compiled)


class _GraphBreak(__import__("torch").nn.Module):
    """A real graph break in the decode step (what 2:4's sparse tensors do to dynamo on a GPU)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        import torch

        torch._dynamo.graph_break()
        return self.inner(x)


def test_a_category_that_breaks_the_graph_is_measured_again_with_breaks_and_keeps_its_error(roofline):
    """--retry-graph-breaks: fullgraph fails on a graph break, the row says where; the retry
    allows breaks and decodes through the compiled step. Without the retry the row is the
    error. On CPU through transformers' switch; the speed needs the GPU."""
    import torch

    def build():
        model = _model()
        model.model.norm = _GraphBreak(model.model.norm)
        return model

    cpu = torch.device("cpu")
    failed = roofline.measure_category(build, "fp16", cpu, 0.0, 3, 1, True, all_devices=True)
    assert "tokens_per_s" not in failed and failed["fullgraph"] is True
    assert "graph_break" in failed["error"] or "Unsupported" in failed["error"], failed
    assert failed["where"] and " <- " in failed["where"], failed

    row = roofline.measure_category(build, "fp16", cpu, 0.0, 3, 1, True, retry_graph_breaks=True, all_devices=True)
    assert row["fullgraph"] is False and row["compiled_step"] is True, row
    assert row["tokens_per_s"] > 0 and row["fullgraph_error"] == failed["error"], row
