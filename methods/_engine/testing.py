"""Helpers the reference engines' tests share (`methods/<name>/test_reference.py`); their
shared fixtures are in `methods/conftest.py`. Not collected by pytest (no `test_` prefix)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from .blockwise import decoder_blocks, find_linears
from .calibration import sample_calibration

CPU = torch.device("cpu")


def c4_file(data_dir: Path) -> Path:
    """The C4 slice the project ships (`tracks/data`)."""
    return data_dir / "hf" / "allenai__c4" / "en" / "train.jsonl"


def c4_ids(model_dir, data_dir: Path, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] C4 token windows for the tokenizer in `model_dir`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sample_calibration(tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, data_file=c4_file(data_dir)).input_ids


def calibration_and_held_out(model_dir, data_dir: Path, nsamples: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded-model runs' data: `nsamples` x 128 calibration tokens (seed 0) and one
    held-out window of 256 tokens (seed 1234)."""
    return c4_ids(model_dir, data_dir, nsamples, 128, 0), c4_ids(model_dir, data_dir, 1, 256, 1234)


def load(model_dir) -> nn.Module:
    """A checkpoint in float32, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every decoder-block linear, keyed by its model-level name."""
    prefix, blocks = decoder_blocks(model)
    return {f"{prefix}.{i}.{name}": linear for i, block in enumerate(blocks) for name, linear in find_linears(block).items()}


def c4_loss(model: nn.Module, input_ids: torch.Tensor) -> float:
    """The language-modelling loss of `model` on `input_ids`."""
    with torch.no_grad():
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()


def read_method_toml(method_dir: Path, *, name: str, kind: str, repo: str, commit: str, license: str) -> dict[str, Any]:
    """`method_dir/method.toml`, checked for the method's name, kind and upstream."""
    declaration = tomllib.loads((Path(method_dir) / "method.toml").read_text())
    assert declaration["name"] == name and declaration["kind"] == kind
    upstream = declaration["upstream"]
    assert upstream["repo"] == repo
    assert upstream["commit"] == commit
    assert upstream["license"] == license
    return declaration


# -- an unpacker for the GPTQ checkpoint, written from the format's description (numpy bit
#    strings), independent of methods/_engine/gptq_format.py's packer

def unpack_bits(words: torch.Tensor, bits: int) -> np.ndarray:
    """int32 words [n_words, k] -> codes [n_words * 32 / bits, k]: each column's words read as
    one little-endian bit string, `bits` bits per code, least significant first."""
    columns = np.ascontiguousarray(words.numpy().astype("<u4").T)  # [k, n_words]
    stream = np.unpackbits(columns.view(np.uint8).reshape(columns.shape[0], -1), axis=1, bitorder="little")
    fields = stream.reshape(columns.shape[0], -1, bits).astype(np.int64)
    return (fields * (1 << np.arange(bits))).sum(axis=2).T


def decode_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(quantization_config, {linear: dequantized float32 weight [out, in]}, {linear: codes})."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(folder / "model.safetensors"))
    bits, v1 = config["bits"], config["checkpoint_format"] == "gptq"
    weights, all_codes = {}, {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        codes = unpack_bits(tensors[f"{name}.qweight"], bits)  # [in, out]
        zeros = unpack_bits(tensors[f"{name}.qzeros"].t().contiguous(), bits).T  # [groups, out]
        zeros = zeros + 1 if v1 else zeros
        scales = tensors[f"{name}.scales"].float().numpy()  # [groups, out]
        g = tensors[f"{name}.g_idx"].numpy().astype(np.int64)  # [in]
        dequantized = scales[g] * (codes - zeros[g]).astype(np.float32)  # [in, out]
        weights[name] = torch.from_numpy(dequantized.T.copy())
        all_codes[name] = torch.from_numpy(codes.T.copy())
    return config, weights, all_codes
