"""LLM-Pruner, the upstream engine: horseee/LLM-Pruner at the pinned commit (+ one patch).

    python hf_prune.py --base_model {model} --pruning_ratio R --block_wise \
        --block_mlp_layer_start a --block_mlp_layer_end b --block_attention_layer_start a \
        --block_attention_layer_end b --pruner_type taylor --taylor param_first --num_examples N \
        --device D --eval_device D --seed S --save_ckpt_log_name llmcbench --save_model
    python upstream_export.py ...            (ours, under the upstream interpreter: unpickle -> tensors)
    (hub data only) python post_training.py --base_model {model} --prune_model <checkpoint> \
        --data_path yahma/alpaca-cleaned --lora_r r --lora_alpha a --lora_dropout d --num_epochs 2 \
        --learning_rate 1e-4 --batch_size 64 --micro_batch_size 4 --output_dir {work}/tune_log

- Pruning ratio: `--pruning_ratio` is the share of heads / MLP channels removed in the pruned
  layers; every linear of a LLaMA block shrinks with them (q/k/v/gate/up by rows, o/down by
  columns), so R = 0.5 removes 50% of the pruned blocks' linear parameters; the declaration's
  measured sparsity is computed from the shapes. Layers: upstream's 4..30 of 32, scaled to the
  model's depth (the reference engine's rule); `uniform` prunes every layer.
- Taylor examples: upstream's `get_examples('bookcorpus', ..., seq_len=64)`; offline the shim
  serves the staged C4 documents for BookCorpus (recorded), which the reference engine draws
  from the same way; a save hook keeps what `get_examples` returned, and the notes give its
  sha256 next to the reference's (parity says whether they match). Timed: the backward passes that
  give the Taylor importance its gradients and `MetaPruner.step` (the importance and the
  removal). Their forward passes are not in the figure: the model's forward is also what
  upstream's evaluation after the save calls. (Timing `MetaPruner.step` alone gave 0.013 s of
  a 4.6 s step in a real upstream run on a 2-layer model: the gradients are most of the cost.)
- Output: `prune_log/llmcbench/pytorch_model.bin` pickles the whole vendored-class model;
  `upstream_export.py` turns it into safetensors + per-layer shapes, and the artifact keeps the
  input model's config with the shapes declared in compression.json (loaded by
  `load_structured_pruned`). Upstream's PPL after pruning (wikitext2, ptb) follows the save;
  offline it stops at PTB.
- LoRA: `post_training.py` trains on yahma/alpaca-cleaned (not staged offline: offline the
  upstream engine stops after pruning and says so). Its output is adapter files only
  (`adapter_model.bin`, vendored peft): merged here, W += B A * lora_alpha / r.
  patches/001-lora-bf16.patch trains in bf16 instead of upstream's fp16, which goes NaN on
  LLaMA-2 (issue #13).
- Models: hf_prune.py builds its own copy of transformers 4.28's LLaMA (multi-head attention,
  rotary base 10000, head_dim = hidden / heads) and loads `LlamaTokenizer` (sentencepiece
  `tokenizer.model`): LLaMA-1/2, the paper's models. Anything else (the embedded SmolLM2: GQA,
  rope_theta 100000, a BPE tokenizer) is refused before upstream starts (`check_model`), not
  left to fail deep inside it or, with another rope_theta, to run as a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmcbench.driver.contract import Compression, LayerCompression

from .._engine.blockwise import UnsupportedModelError
from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext
from .._upstream.convert import ConversionError, copy_tokenizer, require
from .reference import PrunerSettings, examples_digest, layer_ranges

# The model_types (config.json) this adapter runs: hf_prune.py prunes its own LLaMA copy
# (check_model refuses the rest). The model registry refuses the others up front
# (driver/model_registry.py `supports`).
SUPPORTED_ARCHS = {"llama"}


LOG_NAME = "llmcbench"
EXAMPLES_TARGET = "LLMPruner.datasets.example_samples:get_examples"
EXPORT = Path(__file__).with_name("upstream_export.py")


def settings_for(params: dict) -> PrunerSettings:
    s = PrunerSettings.from_params(params)
    if s.pruner_type != "taylor" or s.example_seqlen != 64:
        raise ValueError("llm_pruner upstream: the Taylor examples are 64 tokens (hard-coded in hf_prune.py) and this "
                         "adapter runs --pruner_type taylor")
    return s


MAX_TRACE_TOKEN_ID = 29892  # hf_prune.py's `forward_prompts`, "any input will be fine", in LLaMA's vocabulary


def check_model(model_dir: Path) -> None:
    """Refuse, in one line, a model hf_prune.py's own LLaMA copy and LlamaTokenizer cannot run as it is."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return  # upstream's loader says what is missing
    c = json.loads(config_path.read_text())
    rope = c.get("rope_parameters") or {}
    heads, kv_heads, hidden = c.get("num_attention_heads"), c.get("num_key_value_heads"), c.get("hidden_size")
    theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
    problems = [
        c.get("model_type") != "llama" and f"model_type {c.get('model_type')}",
        kv_heads not in (None, heads) and f"grouped-query attention ({heads} query heads, {kv_heads} KV heads)",
        c.get("head_dim") not in (None, hidden // heads if heads else None) and f"head_dim {c.get('head_dim')}",
        theta != 10000.0 and f"rope_theta {theta:g}",
        (c.get("rope_scaling") or rope.get("rope_type", "default") != "default") and "rope scaling",
        not (model_dir / "tokenizer.model").is_file() and "no sentencepiece tokenizer.model",
        # hf_prune.py traces the dependency graph on hard-coded LLaMA token ids (up to 29892)
        int(c.get("vocab_size") or 0) <= MAX_TRACE_TOKEN_ID and f"a vocabulary of {c.get('vocab_size')} (hf_prune.py's "
                                                                 f"tracing input has LLaMA token ids up to {MAX_TRACE_TOKEN_ID})",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise UnsupportedModelError(
            f"llm_pruner upstream runs LLaMA-1/2-shaped models (hf_prune.py's own LLaMA copy: multi-head attention, "
            f"rotary base 10000; LlamaTokenizer), not {model_dir.name}: {'; '.join(problems)}; use --engine reference")


def check_ratio(config: dict, ratio: float) -> None:
    """Refuse, in one line, a ratio that removes less than one attention head per pruned layer:
    upstream's MetaPruner counts channels (`n = C - int(C * (1 - ratio))` of q_proj's C = heads x
    head_dim) and removes `n // head_dim` whole heads, and with none it fails on `torch.cat` of
    an empty list (seen on a 2-head model at block-20's 0.25)."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if not heads or not hidden or ratio <= 0:
        return
    head_dim = int(config.get("head_dim") or hidden // heads)
    channels = heads * head_dim
    removed = channels - int(channels * (1 - ratio))
    if removed > 0 and removed // head_dim == 0:
        raise UnsupportedModelError(
            f"llm_pruner upstream: --pruning_ratio {ratio} removes {removed} of the {channels} query channels of a pruned "
            f"layer, less than one head of {head_dim}, and hf_prune.py then fails (torch.cat of no heads): use a ratio of "
            f"at least {1 / heads:g} on this {heads}-head model, or --engine reference")


def depth(model_dir: Path) -> int:
    config = model_dir / "config.json"
    return json.loads(config.read_text())["num_hidden_layers"] if config.is_file() else 32


class LLMPrunerUpstream(UpstreamAdapter):
    method = "llm_pruner"
    metric_patterns = (r"PPL after pruning: \{'(?P<key>wikitext2)': (?P<value>[0-9.eE+-]+)",)

    def checkpoint(self, ctx: UpstreamContext) -> Path:
        return ctx.work / "prune_log" / LOG_NAME / "pytorch_model.bin"

    def examples_file(self, ctx: UpstreamContext) -> Path:
        """The Taylor examples upstream's `get_examples` returned (kept by a shim save hook)."""
        return ctx.work / "taylor_examples.pt"

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        s = settings_for(ctx.params)
        check_model(ctx.input_model)
        check_ratio(ctx.input_config, s.pruning_ratio)
        attention, mlp = layer_ranges(s, depth(ctx.model_dir))
        device = "cuda" if ctx.device.startswith("cuda") else "cpu"
        prune = ["--base_model", str(ctx.model_dir), "--pruning_ratio", str(s.pruning_ratio), "--block_wise",
                 "--block_mlp_layer_start", str(mlp.start), "--block_mlp_layer_end", str(mlp.stop),
                 "--block_attention_layer_start", str(attention.start), "--block_attention_layer_end", str(attention.stop),
                 "--pruner_type", s.pruner_type, "--taylor", s.taylor, "--num_examples", str(s.num_examples),
                 "--device", device, "--eval_device", device, "--seed", str(s.seed),
                 "--save_ckpt_log_name", LOG_NAME, "--save_model"]
        steps = [
            Step("prune", "hf_prune.py", prune, time=["torch._tensor:Tensor.backward",
                                                      "LLMPruner.torch_pruning.pruner.algorithms.metapruner:MetaPruner.step"],
                 save=[{"after": EXAMPLES_TARGET, "model": "return", "torch_save": str(self.examples_file(ctx))}],
                 outputs=[str(self.checkpoint(ctx))]),
            Step("export", str(EXPORT), ["--checkpoint", str(self.checkpoint(ctx)), "--out", str(ctx.work / "pruned")],
                 helper=True),
        ]
        if s.lora_steps > 0 and not ctx.staged.offline:
            steps.append(Step("lora", "post_training.py",
                              ["--base_model", str(ctx.model_dir), "--prune_model", str(self.checkpoint(ctx)),
                               "--data_path", "yahma/alpaca-cleaned", "--lora_r", str(s.lora_r), "--lora_alpha", str(s.lora_alpha),
                               "--lora_dropout", str(s.lora_dropout), "--num_epochs", "2", "--learning_rate", str(s.lora_lr),
                               "--batch_size", "64", "--micro_batch_size", "4", "--output_dir", str(ctx.work / "tune_log")],
                              time=["transformers.trainer:Trainer.train"]))
        return steps

    def convert(self, ctx: UpstreamContext) -> Compression:
        from safetensors.torch import load_file, save_file

        s = settings_for(ctx.params)
        pruned = ctx.work / "pruned"
        state = load_file(require(pruned / "model.safetensors", "exported state dict (upstream_export.py)"))
        shapes = json.loads(require(pruned / "shapes.json", "per-layer shapes (upstream_export.py)").read_text())["linears"]
        notes = [f"upstream horseee/LLM-Pruner hf_prune.py --block_wise --pruning_ratio {s.pruning_ratio} --taylor {s.taylor}; "
                 "Taylor examples: 64-token windows of the staged C4 documents in place of BookCorpus offline"]
        if self.examples_file(ctx).is_file():
            examples = torch.load(self.examples_file(ctx), map_location="cpu", weights_only=True)
            notes.append(f"taylor: {examples.shape[0]} x {examples.shape[1]} tokens from upstream's get_examples; "
                         f"examples sha256 {examples_digest(examples)}")
        adapter = ctx.work / "tune_log" / "adapter_model.bin"
        if adapter.is_file():
            merged = merge_lora(state, torch.load(adapter, map_location="cpu", weights_only=True),
                                json.loads((ctx.work / "tune_log" / "adapter_config.json").read_text()))
            notes.append(f"LoRA (post_training.py, yahma/alpaca-cleaned, bf16 by patch) merged into {merged} linears")
        elif s.lora_steps > 0:
            notes.append("no LoRA recovery: upstream's post_training.py trains on yahma/alpaca-cleaned, which is not staged "
                         "offline (the reference engine's LoRA runs on the calibration windows)")
        dense = dense_shapes(ctx.input_model)
        declared, removed, total = {}, 0, 0
        for name, shape in sorted(shapes.items()):
            if name not in dense:
                raise ConversionError(f"upstream's {name} is not a linear of the input model")
            before, now = dense[name][0] * dense[name][1], shape[0] * shape[1]
            if state[f"{name}.weight"].shape != torch.Size(shape):
                raise ConversionError(f"{name}: exported weight {list(state[f'{name}.weight'].shape)} != declared shape {shape}")
            declared[name] = LayerCompression(sparsity=1 - now / before, shape=list(shape))
            removed, total = removed + before - now, total + before
        ctx.model_out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, ctx.model_out / "model.safetensors",
                  metadata={"format": "pt"})
        (ctx.model_out / "config.json").write_text((ctx.input_model / "config.json").read_text())
        copy_tokenizer(ctx.input_model, ctx.model_out)
        return Compression(method="llm_pruner", engine="upstream", sparsity_pattern="structured",
                           target_sparsity=s.pruning_ratio, measured_sparsity=removed / total if total else 0.0,
                           layers=declared, notes=notes)


def dense_shapes(model_dir: Path) -> dict[str, list[int]]:
    """[out, in] of every decoder linear of the input model, from its config (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {n: list(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def merge_lora(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: dict) -> int:
    """W += B @ A * lora_alpha / r for every adapted linear (vendored peft key names:
    `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`). Returns how many."""
    scale = config["lora_alpha"] / config["r"]
    merged = 0
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        weight = f"{module}.weight"
        if weight not in state:
            raise ConversionError(f"LoRA adapter for {module}, which the pruned model does not have")
        state[weight] = (state[weight].float() + (b.float() @ a.float()) * scale).to(state[weight].dtype)
        merged += 1
    return merged


ADAPTER = LLMPrunerUpstream()
