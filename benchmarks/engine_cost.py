"""Compression cost of the reference engines on a randomly initialised LLaMA (LLMCBench Table 4).

Builds a random-weights LlamaForCausalLM of a named shape directly on the target device
(fp16 on CUDA, fp32 on CPU), draws random calibration token ids, and for every method runs
its reference engine's `compress(model, calibration_ids, params, device)` with the method's
paper preset, as `driver/jobrun.py` does (calibration ids on the host, the model on the
device here). It records the wall time of `compress` (CUDA synchronised around it) and the
peak memory (CUDA: max_memory_allocated / max_memory_reserved after a reset; CPU: the
process's peak RSS, which only ever grows), prints them next to the paper's Table 4
(minutes on one A800 for LLaMA-2-7B) and writes them to a JSON file.

Random weights make the cost realistic (same shapes, same FLOPs, same memory) but not the
result: nothing here measures accuracy. A method that fails is reported with its one-line
error and the others still run.

    python benchmarks/engine_cost.py --shape 7b --device cuda                # the paper's setting
    python benchmarks/engine_cost.py --shape 7b --layers 4 --methods wanda,gptq
    python benchmarks/engine_cost.py --shape tiny --device cpu --nsamples 2 --seqlen 32
    python benchmarks/engine_cost.py --param epochs=1 --param lora_steps=2 --param gptq.blocksize=64
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ALL_METHODS = ("wanda", "sparsegpt", "gptq", "smoothquant", "awq", "omniquant", "llm_pruner")

# LLMCBench Table 4: compression time in minutes on one A800 for LLaMA-2-7B.
PAPER_MINUTES: dict[str, dict[str, Any]] = {
    "wanda": {"minutes": 4.0, "text": "4"},
    "sparsegpt": {"minutes": 16.0, "text": "16"},
    "gptq": {"minutes": 17.0, "text": "17"},
    "smoothquant": {"minutes": 6.5, "text": "6.5"},
    "awq": {"minutes": 12.0, "text": "12"},
    "omniquant": {"minutes": 325.0, "text": "325"},
    "llm_pruner": {"minutes": 121.5, "text": "0.5 + 121 LoRA", "prune_minutes": 0.5, "lora_minutes": 121.0},
}
PAPER_DEVICE = "NVIDIA A800 (LLaMA-2-7B)"

SHAPES: dict[str, dict[str, int]] = {
    # LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}


def parse_value(text: str) -> Any:
    """`key=value` values as TOML would give them to validate_params: bool, int, float, else str."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(items: list[str]) -> dict[str | None, dict[str, Any]]:
    """`key=value` (every method whose preset has `key`) or `method.key=value` (that method only)
    -> {method or None: {key: value}}."""
    out: dict[str | None, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"--param expects key=value or method.key=value, got {item!r}")
        scope, dot, bare = key.rpartition(".")
        method = scope.strip().lower().replace("-", "_") if dot else None
        out.setdefault(method, {})[bare.strip()] = parse_value(value)
    return out


def overrides_for(method: str, preset_params: dict[str, Any], params: dict[str | None, dict[str, Any]],
                  known_keys: set[str]) -> dict[str, Any]:
    """Unscoped overrides go to the methods whose preset has the key (`epochs` to OmniQuant,
    `lora_steps` to LLM-Pruner); a key no selected preset has goes to all of them, so the
    engines' validate_params names it. Scoped ones (`gptq.blocksize=64`) go to that method."""
    chosen = {k: v for k, v in params.get(None, {}).items() if k in preset_params or k not in known_keys}
    chosen.update(params.get(method, {}))
    return chosen


def preset_keys(methods: list[str], preset: str | None) -> set[str]:
    """Every param key of the selected methods' presets (unknown methods contribute none)."""
    from llmcbench.driver.registry import get_method

    keys: set[str] = set()
    for method in methods:
        try:
            keys |= set(get_method(method).preset(preset)[1])
        except Exception:
            pass
    return keys


def llama_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
                       bos_token_id=1, eos_token_id=2)


def build_model(config, device, dtype, seed: int = 0):
    """A random LlamaForCausalLM allocated (and initialised) on `device` in `dtype`, once."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def host_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower().replace("--", "-")


def run_method(name: str, preset: str | None, overrides: dict[str | None, dict[str, Any]], known_keys: set[str], config, device, dtype,
               nsamples: int | None, seqlen: int | None, seed: int) -> dict[str, Any]:
    import torch

    from llmcbench.driver.registry import get_method
    from llmcbench.methods._engine.output import EngineOutput

    row: dict[str, Any] = {"method": name, "status": "failed"}
    model = output = None
    try:
        spec = get_method(name)
        preset_name, params = spec.preset(preset)
        params.update(overrides_for(spec.name, params, overrides, known_keys))
        row.update(preset=preset_name, params=params)
        engine = spec.engine_module("reference")
        engine.validate_params(params)
        cal = spec.calibration
        ns = nsamples or (cal.nsamples if cal else 128)
        sl = seqlen or (cal.seqlen if cal else 2048)
        row["calibration"] = [ns, sl]
        generator = torch.Generator().manual_seed(seed)
        calibration_ids = torch.randint(3, config.vocab_size, (ns, sl), generator=generator, dtype=torch.long)

        model = build_model(config, device, dtype, seed)
        row["model_bytes"] = model_bytes(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            row["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        output = engine.compress(model, calibration_ids, dict(params), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["seconds"] = time.perf_counter() - t0
        if device.type == "cuda":
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        row["host_peak_rss_bytes"] = host_peak_rss_bytes()
        declaration = output.declaration if isinstance(output, EngineOutput) else output
        row["declared_method"] = declaration.method
        row["status"] = "ok"
    except Exception as e:  # one failing method must not stop the others
        lines = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"
    finally:
        del model, output  # a packed-export closure holds the model too
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(rows: list[dict[str, Any]], title: str, cuda: bool) -> None:
    headers = ["method", "preset", "calib", "time (min)", "time (s)",
               "peak GPU alloc (GiB)" if cuda else "peak host RSS (GiB)", "paper A800 (min)", "status"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        peak = r.get("peak_allocated_bytes") if cuda else r.get("host_peak_rss_bytes")
        body.append([r["method"], r.get("preset", "-"),
                     "x".join(map(str, r["calibration"])) if r.get("calibration") else "-",
                     f"{r['seconds'] / 60:.2f}" if ok else "-", f"{r['seconds']:.1f}" if ok else "-",
                     gib(peak) if ok else "-", PAPER_MINUTES.get(r["method"], {}).get("text", "-"),
                     "ok" if ok else f"FAILED {r.get('error', '')}"])
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, overflow="fold")
        for b in body:
            table.add_row(*b)
        Console(width=200).print(table)
    except ImportError:
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="model shape (default 7b = LLaMA-2-7B)")
    parser.add_argument("--layers", type=int, default=None, help="cut the depth to N decoder layers (quick runs)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128, the paper's; 0: each method's [calibration] default)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048, the paper's; 0: each method's [calibration] default)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated (default: all seven)")
    parser.add_argument("--preset", default=None, help="preset for every method (default: each one's paper_preset)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset param: key=value goes to the methods whose preset has the key "
                             "(epochs=1 -> omniquant, lora_steps=2 -> llm_pruner), method.key=value to one method (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/engine_cost-<device>.json)")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device} but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    methods = [m.strip().lower().replace("-", "_") for m in args.methods.split(",") if m.strip()]
    overrides = parse_params(args.param)
    known_keys = preset_keys(methods, args.preset)
    config = llama_config(args.shape, args.layers)
    name = device_name(device)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    for method in methods:
        print(f"[engine_cost] {method} on {name} ({args.shape}, {config.num_hidden_layers} layers, {str(dtype).removeprefix('torch.')}) ...", flush=True)
        row = run_method(method, args.preset, overrides, known_keys, config, device, dtype,
                         args.nsamples or None, args.seqlen or None, args.seed)
        row["paper"] = PAPER_MINUTES.get(method)
        print(f"[engine_cost] {method}: " + (f"{row['seconds']:.1f} s" if row["status"] == "ok" else row["error"]), flush=True)
        rows.append(row)

    title = (f"Compression cost on {name}: random LLaMA shape '{args.shape}', {config.num_hidden_layers} layers, "
             f"{str(dtype).removeprefix('torch.')}; paper: {PAPER_DEVICE}")
    print_table(rows, title, device.type == "cuda")
    if args.shape != "7b" or config.num_hidden_layers != 32:
        print("note: the paper's figures are for the full 32-layer LLaMA-2-7B; this run is not comparable one to one")

    out = args.out or Path(__file__).resolve().parent / "results" / f"engine_cost-{slug(name if device.type == 'cuda' else 'cpu')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": name, "device_string": str(device), "dtype": str(dtype).removeprefix("torch."),
        "shape": args.shape, "config": {k: getattr(config, k) for k in (*SHAPES[args.shape], "num_hidden_layers")},
        "nsamples": args.nsamples or "method default", "seqlen": args.seqlen or "method default",
        "seed": args.seed, "param_overrides": {(k or "*"): v for k, v in overrides.items()},
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "paper_device": PAPER_DEVICE, "paper_minutes": PAPER_MINUTES,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": rows,
    }
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
