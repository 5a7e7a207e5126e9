"""The block-wise calibration runner every reference engine uses (STYLE.md, "The algorithm
apart from the plumbing").

Wanda (`lib/prune.py`), SparseGPT (`llama.py`), GPTQ (`llama.py`) and AWQ each carry their
own copy of the same plumbing; here it exists once:

1. Capture the first decoder block's inputs for the calibration batch: the hidden states and
   every other argument the model passes to its layers (attention mask, position ids, rotary
   `position_embeddings`, cache position, ...). A forward pre-hook on block 0 records them
   and stops the forward, so nothing past the embeddings runs. Upstream's `Catcher` kept
   only `attention_mask` and `position_ids`, which breaks on newer transformers where the
   rotary embeddings are computed once per model and passed down.
2. Walk the blocks one at a time on one device: move block i to `device`, leave the rest of
   the model where it is (a 7B model in host memory thus needs one GPU block at a time).
3. Run the calibration batches through the block with forward hooks on its linears; each
   linear's input goes to a per-layer statistics object the algorithm supplies (Wanda's
   input-norm accumulator, GPTQ's Hessian, ...). Only these statistics are kept, never the
   linears' activations.
4. Let the algorithm change the block (prune, quantize) from those statistics.
5. Recompute the block's outputs with the updated weights and feed them to the next block,
   as upstream Wanda, SparseGPT and GPTQ do, so later blocks calibrate on the inputs the
   compressed model will really see.

Step 3-4 may run per group of linears (`sequential`, GPTQ's and SparseGPT's
`--true-sequential`): each group then sees inputs produced by the already-updated groups.
By default all linears of a block form one group, which is what Wanda does.

Only LLaMA-like Hugging Face models are supported: a causal LM whose decoder blocks are
`model.model.layers` (LLaMA, Mistral, Qwen2, ...). Anything else raises
`UnsupportedModelError` with the fix. The model must be fully materialised (no accelerate
offload to the meta device).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)

TOKENS_PER_FORWARD = 8192


class UnsupportedModelError(NotImplementedError):
    """The model's architecture is not one the block-wise runner knows how to walk."""


class LinearStatistics(Protocol):
    """What an algorithm accumulates from one linear's calibration inputs."""

    def add_batch(self, inputs: torch.Tensor) -> None:
        """`inputs`: the linear's input for one calibration batch, shape [..., in_features]."""


@dataclass
class BlockInput:
    """One calibration batch as the block receives it."""

    hidden_states: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockStep:
    """What the algorithm sees for one block (or one group of its linears)."""

    index: int
    prefix: str
    block: nn.Module
    linears: dict[str, nn.Linear]
    statistics: dict[str, LinearStatistics]
    inputs: Sequence[BlockInput]

    def full_name(self, name: str) -> str:
        """The model-level module name (`model.layers.3.self_attn.q_proj`)."""
        return f"{self.prefix}.{name}"

    def run_block(self, batch: BlockInput) -> torch.Tensor:
        return _block_output(self.block(batch.hidden_states, *batch.args, **batch.kwargs))


class _StopForward(Exception):
    pass


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a LLaMA-like causal LM and their module-name prefix."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"architecture '{arch}' is not supported by the reference engines: they need a LLaMA-like "
            "causal LM with its decoder blocks at model.model.layers; use the method's upstream engine instead"
        )
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` inside `module`, keyed by its name relative to `module`
    (upstream's `find_layers`)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) and name}


# upstream llama.py --true-sequential (GPTQ, SparseGPT): each group sees the outputs of the
# groups compressed before it
LLAMA_SEQUENTIAL = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)


def llama_sequential_groups(method: str, blocks: Sequence[nn.Module]) -> tuple[tuple[str, ...], ...]:
    """`LLAMA_SEQUENTIAL`, for `run_blockwise(sequential=...)`, after checking that the
    blocks have exactly LLaMA's linears (checked before any weight changes)."""
    names = set(find_linears(blocks[0]))
    wanted = {name for group in LLAMA_SEQUENTIAL for name in group}
    if names != wanted:
        raise ValueError(f"{method}: true_sequential needs LLaMA's block linears ({', '.join(sorted(wanted))}), "
                         f"the model's blocks have {', '.join(sorted(names))}; set true_sequential = false")
    return LLAMA_SEQUENTIAL


def module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def _block_output(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor on transformers >= 4.56 and a tuple before."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _batches(calibration_ids: torch.Tensor, batch_size: int):
    for start in range(0, calibration_ids.shape[0], batch_size):
        yield calibration_ids[start:start + batch_size]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calibration_ids: torch.Tensor, device: torch.device,
                         batch_size: int = 1) -> list[BlockInput]:
    """Run the model up to its first decoder block and record what that block receives.

    The modules the model runs before block 0 (embeddings, rotary embedding, ...) are moved
    to `device` for the capture and moved back afterwards. The calibration windows are
    full-length and unpadded, so the layer arguments depend only on the batch shape: one copy
    per batch size is kept (an eager attention mask is seqlen^2 per batch).
    """
    _, layers = decoder_blocks(model)
    base = model.model
    homes = [(m, module_device(m)) for m in base.children() if m is not layers]
    records: list[BlockInput] = []
    shared_kwargs: dict[int, tuple[tuple, dict]] = {}

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = tuple(args[1:])
        batch = hidden.shape[0]
        if batch not in shared_kwargs:
            shared_kwargs[batch] = (extra, dict(kwargs))
        extra, kw = shared_kwargs[batch]
        records.append(BlockInput(hidden.detach(), extra, kw))
        raise _StopForward

    for m, _ in homes:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for ids in _batches(calibration_ids, batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward never reached its first decoder block")
    finally:
        handle.remove()
        for m, home in homes:
            if home is not None:
                m.to(home)
    return records


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    device: torch.device | str,
    *,
    statistics: Callable[[str, nn.Linear], LinearStatistics],
    update: Callable[[BlockStep], None],
    sequential: Sequence[Sequence[str]] | None = None,
    batch_size: int | None = None,
) -> None:
    """Calibrate and compress `model` block by block (see the module docstring).

    statistics(full_name, linear) makes the accumulator for one linear; update(step) then
    changes the block from the accumulated statistics. `sequential` lists groups of linear
    names (relative to the block, e.g. ["self_attn.q_proj", "self_attn.k_proj"]) processed
    in order; linears in no group are left alone. `batch_size` calibration windows go
    through a block per forward; by default as many as make about `TOKENS_PER_FORWARD`
    tokens (upstream runs one window at a time; batching changes only the float summation
    order, and is several times faster on CPU).
    """
    if calibration_ids.ndim != 2 or calibration_ids.shape[0] == 0:
        raise ValueError(f"calibration ids must be a non-empty [nsamples, seqlen] tensor, got shape {tuple(calibration_ids.shape)}")
    if batch_size is None:
        batch_size = max(1, TOKENS_PER_FORWARD // calibration_ids.shape[1])
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    prefix, layers = decoder_blocks(model)
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    model.config.use_cache = False
    model.eval()
    try:
        inputs = capture_block_inputs(model, calibration_ids, device, batch_size)
        for index, block in enumerate(layers):
            started = time.perf_counter()
            home = module_device(block)
            block.to(device)
            linears = find_linears(block)
            groups = [list(linears)] if sequential is None else [list(g) for g in sequential]
            for group in groups:
                unknown = [name for name in group if name not in linears]
                if unknown:
                    raise ValueError(f"block {index} has no linear named {', '.join(unknown)}: it has {', '.join(linears)}")
                block_prefix = f"{prefix}.{index}"
                stats = {name: statistics(f"{block_prefix}.{name}", linears[name]) for name in group}
                handles = [linears[name].register_forward_hook(_feed(stats[name])) for name in group]
                try:
                    for batch in inputs:
                        block(batch.hidden_states, *batch.args, **batch.kwargs)
                finally:
                    for h in handles:
                        h.remove()
                update(BlockStep(index, block_prefix, block, {n: linears[n] for n in group}, stats, inputs))
                del stats
            inputs = [
                BlockInput(_block_output(block(b.hidden_states, *b.args, **b.kwargs)), b.args, b.kwargs)
                for b in inputs
            ]
            if home is not None:
                block.to(home)
            log.debug("block %d/%d done in %.2f s", index + 1, len(layers), time.perf_counter() - started)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _feed(stats: LinearStatistics):
    def hook(_module, args, _output):
        stats.add_batch(args[0].detach())
    return hook
