"""Loading a structurally pruned artifact whose layers no longer share one shape.

Structured pruning (LLM-Pruner) removes whole attention head groups and MLP channels, and
upstream's block-wise mode prunes only a middle range of layers: the first and last layers
keep their shapes, the others shrink. A standard Hugging Face config describes one shape
for every layer, so `from_pretrained` cannot build such a model (it would report size
mismatches). The artifact stays a plain HF directory (config.json of the original model,
safetensors weights of the pruned one); what it needs besides is the shape of every linear,
which `compression.json` already declares (`layers.<module name>.shape = [out, in]`,
`sparsity_pattern = "structured"`).

`load_structured_pruned(path)` builds the model from the config without initialising its
weights, shrinks every declared linear to its declared shape (`reshape_for_checkpoint`),
then loads the checkpoint into it, strictly. LLaMA-family attention reshapes its
projections with `-1` heads and a per-module `head_dim`, and the pruning keeps each layer's
ratio of query heads to KV heads, so the forward needs no per-layer attribute beyond the
weights themselves (checked for transformers 5.x `LlamaAttention.forward`).

An artifact pruned the same way in every layer (LLM-Pruner `uniform = true`) writes a
standard config instead, loads with plain `from_pretrained`, and goes through here too,
harmlessly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

COMPRESSION_FILE = "compression.json"


def declared_shapes(model_dir: Path | str) -> dict[str, list[int]] | None:
    """{linear module name: [out, in]} when the artifact in `model_dir` declares structured
    pruning with per-linear shapes; None for every other directory."""
    path = Path(model_dir) / COMPRESSION_FILE
    if not path.is_file():
        return None
    try:
        declaration = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # the job's own contract checks report a broken declaration
    if not isinstance(declaration, dict) or declaration.get("sparsity_pattern") != "structured":
        return None
    shapes = {name: layer["shape"] for name, layer in (declaration.get("layers") or {}).items()
              if isinstance(layer, dict) and layer.get("shape")}
    return shapes or None


def reshape_for_checkpoint(model: nn.Module, shapes: dict[str, list[int]]) -> int:
    """Give every linear named in `shapes` an uninitialised weight (and bias) of its declared
    [out, in] shape, so that the pruned checkpoint's `load_state_dict` fits. Returns how many
    linears changed shape."""
    changed = 0
    for name, shape in shapes.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint declares a shape for '{name}', which this model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"'{name}' is a {type(linear).__name__}, not a linear layer: cannot reshape it")
        out_features, in_features = (int(x) for x in shape)
        if (out_features, in_features) == tuple(linear.weight.shape):
            continue
        like = linear.weight
        linear.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=like.dtype, device=like.device),
                                     requires_grad=like.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(torch.empty(out_features, dtype=linear.bias.dtype, device=linear.bias.device),
                                       requires_grad=linear.bias.requires_grad)
        linear.in_features, linear.out_features = in_features, out_features
        changed += 1
    return changed


def _checkpoint_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (a structured-pruned artifact is saved with save_pretrained)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_structured_pruned(model_dir: Path | str, *, dtype: torch.dtype = torch.float32,
                           trust_remote_code: bool = False) -> nn.Module | None:
    """The model in `model_dir` with its declared per-layer shapes, in eval mode; None when
    the directory is not a structured-pruned artifact (then use `from_pretrained`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    model_dir = Path(model_dir)
    shapes = declared_shapes(model_dir)
    if shapes is None:
        return None
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    reshape_for_checkpoint(model, shapes)
    missing, unexpected = model.load_state_dict(_checkpoint_state(model_dir), strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        tied = {name for name, p in model.named_parameters(remove_duplicate=False)
                if p is model.get_output_embeddings().weight}
        model.tie_weights()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: the checkpoint does not fit its declared shapes "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
