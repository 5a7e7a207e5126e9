"""SmoothQuant, the upstream engine: mit-han-lab/smoothquant at the pinned commit, unmodified.

    python examples/generate_act_scales.py --model-name {model} --output-path {work}/act_scales.pt \
        --num-samples N --seq-len L --dataset-path {calibration}
    python smoothquant/ppl_eval.py --alpha A --model_path {model} --act_scales_path {work}/act_scales.pt \
        --smooth --quantize

- Calibration: upstream reads the Pile validation file (`load_dataset("json", data_files=...)`,
  shuffled with seed 42, first N documents truncated to L tokens); the harness passes the job's
  staged calibration documents (C4) instead, recorded in the notes. Timed: `get_act_scales`.
- `ppl_eval.py` smooths (`smooth_lm`, alpha) and fake-quantizes (`quantize_model`: W8A8Linear,
  per-channel symmetric INT8 weights, dynamic per-token INT8 activations, also on the q/k/v
  outputs), evaluates WikiText-2 on "cuda" in bfloat16, and never saves: the shim saves the
  model `quantize_model` returns. W8A8Linear keeps its weight under nn.Linear's key names, so
  the saved directory is a plain LLaMA checkpoint with smoothed, INT8-grid weights; the
  activation quantization is not in it and is declared in compression.json (our eval applies it).
- Upstream's quantizers are hard-coded to 8 bits and per-token activations: the W4A4 preset
  (and per-tensor activations) cannot be expressed upstream and is refused (`unsupported`).
- Upstream prints `Perplexity: <x>` (WikiText-2, 2048-token windows, bfloat16).
"""

from __future__ import annotations

from llmcbench.driver.contract import Compression

from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext, switch
from .._upstream.convert import hf_dir_from_upstream, quantized_layers
from .reference import SmoothQuantSettings


# The model_types (config.json) this adapter runs: of the registry's architectures, those
# smooth_lm has a branch for (none for ChatGLM). The model registry refuses the others up front
# (driver/model_registry.py `supports`).
SUPPORTED_ARCHS = {"llama", "opt"}


def settings_for(params: dict, arch: str | None = None) -> SmoothQuantSettings:
    s = SmoothQuantSettings.from_params(params, arch)
    if (s.weight_bits, s.act_bits) != (8, 8) or s.act_granularity != "per_token":
        raise NotImplementedError(
            f"smoothquant upstream quantizes W8A8 with per-token activations only (fake_quant.py hard-codes n_bits=8 and "
            f"quantize_model(act_quant='per_token')); W{s.weight_bits}A{s.act_bits} {s.act_granularity} runs on the "
            "reference engine")
    return s


class SmoothQuantUpstream(UpstreamAdapter):
    method = "smoothquant"
    metric_patterns = (r"^(?P<key>Perplexity): (?P<value>[0-9.eE+-]+|nan|inf)$",)

    def parse_metrics(self, log: str) -> dict[str, float]:
        found = super().parse_metrics(log)
        return {"wikitext2_ppl": found["perplexity_ppl"]} if "perplexity_ppl" in found else {}

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        s = settings_for(ctx.params, ctx.input_config.get("model_type"))
        if ctx.staged.calibration is None:
            raise FileNotFoundError("smoothquant upstream needs a calibration file (the C4 slice under /data) for "
                                    "generate_act_scales.py --dataset-path")
        cal = ctx.calibration
        scales = str(ctx.work / "act_scales.pt")
        return [
            Step("act_scales", "examples/generate_act_scales.py",
                 ["--model-name", str(ctx.model_dir), "--output-path", scales, "--num-samples", str(cal.nsamples),
                  "--seq-len", str(cal.seqlen), "--dataset-path", str(ctx.staged.calibration)],
                 time=["smoothquant.calibration:get_act_scales"]),
            Step("quantize", "smoothquant/ppl_eval.py",
                 ["--alpha", str(s.alpha), "--model_path", str(ctx.model_dir), "--act_scales_path", scales,
                  *switch("--smooth", s.smooth), "--quantize"],
                 time=["smoothquant.smooth:smooth_lm", "smoothquant.fake_quant:quantize_model"],
                 save=[{"after": "smoothquant.fake_quant:quantize_model", "model": "return", "dir": str(ctx.work / "model")}]),
        ]

    def convert(self, ctx: UpstreamContext) -> Compression:
        s = settings_for(ctx.params, ctx.input_config.get("model_type"))
        model = hf_dir_from_upstream(ctx.work / "model", ctx.input_model, ctx.model_out)
        layers = quantized_layers(model, 8, None, levels=2 ** 8 - 1, grid="per-channel INT8")  # symmetric abs-max: -127..127
        notes = [f"upstream mit-han-lab/smoothquant: generate_act_scales.py then ppl_eval.py --alpha {s.alpha} "
                 f"{'--smooth ' if s.smooth else ''}--quantize; calibration: the job's {ctx.calibration.dataset} documents "
                 "in place of the Pile validation file",
                 "activation quantization (dynamic per-token INT8, also q/k/v outputs upstream) is not stored: "
                 "applied at evaluation from this declaration (inputs of the linears)"]
        return Compression(method="smoothquant", engine="upstream", weight_bits=8, act_bits=8, symmetric=True,
                           act_granularity="per_token", smoothing_folded=s.smooth, layers=layers, notes=notes)


ADAPTER = SmoothQuantUpstream()
