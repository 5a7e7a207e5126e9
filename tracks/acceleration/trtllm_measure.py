"""Track 5 on TensorRT-LLM: the measurement protocol on a built engine, in TRT-LLM's environment.

Runs under the deploy-tensorrt_llm image's interpreter; imports nothing from llmcbench (the
protocol's loop is measure_common.py next to it). Greedy (top_k 1) decode of exactly
`new_tokens` tokens: `end_id=-1` never matches a token, so EOS is ignored.

    python trtllm_measure.py --engine DIR --tokenizer HF_DIR --out figures.json ...
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
    ap.add_argument("--engine", required=True)
    ap.add_argument("--tokenizer", required=True)
    a = ap.parse_args(argv)

    import tensorrt_llm
    import torch
    from tensorrt_llm.runtime import ModelRunner

    t0 = time.perf_counter()
    runner = ModelRunner.from_dir(engine_dir=a.engine)
    load_s = time.perf_counter() - t0
    vocab = json.loads((Path(a.engine) / "config.json").read_text())["pretrained_config"]["vocab_size"]

    def run(ids: list[list[int]]) -> None:
        out = runner.generate([torch.tensor(x, dtype=torch.int32) for x in ids], max_new_tokens=a.new_tokens, end_id=-1,
                              pad_id=0, top_k=1, return_dict=True)
        torch.cuda.synchronize()
        lengths = out["sequence_lengths"][:, 0].tolist()
        check_lengths([n - a.prompt_tokens for n in lengths], a.new_tokens, "TensorRT-LLM")

    figures = measure(run, vocab, a)
    free, total = torch.cuda.mem_get_info()
    write_figures(a.out, {**figures, "load_s": load_s, "tensorrt_llm_version": tensorrt_llm.__version__,
                          "peak_memory_bytes": total - free, "memory_kind": "gpu_used_after_runs"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
