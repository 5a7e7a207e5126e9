"""Track 5 on MLC-LLM: the measurement protocol through `mlc_llm.MLCEngine`, in MLC's environment.

Runs under the deploy-mlc_llm image's interpreter; imports nothing from llmcbench (the
protocol's loop is measure_common.py next to it). Greedy (temperature 0) completions of
exactly `new_tokens` tokens from token-id prompts, EOS ignored (`debug_config.ignore_eos`).

    python mlc_measure.py --model DIST --model-lib DIST/lib.so --out figures.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from measure_common import check_lengths, measure, protocol_args, write_figures


def main(argv: list[str] | None = None) -> int:
    ap = protocol_args(argparse.ArgumentParser())
    ap.add_argument("--model", required=True)
    ap.add_argument("--model-lib", required=True)
    a = ap.parse_args(argv)

    import mlc_llm
    import torch
    from mlc_llm import MLCEngine

    t0 = time.perf_counter()
    engine = MLCEngine(model=a.model, model_lib=a.model_lib, device="cuda", mode="server")
    load_s = time.perf_counter() - t0
    vocab = json.loads((Path(a.model) / "mlc-chat-config.json").read_text())["vocab_size"]

    def run(ids: list[list[int]]) -> None:
        got = []
        for prompt in ids:  # one request after another: a batch's figure is sequential throughput on MLC
            r = engine.completions.create(prompt=prompt, max_tokens=a.new_tokens, temperature=0.0,
                                          extra_body={"debug_config": {"ignore_eos": True}})
            got.append(r.usage.completion_tokens)
        check_lengths(got, a.new_tokens, "MLC-LLM")

    figures = measure(run, vocab, a)
    engine.terminate()
    free, total = torch.cuda.mem_get_info()
    write_figures(a.out, {**figures, "load_s": load_s, "mlc_llm_version": getattr(mlc_llm, "__version__", "unknown"),
                          "peak_memory_bytes": total - free, "memory_kind": "gpu_used_after_runs"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
