"""Track 5 on the torch_native backend against the memory-bandwidth roofline (issue 7, GPU).

Builds a random-weights LLaMA-2-7B-shaped model in fp16 on a GPU (the shapes of
benchmarks/engine_cost.py), prepares it for each category exactly as a deploy job does
(tracks/acceleration/backends.py: fp16 dense, 2:4 semi-structured sparse, int8 and int4
weight-only) and measures batch-1 greedy decode with the deploy protocol
(tracks/acceleration/protocol.py). Batch-1 decode reads every weight once per token, so

    roofline fraction = bytes of weights read per token x tokens/s / peak HBM bandwidth

where the bytes are counted from the prepared tensors themselves (int4 codes, scales and
zeros; 2:4 values and metadata; the fp16 embedding row and LM head). Random weights give
real shapes and bytes, not real text. Goal (issue 7): fp16 >= 75% of the roofline, int4 >=
3x fp16, 2:4 > 1.1x fp16. `--compile` decodes with a static KV cache under torch.compile
(transformers' own recipe against Python overhead per token: protocol.compiled_decode).

    python benchmarks/deploy_roofline.py                       # 7b shape, all categories
    python benchmarks/deploy_roofline.py --layers 8 --new-tokens 64 --compile
    python benchmarks/deploy_roofline.py --peak-gbs 3350       # H100 SXM; default from the GPU's name
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_GBS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100-SXM4-80GB": 2039,
            "A100": 1555, "A800": 2039, "L40S": 864}
CATEGORIES = ("fp16", "2:4", "int8", "int4")  # and "w8a8" on request: int8 activations on the int8 GEMM


def peak_gbs(name: str) -> float:
    return next((v for k, v in PEAK_GBS.items() if k.lower() in name.lower()), 0.0)


def bytes_per_token(model) -> int:
    """Bytes a batch-1 decode step reads: every decoder weight (as prepared), the LM head, one embedding row."""
    import torch

    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name:
            total += t.shape[-1] * t.element_size()
            continue
        if isinstance(t, torch.Tensor) and hasattr(t, "packed"):  # semi-structured sparse: values + metadata
            total += t.packed.numel() * t.packed.element_size() + t.meta.numel() * t.meta.element_size()
        elif "rotary" not in name:
            total += t.numel() * t.element_size()
    return total


def prepare(model, cat: str, device):
    import torch

    from llmcbench.driver.contract import Compression
    from llmcbench.tracks.acceleration.backends import prepare_native
    from llmcbench.tracks.acceleration.int_kernels import decoder_linears

    if cat == "fp16":
        return prepare_native(model, None, device)
    if cat == "2:4":
        for _, _, lin in decoder_linears(model):  # keep the 2 largest of every 4 weights of a row
            w = lin.weight.data
            idx = w.abs().view(-1, 4).topk(2, dim=1).indices
            mask = torch.zeros_like(w.view(-1, 4), dtype=torch.bool).scatter_(1, idx, True)
            lin.weight.data = (w.view(-1, 4) * mask).view_as(w)
        return prepare_native(model, Compression(method="bench", sparsity_pattern="n:m", n_m=(2, 4)), device)
    if cat == "w8a8":
        return prepare_native(model, Compression(method="bench", weight_bits=8, act_bits=8, act_granularity="per_token"), device)
    if cat not in ("int8", "int4"):
        raise ValueError(f"unknown category '{cat}': fp16, 2:4, int8, int4 or w8a8")
    bits = 8 if cat == "int8" else 4
    return prepare_native(model, Compression(method="bench", weight_bits=bits, group_size=128 if bits == 4 else None), device)


def where(e: BaseException, frames: int = 4) -> str:
    """The innermost frames of an exception, innermost first: 'file:line function <- ...'.
    A compiler's bare `AssertionError: ` (int8 compiled on an H200) says nothing by itself."""
    tb = traceback.extract_tb(e.__traceback__)[-frames:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb))


def measure_category(build, cat: str, device, peak: float, new_tokens: int, repeats: int, compile: bool,
                     fullgraph: bool = True, retry_graph_breaks: bool = False, all_devices: bool = False) -> dict:
    """One category's row: build the model, prepare it as a deploy job does, decode batch-1.

    A failure is a row with the error, where it was raised (and the whole traceback in the
    log): one category failing leaves the others measured. With `retry_graph_breaks`, a
    category that fails compiled whole (fullgraph) is built and measured again with graph
    breaks allowed, and its row keeps the fullgraph error: one device call instead of two."""
    row = _measure_once(build, cat, device, peak, new_tokens, repeats, compile, fullgraph, all_devices)
    if "error" in row and compile and fullgraph and retry_graph_breaks:
        print(f"[roofline] {cat}: again, allowing graph breaks", flush=True)
        retry = _measure_once(build, cat, device, peak, new_tokens, repeats, True, False, all_devices)
        row = {**retry, "fullgraph_error": row["error"], "fullgraph_where": row["where"]}
    return row


def _measure_once(build, cat: str, device, peak: float, new_tokens: int, repeats: int, compile: bool, fullgraph: bool,
                  all_devices: bool) -> dict:
    import torch

    from llmcbench.tracks.acceleration.protocol import compiled_decode, hf_generate, measure

    if compile:  # each category compiles afresh: no guards, caches or failed state left by the one before
        torch._dynamo.reset()
    t0 = time.perf_counter()
    model = build()
    row: dict = {"category": cat}
    if compile:
        row["fullgraph"] = fullgraph
    try:
        t1 = time.perf_counter()
        prepared = prepare(model, cat, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        # where a category's time goes, as it happens: a part cut by its time limit still says
        print(f"[roofline] {cat}: model built in {t1 - t0:.1f} s, prepared in {time.perf_counter() - t1:.1f} s", flush=True)
        if compile:
            compiled_decode(prepared.model, fullgraph=fullgraph, all_devices=all_devices)
        figures = measure(hf_generate(prepared.model), model.config.vocab_size, device, 128, new_tokens, 2, repeats, [1])
        nbytes = bytes_per_token(prepared.model)
        row.update({"kernel": prepared.kernel, "tokens_per_s": figures["tokens_per_s"], "bytes_per_token": nbytes,
                    "roofline_fraction": nbytes * figures["tokens_per_s"] / (peak * 1e9) if peak else None,
                    "peak_memory_gb": figures["peak_memory_bytes"] / 1e9})
        if compile:
            row["compiled_step"] = hasattr(prepared.model, "_compiled_call")
        print(f"[roofline] {cat}: {figures['tokens_per_s']:.1f} tokens/s, {time.perf_counter() - t0:.1f} s in all", flush=True)
    except Exception as e:  # noqa: BLE001 - one category failing leaves the others measured
        traceback.print_exc()
        row.update({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "where": where(e)})
    return row


def main(argv=None) -> int:
    import torch

    from engine_cost import build_model, llama_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-gbs", type=float, default=None, help="HBM bandwidth in GB/s (default: from the GPU's name)")
    ap.add_argument("--compile", action="store_true",
                    help="static KV cache; generate compiles the decode step (mode='reduce-overhead', fullgraph)")
    ap.add_argument("--graph-breaks", action="store_true", help="with --compile: allow graph breaks (not fullgraph)")
    ap.add_argument("--retry-graph-breaks", action="store_true",
                    help="with --compile: a category that fails under fullgraph is measured again allowing graph breaks")
    ap.add_argument("--out", default="deploy_roofline.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (batch-1 decode against the HBM roofline)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    peak = a.peak_gbs or peak_gbs(gpu)
    rows = []
    for cat in a.categories.split(","):
        config = llama_config(a.shape, a.layers)
        config.use_cache = True
        row = measure_category(lambda: build_model(config, device, torch.float16).eval(), cat, device, peak, a.new_tokens,
                               a.repeats, a.compile, fullgraph=not a.graph_breaks, retry_graph_breaks=a.retry_graph_breaks)
        rows.append(row)
        torch.cuda.empty_cache()
        # after every category: a run stopped at a time limit keeps what it measured
        Path(a.out).write_text(json.dumps({"gpu": gpu, "peak_gbs": peak, "compile": a.compile, "rows": rows}, indent=2) + "\n")
    base = next((r["tokens_per_s"] for r in rows if r["category"] == "fp16" and "tokens_per_s" in r), None)
    print(f"{gpu}, peak {peak:.0f} GB/s, shape {a.shape}{f' ({a.layers} layers)' if a.layers else ''}, compile {a.compile}")
    print(f"{'category':8} {'tokens/s':>9} {'GB/token':>9} {'roofline':>9} {'vs fp16':>8}  kernel")
    for r in rows:
        if "error" in r:
            print(f"{r['category']:8} error: {r['error']} (at {r['where']})")
            continue
        if "fullgraph_error" in r:
            print(f"{r['category']:8} (with graph breaks; fullgraph failed: {r['fullgraph_error']} at {r['fullgraph_where']})")
        frac = f"{100 * r['roofline_fraction']:.1f}%" if r["roofline_fraction"] is not None else "-"
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['category']:8} {r['tokens_per_s']:9.1f} {r['bytes_per_token'] / 1e9:9.2f} {frac:>9} {speed:>8}  {r['kernel']}")
    Path(a.out).write_text(json.dumps({"gpu": gpu, "peak_gbs": peak, "compile": a.compile, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
