"""Reference-vs-upstream parity: the same method, preset and model through both engines.

`llmcbench parity <method>` runs (or finds cached) the bench of each engine on track 2
(WikiText-2 perplexity of the artifact, by our evaluation code for both), then compares
the two artifacts weight by weight:

- pruning: mask agreement, the share of block-linear weights that both engines keep or
  both prune (1.0: identical masks), and each engine's measured sparsity;
- quantization: the relative difference ||W_ref - W_up|| / ||W_dense|| and the share of
  identical weights, next to each engine's own error ||W_engine - W_dense|| / ||W_dense||:
  GPTQ-style error feedback turns a rounding flip into others along its row, so two correct
  engines can differ by about their own error while being equally close to the dense model;
- every method: each engine's block output error, each decoder block fed the dense model's
  input to it on WikiText-2 tokens, its output against dense's, relative to the dense block's
  own update. Scales a smoothing engine folds into its weights (SmoothQuant, AWQ, OmniQuant's
  LET) cancel inside a block, so this is the figure that compares such an engine with a
  plain one, where the weight errors measure the scales too;
- structured pruning: the share of block linears whose pruned shapes agree, and channel
  agreement, the share of kept rows/columns (heads, MLP channels) that both engines kept
  (elementwise figures only over the linears of equal shape). Where both engines note the
  sha256 of the examples their importance was computed on (LLM-Pruner's Taylor examples), a
  note says whether they were the same tokens.

It also shows the perplexity upstream printed about itself (its own evaluation, often at
another sequence length), so a reader sees both. The record is written atomically to
`<runs-dir>/parity/<method>-<preset>-<model>.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict

from .fsio import write_record

ENGINES = ("reference", "upstream")


class EngineSide(BaseModel):
    model_config = ConfigDict(extra="forbid")
    compress_job: str
    compress_s: float | None
    compress_peak_gpu_bytes: int | None = None  # track 3's figure on a GPU: the peak reserved while compressing
    wikitext2_ppl: float | None
    measured_sparsity: float | None
    weight_bits: int
    upstream_reported: dict[str, float] = {}
    # where the compress job ran and on what code: a record read on its own says so
    device: str | None = None
    gpu_name: str | None = None
    upstream_commit: str | None = None


class ParityRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    preset: str
    model: str
    dense_wikitext2_ppl: float | None
    engines: dict[str, EngineSide]
    linears_compared: int
    shapes_agree: float
    mask_agreement: float | None
    channel_agreement: float | None = None
    weight_rel_diff: float | None
    identical_fraction: float | None
    weight_rel_err: dict[str, float] | None = None  # per engine, vs dense, over the linears of dense shape
    # per engine: sqrt(mean over blocks of ||B'(h) - B(h)||^2 / ||B(h) - h||^2), h the dense input to block B
    block_rel_err: dict[str, float] | None = None
    block_tokens: int | None = None  # how many WikiText-2 tokens block_rel_err ran on
    notes: list[str] = []


def compare_artifacts(reference_dir: Path, upstream_dir: Path, dense_dir: Path, ids=None, notes: list | None = None) -> dict:
    """Weight-level agreement of two compressed artifacts of the same dense model; with token
    `ids` (batch, seqlen), each engine's block output error as well (where it cannot be taken,
    None, and the reason in `notes`: the record of two finished benches is not lost to it)."""
    from ..methods._engine.testing import block_linears
    from .jobrun import load_model
    from .contract import Job, ModelRef

    job = Job(kind="eval", method="dense", model=ModelRef(name="m", source="local", identity="x"))
    # Mask agreement only where both artifacts declare element sparsity: structured pruning
    # removes rows and columns, and a quantization grid holds zeros, so their zero patterns
    # (fp16 underflow included) say nothing about which weights either engine pruned.
    patterns = {_declared_pattern(Path(d)) for d in (reference_dir, upstream_dir)}
    masked = patterns <= {"unstructured", "n:m"}
    models = {k: load_model(Path(d), job)[0] for k, d in (("reference", reference_dir), ("upstream", upstream_dir), ("dense", dense_dir))}
    linears = {k: block_linears(m) for k, m in models.items()}
    names = sorted(set(linears["reference"]) & set(linears["upstream"]) & set(linears["dense"]))
    same = [n for n in names if linears["reference"][n].weight.shape == linears["upstream"][n].weight.shape]
    agree = total = 0
    diff_sq = dense_sq = identical = 0.0
    err_sq, err_dense_sq = {"reference": 0.0, "upstream": 0.0}, 0.0
    kept_both = kept = 0
    for n in same:
        pair = kept_channels(linears["reference"][n].weight, linears["upstream"][n].weight, linears["dense"][n].weight)
        if pair is not None:
            kept_both, kept = kept_both + len(pair[0] & pair[1]), kept + len(pair[0])
        wr, wu = linears["reference"][n].weight.detach().float(), linears["upstream"][n].weight.detach().float()
        agree += int(((wr == 0) == (wu == 0)).sum())
        total += wr.numel()
        identical += float((wr == wu).sum())
        diff_sq += float(((wr - wu) ** 2).sum())
        wd = linears["dense"][n].weight.detach().float()
        dense_sq += float((wd ** 2).sum()) if wd.shape == wr.shape else float((wr ** 2).sum())
        if wd.shape == wr.shape:
            err_dense_sq += float((wd ** 2).sum())
            err_sq["reference"] += float(((wr - wd) ** 2).sum())
            err_sq["upstream"] += float(((wu - wd) ** 2).sum())
    blocks = None
    if ids is not None:
        try:
            blocks = block_rel_errors(models, ids)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. out of memory, an architecture's own block call
            (notes if notes is not None else []).append(f"no block output error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return {
        "linears_compared": len(same),
        "shapes_agree": len(same) / len(names) if names else 0.0,
        "mask_agreement": agree / total if total and masked else None,
        "channel_agreement": kept_both / kept if kept else None,
        "weight_rel_diff": (diff_sq ** 0.5) / (dense_sq ** 0.5) if dense_sq else None,
        "identical_fraction": identical / total if total else None,
        "weight_rel_err": {k: (v / err_dense_sq) ** 0.5 for k, v in err_sq.items()} if err_dense_sq else None,
        "block_rel_err": blocks,
        "block_tokens": ids.numel() if blocks is not None else None,
    }


def block_rel_errors(models: dict, ids) -> dict[str, float] | None:
    """Per engine: each decoder block run on the dense model's input to that block, its output
    against the dense block's relative to the dense block's own update (output - input), and
    the root mean square of these ratios over the blocks: each block weighs the same, so the
    early blocks' large updates (the attention sink's massive activations) do not drown the
    others. Every fold of the smoothing methods stays inside one block (norm -> q/k/v and
    gate/up, v -> o, up -> down), so W*s and its 1/s cancel here. The weights only: declared
    activation quantization is not applied (as in the weight errors). None where the models'
    blocks do not pair up."""
    from functools import partial

    import torch

    from ..methods._engine.blockwise import UnsupportedModelError, _block_output, decoder_blocks

    try:
        layers = {k: decoder_blocks(m)[1] for k, m in models.items()}
    except UnsupportedModelError:
        return None
    n = len(layers["dense"])
    if any(len(v) != n for v in layers.values()):
        return None

    def hidden_of(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def run(model, before, after):
        """The model's decoder (no logits) with `before(i, ...)` and `after(i, ...)` hooked on block i."""
        handles = [h for i, layer in enumerate(layers[model]) for h in (
            layer.register_forward_pre_hook(partial(before, i), with_kwargs=True),
            layer.register_forward_hook(partial(after, i)))]
        try:
            with torch.no_grad():
                models[model].model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()

    dense_in, dense_out = [None] * n, [None] * n

    def keep_input(i, _module, args, kwargs):
        dense_in[i] = hidden_of(args, kwargs).detach().clone()

    def keep_output(i, _module, _args, output):
        dense_out[i] = _block_output(output).detach().float()

    run("dense", keep_input, keep_output)
    if any(x is None for x in dense_in + dense_out):
        return None
    updates = [float(((o - h.float()) ** 2).sum()) for h, o in zip(dense_in, dense_out)]
    errors = {}
    for engine in ENGINES:
        err = [None] * n

        def substitute(i, _module, args, kwargs):  # the dense input, whatever the engine's earlier blocks made
            h = dense_in[i].clone()
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        def compare(i, _module, _args, output):
            err[i] = float(((_block_output(output).float() - dense_out[i]) ** 2).sum())

        run(engine, substitute, compare)
        ratios = [e / u for e, u in zip(err, updates) if e is not None and u > 0]
        if len(ratios) != sum(u > 0 for u in updates) or not ratios:
            return None
        errors[engine] = (sum(ratios) / len(ratios)) ** 0.5
    return errors


def kept_channels(reference, upstream, dense) -> tuple[set[int], set[int]] | None:
    """Which of the dense linear's output rows (or input columns) each structured-pruned
    engine kept, when both removed the same number along the same dimension; else None.

    Each kept row is matched to the dense row it points along most (cosine): LoRA recovery
    merged after pruning moves the kept rows a little, never onto another dense row."""
    import torch

    if reference.shape != upstream.shape or reference.shape == dense.shape:
        return None
    if reference.shape[1] == dense.shape[1]:
        dim = 0
    elif reference.shape[0] == dense.shape[0]:
        dim = 1
    else:
        return None

    def unit_rows(w):
        return torch.nn.functional.normalize(w.detach().float().movedim(dim, 0).flatten(1), dim=1)

    dense_rows = unit_rows(dense)

    def kept(w):
        return set((unit_rows(w) @ dense_rows.T).argmax(dim=1).tolist())

    return kept(reference), kept(upstream)


def _declared_pattern(model_dir: Path) -> str | None:
    """The artifact's declared sparsity pattern (compression.json), None without one."""
    from .contract import read_compression

    declaration = read_compression(model_dir)
    return declaration.sparsity_pattern if declaration else None


def folded_scales_note(reference_dir: Path, upstream_dir: Path) -> str | None:
    """Where an engine folded per-channel scales into the weights (compression.json's
    `smoothing_folded`: SmoothQuant, AWQ, OmniQuant's LET), its stored linears hold W*s: the
    weight errors against dense then measure how far s is from 1 as well as the rounding (a
    GPU parity run's AWQ W8 weights were 0.056 and 0.074 from dense, where 8-bit rounding in
    groups of 128 moves normal weights by about 0.006). None where neither did."""
    from .contract import read_compression

    folded = [engine for engine, d in zip(ENGINES, (reference_dir, upstream_dir))
              if (c := read_compression(Path(d))) is not None and c.smoothing_folded]
    if not folded:
        return None
    return (f"{' and '.join(folded)} folded per-channel scales into the stored weights (compression.json smoothing_folded): "
            "the weight rel. error vs dense and the weight rel. diff compare W*s, so they measure the scales as well as "
            "the rounding, not the quantization error alone; the block output error, where the scales cancel, and the "
            "ppl compare the models")


def _examples_digest(model_dir: Path) -> str | None:
    """The `examples sha256 <hex>` an engine noted in compression.json (LLM-Pruner's Taylor
    examples), None where it noted none."""
    import re

    from .contract import read_compression

    declaration = read_compression(model_dir)
    notes = declaration.notes if declaration else []
    found = [m.group(1) for n in notes for m in [re.search(r"examples sha256 ([0-9a-f]{64})", n)] if m]
    return found[-1] if found else None


BLOCK_WINDOWS, BLOCK_SEQLEN = 4, 128  # the block errors' tokens: a few seconds on CPU for a 7B model


def block_ids(plan):
    """(BLOCK_WINDOWS, BLOCK_SEQLEN) tokens of WikiText-2's test split (the text both engines'
    perplexity is taken on) from where the plan reads its data, None where it is too short."""
    from transformers import AutoTokenizer

    from ..tracks.performance.perplexity import encode_joined, load_texts
    from ..tracks.performance.task_table import WIKITEXT2

    texts, _ = load_texts(WIKITEXT2, plan.data_dir if plan.data_source == "local" else None)
    tokenizer = AutoTokenizer.from_pretrained(plan.model.path, trust_remote_code=plan.model.trust_remote_code)
    ids = encode_joined(tokenizer, texts[:400])
    n = BLOCK_WINDOWS * BLOCK_SEQLEN
    return ids[:, :n].reshape(BLOCK_WINDOWS, BLOCK_SEQLEN) if ids.shape[1] >= n else None


def _ppl(run) -> float | None:
    t2 = run.result.metrics.get("track2") if run else None
    return t2["wikitext2"]["ppl"] if t2 else None


def parity_plans(method: str, preset: str | None, model: str | None, profile: str, runner: str, runs_dir: Path,
                 data_dir: str | None, device: str, trust_remote_code: bool = False) -> dict:
    """Both engines' track-2 bench plans, with the method's `[parity]` params on both."""
    from .bench import plan_bench
    from .registry import get_method

    params = get_method(method).parity.params or None
    return {engine: plan_bench(method, preset, model, "2", profile, engine, runner, runs_dir, data_dir, device, params=params,
                               trust_remote_code=trust_remote_code)
            for engine in ENGINES}


def run_planned_parity(planned: dict, on_job: Callable | None = None) -> ParityRecord:
    """Runs `parity_plans`' two benches and compares them (the CLI plans first, so that bad
    input is its one-line error before any progress display starts)."""
    from .bench import run_bench

    plans = {engine: run_bench(plan, on_job=on_job) for engine, plan in planned.items()}
    ref, up = plans["reference"], plans["upstream"]
    notes = []
    try:
        ids = block_ids(ref)
    except (OSError, ValueError) as e:  # WikiText-2 not at hand (the hub offline, a slice missing)
        ids = None
        notes.append(f"no block output error: WikiText-2's test text could not be read ({str(e).splitlines()[0][:200]})")
    figures = compare_artifacts(ref.runs["compress"].run_dir / "model", up.runs["compress"].run_dir / "model", Path(ref.model.path),
                                ids=ids, notes=notes)
    sides = {}
    for engine, plan in plans.items():
        comp = plan.runs["compress"].result
        c = comp.metrics.get("compression", {})
        sides[engine] = EngineSide(compress_job=comp.job_hash, compress_s=comp.compress_s,
                                   compress_peak_gpu_bytes=comp.metrics.get("track3", {}).get("compress_peak_gpu_bytes"),
                                   wikitext2_ppl=_ppl(plan.runs.get("compressed eval")),
                                   measured_sparsity=c.get("measured_sparsity"), weight_bits=c.get("weight_bits", 16),
                                   upstream_reported=comp.metrics.get("upstream", {}).get("reported", {}),
                                   device=plan.device, gpu_name=comp.environment.gpu_name,
                                   upstream_commit=comp.provenance.upstream_commit)
    settings = ref.method.parity
    if settings.params:
        notes.append(f"both engines ran with {', '.join(f'{k}={v}' for k, v in settings.params.items())}"
                     + (f": {settings.why}" if settings.why else ""))
    if figures["shapes_agree"] < 1:
        notes.append(f"{1 - figures['shapes_agree']:.0%} of the block linears have different shapes (structured pruning chose "
                     "other heads/channels); elementwise figures cover the rest")
    digests = {e: _examples_digest(plans[e].runs["compress"].run_dir / "model") for e in ENGINES}
    if all(digests.values()):
        notes.append("both engines computed their importance on the same example tokens (sha256 "
                     f"{digests['reference'][:16]}...)" if digests["reference"] == digests["upstream"] else
                     f"the engines' importance examples differ (sha256 {digests['reference'][:16]}... vs "
                     f"{digests['upstream'][:16]}...): their choices differ by the data as well as by the algorithm")
    folded = folded_scales_note(ref.runs["compress"].run_dir / "model", up.runs["compress"].run_dir / "model")
    if folded:
        notes.append(folded)
    upstream_run = up.runs["compress"].result.metrics.get("upstream", {})
    if upstream_run.get("cuda_mapped_to_cpu"):
        notes.append("upstream ran on the CPU: the shim mapped its hard-coded CUDA calls to the CPU (methods/_upstream/shim.py)"
                     + ("; its fp16 ran as fp32 (the upstream stacks' CPU builds have no fast fp16 matmul)" if upstream_run.get("fp16_as_fp32_on_cpu") else ""))
    if sides["upstream"].upstream_reported:
        own_text = upstream_run.get("own_eval_text") or {}
        notes.append("upstream_reported: what upstream printed about its own artifact (its evaluation settings, not ours)"
                     + (f"; on WikiText-2's first {own_text['rows']} of {own_text['rows_total']} test rows ({own_text['tokens']} "
                        f"tokens; {own_text['why']})" if own_text.get("cut") else ""))
    record = ParityRecord(method=ref.method.name, preset=ref.preset, model=ref.model.name,
                          dense_wikitext2_ppl=_ppl(ref.runs.get("dense eval")), engines=sides, notes=notes, **figures)
    out = Path(ref.runs_dir) / "parity" / f"{ref.cell}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_record(out, record)
    return record
