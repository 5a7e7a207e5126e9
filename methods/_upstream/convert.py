"""Helpers the adapters share to turn upstream outputs into the contract's HF directory.

Upstream repositories write four kinds of output: an HF directory (Wanda `--save_model`,
SparseGPT `--save`, AWQ `--dump_fake`, OmniQuant `--save_dir`, or our shim's save hook),
sometimes without the tokenizer; a plain state dict (`torch.save(model.state_dict())`);
a pickled module (LLM-Pruner); adapter-only LoRA files. These helpers cover the common
parts; what is particular to one repository stays in its adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from llmcbench.driver.contract import LayerCompression

from .._engine.blockwise import decoder_blocks, find_linears

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class ConversionError(RuntimeError):
    """Upstream's output is not what its adapter expects (missing, wrong format)."""

    error_type = "crash"


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConversionError(f"upstream left no {what} (expected {path.name})")
    return path


def copy_tokenizer(source_model: Path, dst: Path) -> list[str]:
    """Copy the input model's tokenizer files into the artifact (where `dst` has none of that name:
    `save_pretrained` already wrote the model's generation config)."""
    copied = []
    for name in TOKENIZER_FILES:
        src = source_model / name
        if src.is_file() and not (dst / name).exists():
            shutil.copy2(src, dst / name)
            copied.append(name)
    return copied


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def hf_dir_from_upstream(upstream_dir: Path, source_model: Path, dst: Path, dtype: torch.dtype = torch.float16) -> nn.Module:
    """An HF directory upstream saved -> `dst`, re-saved by this transformers (safetensors,
    only the model's own parameters: quantizer buffers that old upstream classes leave in the
    state dict are dropped by the load) with the input model's own tokenizer.

    A tokenizer upstream saved (Wanda's `--save_model`, OmniQuant's `--save_dir`) is left out:
    its older stack re-saves it differently (LLaMA-2's slow tokenizer with that version's
    `legacy` flags, the rewritten files of the copy staged for it), and the compressed model
    must tokenize exactly as the dense one it is compared with.
    Returns the model as loaded (float32, for measuring the declaration)."""
    require(upstream_dir / "config.json", "HF model directory")
    model = load_hf(upstream_dir)
    save_model(model, source_model, dst, dtype)
    return model


def save_model(model: nn.Module, source_model: Path, dst: Path, dtype: torch.dtype = torch.float16) -> None:
    """Save `model` as the artifact (in upstream's working dtype; the eval side loads it in its own)."""
    dst.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(dst, safe_serialization=True)
    model.to(torch.float32)
    copy_tokenizer(source_model, dst)


def model_from_state_dict(source_model: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """The input model's architecture with upstream's state dict loaded strictly (every key
    of the architecture present, nothing left over): a format mismatch fails here, loudly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source_model)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    tied = {k for k in expected if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(state) - tied)
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise ConversionError(f"upstream state dict does not match {config.model_type}: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, extra {extra[:3]}{'...' if len(extra) > 3 else ''}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=not tied)
    return model.eval()


def distinct_levels(weight: torch.Tensor, group_size: int | None) -> int:
    """The largest number of distinct values in one quantization group of `weight`
    (a row for per-channel grids): at most 2**bits for a faithful b-bit fake-quant."""
    w = weight.detach().to(torch.float32)
    if group_size and group_size > 0 and w.shape[1] % group_size == 0:
        w = w.reshape(-1, group_size)
    ordered = torch.sort(w, dim=-1).values
    return int(((ordered[:, 1:] != ordered[:, :-1]).sum(-1) + 1).max())


def quantized_layers(model: nn.Module, bits: int, group_size: int | None, *, levels: int | None = None,
                     grid: str | None = None, check: bool = True) -> dict[str, LayerCompression]:
    """The per-layer record (`compression.json`) of a model upstream fake-quantized, after checking
    that every decoder linear is on the declared grid: at most `levels` (default 2**bits) distinct
    values per group (per row when `group_size` is None or <= 0). A layer with more is not the
    method's output, and the conversion stops. `check=False` where the groups cannot be seen in
    the saved weights (GPTQ's act-order permutes the columns they were formed over)."""
    prefix, blocks = decoder_blocks(model)
    group = group_size if group_size and group_size > 0 else None
    limit = levels or 2 ** bits
    layers = {}
    for index, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            full = f"{prefix}.{index}.{name}"
            n = distinct_levels(linear.weight, group) if check else 0
            if n > limit:
                raise ConversionError(f"upstream's {full} has {n} distinct values in a {'group' if group else 'row'}, "
                                      f"more than a {grid or f'{bits}-bit'} grid allows ({limit} levels)")
            layers[full] = LayerCompression(weight_bits=bits, shape=list(linear.weight.shape))
    return layers
