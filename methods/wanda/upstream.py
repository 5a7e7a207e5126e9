"""Wanda, the upstream engine: locuslab/wanda `main.py` at the pinned commit, unmodified.

    python main.py --model /models/<m> --prune_method wanda --sparsity_ratio 0.5 \
        --sparsity_type unstructured|2:4|4:8 --nsamples N --seed S \
        --save <work>/log --save_model <work>/model --cache_dir <work>/cache

- Calibration: upstream's `lib/data.get_c4` (hard-coded C4, `allenai--c4` config, also
  loads a validation shard it discards). Offline the shim serves both from the staged C4
  slice (`c4:validation` is unused by pruning); `model.seqlen` is upstream's
  `max_position_embeddings`, not the job's seqlen (recorded in the notes).
- Timing: `lib.prune:prune_wanda` (the pruning alone; upstream's load, its sparsity check
  and its WikiText-2 evaluation are outside).
- Output: `--save_model` is an fp16 HF directory with the tokenizer; `--save` has
  `log_wanda.txt`. Upstream prints `wikitext perplexity <x>` (at seqlen
  `max_position_embeddings`, 4096 for LLaMA-2), kept as its own figure.
"""

from __future__ import annotations

from llmcbench.driver.contract import Compression

from .._engine.sparsity import sparsity_declaration
from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext, flag
from .._upstream.convert import hf_dir_from_upstream
from .reference import WandaSettings


# The model_types (config.json) this adapter runs: main.py is upstream's LLaMA script (OPT has its
# own main_opt.py, which this adapter does not run). The model registry refuses the others up
# front (driver/model_registry.py `supports`).
SUPPORTED_ARCHS = {"llama"}


def sparsity_type(settings: WandaSettings) -> str:
    return "unstructured" if settings.pattern == "unstructured" else f"{settings.n}:{settings.m}"


class WandaUpstream(UpstreamAdapter):
    method = "wanda"
    metric_patterns = (r"^(?P<key>wikitext) perplexity (?P<value>[0-9.eE+-]+|nan|inf)",)

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        settings = WandaSettings.from_params(ctx.params)
        cal = ctx.calibration
        argv = ["--model", str(ctx.model_dir), "--prune_method", "wanda",
                "--sparsity_ratio", str(settings.sparsity), "--sparsity_type", sparsity_type(settings),
                *flag("--nsamples", cal.nsamples if cal else None), *flag("--seed", cal.seed if cal else None),
                "--cache_dir", str(ctx.work / "cache"), "--save", str(ctx.work / "log"), "--save_model", str(ctx.work / "model")]
        return [Step("prune", "main.py", argv, time=["lib.prune:prune_wanda"], unused_splits=["c4:validation", "wikitext:train"])]

    def convert(self, ctx: UpstreamContext) -> Compression:
        settings = WandaSettings.from_params(ctx.params)
        model = hf_dir_from_upstream(ctx.work / "model", ctx.input_model, ctx.model_out)
        notes = ["upstream locuslab/wanda main.py --prune_method wanda "
                 f"--sparsity_type {sparsity_type(settings)}; calibration seqlen = the model's max_position_embeddings "
                 "(upstream's model.seqlen), not the job's"]
        return sparsity_declaration(model, "wanda", settings.pattern, settings.n, settings.m, settings.sparsity, notes=notes)


ADAPTER = WandaUpstream()
