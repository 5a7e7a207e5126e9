"""Unpickle LLM-Pruner's checkpoint into plain tensors (run with the upstream interpreter).

`hf_prune.py --save_model` writes `torch.save({'model': model, 'tokenizer': tokenizer}, ...)`:
the whole module object, of the vendored `LLMPruner.models.hf_llama.modeling_llama` classes,
with per-layer shapes no HF config describes. Only upstream's code can unpickle it, so this
script runs under the upstream interpreter with the checkout on PYTHONPATH, and writes what
any environment reads: `model.safetensors` (every parameter, the tied LM head once) and
`shapes.json` ({linear module name: [out, in]}, and each attention's head count).

    python upstream_export.py --checkpoint prune_log/<name>/pytorch_model.bin --out <dir>

Imports only torch and safetensors (both in upstream's stack); nothing from llmcbench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    kwargs = {"map_location": "cpu"}
    if "weights_only" in torch.load.__code__.co_varnames:
        kwargs["weights_only"] = False  # a pickled module, by design (torch >= 2.6 defaults to True)
    saved = torch.load(a.checkpoint, **kwargs)
    model = saved["model"] if isinstance(saved, dict) else saved
    # Rotary inverse frequencies are a persistent buffer of every layer in the vendored
    # (transformers 4.28-era) LLaMA; later releases compute them from the config and have no
    # such key, so a checkpoint holding them does not load there. Seen on the real upstream run.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    embed = state.get("model.embed_tokens.weight")
    if "lm_head.weight" in state and embed is not None and state["lm_head.weight"].data_ptr() == embed.data_ptr():
        del state["lm_head.weight"]  # tied: stored once, as save_pretrained does
    shapes, heads = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            shapes[name] = list(module.weight.shape)
        if hasattr(module, "num_heads") and name.endswith("self_attn"):
            heads[name] = int(module.num_heads)
    os.makedirs(a.out, exist_ok=True)
    save_file(state, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "shapes.json"), "w") as f:
        json.dump({"linears": shapes, "num_heads": heads}, f, indent=1)
    print(f"exported {len(state)} tensors, {len(shapes)} linears", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
