"""What the pruning reference engines (Wanda, SparseGPT) share around the algorithm: the
N:M shape check made before any weight changes, and the `Compression` declaration with every
sparsity measured from the weights as they are after pruning."""

from __future__ import annotations

from torch import nn

from llmcbench.driver.contract import Compression, LayerCompression

from .blockwise import decoder_blocks, find_linears


def check_n_m_shapes(method: str, model: nn.Module, n: int, m: int) -> None:
    """N:M pruning needs every decoder-block linear's in_features divisible by m; checked up
    front, so a bad shape never leaves a half-pruned model."""
    _, blocks = decoder_blocks(model)
    odd = sorted({linear.in_features for block in blocks for linear in find_linears(block).values()
                  if linear.in_features % m})
    if odd:
        raise ValueError(f"{method}: {n}:{m} pruning needs in_features divisible by {m}, "
                         f"the model has linears with {', '.join(map(str, odd))}")


def sparsity_declaration(model: nn.Module, method: str, pattern: str, n: int | None, m: int | None,
                         target_sparsity: float, notes: list[str]) -> Compression:
    """The compression declaration, with every sparsity measured from the weights as they now are."""
    prefix, blocks = decoder_blocks(model)
    layers: dict[str, LayerCompression] = {}
    zeros = total = 0
    for index, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            weight = linear.weight.data
            layer_zeros = int((weight == 0).sum().item())
            layers[f"{prefix}.{index}.{name}"] = LayerCompression(sparsity=layer_zeros / weight.numel(), shape=list(weight.shape))
            zeros += layer_zeros
            total += weight.numel()
    n_m = pattern == "n:m"
    return Compression(
        method=method,
        engine="reference",
        sparsity_pattern="n:m" if n_m else "unstructured",
        n_m=(n, m) if n_m else None,
        target_sparsity=target_sparsity,
        measured_sparsity=zeros / total,
        layers=layers,
        notes=notes,
    )
