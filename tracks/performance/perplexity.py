"""WikiText-2 perplexity, the GPTQ / SparseGPT / Wanda convention (SPEC.md section 5).

Follows IST-DASLab/sparsegpt `datautils.get_wikitext2` + `llama_eval` and Wanda
`eval_ppl_wikitext`: the `wikitext-2-raw-v1` test split, `"\\n\\n".join(texts)`,
tokenized once with the tokenizer's defaults (`tokenizer(text, return_tensors="pt")`),
non-overlapping windows of `seqlen` tokens, `nsamples = numel // seqlen` (remainder
dropped), per window the mean cross entropy of tokens 1..seqlen-1 given the window
(shifted logits/labels), nll = loss * seqlen, ppl = exp(sum nll / (nsamples * seqlen)).
One deviation in arithmetic only: logits are upcast to fp32 before the cross entropy
(upstream takes it in the model dtype).

Data: offline `hf/Salesforce__wikitext/wikitext-2-raw-v1/test.jsonl` under data_dir. That
slice was rebuilt from `wiki.test.raw` and lacks the hub's blank rows (""), so its joined
text has fewer blank lines than the hub's and its ppl is not exactly the published
number; the result's `data` field says which source was used. Online: the hub dataset
Salesforce/wikitext (the upstream scripts' `load_dataset("wikitext", ...)`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .task_table import WIKITEXT2, TextSpec


def load_texts(spec: TextSpec, data_dir: Path | None) -> tuple[list[str], str]:
    """Rows of the split and a description of the source ("local:<rel file>" | "hub:<id>/<config>")."""
    if data_dir is not None:
        path = spec.local_file(data_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name}: offline slice {path} is missing")
        with open(path, encoding="utf-8") as fh:
            texts = [json.loads(line)[spec.text_field] for line in fh if line.strip()]
        return texts, "local:" + path.relative_to(Path(data_dir)).as_posix()
    import datasets

    ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split)
    return list(ds[spec.text_field]), f"hub:{spec.hub_id}/{spec.hub_config}"


def encode_joined(tokenizer, texts: list[str]):
    """(1, T) token ids of the '\\n\\n'-joined texts, exactly as the upstream scripts tokenize."""
    return tokenizer("\n\n".join(texts), return_tensors="pt").input_ids


def ppl_of_ids(model, ids, *, seqlen: int, max_windows: int | None = None, device=None) -> dict:
    """Perplexity over non-overlapping seqlen windows of ids (shape (1, T))."""
    import torch

    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    nsamples = ids.numel() // seqlen
    if nsamples == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {seqlen}")
    n = nsamples if max_windows is None else min(nsamples, int(max_windows))
    if n < 1:
        raise ValueError("max_windows must be at least 1")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    loss_fct = torch.nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    nlls = []
    try:
        with torch.no_grad():
            for i in range(n):
                batch = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
                logits = model(batch, use_cache=False).logits
                shift_logits = logits[:, :-1, :].contiguous().float()
                shift_labels = batch[:, 1:]
                loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
                nlls.append(loss.float().cpu() * seqlen)
    finally:
        model.train(was_training)
    nll = torch.stack(nlls).sum().item()
    return {
        "ppl": math.exp(nll / (n * seqlen)),
        "seqlen": int(seqlen),
        "windows": n,
        "windows_total": nsamples,
        "tokens": int(ids.numel()),
    }


def wikitext2_ppl(
    model,
    tokenizer,
    *,
    data_dir: Path | None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device=None,
) -> dict:
    """WikiText-2 (raw, test) perplexity of an already-loaded causal LM.

    Returns {ppl, seqlen, windows (evaluated), windows_total (= tokens // seqlen), tokens,
    data ("local:<rel file>" | "hub:Salesforce/wikitext/wikitext-2-raw-v1")[, note]}.
    max_windows evaluates only the first N windows (quick profile).
    """
    texts, data = load_texts(WIKITEXT2, data_dir)
    ids = encode_joined(tokenizer, texts)
    out = ppl_of_ids(model, ids, seqlen=seqlen, max_windows=max_windows, device=device)
    out["data"] = data
    if data_dir is not None:
        out["note"] = WIKITEXT2.notes
    return out
