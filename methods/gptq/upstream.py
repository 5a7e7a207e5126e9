"""GPTQ, the upstream engine: IST-DASLab/gptq `llama.py` at the pinned commit, unmodified.

    python llama.py {model} c4 --wbits W [--groupsize G] [--sym] [--act-order] \
        [--true-sequential] [--static-groups] --nsamples N --seed S --percdamp P

- Calibration: `datautils.get_c4` (C4 train shard, random 2048-token windows; upstream's
  `model.seqlen = 2048`); the C4 validation shard it also loads is unused for calibration.
  Offline both are the staged C4 slice.
- Upstream keeps the quantized weights in memory (its `--save` packs 3-bit only), so the
  shim saves after `__main__:llama_sequential` (model = its first argument); that function is
  also the timed step. The WikiText-2 / PTB / C4 evaluation that follows stops at PTB offline.
- Packed weights: upstream's `quantizers` hold one grid per layer (the last group's when
  groups are used), not the grids of every group, so the upstream engine leaves no `packed/`;
  the reference engine's GPTQ export is the packed one. The conversion checks that every
  group of every linear holds at most 2**bits distinct values (a faithful fake-quant).
- Not exposed upstream: `blocksize` (fixed 128 in `GPTQ.fasterquant`); another value is refused.
- Upstream prints the dataset name, `Evaluating ...`, layer indices, then the perplexity.
"""

from __future__ import annotations

from llmcbench.driver.contract import Compression

from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext, switch
from .._upstream.convert import hf_dir_from_upstream, quantized_layers
from .reference import GPTQSettings

# The model_types (config.json) this adapter runs: llama.py, upstream's LLaMA script (opt.py and
# bloom.py are not run). The model registry refuses the others up front (driver/model_registry.py
# `supports`).
SUPPORTED_ARCHS = {"llama"}


UPSTREAM_BITS = (2, 3, 4, 8)


def settings_for(params: dict) -> GPTQSettings:
    s = GPTQSettings.from_params(params)
    if s.weight_bits not in UPSTREAM_BITS:
        raise ValueError(f"gptq upstream: --wbits takes {', '.join(map(str, UPSTREAM_BITS))}, not {s.weight_bits}")
    if s.blocksize != 128:
        raise ValueError(f"gptq upstream: blocksize is fixed at 128 in upstream's fasterquant, not {s.blocksize}")
    return s


class GPTQUpstream(UpstreamAdapter):
    method = "gptq"
    metric_patterns = (r"^(?P<key>wikitext2|ptb-new|c4-new|ptb|c4)\nEvaluating \.\.\.\n(?:\d+\n)*(?P<value>[0-9.eE+-]+|nan|inf)$",)

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        s = settings_for(ctx.params)
        cal = ctx.calibration
        argv = [str(ctx.model_dir), cal.dataset, "--wbits", str(s.weight_bits),
                *(["--groupsize", str(s.group_size)] if s.group_size != -1 else []), *switch("--sym", s.sym),
                *switch("--act-order", s.act_order), *switch("--true-sequential", s.true_sequential),
                *switch("--static-groups", s.static_groups),
                "--nsamples", str(cal.nsamples), "--seed", str(cal.seed), "--percdamp", str(s.percdamp)]
        save = {"after": "__main__:llama_sequential", "arg": 0, "dir": str(ctx.work / "model")}
        return [Step("quantize", "llama.py", argv, time=["__main__:llama_sequential"], save=[save],
                     unused_splits=["c4:validation", "wikitext:train"])]

    def convert(self, ctx: UpstreamContext) -> Compression:
        s = settings_for(ctx.params)
        model = hf_dir_from_upstream(ctx.work / "model", ctx.input_model, ctx.model_out)
        # groups are contiguous columns unless act-order permutes them (without static groups)
        checkable = s.group_size == -1 or s.static_groups or not s.act_order
        layers = quantized_layers(model, s.weight_bits, s.group_size, check=checkable)
        notes = [f"upstream IST-DASLab/gptq llama.py {ctx.calibration.dataset} --wbits {s.weight_bits} groupsize {s.group_size}, "
                 f"{'symmetric' if s.sym else 'asymmetric'}, act-order {s.act_order}, static groups {s.static_groups}, "
                 f"true-sequential {s.true_sequential}; calibration windows of 2048 tokens (upstream's model.seqlen)",
                 "weights stored dequantized (fp16); no packed export: upstream keeps one grid per layer, not per group"]
        return Compression(method="gptq", engine="upstream", weight_bits=s.weight_bits, act_bits=16,
                           group_size=s.group_size, symmetric=s.sym, act_granularity="none", layers=layers, notes=notes)


ADAPTER = GPTQUpstream()
