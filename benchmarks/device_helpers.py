"""Small steps of benchmarks/device_check.sh, kept out of the shell script.

    python benchmarks/device_helpers.py model OUT TOKENIZER_DIR [--small]
    python benchmarks/device_helpers.py merge-cost OUT PART.json ...
    python benchmarks/device_helpers.py collect-parity OUT RUNS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def make_model(out: Path, tokenizer_dir: Path, small: bool) -> None:
    """A random-weights LLaMA-shaped model with the prepared sentencepiece tokenizer.

    head_dim 128 as LLaMA-2's; 8 layers of hidden 2048 keep each upstream run to seconds on a
    GPU. The tokenizer files are copied, not re-saved: transformers 5 would save its own
    backend's format, which the upstream stack's transformers 4.x does not read.

    max_position_embeddings is 2048, the calibration seqlen that upstream SparseGPT and GPTQ
    hard-code and upstream Wanda reads from the config: with the paper profile (2048-token
    windows, 128 of them) the harness's sampler draws exactly upstream's `get_c4` windows, so
    both engines compress from the very same C4 tokens and the agreement figures measure the
    algorithm, not the data."""
    import shutil

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    config = LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=256 if small else 2048,
                         intermediate_size=512 if small else 5504, num_hidden_layers=2 if small else 8,
                         num_attention_heads=2 if small else 16, num_key_value_heads=2 if small else 16,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if small else torch.float16)
    shutil.rmtree(out, ignore_errors=True)  # no stale tokenizer files of another model
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}")


def merge_cost(out: Path, parts: list[Path]) -> None:
    records = [json.loads(p.read_text()) for p in parts if p.is_file()]
    merged = {**(records[0] if records else {}), "results": [r for rec in records for r in rec["results"]]}
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"{out.name}: {len(merged['results'])} methods")


def collect_parity(out: Path, runs: Path) -> None:
    """The parity records, plus every job that did not end `ok` with its error class and message."""
    records = {p.stem: json.loads(p.read_text()) for p in sorted((runs / "parity").glob("*.json"))}
    failed = {}
    for result in sorted(runs.rglob("result.json")):
        r = json.loads(result.read_text())
        if r.get("status") != "ok":
            failed[str(result.parent.relative_to(runs))] = r.get("error")
    out.write_text(json.dumps({"parity": records, "failed_jobs": failed}, indent=2, default=str) + "\n")
    print(f"{out.name}: {len(records)} parity records, {len(failed)} failed jobs")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "model":
        make_model(Path(args[0]), Path(args[1]), "--small" in args)
    elif cmd == "merge-cost":
        merge_cost(Path(args[0]), [Path(a) for a in args[1:]])
    elif cmd == "collect-parity":
        collect_parity(Path(args[0]), Path(args[1]))
    else:
        print(f"error: unknown step {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
