"""Bit-packing of integer codes into int32 words, GPTQ layout: the one packer behind the GPTQ
checkpoint (`methods/_engine/gptq_format.py`: GPTQ's and OmniQuant's exports) and the AWQ
engine's gptq_v2 export and AWQ GEMM layout (`methods/awq/export.py`).

Codes are packed least significant bits first: code i of a run occupies bits
[i * bits, (i + 1) * bits) of the run's words read as one little-endian bit string, so for 2,
4 and 8 bits each word holds 32 / bits consecutive codes and for 3 bits 32 codes span 3 words
(AutoGPTQ's layout). Words are int32 holding the unsigned bit pattern.
"""

from __future__ import annotations

import math

import torch


def pack_multiple(bits: int) -> int:
    """How many codes make a whole number of int32 words: 32 / gcd(32, bits)."""
    return 32 // math.gcd(32, bits)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack non-negative integer codes (each < 2^bits) along `dim` (the last by default) into
    int32 words, n codes -> n * bits / 32 words: code i occupies bits [i * bits, (i + 1) * bits)
    of the little-endian bit string of the words."""
    if dim not in (-1, codes.ndim - 1):
        return pack_int32(codes.movedim(dim, -1), bits).movedim(-1, dim)
    n = codes.shape[-1]
    if n % pack_multiple(bits):
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words")
    codes = codes.to(torch.int64)
    if int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes outside 0..{2 ** bits - 1} cannot be packed in {bits} bits")
    words = torch.zeros(*codes.shape[:-1], n * bits // 32, dtype=torch.int64, device=codes.device)
    offset = torch.arange(n, device=codes.device) * bits
    word, shift = offset // 32, offset % 32
    index = word.expand_as(codes)
    words.scatter_add_(-1, index, (codes << shift) & 0xFFFFFFFF)
    spills = shift + bits > 32  # a code that crosses into the next word (3 bits only)
    if bool(spills.any()):
        high = torch.where(spills, codes >> (32 - shift).clamp(max=63), torch.zeros_like(codes))
        words.scatter_add_(-1, (word + 1).clamp(max=words.shape[-1] - 1).expand_as(codes), high)
    return to_int32(words)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx of contiguous groups: the group of every input channel, c // group_size
    (group_size <= 0: one group), int64."""
    return torch.arange(in_features) // (group_size if group_size > 0 else in_features)
