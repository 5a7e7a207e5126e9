"""Track 5 on vLLM: the measurement protocol of protocol.py, inside vLLM's own environment.

Runs under the vLLM interpreter (the deploy-vllm image's venv, or `LLMCBENCH_VLLM_PYTHON`:
vLLM pins its own torch and transformers, which cannot share the harness's environment), so
it imports nothing from llmcbench. The same protocol: seeded random prompt token ids (the
same generator as protocol.prompt_ids), greedy decode of exactly `new_tokens` tokens with EOS
ignored, `warmup` untimed runs, the median of `repeats` timed runs; batched throughput per
extra batch size. The figures go to `--out` as JSON.

    python vllm_measure.py --model DIR --out figures.json [--quantization gptq] [--dtype float32] ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def prompt_ids(vocab_size: int, prompt_tokens: int, batch: int = 1, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab_size - 1), (batch, prompt_tokens), generator=g).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=None, help="default: --model (a packed export may have no tokenizer)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--max-model-len", type=int, default=1024)
    a = ap.parse_args(argv)

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=a.model, tokenizer=a.tokenizer or a.model, dtype=a.dtype, quantization=a.quantization, max_model_len=a.max_model_len,
              enforce_eager=True, seed=0, max_num_seqs=max(int(b) for b in a.batch_sizes.split(",")))
    load_s = time.perf_counter() - t0
    config_vocab = llm.llm_engine.model_config.hf_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, min_tokens=a.new_tokens, ignore_eos=True)

    def run(ids: list[list[int]]) -> None:
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        got = [len(o.outputs[0].token_ids) for o in outs]
        if any(n != a.new_tokens for n in got):
            raise RuntimeError(f"vLLM decoded {got} tokens, not {a.new_tokens}")

    def timed(ids: list[list[int]], warmup: int, repeats: int) -> dict:
        for _ in range(warmup):
            run(ids)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(ids)
            runs.append(time.perf_counter() - t)
        median = statistics.median(runs)
        return {"tokens_per_s": len(ids) * a.new_tokens / median, "median_s": median, "runs_s": runs}

    batch1 = timed(prompt_ids(config_vocab, a.prompt_tokens), a.warmup, a.repeats)
    throughput = {}
    for b in (int(x) for x in a.batch_sizes.split(",")):
        if b > 1:
            throughput[str(b)] = timed(prompt_ids(config_vocab, a.prompt_tokens, b), 1, max(1, a.repeats // 2))["tokens_per_s"]
    import vllm

    figures = {"batch1": batch1, "throughput": throughput, "tokens_per_s": batch1["tokens_per_s"], "load_s": load_s,
               "vllm_version": vllm.__version__, "peak_memory_bytes": _peak_rss(), "memory_kind": "host_rss_max_process"}
    tmp = a.out + ".partial"
    with open(tmp, "w") as f:
        json.dump(figures, f)
    os.replace(tmp, a.out)
    print(f"vllm {vllm.__version__}: {batch1['tokens_per_s']:.1f} tokens/s at batch 1", flush=True)
    return 0


def _peak_rss() -> int:
    """The larger of this process's and its (finished) children's peak RSS: vLLM's engine may
    run in a child process."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    sys.exit(main())
