"""LLM-Pruner, the reference engine: dependency-aware structured pruning + LoRA recovery.

Ma, Fang, Wang, "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS
2023, arXiv:2305.11627). Follows horseee/LLM-Pruner `hf_prune.py --block_wise` with
`--pruner_type taylor` and `LLMPruner/pruner/hf_llama_pruner.py` (`TaylorImportance`), then
`post_training.py` (LoRA), at commit 128a07d; written from the paper and upstream's
behaviour, not from its code (upstream drives a vendored copy of torch-pruning's
dependency graph; for LLaMA blocks the coupled groups are fixed and are spelled out here).

Coupled groups, per decoder layer (what torch-pruning's graph finds for block-wise mode):
- attention: one group per KV head: the KV head's rows of k_proj and v_proj, the rows of
  its query heads in q_proj (GQA: num_attention_heads / num_key_value_heads of them) and
  the matching input columns of o_proj. With plain multi-head attention (LLaMA-7B) a group
  is one head, as upstream (`consecutive_groups = head_dim` on q_proj). Upstream predates
  GQA; pruning whole KV groups keeps every layer's query/KV head ratio, so the stock
  attention forward still applies.
- MLP: one group per intermediate channel: row c of gate_proj and up_proj, column c of
  down_proj.
The hidden size, embeddings, norms and LM head are never pruned (block-wise mode).

Importance of a group (first-order Taylor, upstream `--taylor param_first`, reduction
`sum`): with g the gradient of the LM loss on `num_examples` calibration windows,
    I(group) = sum over the group's weights of |W * g|
`param_mix` subtracts upstream's second-order term: |W*g - 0.5 * W * F * W| with F the
per-example squared gradients averaged over the examples (a diagonal Fisher). `random`
and `l2` (|W|^2 summed) are upstream's other `--pruner_type`s, kept for comparisons.

How many: every pruned layer loses the same share, round(ratio * groups) of its attention
groups (at most all but one) and round(ratio * intermediate) MLP channels, the lowest-
importance ones. Upstream's `--pruning_ratio` is thus a share of groups inside the pruned
layers, not of the model's parameters. Which layers: upstream's LLaMA-7B recipe prunes
attention and MLP in layers 4..29 of 32 (`--block_*_layer_start 4 --block_*_layer_end 30`)
and keeps the first 4 and last 2; here that rule is scaled to the model's depth L:
start = round(4 L / 32), end = L - round(2 L / 32) (30 layers: 4..27; 2 layers: all).
`uniform = true` instead prunes every layer by the same amount, so the result has one shape
and a standard config. Otherwise the config keeps the original (unpruned-layer) shape and
`compression.json` declares every linear's shape; `methods/_engine/structured.py` loads it.

Recovery (upstream `post_training.py`): LoRA r 8, alpha 16, dropout 0.05 on q/k/v/o/gate/
up/down, AdamW at lr 1e-4, then merged into the weights (`merge_and_unload`), so the
artifact is a plain model. Departures, both because a job has only its C4 calibration
windows: upstream trains 2 epochs of Alpaca-cleaned (50k instructions, cutoff 256) with a
100-step warmup; here `lora_steps` steps at a constant lr on the calibration windows,
`lora_batch_size` windows a step, cycling through them in a seeded shuffled order.
Taylor examples: upstream draws 10 windows of 64 tokens from distinct random BookCorpus
documents (`get_examples`, seeded by `--seed`); the job draws `num_examples` windows of
`example_seqlen` tokens the same way from its calibration documents (`draw_examples`, C4:
the documents the upstream engine is served for BookCorpus offline), so both engines score
the same tokens and a parity run compares the algorithms, not two samples of the data. Their
sha256 is in the notes. Called without them (`compress` alone), the first `num_examples`
calibration windows cut to `example_seqlen` tokens serve.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from llmcbench.driver.contract import Compression, LayerCompression

from .._engine.blockwise import UnsupportedModelError, decoder_blocks, find_linears, module_device
from .._engine.calibration import sample_distinct_windows

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LORA_TARGETS = [*ATTENTION, *MLP]
PRUNER_TYPES = ("taylor", "random", "l2")
TAYLOR_MODES = ("param_first", "param_mix")
# Upstream's LLaMA-7B layer range: layers 4..29 of 32 pruned (end exclusive 30).
UPSTREAM_DEPTH, UPSTREAM_KEEP_FIRST, UPSTREAM_KEEP_LAST = 32, 4, 2


@dataclass(frozen=True)
class PrunerSettings:
    pruning_ratio: float
    pruner_type: str = "taylor"
    taylor: str = "param_first"
    uniform: bool = False
    num_examples: int = 10
    example_seqlen: int = 64
    attention_layer_start: int | None = None
    attention_layer_end: int | None = None
    mlp_layer_start: int | None = None
    mlp_layer_end: int | None = None
    lora_steps: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_lr: float = 1e-4
    lora_batch_size: int = 4
    lora_seqlen: int | None = None
    seed: int = 42

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PrunerSettings":
        """Validate a preset's params merged with the job's overrides."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(f"llm_pruner: unknown parameter(s) {', '.join(unknown)}: allowed are {', '.join(sorted(allowed))}")
        if "pruning_ratio" not in params:
            raise ValueError("llm_pruner: pruning_ratio is required, a share of groups in (0, 1), e.g. 0.5")
        p = dict(params)
        ratio = p["pruning_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < float(ratio) < 1:
            raise ValueError(f"llm_pruner: pruning_ratio must be a number in (0, 1), got {ratio!r}")
        p["pruning_ratio"] = float(ratio)
        for key, choices in (("pruner_type", PRUNER_TYPES), ("taylor", TAYLOR_MODES)):
            if key in p:
                value = str(p[key]).strip().lower()
                if value not in choices:
                    raise ValueError(f"llm_pruner: {key} must be one of {', '.join(choices)}, got {p[key]!r}")
                p[key] = value
        if "uniform" in p and not isinstance(p["uniform"], bool):
            raise ValueError(f"llm_pruner: uniform must be true or false, got {p['uniform']!r}")
        for key, minimum in (("num_examples", 1), ("example_seqlen", 2), ("lora_steps", 0), ("lora_r", 1),
                             ("lora_alpha", 1), ("lora_batch_size", 1), ("lora_seqlen", 2), ("seed", 0),
                             ("attention_layer_start", 0), ("attention_layer_end", 0),
                             ("mlp_layer_start", 0), ("mlp_layer_end", 0)):
            value = p.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"llm_pruner: {key} must be an integer >= {minimum}, got {value!r}")
        for key, low, high in (("lora_dropout", 0.0, 1.0), ("lora_lr", 0.0, 1.0)):
            value = p.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) < high:
                raise ValueError(f"llm_pruner: {key} must be a number in [{low}, {high}), got {value!r}")
            p[key] = float(value)
        settings = cls(**p)
        for kind in ("attention", "mlp"):
            start, end = getattr(settings, f"{kind}_layer_start"), getattr(settings, f"{kind}_layer_end")
            if start is not None and end is not None and start >= end:
                raise ValueError(f"llm_pruner: {kind}_layer_start {start} must be below {kind}_layer_end {end}")
        if settings.uniform and any(getattr(settings, f"{k}_layer_{e}") is not None
                                    for k in ("attention", "mlp") for e in ("start", "end")):
            raise ValueError("llm_pruner: uniform = true prunes every layer; it takes no layer range")
        return settings


def validate_params(params: dict[str, Any]) -> None:
    """Called by the driver before any job is written, so bad params fail as bad input."""
    PrunerSettings.from_params(params)


# ----------------------------------------------------------------------------- model layout

@dataclass(frozen=True)
class Layout:
    """Attention geometry of one decoder layer."""

    kv_heads: int
    heads_per_group: int  # query heads per KV head (1 without GQA)
    head_dim: int
    intermediate: int


def layer_layout(layer: nn.Module) -> Layout:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION) \
            or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP) or not hasattr(attn, "head_dim"):
        raise UnsupportedModelError(
            "LLM-Pruner's reference engine needs LLaMA-style decoder layers (self_attn.{q,k,v,o}_proj with head_dim, "
            "mlp.{gate,up,down}_proj); use the upstream engine for this architecture")
    head_dim = int(attn.head_dim)
    kv_heads = attn.k_proj.out_features // head_dim
    heads = attn.q_proj.out_features // head_dim
    if kv_heads == 0 or heads % kv_heads or attn.v_proj.out_features != kv_heads * head_dim:
        raise UnsupportedModelError(f"attention with {heads} query heads and {kv_heads} KV heads is not a LLaMA-style GQA layout")
    return Layout(kv_heads, heads // kv_heads, head_dim, mlp.gate_proj.out_features)


def check_model(model: nn.Module) -> tuple[str, nn.ModuleList]:
    prefix, layers = decoder_blocks(model)
    for layer in layers:
        layer_layout(layer)
    return prefix, layers


def layer_ranges(settings: PrunerSettings, depth: int) -> tuple[range, range]:
    """The layers whose attention / MLP are pruned (upstream's 4..30-of-32 rule scaled to `depth`)."""
    if settings.uniform:
        return range(depth), range(depth)
    start = round(UPSTREAM_KEEP_FIRST * depth / UPSTREAM_DEPTH)
    end = depth - round(UPSTREAM_KEEP_LAST * depth / UPSTREAM_DEPTH)
    out = []
    for kind in ("attention", "mlp"):
        s = getattr(settings, f"{kind}_layer_start")
        e = getattr(settings, f"{kind}_layer_end")
        s, e = start if s is None else s, end if e is None else e
        if e > depth:
            raise ValueError(f"llm_pruner: {kind}_layer_end {e} is past the model's {depth} layers")
        out.append(range(s, e))
    return out[0], out[1]


def pruned_count(groups: int, ratio: float, width: int = 1) -> int:
    """Groups removed from a layer, counted as upstream's pruner does (torch_pruning's
    `prune_local`): of the C = groups x width channels, C - int(C x (1 - ratio)) are to go, in
    whole groups of `width` channels (an attention group: its query heads' rows in q_proj),
    keeping at least one group. Rounding half up instead removed one head more than upstream
    at ratios such as 0.3 or 0.62 (10 of LLaMA-7B's 32 heads where upstream removes 9) and one
    MLP channel less (3302 of 11008 where upstream removes 3303)."""
    channels = groups * width
    return max(0, min(groups - 1, (channels - int(channels * (1 - ratio))) // width))


# ----------------------------------------------------------------------------- importance

def attention_group_slices(layout: Layout) -> list[tuple[slice, slice]]:
    """Per KV group: (its rows in k_proj/v_proj, its rows in q_proj = its columns in o_proj)."""
    kv, q = layout.head_dim, layout.head_dim * layout.heads_per_group
    return [(slice(g * kv, (g + 1) * kv), slice(g * q, (g + 1) * q)) for g in range(layout.kv_heads)]


def _salience(linear: nn.Linear, settings: PrunerSettings) -> torch.Tensor:
    """Element-wise importance of a linear's weights (upstream TaylorImportance / MagnitudeImportance)."""
    w = linear.weight.detach().float()
    if settings.pruner_type == "l2":
        return w.pow(2)
    grad = linear.weight.grad
    if grad is None:
        raise RuntimeError("llm_pruner: no gradient reached a pruned linear; the Taylor pass failed")
    s = w * grad.float()
    if settings.taylor == "param_mix":
        s = s - 0.5 * w * linear.weight.fisher.float() * w
    return s.abs()


def attention_importance(attn: nn.Module, layout: Layout, settings: PrunerSettings) -> torch.Tensor:
    sal = {name: _salience(getattr(attn, name), settings) for name in ATTENTION}
    scores = []
    for kv_rows, q_rows in attention_group_slices(layout):
        scores.append(sal["q_proj"][q_rows].sum() + sal["k_proj"][kv_rows].sum() + sal["v_proj"][kv_rows].sum()
                      + sal["o_proj"][:, q_rows].sum())
    return torch.stack(scores)


def mlp_importance(mlp: nn.Module, settings: PrunerSettings) -> torch.Tensor:
    return (_salience(mlp.gate_proj, settings).sum(1) + _salience(mlp.up_proj, settings).sum(1)
            + _salience(mlp.down_proj, settings).sum(0))


def lowest(scores: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the `count` groups to remove (lowest scores, ties to the lower index; random when no scores)."""
    if generator is not None:
        return torch.randperm(scores.numel(), generator=generator)[:count].sort().values
    return torch.sort(scores.cpu(), stable=True).indices[:count].sort().values


@torch.enable_grad()
def taylor_gradients(model: nn.Module, linears: list[nn.Linear], examples: torch.Tensor, settings: PrunerSettings) -> float:
    """Leave d(LM loss)/dW in `.grad` of every linear in `linears` (and, for param_mix, the
    mean per-example squared gradient in `.weight.fisher`); returns the loss."""
    params = list(model.parameters())
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for linear in linears:
        linear.weight.requires_grad_(True)
        linear.weight.grad = None
    try:
        if settings.taylor == "param_mix" and settings.pruner_type == "taylor":
            for linear in linears:
                linear.weight.fisher = torch.zeros_like(linear.weight, dtype=torch.float32)
            for row in examples:
                ids = row.unsqueeze(0)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for linear in linears:
                    linear.weight.fisher += linear.weight.grad.float().pow(2) / examples.shape[0]
                    linear.weight.grad = None
        loss = model(input_ids=examples, labels=examples, use_cache=False).loss
        loss.backward()
        return float(loss.detach())
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------- surgery

def _keep(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    """Shrink `linear` in place to the given output rows / input columns."""
    w = linear.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows.to(w.device)).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = w.shape[0]
    if columns is not None:
        w = w.index_select(1, columns.to(w.device))
        linear.in_features = w.shape[1]
    linear.weight = nn.Parameter(w.contiguous().clone(), requires_grad=linear.weight.requires_grad)


def _complement(n: int, removed: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[removed.cpu()] = False
    return torch.arange(n)[mask]


def prune_attention(attn: nn.Module, layout: Layout, removed: torch.Tensor) -> None:
    keep = _complement(layout.kv_heads, removed)
    slices = attention_group_slices(layout)
    kv_rows = torch.cat([torch.arange(slices[g][0].start, slices[g][0].stop) for g in keep.tolist()])
    q_rows = torch.cat([torch.arange(slices[g][1].start, slices[g][1].stop) for g in keep.tolist()])
    _keep(attn.q_proj, rows=q_rows)
    _keep(attn.k_proj, rows=kv_rows)
    _keep(attn.v_proj, rows=kv_rows)
    _keep(attn.o_proj, columns=q_rows)
    # LlamaAttention reshapes with -1 heads and keeps num_key_value_groups (unchanged here);
    # older transformers read num_heads / num_key_value_heads attributes, kept right as well.
    for name, value in (("num_heads", len(keep) * layout.heads_per_group), ("num_key_value_heads", len(keep))):
        if hasattr(attn, name):
            setattr(attn, name, value)


def prune_mlp(mlp: nn.Module, layout: Layout, removed: torch.Tensor) -> None:
    keep = _complement(layout.intermediate, removed)
    _keep(mlp.gate_proj, rows=keep)
    _keep(mlp.up_proj, rows=keep)
    _keep(mlp.down_proj, columns=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


# ----------------------------------------------------------------------------- LoRA

def lora_recover(model: nn.Module, windows: torch.Tensor, settings: PrunerSettings) -> tuple[float, float]:
    """Train LoRA adapters on the calibration windows for `lora_steps` steps and merge them
    into the weights. Returns the mean training loss of the first and the last few steps."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("llm_pruner: LoRA recovery needs the `peft` package (pip install peft), "
                           "or set lora_steps = 0 to skip it") from None
    device = module_device(model)
    if settings.lora_seqlen is not None:
        windows = windows[:, :settings.lora_seqlen]
    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)  # adapter init (A) and dropout
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lora_lr, weight_decay=0.0)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses = []
    peft_model.train()
    try:
        with torch.enable_grad():
            for _ in range(settings.lora_steps):
                if len(order) < settings.lora_batch_size:
                    epoch = list(range(windows.shape[0]))
                    rng.shuffle(epoch)
                    order += epoch
                batch = windows[order[:settings.lora_batch_size]].to(device)
                del order[:settings.lora_batch_size]
                loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
    finally:
        merged = peft_model.merge_and_unload()
        if merged is not model:  # peft swaps its wrappers back into the same module tree
            raise RuntimeError("llm_pruner: peft did not merge the adapters back into the model in place")
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(model):
                delattr(model, attr)
        for p in model.parameters():
            p.requires_grad_(requires.get(p, True))
        model.train(was_training)
    k = max(1, min(5, len(losses) // 4))
    return (sum(losses[:k]) / k, sum(losses[-k:]) / k) if losses else (float("nan"), float("nan"))


# ----------------------------------------------------------------------------- engine

def draw_examples(tokenizer, documents, params: dict[str, Any]) -> torch.Tensor | None:
    """The Taylor examples as upstream's `get_examples` draws them (None for the other pruner types)."""
    settings = PrunerSettings.from_params(params)
    if settings.pruner_type != "taylor":
        return None
    return sample_distinct_windows(documents, tokenizer, nsamples=settings.num_examples, seqlen=settings.example_seqlen,
                                   seed=settings.seed, source="the calibration documents")


def examples_digest(examples: torch.Tensor) -> str:
    """sha256 of the example token ids (int64, row-major): the same figure for both engines'
    notes, so that a parity run can say whether they scored the same tokens."""
    return hashlib.sha256(examples.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def compress(model: nn.Module, calibration_ids: torch.Tensor, params: dict[str, Any],
             device: torch.device, examples: torch.Tensor | None = None) -> Compression:
    """Prune `model` in place (block-wise, coupled groups, Taylor importance), recover with
    LoRA, and declare every linear's new shape. The caller fills in `preset`. `examples`:
    the Taylor pass's windows (`draw_examples`); by default the calibration windows, cut."""
    settings = PrunerSettings.from_params(params)
    prefix, layers = check_model(model)
    if calibration_ids.ndim != 2 or calibration_ids.shape[0] == 0 or calibration_ids.shape[1] < 2:
        raise ValueError(f"calibration ids must be a non-empty [nsamples, seqlen >= 2] tensor, got {tuple(calibration_ids.shape)}")
    attn_range, mlp_range = layer_ranges(settings, len(layers))
    layouts = [layer_layout(layer) for layer in layers]
    dense_shapes = {f"{prefix}.{i}.{n}": tuple(l.weight.shape) for i, layer in enumerate(layers)
                    for n, l in find_linears(layer).items()}
    params_before = sum(p.numel() for p in model.parameters())
    home = module_device(model)
    device = torch.device(device)
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    model.to(device)
    model.eval()
    notes = [f"calibration: {calibration_ids.shape[0]} x {calibration_ids.shape[1]} tokens"]
    try:
        started = time.perf_counter()
        targets = [getattr(layers[i].self_attn, n) for i in attn_range for n in ATTENTION] + \
                  [getattr(layers[i].mlp, n) for i in mlp_range for n in MLP]
        generator = None
        if settings.pruner_type == "taylor":
            drawn = examples is not None
            if not drawn:
                examples = calibration_ids[:settings.num_examples, :settings.example_seqlen]
            loss = taylor_gradients(model, targets, examples.to(device), settings)
            notes.append(f"taylor ({settings.taylor}): loss {loss:.4f} on {examples.shape[0]} x {examples.shape[1]} tokens "
                         + (f"drawn as upstream's get_examples (seed {settings.seed})" if drawn else "of the calibration windows")
                         + f"; examples sha256 {examples_digest(examples)}")
        elif settings.pruner_type == "random":
            generator = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():
            for i in attn_range:
                attn, layout = layers[i].self_attn, layouts[i]
                scores = attention_importance(attn, layout, settings) if generator is None else torch.zeros(layout.kv_heads)
                prune_attention(attn, layout, lowest(scores, pruned_count(layout.kv_heads, settings.pruning_ratio, layout.head_dim * layout.heads_per_group), generator))
            for i in mlp_range:
                mlp, layout = layers[i].mlp, layouts[i]
                scores = mlp_importance(mlp, settings) if generator is None else torch.zeros(layout.intermediate)
                prune_mlp(mlp, layout, lowest(scores, pruned_count(layout.intermediate, settings.pruning_ratio), generator))
        for linear in targets:
            linear.weight.grad = None
            if hasattr(linear.weight, "fisher"):
                del linear.weight.fisher
        notes.append(f"pruned attention in layers {_span(attn_range)}, MLP in layers {_span(mlp_range)} "
                     f"of {len(layers)} at ratio {settings.pruning_ratio} ({settings.pruner_type}) in {time.perf_counter() - started:.1f} s")
        if settings.uniform:
            _standard_config(model, layers)
        if settings.lora_steps > 0:
            started = time.perf_counter()
            first, last = lora_recover(model, calibration_ids, settings)
            notes.append(f"LoRA r={settings.lora_r} alpha={settings.lora_alpha} lr={settings.lora_lr}: {settings.lora_steps} steps "
                         f"x {settings.lora_batch_size} windows, loss {first:.4f} -> {last:.4f}, merged, "
                         f"in {time.perf_counter() - started:.1f} s")
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
        if home is not None:
            model.to(home)
    params_after = sum(p.numel() for p in model.parameters())
    notes.append(f"parameters {params_before} -> {params_after} ({100 * (1 - params_after / params_before):.2f}% removed)")
    return _declaration(model, prefix, layers, dense_shapes, settings, notes)


def _span(r: range) -> str:
    return f"{r.start}..{r.stop - 1}" if len(r) else "none"


def _standard_config(model: nn.Module, layers: nn.ModuleList) -> None:
    """After uniform pruning every layer has one shape: write it into the config."""
    layout = layer_layout(layers[0])
    if any(layer_layout(layer) != layout for layer in layers):
        raise RuntimeError("llm_pruner: uniform pruning left layers of different shapes")
    config = model.config
    config.head_dim = layout.head_dim  # must be explicit once num_attention_heads no longer divides hidden_size
    config.num_key_value_heads = layout.kv_heads
    config.num_attention_heads = layout.kv_heads * layout.heads_per_group
    config.intermediate_size = layout.intermediate


def _declaration(model, prefix, layers, dense_shapes, settings: PrunerSettings, notes: list[str]) -> Compression:
    declared: dict[str, LayerCompression] = {}
    removed = total = 0
    for i, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            full = f"{prefix}.{i}.{name}"
            before = math.prod(dense_shapes[full])
            now = linear.weight.numel()
            declared[full] = LayerCompression(sparsity=1 - now / before, shape=list(linear.weight.shape))
            removed += before - now
            total += before
    return Compression(
        method="llm_pruner",
        engine="reference",
        sparsity_pattern="structured",
        target_sparsity=settings.pruning_ratio,
        measured_sparsity=removed / total,
        layers=declared,
        notes=notes,
    )
