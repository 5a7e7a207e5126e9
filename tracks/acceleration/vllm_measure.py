"""Track 5 on vLLM: the measurement protocol inside vLLM's own environment.

Runs under the vLLM interpreter (the deploy-vllm image's venv, or `LLMCBENCH_VLLM_PYTHON`:
vLLM pins its own torch and transformers, which cannot share the harness's environment), so
it imports nothing from llmcbench; the protocol's loop is measure_common.py next to it.
Greedy decode of exactly `new_tokens` tokens with EOS ignored.

    python vllm_measure.py --model DIR --out figures.json [--quantization gptq] [--dtype float32] ...
"""

from __future__ import annotations

import argparse
import sys
import time

from measure_common import check_lengths, measure, peak_rss, process_tree, protocol_args, reset_peak_rss, write_figures


def main(argv: list[str] | None = None) -> int:
    ap = protocol_args(argparse.ArgumentParser())
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", default=None, help="default: --model (a packed export may have no tokenizer)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile, no CUDA graphs")
    a = ap.parse_args(argv)

    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=a.model, tokenizer=a.tokenizer or a.model, dtype=a.dtype, quantization=a.quantization,
              max_model_len=a.max_model_len, enforce_eager=a.eager, seed=0,
              max_num_seqs=max(int(b) for b in a.batch_sizes.split(",")))
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, min_tokens=a.new_tokens, ignore_eos=True)

    def run(ids: list[list[int]]) -> None:
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        check_lengths([len(o.outputs[0].token_ids) for o in outs], a.new_tokens, "vLLM")

    # vLLM decodes in its engine's processes (on CPU the worker holds the weights and the KV
    # cache it allocates up front): their peak RSS, reset before the runs, summed with this one's
    processes = process_tree()
    reset = reset_peak_rss(processes)
    figures = measure(run, llm.llm_engine.model_config.hf_config.vocab_size, a)
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        memory = {"peak_memory_bytes": total - free, "memory_kind": "gpu_used_after_runs"}
    else:
        memory = {"peak_memory_bytes": peak_rss(processes),
                  "memory_kind": "host_rss_processes" if reset else "host_rss_processes_lifetime"}
    # the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the CPU default here, as
    # vLLM itself parses it): its worker's threads are this process's, and vLLM logs no core
    # binding to read them from
    in_process = not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING
    threads = {"worker_threads": torch.get_num_threads()} if in_process and not torch.cuda.is_available() else {}
    write_figures(a.out, {**figures, "load_s": load_s, "vllm_version": vllm.__version__, "engine_in_process": in_process,
                          "compiled": not a.eager,
                          **threads, **memory})
    print(f"vllm {vllm.__version__}: {figures['tokens_per_s']:.1f} tokens/s at batch 1", flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    sys.exit(main())
