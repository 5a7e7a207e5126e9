"""OmniQuant, the upstream engine: OpenGVLab/OmniQuant at the pinned commit, unmodified.

    (with LET) python generate_act_scale_shift.py --model {model} --scales-output-path {work}/act_scales/ \
        --shifts-output-path {work}/act_shifts/ --calib_dataset c4 --num-samples N --seq-len L --seed S
    python main.py --model {model} --net <label> --attn_implementation eager --calib_dataset c4 --nsamples N \
        --seed S --batch_size B --epochs E --wbits W --abits A [--group_size G] --lwc [--let] --lwc_lr ..
        --let_lr .. --alpha .. --wd .. [--act-scales .. --act-shifts ..] --output_dir {work}/log
        --cache_dir {work}/cache --save_dir {work}/model --eval_ppl

- `--net` is an argparse choice upstream uses for the model-family dispatch (`"llama" in net`),
  cache names and default paths; a LLaMA-architecture model whose name is not a choice gets
  the label `Llama-2-7b` (recorded in the notes), as the README tells users to pass.
- Calibration: the job's C4 documents (`--calib_dataset c4`; offline the staged slice, whose
  validation split `get_c4` also loads and does not use for calibration). Upstream's seqlen is
  2048 (hard-coded); the act-scale step takes the job's seqlen.
- Timed: `get_act_scales`/`get_act_shifts` of the first step, `quantize.omniquant:omniquant`
  (block-wise LWC/LET training) of the second.
- Output: `--save_dir` is `save_pretrained` of the model with LET folded and weights
  fake-quantized in place (the LWC/LET parameters are deleted first) plus the tokenizer; the
  activation quantization is not in it: compression.json declares act_bits and per-token
  granularity, which our evaluation applies. The directory is written before upstream's
  WikiText-2/C4 evaluation (`--eval_ppl`), which offline stops at C4 (not staged).
- `pdb.set_trace()` on a NaN loss (quantize/omniquant.py) fails the job (the shim).
- LET presets on a model with grouped-query attention (SmolLM2, LLaMA-3) are refused up front:
  upstream's LET folds assume as many KV heads as query heads (`check_let_attention`).
- Upstream logs `wikitext2 : <ppl>` and `c4 : <ppl>`.
- No packed export: `--real_quant` (AutoGPTQ's QuantLinear, W2/3/4 weight-only: not the paper
  preset's W8A8) needs auto_gptq, which the image does not install, so track 4 sizes and
  measures an upstream artifact as its fake-quantized checkpoint, where the reference engine's
  GPTQ export is counted.
"""

from __future__ import annotations

import json

from llmcbench.driver.contract import Compression

from .._engine.blockwise import UnsupportedModelError
from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext, switch
from .._upstream.convert import hf_dir_from_upstream, quantized_layers
from .reference import OmniQuantSettings

NET_CHOICES = ("opt-125m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "llama-7b", "llama-13b",
               "llama-30b", "llama-65b", "Llama-2-7b", "Llama-2-13b", "Llama-2-70b", "Llama-2-7b-chat", "Llama-2-13b-chat",
               "falcon-180b", "falcon-7b", "mixtral-8x7b")
FAMILY_LABEL = {"llama": "Llama-2-7b", "opt": "opt-1.3b", "falcon": "falcon-7b", "mixtral": "mixtral-8x7b"}
# The model_types (config.json) this adapter runs: main.py's --net dispatch: OPT, LLaMA, Falcon,
# Mixtral. The model registry refuses the others up front (driver/model_registry.py `supports`).
SUPPORTED_ARCHS = set(FAMILY_LABEL)


def net_label(ctx: UpstreamContext) -> str:
    name = ctx.model_dir.name
    if name in NET_CHOICES:
        return name
    config = ctx.model_dir / "config.json"
    family = json.loads(config.read_text()).get("model_type", "llama") if config.is_file() else "llama"
    if family not in FAMILY_LABEL:
        raise NotImplementedError(f"omniquant upstream supports OPT, LLaMA, Falcon and Mixtral models, not {family}")
    return FAMILY_LABEL[family]


def check_let_attention(ctx: UpstreamContext, s: OmniQuantSettings) -> None:
    """Upstream's LET smooths v_proj into o_proj and q_proj into k_proj channel for channel
    (quantize/utils.py `smooth_and_quant_temporary`): with grouped-query attention those have
    different widths and upstream stops at its first block ("The size of tensor a (64) must
    match the size of tensor b (128)", found running its image). Refused before it starts."""
    if not s.let:
        return
    c = ctx.input_config
    heads, kv_heads = c.get("num_attention_heads"), c.get("num_key_value_heads") or c.get("num_attention_heads")
    if heads and kv_heads != heads:
        raise UnsupportedModelError(
            f"omniquant upstream's LET (--let) folds v_proj into o_proj and q_proj into k_proj channel for channel, which "
            f"needs as many KV heads as query heads; {ctx.input_model.name} has grouped-query attention ({heads} query heads, "
            f"{kv_heads} KV heads): use a preset without LET (w4a16-g128) or --engine reference")


class OmniQuantUpstream(UpstreamAdapter):
    method = "omniquant"
    metric_patterns = (r"(?P<key>wikitext2|c4|ptb) : (?P<value>[0-9.eE+-]+|nan|inf)\s*$",)

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        s = OmniQuantSettings.from_params(ctx.params)
        check_let_attention(ctx, s)
        cal = ctx.calibration
        scales, shifts = ctx.work / "act_scales", ctx.work / "act_shifts"
        basename = ctx.model_dir.name
        steps = []
        if s.let:
            steps.append(Step("act_scales", "generate_act_scale_shift.py",
                              ["--model", str(ctx.model_dir), "--scales-output-path", f"{scales}/",
                               "--shifts-output-path", f"{shifts}/", "--calib_dataset", cal.dataset,
                               "--num-samples", str(cal.nsamples), "--seq-len", str(cal.seqlen), "--seed", str(cal.seed)],
                              time=["__main__:get_act_scales", "__main__:get_act_shifts"], unused_splits=["c4:validation"]))
        argv = ["--model", str(ctx.model_dir), "--net", net_label(ctx), "--attn_implementation", "eager",
                "--calib_dataset", cal.dataset, "--nsamples", str(cal.nsamples), "--seed", str(cal.seed),
                "--batch_size", str(s.batch_size), "--epochs", str(s.epochs), "--wbits", str(s.weight_bits),
                "--abits", str(s.act_bits), *(["--group_size", str(s.group_size)] if s.group_size > 0 else []),
                *switch("--lwc", s.lwc), *switch("--let", s.let), "--lwc_lr", str(s.lwc_lr), "--let_lr", str(s.let_lr),
                "--alpha", str(s.alpha), "--wd", str(s.wd),
                *(["--act-scales", f"{scales}/{basename}.pt", "--act-shifts", f"{shifts}/{basename}.pt"] if s.let else []),
                "--output_dir", str(ctx.work / "log"), "--cache_dir", str(ctx.work / "cache"),
                "--save_dir", str(ctx.work / "model"), "--eval_ppl"]
        steps.append(Step("omniquant", "main.py", argv, time=["quantize.omniquant:omniquant"],
                          unused_splits=["c4:validation", "wikitext:train"], outputs=[str(ctx.work / "model" / "config.json")]))
        return steps

    def convert(self, ctx: UpstreamContext) -> Compression:
        s = OmniQuantSettings.from_params(ctx.params)
        model = hf_dir_from_upstream(ctx.work / "model", ctx.input_model, ctx.model_out)
        layers = quantized_layers(model, s.weight_bits, s.group_size)
        notes = [f"upstream OpenGVLab/OmniQuant main.py --net {net_label(ctx)} --wbits {s.weight_bits} --abits {s.act_bits} "
                 f"group {s.group_size} lwc {s.lwc} let {s.let} epochs {s.epochs}; calibration: {ctx.calibration.dataset}, "
                 "2048-token windows (upstream's seqlen)",
                 "weights: LET folded and fake-quantized by upstream (--save_dir)"
                 + (f"; activations: {s.act_bits}-bit dynamic per-token, not stored, applied at evaluation from this declaration"
                    if s.act_bits < 16 else "")]
        return Compression(method="omniquant", engine="upstream", weight_bits=s.weight_bits, act_bits=s.act_bits,
                           group_size=s.group_size, symmetric=False,
                           act_granularity="per_token" if s.act_bits < 16 else "none", smoothing_folded=s.let,
                           layers=layers, notes=notes)


ADAPTER = OmniQuantUpstream()
